"""Run exported ONNX files in ONNX Runtime on the CPU as if they were the PyTorch modules, and time them.

:class:`OnnxModel` takes and returns torch tensors, in the structure the exported module returned (the list of
per-level maps of our detectors), so ``model.postprocess(OnnxModel(path)(images))`` decodes exactly as the PyTorch
model's output would be. :func:`onnx_latency_ms` is :func:`~lightning_prune.report.latency_ms` for ONNX files.
No Trainer imports; needs the ``export`` extra.

Example:
    >>> import tempfile
    >>> from torch import nn
    >>> from lightning_prune.report.export import export_onnx
    >>> path = export_onnx(nn.Conv2d(3, 8, 3), torch.rand(1, 3, 16, 16), f"{tempfile.mkdtemp()}/conv.onnx")
    >>> OnnxModel(path)(torch.rand(2, 3, 16, 16)).shape
    torch.Size([2, 8, 14, 14])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_prune.report.export import OUTPUTS_KEY, file_size_mb, require_export_extra, restore_outputs
from lightning_prune.report.latency import check_timing, interleaved_ms


class OnnxModel:
    """An ONNX file behind a torch-like call: ``OnnxModel(path)(images)`` → the outputs as torch tensors.

    One ONNX Runtime CPU session is built at construction and reused by every call. Outputs are returned on the
    input's device, as a list, a tuple or one tensor as :func:`~lightning_prune.report.export.export_onnx` recorded
    (a file exported elsewhere: one tensor, or a list of several).

    The session's threads sleep as soon as a run ends (``session.intra_op.allow_spinning`` 0). ONNX Runtime's default
    keeps them spinning for the next run, which on a shared CPU takes the cores from whatever runs next: with four
    sessions timed in turn on 2 cores (a YOLOv3-tiny at 256 px and its pruned versions), every run took about 3×
    as long with spinning (batch 1: 7.5–11 ms instead of 2.9–3.4 ms; batch 8: 34–44 ms instead of 13–16 ms) and the
    ranking of the models changed from round to round.

    Args:
        path: the ``.onnx`` file.
        threads: ONNX Runtime's intra-op threads; default :func:`torch.get_num_threads` (the same as PyTorch runs
            with, for fair comparisons).

    Attributes:
        path: the file.
        size_mb: its size in MB.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: ``threads`` is not None nor an int >= 1.
        ModuleNotFoundError: the ``export`` extra is not installed.

    Example:
        >>> import tempfile
        >>> from lightning_prune.models import build_detector
        >>> from lightning_prune.report.export import export_onnx
        >>> model = build_detector("yolov8n", num_classes=2, img_size=64)
        >>> onnx_model = OnnxModel(export_onnx(model, torch.rand(1, 3, 64, 64), f"{tempfile.mkdtemp()}/y.onnx"))
        >>> raw = onnx_model(torch.rand(3, 3, 64, 64))
        >>> type(raw).__name__, len(raw), len(model.postprocess(raw))
        ('list', 3, 3)
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        require_export_extra()
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"Expected argument `path` to be an existing ONNX file but got {str(path)!r}.")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"Expected argument `threads` to be None or an int >= 1 but got {threads!r}.")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1  # one image batch at a time: no parallel branches worth a second pool
        options.log_severity_level = 3  # errors only (not the optimizer's notes)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # see the class docstring
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.input_name: str = self.session.get_inputs()[0].name
        self.structure: str | None = self.session.get_modelmeta().custom_metadata_map.get(OUTPUTS_KEY)
        self.size_mb = file_size_mb(self.path)

    def __call__(self, images: torch.Tensor) -> Any:
        arrays = self.session.run(None, {self.input_name: images.detach().cpu().float().numpy()})
        return restore_outputs([torch.from_numpy(a).to(images.device) for a in arrays], self.structure)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {self.size_mb:.2f} MB)"


def onnx_latency_ms(
    paths: Sequence[str | Path],
    example_input: torch.Tensor,
    warmup: int = 3,
    repeats: int = 20,
    threads: int | None = None,
) -> list[float]:
    """Median wall time in ms of one ONNX Runtime run of each file on ``example_input``, measured interleaved.

    As :func:`~lightning_prune.report.latency_ms`: every round times each model once, in turn, so that drifts of a
    shared machine hit all models alike, and the median over rounds is robust to outliers. Sessions are built
    before the first round (not timed); each call includes the (zero-copy) tensor conversions.

    Args:
        paths: the ``.onnx`` files to compare.
        example_input: the input batch (its batch size and resolution are what is measured).
        warmup: untimed rounds first.
        repeats: timed rounds.
        threads: intra-op threads of every session (default :func:`torch.get_num_threads`).

    Raises:
        ValueError: ``warmup < 0`` or ``repeats < 1``.
        FileNotFoundError: a path is not a file.

    Example:
        >>> import tempfile
        >>> from torch import nn
        >>> from lightning_prune.report.export import export_onnx
        >>> folder = tempfile.mkdtemp()
        >>> paths = [export_onnx(nn.Conv2d(3, c, 3), torch.rand(1, 3, 32, 32), f"{folder}/{c}.onnx") for c in (8, 64)]
        >>> ms = onnx_latency_ms(paths, torch.rand(1, 3, 32, 32), warmup=1, repeats=3)
        >>> len(ms), all(t > 0 for t in ms)
        (2, True)
    """
    check_timing(warmup, repeats)
    models = [OnnxModel(p, threads=threads) for p in paths]
    return interleaved_ms(models, example_input.detach().cpu(), warmup, repeats)
