"""lightning_prune: structured pruning, network slimming and distillation for detectors in PyTorch Lightning."""

from lightning_prune.__about__ import __version__

__all__ = ["__version__"]
