"""Network slimming end to end on the built-in data, and the step-time overhead of SparsityRegularization.

Usage: python benchmarks/slimming.py [--recipe recipes/shapes/yolov3-slim.yaml] [--out DIR] [--steps 12]
       [--results benchmarks/RESULTS.md] [extra pipeline arguments, e.g. --baseline CKPT ...]

1. Runs ``lightning-prune pipeline --config RECIPE`` in a subprocess exactly as a user would and reads its report
   (Baseline / Sparse / Pruned / Finetuned). Targets (issue #4): >= 50% of the parameters removed; mAP50-95 after
   finetuning >= baseline - 1.0 point; right after pruning >= baseline - 3.0 points.
2. Times training steps of the recipe's model with and without SparsityRegularization, in one process, the two
   interleaved run by run (Trainer fits of ``--steps`` batches, the first two of each discarded); target <= 3%.

Writes the section "slimming" of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _results import RESULTS, publish
from _timing import run_command, step_times, synthetic_loader, timed_steps

from lightning_prune.callbacks import SparsityRegularization
from lightning_prune.cli import load_recipe
from lightning_prune.pipeline import split_recipe

ROOT = Path(__file__).resolve().parents[1]


class _TimedSparsity(SparsityRegularization):
    """SparsityRegularization that also times its own optimizer-step hook."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spent: list[float] = []

    def on_before_optimizer_step(self, *args: Any) -> None:
        start = time.perf_counter()
        super().on_before_optimizer_step(*args)
        self.spent.append(time.perf_counter() - start)


def step_overhead(recipe: Path, steps: int, rounds: int = 6) -> dict[str, float]:
    """Step time without and with the SparsityRegularization of ``recipe``'s sparsity stage (see
    :func:`sparsity_overhead`)."""
    shared, stages = split_recipe(load_recipe(recipe))
    penalty = next(
        c["init_args"] for c in stages["sparsity"]["callbacks"] if c["class_path"].endswith("SparsityRegularization")
    )
    return sparsity_overhead(shared, penalty, steps, rounds)


def sparsity_overhead(shared: dict[str, Any], penalty: dict[str, Any], steps: int, rounds: int = 6) -> dict[str, float]:
    """Step time of ``shared``'s model without and with ``SparsityRegularization(**penalty)``, fits interleaved (order
    alternating), on synthetic batches of its data's size.

    Returns the median step times (s), the median and spread of the per-round ratios, and the hook's own time.
    """
    module_name, _, class_name = shared["model"]["class_path"].rpartition(".")
    detector = getattr(importlib.import_module(module_name), class_name)
    size = shared["data"].get("img_size", 320)
    loader = synthetic_loader(size, shared["data"].get("batch_size", 16), steps)
    hooks: list[float] = []

    def fit(regularized: bool) -> list[float]:
        torch.manual_seed(0)
        model = detector(**{**shared["model"]["init_args"], "img_size": size})
        callback = _TimedSparsity(**penalty)
        times = step_times(model, [callback] if regularized else [], loader)
        hooks.extend(callback.spent[2:])
        return times

    ratios: list[float] = []
    samples: dict[bool, list[float]] = {False: [], True: []}
    for round_ in range(rounds):  # one pair of fits per round, the order alternating: its ratio is one sample
        pair = {regularized: fit(regularized) for regularized in ((False, True) if round_ % 2 == 0 else (True, False))}
        for regularized, times in pair.items():
            samples[regularized] += times
        ratios.append(statistics.median(pair[True]) / statistics.median(pair[False]))
    plain, regularized = statistics.median(samples[False]), statistics.median(samples[True])
    return {
        "plain": plain,
        "regularized": regularized,
        "ratio": statistics.median(ratios),
        "low": min(ratios),
        "high": max(ratios),
        "hook": statistics.median(hooks),
    }


def run_pipeline(recipe: str | Path, out: Path, *extra: str) -> tuple[list[dict[str, Any]], str, float]:
    """``lightning-prune pipeline`` in a subprocess: the report's rows, its markdown, the wall time in s."""
    cmd = [sys.executable, "-m", "lightning_prune", "pipeline", "--config", str(recipe), "--out", str(out), *extra]
    _, wall = run_command(cmd, ROOT, "pipeline")
    return json.loads((out / "report.json").read_text())["rows"], (out / "report.md").read_text().strip(), wall


