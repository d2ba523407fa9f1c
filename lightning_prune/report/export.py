"""Export a model to ONNX or TorchScript as deployed (an eval-mode copy), and check the file computes what it does.

:func:`export_onnx` writes one self-contained ``.onnx`` file (weights inside) with the input named ``images``, the
outputs ``output_0 .. output_{n-1}`` and the batch axis dynamic; the PyTorch output structure (a list of per-level
maps for our detectors, a tuple, or one tensor) is stored in the file's metadata under :data:`OUTPUTS_KEY`, so that
:class:`~lightning_prune.report.onnx_runtime.OnnxModel` returns the same structure. :func:`export_torchscript`
traces. Both run the written file once on the example input and compare it with the model (:func:`check_export`).
No Trainer imports; ONNX needs the ``export`` extra (:func:`require_export_extra`).

Example:
    >>> import tempfile
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.SiLU())
    >>> path = export_onnx(net, torch.rand(1, 3, 32, 32), f"{tempfile.mkdtemp()}/net.onnx")
    >>> check_export(net, path, torch.rand(4, 3, 32, 32)) < 1e-4  # another batch size: the batch axis is dynamic
    True
    >>> net.training  # exported from an eval-mode copy
    True
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import io
import logging
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: ONNX metadata key holding how to rebuild the model's output structure: ``tensor``, ``list`` or ``tuple``.
OUTPUTS_KEY = "lightning_prune.outputs"
#: Name of the exported graph's input.
INPUT_NAME = "images"
#: File suffixes :func:`check_export` runs through ``torch.jit.load``.
TORCHSCRIPT_SUFFIXES = (".pt", ".ts", ".torchscript")
_EXTRA_HINT = "pip install 'lightning_prune[export]'"


def require_export_extra() -> None:
    """Import ``onnx`` and ``onnxruntime``, or raise the ``pip install`` that fixes their absence.

    Raises:
        ModuleNotFoundError: one of them is not installed.

    Example:
        >>> require_export_extra()  # installed here: nothing happens
    """
    for package in ("onnx", "onnxruntime"):
        try:
            importlib.import_module(package)
        except ImportError as err:
            raise ModuleNotFoundError(
                f"Expected the package `{package}` (ONNX export and runtime) to be installed but it is not. "
                f"HINT: `{_EXTRA_HINT}`.",
                name=package,
            ) from err


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | Path,
    *,
    opset: int = 17,
    dynamic_batch: bool = True,
    check: bool = True,
    atol: float = 1e-4,
) -> Path:
    """Write an eval-mode copy of ``model`` to ``path`` as ONNX; the path.

    The model is exported on the CPU from a deep copy: ``model`` itself (its modes, its parameters, its device) is
    not touched. The file holds its weights (no external data file), so :func:`file_size_mb` is its size.

    Args:
        model: a module whose forward takes one image batch and returns a tensor or a list or tuple of tensors.
        example_input: a batch to trace with (its batch size does not matter with ``dynamic_batch``).
        path: the ``.onnx`` file to write (parent folders are created).
        opset: the ONNX operator set.
        dynamic_batch: make the batch axis of the input and of every output dynamic.
        check: run the file in ONNX Runtime on ``example_input`` and compare with the model (:func:`check_export`).
        atol: the tolerance of ``check``, relative to ``max(1, max |output|)`` of each output.

    Raises:
        ValueError: ``opset`` is not an int >= 11, ``atol`` is not > 0, or (``check``) the file computes other outputs.
        TypeError: ``example_input`` is not a tensor, or the model returns something else than tensors.
        ModuleNotFoundError: the ``export`` extra is not installed.

    Example:
        >>> import tempfile
        >>> import onnx
        >>> from lightning_prune.models import build_detector
        >>> model = build_detector("yolov3-tiny", num_classes=2, img_size=64)
        >>> path = export_onnx(model, torch.rand(1, 3, 64, 64), f"{tempfile.mkdtemp()}/yolo.onnx")
        >>> graph = onnx.load(path)
        >>> [i.name for i in graph.graph.input], [o.name for o in graph.graph.output]
        (['images'], ['output_0', 'output_1', 'output_2'])
        >>> {p.key: p.value for p in graph.metadata_props}[OUTPUTS_KEY]
        'list'
    """
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 11:
        raise ValueError(f"Expected argument `opset` to be an int >= 11 but got {opset!r}.")
    _check_atol(atol)
    x = _check_example(example_input)
    require_export_extra()
    import onnx

    net = _eval_copy(model)
    with torch.no_grad():
        outputs, kind = _flatten(net(x))
    names = [f"output_{i}" for i in range(len(outputs))]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet_exporter():
        # The TorchScript-based exporter while torch still ships it (deprecated, and no longer the default since
        # torch 2.9): 0.3 s for a YOLOv8n against 4.2 s with torch.export (dynamo), `dynamic_axes` as they are, the
        # opset asked for (dynamo starts at 18 and converts down), BatchNorm and constants folded; our detectors
        # have no data-dependent control flow that tracing would freeze. Dynamo takes over once the legacy is gone.
        if _legacy_exporter_available():
            kwargs: dict[str, Any] = {"dynamo": False} if _has_dynamo_flag() else {}
            axes = {name: {0: "batch"} for name in [INPUT_NAME, *names]} if dynamic_batch else None
            torch.onnx.export(
                net, (x,), str(path), input_names=[INPUT_NAME], output_names=names, opset_version=opset,
                dynamic_axes=axes, **kwargs,
            )  # fmt: skip
        else:
            shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
            torch.onnx.export(
                net, (x,), str(path), input_names=[INPUT_NAME], output_names=names, opset_version=opset,
                dynamo=True, external_data=False, dynamic_shapes=shapes,
            )  # fmt: skip
    graph = onnx.load(str(path))
    del graph.metadata_props[:]  # a re-export overwrites: one key, ours
    graph.metadata_props.add(key=OUTPUTS_KEY, value=kind)
    onnx.save(graph, str(path))
    if check:
        _compare(outputs, _run_file(path, x), path, atol)
    return path


def export_torchscript(
    model: nn.Module, example_input: torch.Tensor, path: str | Path, *, check: bool = True, atol: float = 1e-4
) -> Path:
    """Trace an eval-mode copy of ``model`` with ``torch.jit.trace`` and save it to ``path``; the path.

    ``model`` is not touched. The trace records the operations run on ``example_input``: data-dependent control
    flow is frozen (none in our detectors), and the output list keeps its length.

    Args:
        model: a module whose forward takes one image batch and returns a tensor or a list or tuple of tensors.
        example_input: a batch to trace with.
        path: the file to write (``.pt``, ``.ts`` or ``.torchscript`` for :func:`check_export`).
        check: reload the file with ``torch.jit.load``, run it on ``example_input`` and compare with the model.
        atol: the tolerance of ``check``, relative to ``max(1, max |output|)`` of each output.

    Raises:
        ValueError: ``atol`` is not > 0, or (``check``) the file computes other outputs.
        TypeError: ``example_input`` is not a tensor, or the model returns something else than tensors.

    Example:
        >>> import tempfile
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
        >>> path = export_torchscript(net, torch.rand(1, 3, 16, 16), f"{tempfile.mkdtemp()}/net.pt")
        >>> torch.jit.load(path)(torch.rand(2, 3, 16, 16)).shape
        torch.Size([2, 8, 14, 14])
    """
    _check_atol(atol)
    x = _check_example(example_input)
    net = _eval_copy(model)
    with torch.no_grad():
        outputs, _ = _flatten(net(x))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for m in net.modules():
        if hasattr(m, "_jit_is_scripting"):  # a LightningModule: its `trainer` property raises while traced unless
            object.__setattr__(m, "_jit_is_scripting", True)  # this is set, as its `to_torchscript` does (our copy)
    with _quiet_exporter(), torch.no_grad():
        # strict=False: a list output is fine when its length does not depend on the input (one map per level)
        traced = torch.jit.trace(net, (x,), strict=False, check_trace=False)  # `check` compares the saved file
        torch.jit.save(traced, str(path))
    if check:
        _compare(outputs, _run_file(path, x), path, atol)
    return path


def check_export(model: nn.Module, path: str | Path, example_input: torch.Tensor, atol: float = 1e-4) -> float:
    """Largest absolute difference between the outputs of ``model`` (in eval mode) and of its exported file.

    The file is run by its suffix: ``.onnx`` in ONNX Runtime on the CPU, ``.pt``/``.ts``/``.torchscript`` with
    ``torch.jit.load``. ``model`` is not touched (an eval-mode copy runs).

    Args:
        model: the model the file was exported from.
        path: the exported file.
        example_input: the batch to compare on.
        atol: the largest difference allowed, relative to ``max(1, max |output|)`` of each output.

    Raises:
        ValueError: an unknown suffix, ``atol`` not > 0, or a difference above ``atol``.
        FileNotFoundError: ``path`` does not exist.
        ModuleNotFoundError: an ``.onnx`` file without the ``export`` extra.

    Example:
        >>> import tempfile
        >>> from torch import nn
        >>> net = nn.Linear(4, 2)
        >>> path = export_torchscript(net, torch.rand(3, 4), f"{tempfile.mkdtemp()}/linear.ts")
        >>> check_export(net, path, torch.rand(5, 4))
        0.0
    """
    _check_atol(atol)
    path = Path(path)
    if path.suffix not in (".onnx", *TORCHSCRIPT_SUFFIXES):
        raise ValueError(
            f"Expected argument `path` to end with one of {['.onnx', *TORCHSCRIPT_SUFFIXES]} but got {str(path)!r}."
        )
    if not path.is_file():
        raise FileNotFoundError(f"Expected argument `path` to be an existing file but got {str(path)!r}.")
    x = _check_example(example_input)
    with torch.no_grad():
        outputs, _ = _flatten(_eval_copy(model)(x))
    return _compare(outputs, _run_file(path, x), path, atol)


def file_size_mb(path: str | Path) -> float:
    """Size of the file at ``path`` in MB (bytes / 1e6).

    Raises:
        FileNotFoundError: ``path`` is not a file.

    Example:
        >>> import tempfile
        >>> file = Path(tempfile.mkdtemp()) / "blob.bin"
        >>> _ = file.write_bytes(bytes(2_500_000))
        >>> file_size_mb(file)
        2.5
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Expected argument `path` to be an existing file but got {str(path)!r}.")
    return path.stat().st_size / 1e6


