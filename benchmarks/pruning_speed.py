"""Does pruning make the model faster? Latency of a pruned YOLOv8s against plain Torch-Pruning, side by side.

Usage: python benchmarks/pruning_speed.py [--threads 2] [--quick | --event_only] [--results benchmarks/RESULTS.md]
       [--ours "round_to=16,global_pruning=1,max_layer_ratio=0.6" ...] [--ours "allocation=latency,round_to=8"]
       [--scale s] [--repeats 10]

Takes about 15-20 minutes on 2 cores (--quick: about 15 s, a smoke test whose numbers mean nothing). Run it on a
quiet machine: every timing is wall clock.

For each MACs reduction (25/50/75%) a fresh seeded ``YOLOv8("s", num_classes=80, img_size=640)`` is pruned to it
(±3%) by each method, then the BatchNorm-fused eager forward (as deployed; :func:`lightning_prune.report.fuse.
fuse_batchnorm`) of the original and the pruned model is timed at batch 1 and 8, 320 and 640 px, under
``torch.inference_mode()``: warm-up, then the two models' runs interleaved (noise hits both) and the median kept.
Speedup fidelity = (latency before / after) ÷ (MACs before / after): 1.0 means the latency falls as much as MACs.

Methods: plain Torch-Pruning as its YOLOv8 example prunes (``MagnitudePruner``, ``GroupMagnitudeImportance(p=2)``,
the same ratio for every layer, the head's output convs ignored; its ``pruning_ratio`` bisected to meet the
reduction), without and with ``round_to=8``; ours: ``StructuredPruning(target_macs_ratio=1 - reduction,
importance="l2", ...)`` applied without a Trainer, once per ``--ours`` flag (``""``: the callback's defaults; by
default ``""``, ``round_to=8``, ``round_to=16`` and ``allocation=latency,round_to=8``, the latency-aware allocation
whose table is measured at the trace size, 320 px, batch 1 (``latency_batch_size=8`` to change the batch); its rows
note the table's entries and measuring time). A method that fails (e.g. a target found unreachable) gets a
"failed" row. The weights are random (seeded): magnitude criteria rank channels differently on a trained model.
Then the cost of one pruning event (prune + optimizer patch + DDP re-wrap; ``pruning_ratio=0.5``, an SGD optimizer)
and of one ``target_macs_ratio`` step (which adds the bisection of dry runs).

Writes the section "pruning_speed" of benchmarks/RESULTS.md (or ``--results``); asserts nothing. ``--event_only``
measures only the pruning event (medians of 5 interleaved runs) into the section "pruning_event".
Targets on 2 CPU cores: fidelity >= 0.9 at every size/batch/reduction and never below plain Torch-Pruning at the
same MACs; one pruning event on the yolov8s-size model <= 1 s.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import _results

from lightning_prune.callbacks import StructuredPruning
from lightning_prune.models.yolov8 import YOLOv8
from lightning_prune.pruning.latency import LatencyTable
from lightning_prune.report.fuse import fuse_batchnorm
from lightning_prune.report.summary import model_stats

TRACE = 320  # pruning traces at this size (MACs ratios of a conv net do not depend on it)
TOLERANCE = 0.03
DEFAULT_OURS = ["", "round_to=8", "round_to=16", "allocation=latency,round_to=8"]  # "": the callback's defaults


def fake_trainer(optimizers: list[torch.optim.Optimizer] | None = None) -> Any:
    return SimpleNamespace(
        sanity_checking=False,
        current_epoch=0,
        global_step=0,
        is_global_zero=True,
        world_size=1,
        optimizers=optimizers or [],
        lr_scheduler_configs=[],
        strategy=object(),
        logger=None,
        train_dataloader=None,
    )


def build(scale: str = "s", classes: int = 80) -> YOLOv8:
    torch.manual_seed(0)
    model = YOLOv8(scale, num_classes=classes, img_size=640).eval()
    model.example_input_array = torch.zeros(1, 3, TRACE, TRACE)
    return model


def macs(model: nn.Module, size: int = TRACE) -> float:
    return model_stats(model, torch.zeros(1, 3, size, size))["macs"]


# ---------------------------------------------------------------------------------------------- methods
def tp_prune(
    model: nn.Module,
    ratio: float,
    round_to: int | None = None,
    size: int = TRACE,
    pruner: type[tp.pruner.BasePruner] = tp.pruner.MagnitudePruner,
) -> nn.Module:
    """One step of plain Torch-Pruning on ``model``, in place, as its YOLOv8 example prunes: a new pruner,
    ``GroupMagnitudeImportance(p=2)``, the same ``ratio`` for every layer, the head's output convs ignored."""
    ignored = [model.get_submodule(n) for n in model.adapter.output_layers(model)]
    pruner(
        model,
        torch.zeros(1, 3, size, size),
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=ignored,
        round_to=round_to,
    ).step()
    return model.eval()