def pruned_without_folding(recipe: Path, out: Path, extra: list[str]) -> dict[str, Any]:
    """The prune stage again on the sparsity-trained weights, with ``fold_bias=False``: the Pruned row it gives."""
    shared, stages = split_recipe(load_recipe(recipe))
    callbacks = [
        {**c, "init_args": {**c.get("init_args", {}), "fold_bias": False}} for c in stages["prune"]["callbacks"]
    ]
    ablation = out / "no-folding"
    ablation.mkdir(parents=True, exist_ok=True)
    path = ablation / "recipe.yaml"
    path.write_text(yaml.safe_dump({**shared, "pipeline": {"baseline": {}, "prune": {"callbacks": callbacks}}}))
    rows, _, _ = run_pipeline(path, ablation / "run", "--baseline", str(out / "sparsity.ckpt"), *extra)
    return rows[-1]


def _without_baseline(args: list[str]) -> list[str]:
    out, skip = [], False
    for arg in args:
        if skip or arg.startswith("--baseline="):
            skip = False
            continue
        skip = arg == "--baseline"
        if not skip:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/shapes/yolov3-slim.yaml")
    parser.add_argument("--out", help="pipeline folder (default: a temporary one)")
    parser.add_argument("--steps", type=timed_steps, default=16, help="training batches per timed fit")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved pairs of timed fits")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the markdown file to update")
    args, extra = parser.parse_known_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        state = out / "pipeline.json"
        skipped = list(json.loads(state.read_text())["stages"]) if state.is_file() else []
        rows, table, wall = run_pipeline(args.recipe, out, *extra)
        unfolded = pruned_without_folding(ROOT / args.recipe, out, _without_baseline(extra))
    by = {r["stage"]: r for r in rows}
    base, pruned, tuned = by["Baseline"], by["Pruned"], by.get("Finetuned", by["Pruned"])
    removed = 1 - tuned["params"] / base["params"]
    drop_pruned = 100 * (base["val/mAP"] - pruned["val/mAP"])
    drop_tuned = 100 * (base["val/mAP"] - tuned["val/mAP"])
    timing = step_overhead(ROOT / args.recipe, args.steps, args.rounds)
    overhead = timing["ratio"] - 1

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    body = "\n".join(
        [
            f"Command: `lightning-prune pipeline --config {args.recipe}{''.join(' ' + e for e in extra)}` "
            f"(wall time {wall / 60:.1f} min, "
            + (f"resumed: the stages {', '.join(skipped)} were done by an earlier run" if skipped else "all stages")
            + ", data cache warm).",
            "",
            table,
            "",
            f"Folding's share: the same pruning of the Sparse weights without `fold_bias` gives mAP50-95 "
            f"{unfolded['val/mAP']:.4f} (mAP50 {unfolded['val/mAP50']:.4f}) instead of {pruned['val/mAP']:.4f}"
            + (
                " (equal: no removed channel was constant where it is read, and only those are folded)."
                if unfolded["val/mAP"] == pruned["val/mAP"]
                else "."
            ),
            "",
            "| target (issue #4) | measured | |",
            "| --- | --- | --- |",
            f"| >= 50% of parameters removed | {removed:.1%} | {verdict(removed >= 0.5)} |",
            f"| mAP50-95 after finetuning >= baseline - 1.0 | {-drop_tuned:+.2f} points | "
            f"{verdict(drop_tuned <= 1.0)} |",
            f"| mAP50-95 right after pruning >= baseline - 3.0 | {-drop_pruned:+.2f} points | "
            f"{verdict(drop_pruned <= 3.0)} |",
            f"| SparsityRegularization step time <= +3% | {overhead:+.1%}: median of {args.rounds} interleaved pairs "
            f"of fits (range {timing['low'] - 1:+.1%} … {timing['high'] - 1:+.1%}; {timing['plain'] * 1e3:.0f} → "
            f"{timing['regularized'] * 1e3:.0f} ms per step); the hook itself takes {timing['hook'] * 1e3:.2f} ms "
            f"({timing['hook'] / timing['plain']:.1%} of a step) | {verdict(overhead <= 0.03)} |",
        ]
    )
    return publish("slimming", body, args.results)


if __name__ == "__main__":
    main()
