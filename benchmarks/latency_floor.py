"""How much speedup can channel pruning buy at all on this CPU? The latency floor of a detector.

Usage: python benchmarks/latency_floor.py [--threads 2] [--repeats 10] [--quick] [--results benchmarks/RESULTS.md]

Channel pruning removes MACs, but not the work that does not scale with the prunable widths: one kernel launch
per op, the image's 3 input channels, the head's output convs (anchors/DFL bins × classes), the box decoding. This
measures that floor: every prunable conv group of the model is cut to a single channel (Torch-Pruning's dependency
graph, the head's output convs kept), and the BatchNorm-fused eager forward of the floor model
is timed interleaved with the unpruned one (median of ``--repeats``), for the models the other sections measure:
YOLOv8s (80 classes) at 320 and 640 px, YOLOv8n (4 classes, the shapes recipes) at 256 px, YOLOv3-m (4 classes, the
``compare`` and ``compression_yolov3`` model) at 128 px; batch 1 and 8.

Two ceilings on the speedup fidelity (speedup ÷ MACs reduction) follow, for a pruned model left with a fraction
``r`` of the MACs:

- strict: no pruned model is faster than the floor, so fidelity <= r · t / t_floor;
- linear: if the latency above the floor fell exactly as fast as the MACs above the floor's MACs ``r0``,
  t(r) = t_floor + (t - t_floor) · (r - r0) / (1 - r0). This is a model, not a bound (a latency-aware allocation can
  beat it by cutting the layers with the most latency per MAC first), but it is what an ideal uniform cut gives.

Writes the section "latency_floor" of benchmarks/RESULTS.md; asserts nothing. ``--quick``: YOLOv8n at 128 px,
batch 1, 3 repeats (a smoke test whose numbers mean nothing).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import _results
from pruning_speed import build, macs, time_pair

from lightning_prune.models.base import DetectorModule
from lightning_prune.models.yolov3 import YOLOv3
from lightning_prune.report.fuse import fuse_batchnorm

REMAINING = (0.75, 0.5, 0.25)  # MACs left: the -25/-50/-75% cuts of issues #3 and #6


def floor_model(model: DetectorModule, size: int) -> DetectorModule:
    """``model`` (in place) with every prunable conv group cut to its first channel, the head's outputs kept."""
    ignored = [model.get_submodule(n) for n in model.adapter.output_layers(model)]
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, 3, size, size))
    for group in list(graph.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d])):
        conv = group[0].dep.target.module
        if conv.out_channels > 1:  # groups are collected up front: re-fetch against the current widths
            graph.get_pruning_group(conv, tp.prune_conv_out_channels, list(range(1, conv.out_channels))).prune()
    return model.eval()


def yolov3(scale: str, classes: int) -> YOLOv3:
    """A YOLOv3 of random weights (the floor and the ceilings depend on the structure only)."""
    torch.manual_seed(0)
    return YOLOv3(scale, num_classes=classes, img_size=128).eval()


def ceilings(t: float, t_floor: float, r0: float, r: float) -> tuple[float, float]:
    """(strict, linear) fidelity ceilings at MACs fraction ``r``; see the module docstring.

    >>> [round(v, 3) for v in ceilings(10.0, 2.0, 0.0, 0.5)]
    [2.5, 0.833]
    """
    linear = t_floor + (t - t_floor) * (r - r0) / (1.0 - r0)
    return r * t / t_floor, r * t / linear


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per model (default 10, quick 3)")
    parser.add_argument("--quick", action="store_true", help="YOLOv8n, 128 px, batch 1 (smoke test)")
    parser.add_argument("--results", type=Path, default=_results.RESULTS, help="the markdown file to update")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 10)
    models = (
        [("YOLOv8n", build("n", 4), 4, [128], [1])]
        if args.quick
        else [
            ("YOLOv8s", build("s", 80), 80, [320, 640], [1, 8]),
            ("YOLOv8n", build("n", 4), 4, [256], [1, 8]),
            ("YOLOv3-m", yolov3("m", 4), 4, [128], [1, 8]),
        ]
    )

    rows = []
    for label, base, classes, sizes, batches in models:
        floor = floor_model(copy.deepcopy(base), min(sizes))
        r0 = macs(floor, min(sizes)) / macs(base, min(sizes))
        fused_base, fused_floor = (fuse_batchnorm(m, torch.zeros(1, 3, 64, 64)) for m in (base, floor))
        for size in sizes:
            for batch in batches:
                t, t_floor = time_pair(fused_base, fused_floor, torch.randn(batch, 3, size, size), repeats)
                bounds = [ceilings(t, t_floor, r0, r) for r in REMAINING]
                rows.append(
                    f"| {label} ({classes} classes) | {size} | {batch} | {t * 1e3:.1f} | {t_floor * 1e3:.1f} "
                    f"({t_floor / t:.0%}) | {r0:.3f} | "
                    + " | ".join(f"{linear:.2f} ({strict:.2f})" for strict, linear in bounds)
                    + " |"
                )
                print(rows[-1], flush=True)

    body = "\n".join(
        [
            "Floor model: every prunable conv group cut to one channel (Torch-Pruning's dependency graph, the head's "
            "output convs kept). Latency: BatchNorm-fused eager forward, `torch.inference_mode()`, median of "
            f"{repeats} runs interleaved with the unpruned model's. Fidelity ceilings per MACs cut: linear model "
            "(strict bound in brackets); see the script's docstring."
            + (" **Quick smoke run**: not a measurement." if args.quick else ""),
            "",
            "| model | px | batch | unpruned (ms) | floor (ms, share) | floor MACs | ceiling -25% | ceiling -50% "
            "| ceiling -75% |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            *rows,
        ]
    )
    return _results.publish("latency_floor", body, args.results)


if __name__ == "__main__":
    main()