def search_tp_ratio(
    base: nn.Module,
    reduction: float,
    round_to: int | None,
    iterations: int = 14,
    size: int = TRACE,
    steps: int = 1,
    pruner: type[tp.pruner.BasePruner] = tp.pruner.MagnitudePruner,
) -> tuple[nn.Module, float]:
    """A copy of ``base`` pruned to the MACs reduction by ``steps`` calls of :func:`tp_prune` at one ratio (bisected),
    and that ratio. The widths of a uniform ratio do not depend on the weights: training between the steps keeps
    the MACs found here."""
    goal, original = 1.0 - reduction, macs(base, size)
    lo, hi, best = 0.0, 0.95, None
    for _ in range(iterations):
        mid = (lo + hi) / 2
        model = copy.deepcopy(base)
        for _ in range(steps):
            tp_prune(model, mid, round_to, size, pruner)
        value = macs(model, size) / original
        if best is None or abs(value / goal - 1) < abs(best[1] / goal - 1):
            best = (model, value, mid)
        if abs(value / goal - 1) < TOLERANCE / 3:
            break
        lo, hi = (mid, hi) if value > goal else (lo, mid)
    assert best is not None
    return best[0], best[2]


def torch_pruning(base: YOLOv8, reduction: float, round_to: int | None, iterations: int = 14) -> tuple[nn.Module, str]:
    """Torch-Pruning's YOLOv8 recipe, its uniform ``pruning_ratio`` bisected to the MACs reduction."""
    model, ratio = search_tp_ratio(base, reduction, round_to, iterations)
    return model, f"pruning_ratio={ratio:.3f}"


def ours(base: YOLOv8, reduction: float, **kwargs: Any) -> tuple[nn.Module, str]:
    model = copy.deepcopy(base)
    callback = StructuredPruning(target_macs_ratio=1.0 - reduction, importance="l2", **kwargs)
    callback.on_train_epoch_start(fake_trainer(), model)
    table = callback.latency_table
    note = f"latency table: {len(table)} entries, {table.seconds:.1f} s" if isinstance(table, LatencyTable) else ""
    return model.eval(), note


def parse_ours(spec: str) -> dict[str, Any]:
    """``"round_to=16,global_pruning=1,max_layer_ratio=0.8,allocation=latency"`` -> StructuredPruning's keywords."""
    kwargs: dict[str, Any] = {}
    for item in filter(None, spec.split(",")):
        key, value = item.split("=")
        if key == "global_pruning":
            kwargs[key] = value.lower() in ("1", "true", "yes")
        elif key == "round_to":
            kwargs[key] = None if value.lower() == "none" else int(value)
        elif key == "allocation":
            kwargs[key] = value
        elif key == "latency_batch_size":
            kwargs[key] = int(value)
        else:
            kwargs[key] = float(value)
    return kwargs


