"""The compression report: a model and its compressed versions measured side by side in one run (no Trainer imports).

Rows are models (the original, the compressed model, and its INT8 ONNX version when asked for); columns are what a
pruning paper's table shows: parameters, MACs, size on disk, latency per runtime and batch size, and mAP. Every
number of a column is measured in the same run, the same way, on the same machine: latencies are medians of rounds
in which every model runs once in turn (so that a shared machine's drifts hit all alike).

- **size (MB)**: the PyTorch weights as saved (``torch.save(state_dict)``); for ONNX rows, the ``.onnx`` file.
- **latency (ms)**: ``cpu`` = PyTorch eager on the CPU with BatchNorm fused (as deployed); ``ort`` = ONNX Runtime
  on the CPU (``export`` extra); ``cuda`` = PyTorch eager on the GPU when there is one. At each batch size asked.
- **mAP50 / mAP50-95**: :func:`~lightning_prune.report.evaluate.evaluate_map` over the given validation data, with
  the compressed model's decoding and NMS for every row (the INT8 row through ONNX Runtime).
- **fidelity** (in the summary): latency speedup ÷ MACs reduction, 1.0 when time falls as fast as MACs.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_prune.pruning.tracing import restored
from lightning_prune.report.evaluate import Postprocess, evaluate_map
from lightning_prune.report.latency import latency_ms
from lightning_prune.report.summary import model_stats

RUNTIMES = ("cpu", "ort", "cuda")
_RUNTIME_LABELS = {"cpu": "CPU", "ort": "ORT", "cuda": "CUDA"}


def compression_report(
    models: Mapping[str, nn.Module],
    example_input: torch.Tensor,
    *,
    dataloader: Iterable[Any] | None = None,
    postprocess: Postprocess | None = None,
    out_dir: str | Path | None = None,
    batch_sizes: Sequence[int] = (1, 8),
    runtimes: Sequence[str] | None = None,
    int8: bool = False,
    calibration: Iterable[torch.Tensor] | None = None,
    calibration_method: str = "entropy",
    warmup: int = 3,
    repeats: int = 20,
    limit_val_batches: int | None = None,
) -> list[dict[str, Any]]:
    """Measure ``models`` (the original first, the most compressed last) side by side, one row each.

    No model is modified: latencies are taken on eval-mode (fused) copies, ONNX files are exported from copies.

    Args:
        models: ``{row name: model}`` in table order, with the same input and output layout; the first row is the
            reference of the summary lines.
        example_input: one input (1, 3, S, S): its resolution is what is measured; batches of ``batch_sizes`` are
            made from random images of that size.
        dataloader: validation batches ``(images, targets)`` for mAP; ``None``: no mAP columns.
        postprocess: the raw output's decoding and NMS; default the last model's ``postprocess`` (our detectors).
        out_dir: where the ONNX files go (``<name>.onnx``, ``<name>.int8.onnx``); needed for ``ort`` and ``int8``.
        batch_sizes: the batch sizes timed.
        runtimes: among ``cpu``, ``ort``, ``cuda``; default ``cpu``, plus ``ort`` when the ``export`` extra is
            installed and ``out_dir`` is given, plus ``cuda`` when a GPU is present.
        int8: add a row ``"<last name> INT8"``: the last model quantized by ONNX Runtime (static, QDQ).
        calibration: image batches for the INT8 calibration (required with ``int8``).
        calibration_method: ``entropy`` (KL divergence), ``minmax`` or ``percentile``.
        warmup: untimed rounds per latency measurement.
        repeats: timed rounds per latency measurement.
        limit_val_batches: evaluate mAP on the first batches only.

    Returns:
        One dict per row: ``name``, ``format`` (``pytorch`` / ``onnx-int8``), ``params``, ``macs``, ``size_mb``,
        ``onnx_mb`` and ``onnx_file`` (the exported file's size and path; ``None`` without ONNX), ``latency_ms``
        (``{"cpu_b1": ..., "ort_b8": ...}``; absent keys were not measured for that row), ``mAP`` and ``mAP50``
        (``None`` without data).

    Raises:
        ValueError: no model, an unknown runtime, a batch size < 1, ``int8`` without ``calibration``, ``ort``/``int8``
            without ``out_dir``, ``cuda`` without a GPU, or no ``postprocess`` for the mAP.
        ModuleNotFoundError: ``ort``/``int8`` without the ``export`` extra.
    """
    if not models:
        raise ValueError("Expected argument `models` to map row names to models but got an empty mapping.")
    runtimes = _resolve_runtimes(runtimes, out_dir)
    sizes = check_batch_sizes(batch_sizes)
    if (int8 or "ort" in runtimes) and out_dir is None:
        raise ValueError("Expected argument `out_dir` to be set for ONNX Runtime latency and INT8 but got None.")
    if int8 and calibration is None:
        raise ValueError("Expected argument `calibration` to be image batches for `int8=True` but got None.")
    last_name, last = list(models.items())[-1]
    if dataloader is not None and postprocess is None:
        postprocess = getattr(last, "postprocess", None)
        if postprocess is None:
            raise ValueError(
                f"Expected argument `postprocess` to decode {type(last).__name__}'s raw output for the mAP but "
                "got None (and the model has no `postprocess` method)."
            )
    if int8 or "ort" in runtimes:
        from lightning_prune.report.export import require_export_extra

        require_export_extra()

    example = example_input[:1]
    rows: list[dict[str, Any]] = [
        {
            "name": name,
            "format": "pytorch",
            **model_stats(model, example),
            "size_mb": _saved_mb(model),
            "onnx_mb": None,
            "onnx_file": None,
            "latency_ms": {},
            "mAP": None,
            "mAP50": None,
        }
        for name, model in models.items()
    ]
    onnx_paths: list[Path] = []  # one per row once exported; the INT8 file last
    if out_dir is not None and (int8 or "ort" in runtimes):
        from lightning_prune.report.export import export_onnx, file_size_mb

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        exported = models if "ort" in runtimes else {last_name: last}
        for name, model in exported.items():
            path = export_onnx(model, example, out / f"{_slug(name)}.onnx")
            rows[list(models).index(name)].update(onnx_mb=file_size_mb(path), onnx_file=str(path))
            onnx_paths.append(path)
    if int8:
        from lightning_prune.report.export import file_size_mb
        from lightning_prune.report.quantize import quantize_onnx

        assert calibration is not None
        int8_path = quantize_onnx(
            onnx_paths[-1], onnx_paths[-1].with_suffix(".int8.onnx"), calibration, method=calibration_method
        )
        size = file_size_mb(int8_path)
        rows.append(
            {
                **rows[-1],
                "name": f"{last_name} INT8",
                "format": "onnx-int8",
                "size_mb": size,
                "onnx_mb": size,
                "onnx_file": str(int8_path),
                "latency_ms": {},
            }
        )
        onnx_paths.append(int8_path)

    generator = torch.Generator().manual_seed(0)
    inputs = {b: torch.rand(b, *example.shape[1:], generator=generator) for b in sizes}
    timed_onnx = onnx_paths if "ort" in runtimes else onnx_paths[-1:] if int8 else []
    for b, batch in inputs.items():
        if "cpu" in runtimes:
            for row, ms in zip(rows, latency_ms(list(models.values()), batch, warmup=warmup, repeats=repeats)):
                row["latency_ms"][f"cpu_b{b}"] = ms
        if "cuda" in runtimes:
            cuda_ms = latency_ms(list(models.values()), batch.cuda(), warmup=warmup, repeats=repeats)
            for row, ms in zip(rows, cuda_ms):
                row["latency_ms"][f"cuda_b{b}"] = ms
        if timed_onnx:
            from lightning_prune.report.onnx_runtime import onnx_latency_ms

            ort_ms = onnx_latency_ms(timed_onnx, batch, warmup=warmup, repeats=repeats)
            for row, ms in zip(rows[-len(timed_onnx) :], ort_ms):
                row["latency_ms"][f"ort_b{b}"] = ms

    if dataloader is not None:
        assert postprocess is not None
        for row, model in zip(rows, models.values()):
            row.update(_evaluate(_in_eval_mode(model), postprocess, dataloader, limit_val_batches))
        if int8:
            from lightning_prune.report.onnx_runtime import OnnxModel

            rows[-1].update(_evaluate(OnnxModel(onnx_paths[-1]), postprocess, dataloader, limit_val_batches))
    return rows


def format_report(rows: list[dict[str, Any]], input_shape: Sequence[int] | None = None) -> str:
    """The rows of :func:`compression_report` as a markdown table, followed by a summary of each row vs the first.

    Example:
        >>> rows = [
        ...     {"name": "Original", "params": 2e6, "macs": 4e9, "size_mb": 8.0, "onnx_mb": None,
        ...      "latency_ms": {"cpu_b1": 10.0}, "mAP": 0.5, "mAP50": 0.7},
        ...     {"name": "Pruned", "params": 1e6, "macs": 2e9, "size_mb": 4.0, "onnx_mb": None,
        ...      "latency_ms": {"cpu_b1": 5.5}, "mAP": 0.49, "mAP50": 0.7},
        ... ]
        >>> print(format_report(rows))
        | model | params | MACs | size (MB) | CPU b1 (ms) | mAP50 | mAP50-95 |
        | --- | ---: | ---: | ---: | ---: | ---: | ---: |
        | Original | 2.000M | 4.000G | 8.00 | 10.0 | 0.7000 | 0.5000 |
        | Pruned | 1.000M | 2.000G | 4.00 | 5.5 | 0.7000 | 0.4900 |
        <BLANKLINE>
        Pruned vs Original: params −50.0%, MACs −50.0% (÷2.00), size ×0.50, CPU b1 ×1.82 (fidelity 0.91), mAP50-95 −1.00
    """
    keys = _latency_keys(rows)
    has_onnx = any(r.get("onnx_mb") is not None for r in rows)
    header = ["model", "params", "MACs", "size (MB)"] + (["ONNX (MB)"] if has_onnx else [])
    header += [_latency_label(k) for k in keys] + ["mAP50", "mAP50-95"]
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for r in rows:
        cells = [r["name"], f"{r['params'] / 1e6:.3f}M", f"{r['macs'] / 1e9:.3f}G", f"{r['size_mb']:.2f}"]
        if has_onnx:
            cells.append("—" if r.get("onnx_mb") is None else f"{r['onnx_mb']:.2f}")
        cells += [_ms(r["latency_ms"].get(k)) for k in keys]
        cells += [_score(r.get("mAP50")), _score(r.get("mAP"))]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [_summary(r, rows[0], keys) for r in rows[1:]]
    fp32 = {r["name"]: r for r in rows if r.get("format", "pytorch") == "pytorch"}
    for r in rows:
        source = fp32.get(r["name"].removesuffix(" INT8"))
        if r.get("format") == "onnx-int8" and source is not None and source is not rows[0]:
            lines.append(_summary(r, {**source, "size_mb": source.get("onnx_mb") or source["size_mb"]}, keys))
    if input_shape is not None:
        lines.append(
            f"Input {'×'.join(str(int(d)) for d in input_shape[1:])} (batch as in each column), "
            f"{torch.get_num_threads()} CPU threads; CPU = PyTorch eager with BatchNorm fused, ORT = ONNX Runtime."
        )
    return "\n".join(lines)


def write_report(
    rows: list[dict[str, Any]],
    out_dir: str | Path,
    input_shape: Sequence[int] | None = None,
    stem: str = "compression_report",
) -> tuple[Path, Path]:
    """Write ``<stem>.md`` (:func:`format_report`) and ``<stem>.json`` (the rows) into ``out_dir``; their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / f"{stem}.md", out / f"{stem}.json"
    md.write_text(format_report(rows, input_shape) + "\n")
    js.write_text(json.dumps({"input_shape": list(input_shape) if input_shape else None, "rows": rows}, indent=2))
    return md, js


def report_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Flat scalars for a logger: ``report/<row>/<column>`` (``report/compressed/cpu_b1_ms``, ...)."""
    out: dict[str, float] = {}
    for r in rows:
        prefix = f"report/{_slug(r['name'])}"
        for key in ("params", "macs", "size_mb", "onnx_mb", "mAP", "mAP50"):
            if r.get(key) is not None:
                out[f"{prefix}/{key}"] = float(r[key])
        out.update({f"{prefix}/{k}_ms": float(v) for k, v in r["latency_ms"].items()})
    return out


# ---------------------------------------------------------------------------------------------- helpers
def _resolve_runtimes(runtimes: Sequence[str] | None, out_dir: Any) -> list[str]:
    if runtimes is None:
        import importlib.util

        chosen = ["cpu"]
        if out_dir is not None and all(importlib.util.find_spec(p) for p in ("onnx", "onnxruntime")):
            chosen.append("ort")
        if torch.cuda.is_available():
            chosen.append("cuda")
        return chosen
    runtimes = list(runtimes)
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown or not runtimes:
        raise ValueError(
            f"Expected argument `runtimes` to be a non-empty list among {list(RUNTIMES)} but got {runtimes!r}."
        )
    if "cuda" in runtimes and not torch.cuda.is_available():
        raise ValueError("Expected a CUDA device for `runtimes` with 'cuda' but torch sees none.")
    return runtimes


def check_batch_sizes(batch_sizes: Sequence[int]) -> list[int]:
    """``batch_sizes`` as a list: non-empty, ints >= 1 (else the ``ValueError`` naming the argument)."""
    sizes = list(batch_sizes)
    if not sizes or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in sizes):
        raise ValueError(
            f"Expected argument `batch_sizes` to be a non-empty list of ints >= 1 but got {batch_sizes!r}."
        )
    return sizes


def _saved_mb(model: nn.Module) -> float:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes / 1e6


def _in_eval_mode(model: nn.Module) -> Any:
    """Run ``model`` in eval mode, every submodule's mode given back after each call."""

    def forward(images: torch.Tensor) -> Any:
        with restored(model, keep_grads=True):
            return model.eval()(images)

    return forward


def _evaluate(forward: Any, postprocess: Postprocess, dataloader: Iterable[Any], limit: int | None) -> dict[str, Any]:
    result = evaluate_map(forward, postprocess, dataloader, limit_batches=limit)
    return {"mAP": result["mAP"], "mAP50": result["mAP50"]}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_") or "model"


def _latency_keys(rows: list[dict[str, Any]]) -> list[str]:
    keys = {k for r in rows for k in r["latency_ms"]}
    return sorted(keys, key=lambda k: (RUNTIMES.index(k.split("_b")[0]), int(k.split("_b")[1])))


def _latency_label(key: str) -> str:
    runtime, batch = key.split("_b")
    return f"{_RUNTIME_LABELS[runtime]} b{batch} (ms)"


def _signed(value: float, spec: str) -> str:
    """``value`` with an explicit sign, the minus as U+2212 (as the tables in papers print it)."""
    return format(value, "+" + spec).replace("-", "−")


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _score(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _summary(row: dict[str, Any], base: dict[str, Any], keys: list[str]) -> str:
    """``row`` against ``base``: relative size, latency speedups per column (with fidelity), mAP difference."""
    reduction = base["macs"] / row["macs"] if row["macs"] else math.inf
    parts = [
        f"params {_signed(row['params'] / base['params'] - 1, '.1%')}",
        f"MACs {_signed(row['macs'] / base['macs'] - 1, '.1%')} (÷{reduction:.2f})",
        f"size ×{row['size_mb'] / base['size_mb']:.2f}",
    ]
    for k in keys:
        mine, theirs = row["latency_ms"].get(k), base["latency_ms"].get(k)
        if mine is None or theirs is None:  # not measured for one of the two (the INT8 row has ORT columns only)
            continue
        speedup = theirs / mine
        fidelity = f" (fidelity {speedup / reduction:.2f})" if reduction > 1.0001 else ""
        parts.append(f"{_latency_label(k).removesuffix(' (ms)')} ×{speedup:.2f}{fidelity}")
    if row.get("mAP") is not None and base.get("mAP") is not None:
        parts.append(f"mAP50-95 {_signed(100 * (row['mAP'] - base['mAP']), '.2f')}")
    return f"{row['name']} vs {base['name']}: " + ", ".join(parts)
