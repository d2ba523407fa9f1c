"""Where to prune: uniform ratios against budget-allocated ones at the same MACs, before and after finetuning.

Usage: python benchmarks/allocation.py [--baseline CKPT | --baseline_epochs 15] [--sensitivity SENSITIVITY_JSON]
       [--recipe recipes/shapes/yolov8n.yaml] [--target_macs 0.5] [--round_to 8] [--finetune_epochs 3]
       [--seeds 0] [--methods uniform,global,sensitivity,netadapt] [--out DIR]
       [--results benchmarks/RESULTS.md] [--section allocation]

The baseline is a trained checkpoint of the recipe's model (without ``--baseline``: ``lightning-prune fit`` of the
recipe for ``--baseline_epochs`` into ``--out``, reused when there); the sensitivity table is the ``sensitivity.json``
of ``lightning-prune sensitivity --config RECIPE --ckpt CKPT --round_to 8`` on it (without ``--sensitivity``: that
command is run into ``--out``, reused when there; about 7 s per group × 59 groups for YOLOv8n on 4 batches).

Each method prunes a fresh copy of the baseline one-shot to ``--target_macs`` of its MACs with
``StructuredPruning`` (``l2``, the same ``--round_to``), outside a Trainer (each method and seed's result is kept
in ``--out`` and reused by a rerun):

- ``uniform``: every layer loses the same fraction of its channels (``global_pruning=False``), the ratio searched;
- ``global``: channels ranked across layers by the criterion (the callback's default);
- ``sensitivity``: ``allocation="sensitivity"``, widths spent at equal measured mAP loss per MAC saved;
- ``netadapt``: ``allocation="netadapt"``, rounds of 10% of the MACs, proposals scored on 2 validation batches
  (about 15 minutes for YOLOv8n at 256 px).

mAP50-95 over the whole validation split right after pruning, then after ``--finetune_epochs`` epochs of the recipe's
training (no distillation, warm-up off, the same seed for every method), for each seed. Takes about
(3 + 4 × finetune_epochs) minutes per method and seed for YOLOv8n at 256 px on 2 CPU cores.

Target (issue #7): at -50% MACs, sensitivity- or NetAdapt-allocated ratios beat uniform ratios by >= 1.0 mAP50-95
before finetune and do not lose after finetune. Writes the section ``--section`` of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import yaml
from pytorch_lightning.utilities.exceptions import MisconfigurationException

sys.path.insert(0, str(Path(__file__).parent))
from _results import RESULTS, mean_std, publish
from _timing import run_command
from compare import fit
from pruning_speed import fake_trainer

from lightning_prune.callbacks import StructuredPruning
from lightning_prune.cli import load_recipe, recipe_datamodule
from lightning_prune.export import load_module
from lightning_prune.report import evaluate_map
from lightning_prune.report.summary import model_stats

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "uniform": {"global_pruning": False},
    "global": {},
    "sensitivity": {"allocation": "sensitivity"},
    "netadapt": {"allocation": "netadapt", "netadapt_batches": 2},
}


def prune(
    base: pl.LightningModule,
    method: str,
    target: float,
    round_to: int | None,
    sensitivity: str,
    val: Any,
    netadapt_step: float,
) -> Any:
    """A pruned copy of ``base`` and the pruning's wall time (s); ``val`` scores NetAdapt's proposals."""
    model = copy.deepcopy(base)
    kwargs = dict(METHODS[method], target_macs_ratio=target, importance="l2", round_to=round_to)
    if method == "sensitivity":
        kwargs["sensitivity"] = sensitivity
    if method == "netadapt":
        kwargs["netadapt_step"] = netadapt_step
    callback = StructuredPruning(**kwargs)
    trainer = fake_trainer()
    trainer.val_dataloaders = val
    start = time.perf_counter()
    callback.setup(trainer, model, "fit")
    callback.on_train_epoch_start(trainer, model)
    return model, time.perf_counter() - start


def finetune(model: pl.LightningModule, data: Any, epochs: int, seed: int, root: Path, batches: int | None) -> None:
    pl.seed_everything(seed)
    if hasattr(model, "warmup_epochs"):
        model.warmup_epochs = 0  # the baseline warmed up already
    fit(model, data, epochs, [], {"limit_train_batches": batches, "default_root_dir": root})


def train_baseline(recipe: str, epochs: int, out: Path, extra: list[str]) -> Path:
    """``lightning-prune fit`` of the recipe (once: reused when ``out`` has it); its last checkpoint."""
    ckpt = out / "baseline.ckpt"
    if not ckpt.is_file():
        root = out / "baseline"
        cmd = [sys.executable, "-m", "lightning_prune", "fit", "--config", recipe, "--trainer.max_epochs", str(epochs)]
        run_command([*cmd, "--trainer.default_root_dir", str(root), *extra], ROOT, "baseline fit")
        last = sorted(root.glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)[-1]
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(last, ckpt)
    return ckpt


def data_overrides(extra: list[str]) -> dict[str, Any]:
    """``{"root": "DIR"}`` from ``["--data.root", "DIR", ...]`` (values parsed as YAML)."""
    pairs = dict(zip(extra[::2], extra[1::2], strict=False))
    return {k.removeprefix("--data."): yaml.safe_load(v) for k, v in pairs.items() if k.startswith("--data.")}


def analyse(args: Any, out: Path, extra: list[str]) -> Path:
    """``lightning-prune sensitivity`` on the baseline (once: reused when ``out`` has it); its sensitivity.json."""
    folder = out / "sensitivity"
    if not (folder / "sensitivity.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        recipe = folder / "recipe.yaml"  # the command takes no --data.* overrides: they go into a recipe over it
        recipe.write_text(yaml.safe_dump({"_base_": [str(Path(args.recipe).resolve())], "data": data_overrides(extra)}))
        cmd = [sys.executable, "-m", "lightning_prune", "sensitivity", "--config", str(recipe), "--ckpt", args.baseline]
        cmd += ["--val_batches", str(args.sensitivity_batches), "--round_to", str(args.round_to), "--out", str(folder)]
        if args.ratios:
            cmd += ["--ratios", *args.ratios.split(",")]
        if args.sensitivity_groups:
            cmd += ["--groups", args.sensitivity_groups]
        run_command(cmd, ROOT, "sensitivity")
    return folder / "sensitivity.json"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes/shapes/yolov8n.yaml"))
    parser.add_argument("--baseline", default=None, help="trained checkpoint of the recipe's model")
    parser.add_argument("--baseline_epochs", type=int, default=15, help="without --baseline: epochs to train it")
    parser.add_argument("--sensitivity", default=None, help="sensitivity.json of `lightning-prune sensitivity`")
    parser.add_argument("--sensitivity_batches", type=int, default=4, help="without --sensitivity: its --val_batches")
    parser.add_argument("--ratios", default=None, help="without --sensitivity: its --ratios, comma-separated")
    parser.add_argument("--sensitivity_groups", default=None, help="without --sensitivity: its --groups (a regex)")
    parser.add_argument("--target_macs", type=float, default=0.5)
    parser.add_argument("--round_to", type=int, default=8)
    parser.add_argument("--finetune_epochs", type=int, default=3)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--netadapt_step", type=float, default=0.1, help="MACs fraction per NetAdapt round")
    parser.add_argument("--val_batches", type=int, default=None, help="evaluate on the first batches only (smoke)")
    parser.add_argument("--train_batches", type=int, default=None, help="batches per finetune epoch (smoke)")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--section", default="allocation")
    parser.add_argument("--out", default="/tmp/lightning_prune_allocation")
    args, extra = parser.parse_known_args(argv)  # extra: LightningCLI arguments for the baseline fit
    out = Path(args.out)
    if args.baseline is None:
        args.baseline = str(train_baseline(args.recipe, args.baseline_epochs, out, extra))
    if args.sensitivity is None:
        args.sensitivity = str(analyse(args, out, extra))
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}, expected some of {list(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    recipe = load_recipe(args.recipe)
    recipe["data"] = {**recipe.get("data", {}), **data_overrides(extra)}  # --data.root DIR and the like
    data = recipe_datamodule(recipe)
    data.setup("fit")
    base = load_module(args.baseline)
    example = base.example_input_array

    def score(model: Any) -> float:
        model.eval()
        return evaluate_map(model, model.postprocess, data.val_dataloader(), limit_batches=args.val_batches)["mAP"]

    base_map = score(base)
    base_stats = model_stats(base, example)
    rows: dict[str, dict[str, Any]] = {}
    for method in methods:
        runs = []
        for seed in seeds:
            cache = out / f"{method}-t{args.target_macs:g}-r{args.round_to}-e{args.finetune_epochs}-seed{seed}.json"
            if cache.is_file():  # a finished run of this method and seed (a stopped benchmark resumes)
                runs.append(json.loads(cache.read_text()))
                continue
            pl.seed_everything(seed)
            val = data.val_dataloader()
            try:
                model, seconds = prune(
                    base, method, args.target_macs, args.round_to, args.sensitivity, val, args.netadapt_step
                )
            except (ValueError, MisconfigurationException) as err:  # e.g. a budget the table cannot meet
                runs.append({"failed": str(err).split(" HINT:")[0]})
                print(f"[allocation] {method} failed: {err}", flush=True)
                break
            run = {"stats": model_stats(model, example), "seconds": seconds, "before": score(model)}
            finetune(model, data, args.finetune_epochs, seed, out, args.train_batches)
            run["after"] = score(model)
            print(f"[allocation] {method} seed {seed}: {run['before']:.4f} -> {run['after']:.4f}", flush=True)
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(run))
            runs.append(run)
        failed = [r for r in runs if "failed" in r]
        rows[method] = (
            failed[0]
            if failed
            else {
                "stats": runs[0]["stats"],
                "seconds": statistics.fmean(r["seconds"] for r in runs),
                "before": [r["before"] for r in runs],
                "after": [r["after"] for r in runs],
            }
        )
    body = report(args, base_map, base_stats, rows, seeds)
    return publish(args.section, body, Path(args.results))


def report(args: Any, base_map: float, base: dict, rows: dict[str, dict[str, Any]], seeds: list[int]) -> str:
    lines = [
        f"Recipe `{Path(args.recipe).relative_to(ROOT) if Path(args.recipe).is_relative_to(ROOT) else args.recipe}`, "
        f"baseline `{args.baseline}` ({base['params'] / 1e6:.3f}M params, {base['macs'] / 1e9:.3f} GMACs, "
        f"mAP50-95 {100 * base_map:.2f}); one-shot StructuredPruning to {args.target_macs:g} of its MACs (l2, "
        f"round_to={args.round_to}); finetune {args.finetune_epochs} epochs without distillation; seeds {seeds}. "
        f"mAP50-95 over the whole validation split. Sensitivity table: `{args.sensitivity}` (its groups, ratios "
        "and trials: `lightning-prune sensitivity` on the baseline).",
        "",
        "| method | params | MACs (of baseline) | prune (s) | mAP50-95 after pruning | after finetune |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for method, row in rows.items():
        if "failed" in row:
            lines.append(f"| {method} | failed: {row['failed']} | | | | |")
            continue
        s = row["stats"]
        lines.append(
            f"| {method} | {s['params'] / 1e6:.3f}M | {s['macs'] / 1e9:.3f}G ({s['macs'] / base['macs']:.3f}) | "
            f"{row['seconds']:.1f} | {mean_std(row['before'])} | {mean_std(row['after'])} |"
        )
    off = [
        m
        for m, r in rows.items()
        if "stats" in r and abs(r["stats"]["macs"] / base["macs"] / args.target_macs - 1) > 0.03
    ]
    if off:
        lines += [
            "",
            f"Off the ±3% MACs tolerance (the search's closest dry run; `round_to` moves widths in whole blocks): "
            f"{', '.join(off)}.",
        ]
    allocated = [m for m in ("sensitivity", "netadapt") if "before" in rows.get(m, {})]
    if "before" in rows.get("uniform", {}) and allocated:
        u = rows["uniform"]
        lines += ["", "| target (issue #7) | measured | |", "| --- | --- | --- |"]
        for method in allocated:
            a = rows[method]
            gain = 100 * (statistics.fmean(a["before"]) - statistics.fmean(u["before"]))
            kept = 100 * (statistics.fmean(a["after"]) - statistics.fmean(u["after"]))
            lines += [
                f"| {method}-allocated >= uniform + 1.0 before finetune | {gain:+.2f} points | "
                f"{'met' if gain >= 1.0 else 'NOT met'} |",
                f"| {method}-allocated >= uniform after finetune | {kept:+.2f} points | "
                f"{'met' if kept >= 0.0 else 'NOT met'} |",
            ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