# ---------------------------------------------------------------------------------------------- timing
@torch.inference_mode()
def time_pair(a: nn.Module, b: nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median seconds of one forward of ``a`` and of ``b``, their runs interleaved after a warm-up."""
    for m in (a, b, a, b):
        m(x)
    ta, tb = [], []
    for _ in range(repeats):
        for m, ts in ((a, ta), (b, tb)):
            start = time.perf_counter()
            m(x)
            ts.append(time.perf_counter() - start)
    return statistics.median(ta), statistics.median(tb)


def event_cost(base: YOLOv8, **kwargs: Any) -> float:
    """Seconds of one ``prune_step`` with an SGD optimizer to patch (calibration excluded: "l2" needs none).

    The callback's ``setup`` (tracing checks, output layers, the unpruned model's stats) runs first, as in ``fit``.
    """
    model = copy.deepcopy(base).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for p in model.parameters():  # give the optimizer state to carry
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    callback = StructuredPruning(importance="l2", **kwargs)
    callback.setup(fake_trainer([optimizer]), model, "fit")
    start = time.perf_counter()
    callback.prune_step(fake_trainer([optimizer]), model)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- main
def event_medians(scale: str, spec: str, runs: int, with_target: bool = True) -> dict[str, float]:
    """Seconds of one pruning event, medians of ``runs`` interleaved runs: ``ratio`` (ours, ``pruning_ratio=0.5``;
    absent for the latency allocation, which needs a target), ``target`` (``target_macs_ratio=0.5``), ``tp``."""
    kwargs = parse_ours(spec)
    by_ratio = kwargs.get("allocation", "importance") != "latency"  # the latency allocation needs a target
    variants = {"ratio": lambda: event_cost(build(scale), pruning_ratio=0.5, **kwargs)} if by_ratio else {}
    if with_target:
        variants["target"] = lambda: event_cost(build(scale), target_macs_ratio=0.5, **kwargs)
    variants["tp"] = lambda: tp_event_cost(build(scale))
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(runs):
        for name, run in variants.items():
            times[name].append(run())
    return {name: statistics.median(values) for name, values in times.items()}


def event_table(scale: str, spec: str, runs: int, with_target: bool = True) -> str:
    """The cost of one pruning event, ours and plain Torch-Pruning's, medians of ``runs`` interleaved runs."""
    by_ratio = parse_ours(spec).get("allocation", "importance") != "latency"
    median = event_medians(scale, spec, runs, with_target)
    target = f"{median['target']:.2f}" if with_target else "skipped (--quick)"
    ratio = f"{median['ratio']:.2f}" if by_ratio else "- (needs a target)"
    return "\n".join(
        [
            f"| pruning event on YOLOv8{scale} (traced at {TRACE} px; median of {runs}) | seconds | target |",
            "| --- | --- | --- |",
            f"| ours, `pruning_ratio=0.5`: prune + SGD optimizer patch + re-wrap | {ratio} | <= 1 s |",
            f"| ours, `target_macs_ratio=0.5` (adds the search of dry runs) | {target} | - |",
            f"| plain Torch-Pruning: dependency graph + `step()` at ratio 0.5 | {median['tp']:.2f} | - |",
            "",
            f"The pruning-event rows ran ours with {spec or 'the defaults'}; the callback's `setup` (tracing checks, "
            "the unpruned model's stats) runs before the timed step, as in `fit`.",
        ]
    )


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="320 px, batch 1, -50%% MACs, few repeats (smoke test)")
    parser.add_argument("--results", type=Path, default=_results.RESULTS, help="the markdown file to update")
    parser.add_argument("--ours", action="append", help=f"StructuredPruning settings; default {DEFAULT_OURS}")
    parser.add_argument("--scale", default="s", help="YOLOv8 scale; the smoke test uses n")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per model (default 10, quick 3)")
    parser.add_argument("--event_only", action="store_true", help="only the pruning event's cost (own section)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.event_only:
        body = event_table(args.scale, (args.ours or DEFAULT_OURS)[0], 5)
        return _results.publish("pruning_event", body, args.results)
    reductions = [0.5] if args.quick else [0.25, 0.5, 0.75]
    settings = [(s, b) for s in ([320] if args.quick else [320, 640]) for b in ([1] if args.quick else [1, 8])]
    repeats = args.repeats or (3 if args.quick else 10)

    iterations = 3 if args.quick else 14  # of the bisection of Torch-Pruning's ratio
    base = build(args.scale)
    base_stats = model_stats(base, torch.zeros(1, 3, 640, 640))
    methods: list[tuple[str, Any]] = [
        ("Torch-Pruning", lambda r: torch_pruning(base, r, None, iterations)),
        ("Torch-Pruning round_to=8", lambda r: torch_pruning(base, r, 8, iterations)),
    ]
    for spec in args.ours or DEFAULT_OURS:
        kwargs = parse_ours(spec)
        methods.append((f"ours {spec or '(defaults)'}", lambda r, kw=kwargs: ours(base, r, **kw)))
    fused_base = fuse_batchnorm(base, torch.zeros(1, 3, 64, 64))

    rows: list[str] = []
    fidelity: dict[tuple[float, int, int], dict[str, float]] = {}  # (reduction, px, batch) -> method -> fidelity
    for reduction in reductions:
        for name, method in methods:
            start = time.perf_counter()
            try:
                pruned, note = method(reduction)
            except Exception as err:  # e.g. a target found unreachable: report it, go on
                rows.append(f"| -{reduction:.0%} | {name} | failed: {str(err).splitlines()[0]} |" + " |" * 8)
                print(rows[-1], flush=True)
                continue
            prune_s = time.perf_counter() - start
            stats = model_stats(pruned, torch.zeros(1, 3, 640, 640))
            mac_x = base_stats["macs"] / stats["macs"]
            fused = fuse_batchnorm(pruned, torch.zeros(1, 3, 64, 64))
            for size, batch in settings:
                x = torch.randn(batch, 3, size, size)
                before, after = time_pair(fused_base, fused, x, repeats)
                fid = fidelity.setdefault((reduction, size, batch), {})[name] = before / after / mac_x
                rows.append(
                    f"| -{reduction:.0%} | {name} | {stats['params'] / 1e6:.2f}M | {stats['macs'] / 1e9:.2f}G "
                    f"({1 - 1 / mac_x:.1%}) | {size} | {batch} | {before * 1e3:.1f} | {after * 1e3:.1f} "
                    f"| {before / after:.2f}x | {fid:.2f} | {prune_s:.1f} {note} |"
                )
                print(rows[-1], flush=True)
    names = [name for name, _ in methods]
    side_by_side = [
        f"| -{r:.0%} | {s} | {b} | " + " | ".join(f"{fids[n]:.2f}" if n in fids else "-" for n in names) + " |"
        for (r, s, b), fids in fidelity.items()
    ]
    worst = {n: min((f[n] for f in fidelity.values() if n in f), default=float("nan")) for n in names}
    first = (args.ours or DEFAULT_OURS)[0]
    events = event_table(args.scale, first, 1 if args.quick else 5, with_target=not args.quick)

    body = "\n".join(
        [
            f"Model: YOLOv8{args.scale} (80 classes), {base_stats['params'] / 1e6:.2f}M params, "
            f"{base_stats['macs'] / 1e9:.2f} GMACs at 640 px. Latency: BatchNorm-fused eager forward, "
            f"`torch.inference_mode()`, median of {repeats} runs interleaved with the original's. "
            "Fidelity = speedup ÷ MACs reduction (target >= 0.9)."
            + (" **Quick smoke run**: not a measurement." if args.quick else ""),
            "",
            "Fidelity side by side:",
            "",
            "| MACs cut | px | batch | " + " | ".join(names) + " |",
            "| --- | --- | --- | " + " | ".join("---" for _ in names) + " |",
            *side_by_side,
            "",
            "Worst fidelity per method: " + ", ".join(f"{k} {v:.2f}" for k, v in worst.items()) + ".",
            "",
            "| MACs cut | method | params | MACs at 640 (cut) | px | batch | before (ms) | after (ms) | speedup "
            "| fidelity | prune time (s) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
            events,
        ]
    )
    return _results.publish("pruning_speed", body, args.results)


def tp_event_cost(base: YOLOv8) -> float:
    example = torch.zeros(1, 3, TRACE, TRACE)
    ignored = [base.get_submodule(n) for n in base.adapter.output_layers(base)]
    start = time.perf_counter()
    tp.pruner.MagnitudePruner(
        base,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=0.5,
        ignored_layers=ignored,
    ).step()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