def restore_outputs(tensors: Sequence[torch.Tensor], kind: str | None) -> Any:
    """Rebuild the output structure :func:`export_onnx` recorded (``None``: one tensor alone, several as a list).

    Raises:
        ValueError: an unknown ``kind``, or ``tensor`` with several tensors.

    Example:
        >>> restore_outputs([torch.zeros(1)], "tensor").shape, type(restore_outputs([torch.zeros(1)], "tuple"))
        (torch.Size([1]), <class 'tuple'>)
        >>> type(restore_outputs([torch.zeros(1), torch.zeros(2)], None))  # a file written elsewhere
        <class 'list'>
    """
    if kind is None:
        kind = "tensor" if len(tensors) == 1 else "list"
    if kind == "tensor" and len(tensors) == 1:
        return tensors[0]
    if kind in ("list", "tuple"):
        return list(tensors) if kind == "list" else tuple(tensors)
    raise ValueError(
        f"Expected the output structure to be 'list', 'tuple' or 'tensor' (with one output) but got {kind!r} "
        f"with {len(tensors)} outputs."
    )


# ---------------------------------------------------------------------- helpers
def _flatten(output: Any) -> tuple[list[torch.Tensor], str]:
    if isinstance(output, torch.Tensor):
        return [output], "tensor"
    if isinstance(output, (list, tuple)) and output and all(isinstance(t, torch.Tensor) for t in output):
        return list(output), "list" if isinstance(output, list) else "tuple"
    kinds = type(output).__name__ if not isinstance(output, (list, tuple)) else [type(t).__name__ for t in output]
    raise TypeError(f"Expected the model to return a tensor or a list or tuple of tensors but got {kinds}.")


