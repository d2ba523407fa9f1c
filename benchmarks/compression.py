"""What a user ships: the compression report of a pruned + distilled detector, with ONNX Runtime and INT8 rows.

Usage: python benchmarks/compression.py [--recipe recipes/shapes/yolov8n.yaml] [--baseline CKPT | --baseline_epochs N]
       [--finetune_epochs 5] [--prune "{allocation: latency}"] [--kd "{loss: fm_nms, weight: 1}"]
       [--calibration_images 64] [--repeats 20] [--latency_runs 3] [--out DIR] [--results benchmarks/RESULTS.md]
       [extra LightningCLI arguments for every stage ...]

1. Trains the recipe's model (or takes ``--baseline``), prunes it one-shot to half its MACs (StructuredPruning,
   ``l2``, ``round_to=8``; ``--prune`` overrides) and finetunes it ``--finetune_epochs`` epochs with distillation
   from the baseline, through ``lightning-prune pipeline``. The distillation is ``benchmarks/distillation.py``'s
   (``distillation.KD``: FM-NMS weight 300 plus CWD on the neck at 30) for YOLOv8 recipes, FM-NMS with weight 1
   otherwise; ``--kd`` replaces it.
2. Measures Baseline / Pruned+KD / Pruned+KD INT8 side by side in one run
   (:func:`lightning_prune.report.compression.compression_report`): params, MACs, size, latency on CPU eager
   (BatchNorm fused) and ONNX Runtime at batch 1 and 8, mAP over the whole validation split (the INT8 model through
   ONNX Runtime, decoded by the same NMS). INT8: ONNX Runtime static quantization, QDQ, entropy calibration on
   ``--calibration_images`` training images, the output convs in float (``quantize_onnx``'s defaults); then each
   calibration method with the output convs in float and in INT8, side by side.

Targets (issue #6): INT8 file <= 0.3 × the fp32 ONNX file; INT8 mAP50-95 >= fp32 - 1.0 point; speedup fidelity
(latency speedup ÷ MACs reduction) >= 0.9 at -50% MACs, batch 1 and 8, CPU eager and ONNX Runtime. On a shared
machine one timing of a pair can be off by 10% (a busy neighbour slows the smaller model's many short kernels more
than the baseline's), so the fp32 pair is timed ``--latency_runs`` more times, each an independent interleaved
measurement like the report's: a fidelity's verdict is the median over all runs, shown with their range.

Writes the section "compression" of benchmarks/RESULTS.md (``--section``: another name, e.g. for a ``--prune``
variant: ``--prune "{allocation: latency}" --section compression_latency``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import distillation
from _results import RESULTS, command, publish
from slimming import run_pipeline

from lightning_prune.cli import load_recipe
from lightning_prune.data import DetectionDataModule
from lightning_prune.export import load_module
from lightning_prune.report import (
    CALIBRATION_METHODS,
    OnnxModel,
    compression_report,
    evaluate_map,
    file_size_mb,
    format_report,
    latency_ms,
    onnx_latency_ms,
    quantize_onnx,
)

ROOT = Path(__file__).resolve().parents[1]
PRUNE = {
    "class_path": "lightning_prune.callbacks.StructuredPruning",
    "init_args": {"target_macs_ratio": 0.5, "importance": "l2", "round_to": 8},
}


def train(
    shared: dict[str, Any],
    out: Path,
    baseline: Path | None,
    epochs: int,
    baseline_epochs: int | None,
    prune: dict[str, Any],
    kd: dict[str, Any],
    extra: list[str],
) -> Path:
    """Baseline (unless given) → one-shot prune → finetune distilled (``kd``) from the baseline; the output
    folder."""
    teacher = str(baseline) if baseline is not None else "{out}/baseline.ckpt"
    finetune = {
        "trainer": {"max_epochs": epochs},
        "model": {"init_args": {"warmup_epochs": 0}},
        "callbacks": [
            {
                "class_path": "lightning_prune.callbacks.Distillation",
                "init_args": {"teacher": teacher, **kd},
            }
        ],
    }
    first = {"trainer": {"max_epochs": baseline_epochs}} if baseline_epochs else {}
    recipe = {**shared, "pipeline": {"baseline": first, "prune": {"callbacks": [prune]}, "finetune": finetune}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    run_pipeline(out / "recipe.yaml", out / "out", *(["--baseline", str(baseline)] if baseline else []), *extra)
    return out / "out"


def default_kd(shared: dict[str, Any]) -> dict[str, Any]:
    """The finetuning's Distillation arguments (besides the teacher) for the recipe's model family."""
    if shared["model"]["class_path"].rsplit(".", 1)[-1] == "YOLOv8":
        return dict(distillation.KD)
    return {"loss": "fm_nms", "weight": 1.0}


def calibration_ablation(
    fp32: Path, model: Any, data: DetectionDataModule, calibration: list[Any]
) -> dict[tuple, dict]:
    """The compressed model's fp32 ONNX file quantized with each calibration method, its output convs in float
    (``quantize_onnx``'s default) and in INT8 like the rest: size and mAP through ORT, keyed (method, float outputs).
    The INT8 files are written beside ``fp32``; ``calibration``: the report's calibration batches.
    """
    folder, stem = fp32.parent, fp32.stem
    out = {}
    for method in CALIBRATION_METHODS:
        for float_outputs in (True, False):
            path = quantize_onnx(
                fp32,
                folder / f"{stem}.{method}{'' if float_outputs else '-int8-outputs'}.int8.onnx",
                calibration,
                method=method,
                float_outputs=float_outputs,
            )
            result = evaluate_map(OnnxModel(path), model.postprocess, data.val_dataloader())
            out[method, float_outputs] = {"mb": file_size_mb(path), "mAP": result["mAP"], "mAP50": result["mAP50"]}
    return out


def speedup_runs(
    models: tuple[nn.Module, nn.Module],
    onnx_files: tuple[Path, Path],
    example: torch.Tensor,
    keys: list[str],
    runs: int,
    repeats: int,
) -> dict[str, list[float]]:
    """``runs`` more latency speedups (baseline ÷ pruned) of the fp32 pair per latency key (``cpu_b1``, ``ort_b8``):
    each an independent interleaved measurement (median of ``repeats`` rounds), as the report's own."""
    speedups: dict[str, list[float]] = {key: [] for key in keys}
    generator = torch.Generator().manual_seed(0)
    for _ in range(runs):
        for key in keys:
            runtime, batch = key.split("_b")
            x = torch.rand(int(batch), *example.shape[1:], generator=generator)
            if runtime == "cpu":
                base_ms, pruned_ms = latency_ms(list(models), x, repeats=repeats)
            else:
                base_ms, pruned_ms = onnx_latency_ms(list(onnx_files), x, repeats=repeats)
            speedups[key].append(base_ms / pruned_ms)
    return speedups


def _runs(text: str) -> int:
    """``--latency_runs``'s type: a count >= 0."""
    try:
        runs = int(text)
    except ValueError:
        runs = -1
    if runs < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0 but got {text}")
    return runs


def targets(rows: list[dict[str, Any]], more_speedups: dict[str, list[float]] | None = None) -> list[str]:
    """The targets table of issue #6; a fidelity's verdict is the median over the report's run and
    ``more_speedups[key]`` (more runs of the same fp32 pair)."""
    base, fp32, int8 = rows
    reduction = base["macs"] / fp32["macs"]
    lines = ["| target (issue #6) | measured | |", "| --- | --- | --- |"]
    size = int8["onnx_mb"] / fp32["onnx_mb"]
    lines.append(
        f"| INT8 file <= 0.3 × fp32 file | ×{size:.3f} ({int8['onnx_mb']:.2f} / {fp32['onnx_mb']:.2f} MB) | "
        f"{'met' if size <= 0.3 else 'NOT met'} |"
    )
    drop = 100 * (int8["mAP"] - fp32["mAP"])
    lines.append(
        f"| INT8 mAP50-95 >= fp32 − 1.0 | {100 * int8['mAP']:.2f} vs {100 * fp32['mAP']:.2f} "
        f"({drop:+.2f} points) | {'met' if drop >= -1.0 else 'NOT met'} |"
    )
    for key in sorted(fp32["latency_ms"]):
        fidelity = base["latency_ms"][key] / fp32["latency_ms"][key] / reduction
        runtime, batch = key.split("_b")
        label = {"cpu": "CPU eager", "ort": "ONNX Runtime", "cuda": "CUDA"}[runtime]
        runs = [fidelity] + [speedup / reduction for speedup in (more_speedups or {}).get(key, [])]
        verdict = statistics.median(runs)
        measured = (
            f"{verdict:.2f}, median of {len(runs)} runs ({min(runs):.2f}–{max(runs):.2f}; the table's {fidelity:.2f})"
            if len(runs) > 1
            else f"{fidelity:.2f}"
        )
        lines.append(
            f"| fidelity >= 0.9, {label}, batch {batch} | {measured}, ×{reduction:.2f} fewer MACs | "
            f"{'met' if verdict >= 0.9 else 'NOT met'} |"
        )
    return lines


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/shapes/yolov8n.yaml")
    parser.add_argument("--baseline", type=Path, help="trained checkpoint of the recipe's model (default: train one)")
    parser.add_argument("--baseline_epochs", type=int, help="baseline training epochs (default: the recipe's)")
    parser.add_argument("--finetune_epochs", type=int, default=5)
    parser.add_argument(
        "--prune",
        type=distillation.yaml_mapping,
        default={},
        help="StructuredPruning arguments over the defaults, as YAML: '{allocation: latency}'",
    )
    parser.add_argument(
        "--kd",
        type=distillation.yaml_mapping,
        help="the finetuning's Distillation arguments besides the teacher, as YAML (default: by family)",
    )
    parser.add_argument("--calibration_images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds per latency")
    parser.add_argument(
        "--latency_runs",
        type=_runs,
        default=3,
        help="more independent timings of the fp32 pair for the fidelity targets (their median decides)",
    )
    parser.add_argument("--out", type=Path, help="runs folder (default: a temporary one)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the markdown file to update")
    parser.add_argument("--section", default="compression", help="its section to write (default compression)")
    args, extra = parser.parse_known_args(argv)
    shared = {k: v for k, v in load_recipe(ROOT / args.recipe).items() if k != "pipeline"}
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        reused = (out / "runs" / "out" / "finetune.ckpt").exists()  # the pipeline skips the stages it has done
        start = time.perf_counter()
        prune = {**PRUNE, "init_args": {**PRUNE["init_args"], **args.prune}}
        kd = default_kd(shared) if args.kd is None else args.kd
        stages = train(
            shared, out / "runs", args.baseline, args.finetune_epochs, args.baseline_epochs, prune, kd, extra
        )
        train_s = time.perf_counter() - start
        model_class = shared["model"]["class_path"]
        baseline = load_module(args.baseline or stages / "baseline.ckpt", model_class)
        tuned = load_module(stages / "finetune.ckpt", model_class)
        data_args = {k: v for k, v in shared["data"].items() if k != "class_path"}
        data_args.update({"num_workers": 0, "root": data_args.get("root")})
        for i in range(0, len(extra) - 1):  # `--data.key value` overrides given for the stages apply here too
            if extra[i].startswith("--data."):
                data_args[extra[i][len("--data.") :]] = yaml.safe_load(extra[i + 1])
        data = DetectionDataModule(**data_args)
        data.setup("fit")
        start = time.perf_counter()
        calibration = data.calibration_images(args.calibration_images)
        rows = compression_report(
            {"Baseline": baseline, "Pruned+KD": copy.deepcopy(tuned)},
            baseline.example_input_array,
            dataloader=data.val_dataloader(),
            postprocess=tuned.postprocess,
            out_dir=out / "onnx",
            runtimes=["cpu", "ort"],
            int8=True,
            calibration=calibration,
            repeats=args.repeats,
        )
        fp32_files = (Path(rows[0]["onnx_file"]), Path(rows[1]["onnx_file"]))
        more = speedup_runs(
            (baseline, tuned),
            fp32_files,
            baseline.example_input_array,
            sorted(k for k in rows[1]["latency_ms"] if k.split("_b")[0] in ("cpu", "ort")),
            args.latency_runs,
            args.repeats,
        )
        report_s = time.perf_counter() - start
        ablation = calibration_ablation(fp32_files[1], tuned, data, calibration)
    shape = tuple(baseline.example_input_array.shape)
    body = "\n".join(
        [
            f"Command: `{command('compression.py', argv)}`.",
            "",
            f"Recipe `{args.recipe}` ({shape[-1]} px"
            + (f", with `{' '.join(extra)}` for every stage" if extra else "")
            + "): "
            + (
                f"baseline `{args.baseline}`"
                if args.baseline
                else f"baseline trained {args.baseline_epochs or 'the recipe'}"
                + (" epochs" if args.baseline_epochs else "'s epochs")
            )
            + f"; one-shot StructuredPruning ({prune['init_args']}); {args.finetune_epochs} finetune epochs"
            f" with Distillation ({kd}) from the baseline; INT8 = ONNX Runtime static QDQ, entropy calibration on "
            f"{args.calibration_images} training images, output convs in float. "
            + ("Stages reused from an earlier run in `--out`" if reused else f"Training {train_s / 60:.1f} min")
            + f", report {report_s:.0f} s.",
            "",
            format_report(rows, shape),
            "",
            *targets(rows, more),
            "",
            "INT8 calibration methods on the same fp32 file and calibration images (mAP through ONNX Runtime); output "
            "convs: the nodes that write the graph outputs kept in float (`quantize_onnx(float_outputs=True)`, the "
            "default, as in the table above) or quantized like the rest:",
            "",
            "| calibration | output convs | INT8 (MB) | mAP50 | mAP50-95 |",
            "| --- | --- | ---: | ---: | ---: |",
            *(
                f"| {m} | {'float' if fo else 'INT8'} | {r['mb']:.3f} | {r['mAP50']:.4f} | {r['mAP']:.4f} |"
                for (m, fo), r in ablation.items()
            ),
        ]
    )
    return publish(args.section, body, args.results)


if __name__ == "__main__":
    main()
