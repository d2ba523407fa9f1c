"""Package metadata, read by ``setup.cfg`` (``version = attr: ...``)."""

__version__ = "0.1.0"