def _check_atol(atol: float) -> None:
    if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not atol > 0:
        raise ValueError(f"Expected argument `atol` to be a float > 0 but got {atol!r}.")


def _check_example(example_input: Any) -> torch.Tensor:
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(
            f"Expected argument `example_input` to be a tensor (an image batch) but got {type(example_input).__name__}."
        )
    return example_input.detach().cpu()


def _eval_copy(model: nn.Module) -> nn.Module:
    # a LightningModule drops its trainer when copied (its __getstate__)
    return copy.deepcopy(model).cpu().eval()


def _legacy_exporter_available() -> bool:
    """Whether this torch still ships the TorchScript-based ONNX exporter (``torch.onnx.utils.export``)."""
    try:
        return hasattr(importlib.import_module("torch.onnx.utils"), "export")
    except ImportError:
        return False


def _has_dynamo_flag() -> bool:
    return "dynamo" in inspect.signature(torch.onnx.export).parameters  # torch >= 2.5: legacy is `dynamo=False`


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporters for one call: deprecation notices, tracer warnings, progress prints and log lines.

    What they printed is shown if the export fails.
    """
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]  # dynamo's opset notes
    levels = [logger.level for logger in loggers]
    printed = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(printed):
            for category in (DeprecationWarning, FutureWarning, UserWarning, torch.jit.TracerWarning):
                warnings.simplefilter("ignore", category)
            for logger in loggers:
                logger.setLevel(logging.ERROR)
            yield
    except BaseException:
        sys.stdout.write(printed.getvalue())
        raise
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _run_file(path: Path, x: torch.Tensor) -> list[torch.Tensor]:
    if path.suffix == ".onnx":
        from lightning_prune.report.onnx_runtime import OnnxModel

        outputs, _ = _flatten(OnnxModel(path, threads=torch.get_num_threads())(x))
        return outputs
    with _quiet_exporter(), torch.no_grad():  # torch.jit is deprecated (for torch.export): quiet
        outputs, _ = _flatten(torch.jit.load(str(path), map_location="cpu")(x))
    return outputs


def _compare(reference: list[torch.Tensor], exported: list[torch.Tensor], path: Path, atol: float) -> float:
    if len(reference) != len(exported) or any(r.shape != e.shape for r, e in zip(reference, exported)):
        raise ValueError(
            f"Expected the exported model {str(path)!r} to return outputs of shapes "
            f"{[tuple(r.shape) for r in reference]} but got {[tuple(e.shape) for e in exported]}."
        )
    worst = 0.0
    for i, (r, e) in enumerate(zip(reference, exported)):
        if not r.numel():
            continue
        diff = float((r.float() - e.float()).abs().max())
        worst = max(worst, diff)
        scale = max(1.0, float(r.abs().max()))
        if not diff <= atol * scale:  # also catches NaN
            raise ValueError(
                f"Expected the exported model {str(path)!r} to compute the PyTorch outputs within atol={atol} "
                f"(relative to max(1, max |output|) = {scale:.4g}) but output {i} differs by up to {diff:.4g}."
            )
    return worst
