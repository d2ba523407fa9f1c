"""``lightning-prune sensitivity``: how much mAP each layer group costs when pruned alone, and per-layer ratios from it.

The recipe gives the model (``model.class_path`` / ``init_args``, its ``img_size`` linked to the data's, as in
``fit``) and the data; ``--ckpt`` replaces the model by a checkpoint's (pruned or not, through
:func:`lightning_prune.export.load_module`). Every prunable dependency group is pruned alone at each ``--ratios``
(:class:`~lightning_prune.pruning.sensitivity.SensitivityAnalysis`, on deep copies), and the mAP of the first
``--val_batches`` validation batches measured with the model's own decoding and NMS
(:func:`~lightning_prune.report.evaluate.evaluate_map`). Written to ``--out``:

- ``sensitivity.md``: the table (mAP change per group and ratio, most sensitive group first), also printed;
- ``sensitivity.json``: every trial, the baseline, the ranking and the chosen ratios;
- ``sensitivity.png``: the curves (with matplotlib, the ``report`` extra);
- ``layer_ratios.yaml``: per group the largest ratio costing at most ``--max_drop`` mAP points, for
  ``StructuredPruning(layer_ratios=...)`` (read it with :func:`~lightning_prune.pruning.sensitivity.load_layer_ratios`).

Launched by ``torchrun`` (``WORLD_SIZE`` > 1), each process evaluates every ``WORLD_SIZE``-th group and rank 0
gathers the results (``torch.distributed.all_gather_object``) and writes the files.

Example:
    lightning-prune sensitivity --config recipes/shapes/yolov8n.yaml --ckpt best.ckpt --ratios 0.2 0.5 0.8
    torchrun --nproc_per_node 4 -m lightning_prune sensitivity --config recipes/coco/yolov8s.yaml --ckpt best.ckpt
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_prune.export import check_input_side, example_input
from lightning_prune.pruning.sensitivity import (
    DEFAULT_RATIOS,
    SensitivityAnalysis,
    SensitivityResult,
    SensitivityRow,
    check_ratios,
    merge_results,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-prune sensitivity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="recipe: its model (unless --ckpt) and its validation data")
    parser.add_argument("--ckpt", default=None, help="Lightning checkpoint whose module is analysed (pruned or not)")
    parser.add_argument("--ratios", type=float, nargs="+", default=list(DEFAULT_RATIOS), help="in (0, 1)")
    parser.add_argument("--val_batches", type=int, default=8, help="validation batches per evaluation (default 8)")
    parser.add_argument("--max_drop", type=float, default=1.0, help="mAP points a group may cost (default 1.0)")
    parser.add_argument("--out", default="sensitivity", help="output folder (default ./sensitivity)")
    parser.add_argument("--importance", default="l2", help="channel criterion, as StructuredPruning's (default l2)")
    parser.add_argument("--round_to", type=int, default=None, help="keep channel counts multiples of this")
    parser.add_argument("--ignored_layers", nargs="*", default=None, help="regexes of layers never pruned")
    parser.add_argument("--groups", nargs="*", default=None, help="regexes: analyse only the groups so named")
    parser.add_argument("--trace_size", type=int, default=None, help="side the groups are traced at (default model's)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    return parser


def main(args: list[str]) -> dict[str, Any]:
    """Run ``lightning-prune sensitivity``; the summary written to ``sensitivity.json`` (every rank returns it)."""
    known = build_parser().parse_args(args)
    ratios = _check_args(known)
    device = _device(known.device)
    rank, world_size = launch_rank()
    from lightning_prune.cli import load_recipe

    recipe = load_recipe(known.config)
    data = _datamodule(recipe)
    model = _model(recipe, known.config, known.ckpt, data).to(device).eval()
    example = example_input(model, known.trace_size, "--trace_size", "trace").to(device)
    batches = list(itertools.islice(data.val_dataloader(), known.val_batches))  # loaded once, not per trial

    def evaluate(pruned: nn.Module) -> float:
        from lightning_prune.report.evaluate import evaluate_map

        return evaluate_map(pruned, pruned.postprocess, batches, device=device)["mAP"]

    analysis = SensitivityAnalysis(
        model,
        example,
        evaluate,
        ratios=ratios,
        importance=known.importance,
        ignored_layers=known.ignored_layers,
        groups=known.groups,
        round_to=known.round_to,
    )
    mine = len(analysis.groups[rank::world_size])
    _say(
        rank,
        f"{type(model).__name__}: {len(analysis.groups)} groups × {len(ratios)} ratios"
        + (f", up to {mine} groups on each of {world_size} ranks" if world_size > 1 else "")
        + f", {sum(len(b[1]) for b in batches)} validation images",
    )
    start = time.perf_counter()
    result = analysis.run(rank, world_size, on_trial=_progress(rank, mine, len(ratios), start))
    seconds = time.perf_counter() - start
    result = gather_results(result, world_size)
    summary = {
        "config": str(known.config),
        "ckpt": known.ckpt,
        "model": type(model).__name__,
        "max_drop": known.max_drop,
        "seconds": seconds,
        "ranking": result.ranking(),
        "layer_ratios": result.layer_ratios(known.max_drop),
        "sensitive_groups": result.sensitive_groups(known.max_drop),
        **result.to_dict(),
    }
    if rank == 0:
        _write(result, summary, Path(known.out), known.max_drop)
    return summary


def launch_rank() -> tuple[int, int]:
    """``(rank, world_size)`` of a ``torchrun`` launch (its ``RANK`` and ``WORLD_SIZE``); ``(0, 1)`` alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world_size) if world_size > 1 else (0, 1)


def gather_results(result: SensitivityResult, world_size: int) -> SensitivityResult:
    """Every rank's share of the trials gathered (gloo) and merged, rank 0's baseline, on every rank.

    The process group is created only now, after the evaluations: while one exists, torchmetrics' mAP synchronizes
    its state across ranks at every ``compute()``, which would mix the ranks' different pruned models (and hang
    once ranks run different numbers of evaluations).
    """
    if world_size <= 1:
        return result
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo")
    try:
        parts: list[Any] = [None] * world_size
        dist.all_gather_object(parts, result)
    finally:
        if created:
            dist.destroy_process_group()
    return merge_results(parts)


def _check_args(known: argparse.Namespace) -> list[float]:
    ratios = check_ratios(known.ratios, "--ratios")
    if known.val_batches < 1:
        raise ValueError(f"Expected argument `--val_batches` to be an int >= 1 but got {known.val_batches}.")
    if not known.max_drop >= 0:
        raise ValueError(f"Expected argument `--max_drop` to be a float >= 0 (mAP points) but got {known.max_drop}.")
    check_input_side(known.trace_size, "--trace_size")
    return ratios


def _device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _datamodule(recipe: dict[str, Any]) -> Any:
    """The recipe's data module, its validation split set up."""
    from lightning_prune.cli import recipe_datamodule

    dm = recipe_datamodule(recipe)
    dm.setup("validate")
    return dm


def _model(recipe: dict[str, Any], config: str, ckpt: str | None, data: Any) -> nn.Module:
    """The checkpoint's module, else the recipe's model built with the data's ``img_size`` (as ``fit`` links it),
    seeded by the recipe's ``seed_everything`` (default 0): every rank builds the same weights."""
    if ckpt is not None:
        from lightning_prune.export import load_module

        model = load_module(ckpt)
    else:
        from lightning_prune.pruning.checkpoint import import_class

        spec = recipe.get("model")
        if not (isinstance(spec, dict) and isinstance(spec.get("class_path"), str)):
            raise ValueError(
                f"Expected the recipe {config!r} to give `model.class_path` (or `--ckpt` to be given) but got {spec!r}."
            )
        cls = import_class(spec["class_path"], "model.class_path")
        init = dict(spec.get("init_args") or {})
        if "img_size" in inspect.signature(cls).parameters:
            init["img_size"] = data.img_size
        seed = recipe.get("seed_everything", 0)
        torch.manual_seed(seed if isinstance(seed, int) and not isinstance(seed, bool) else 0)
        model = cls(**init)
    classes = getattr(model, "num_classes", None)
    if classes is not None and classes != data.num_classes:
        raise ValueError(
            f"Expected the model's `num_classes` to match the data ({data.num_classes} classes) but got {classes}. "
            f"HINT: set `model.init_args.num_classes: {data.num_classes}` in the recipe."
        )
    if not callable(getattr(model, "postprocess", None)):
        raise ValueError(
            f"Expected {type(model).__name__} to have `postprocess(raw) -> detections` (a DetectorModule) to measure "
            "mAP with, but it has none."
        )
    return model


def _progress(rank: int, groups: int, ratios: int, start: float) -> Any:
    done: list[SensitivityRow] = []

    def report(row: SensitivityRow) -> None:
        done.append(row)
        if len(done) % ratios == 0:
            deltas = " ".join(f"{100 * r.delta:+.1f}" for r in done[-ratios:])
            _say(
                rank,
                f"group {len(done) // ratios}/{groups} `{row.group}`: Δ mAP {deltas} "
                f"({time.perf_counter() - start:.0f} s)",
                every_rank=True,
            )

    return report


def _say(rank: int, message: str, every_rank: bool = False) -> None:
    if rank == 0 or every_rank:
        prefix = "[lightning-prune] sensitivity" + (f" [rank {rank}]" if every_rank and rank else "")
        print(f"{prefix}: {message}", flush=True)


def _write(result: SensitivityResult, summary: dict[str, Any], out: Path, max_drop: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table = result.to_markdown(max_drop)
    (out / "sensitivity.md").write_text(table)
    (out / "layer_ratios.yaml").write_text(result.to_yaml(max_drop))
    written = ["sensitivity.md", "sensitivity.json", "layer_ratios.yaml"]
    if importlib.util.find_spec("matplotlib") is not None and result.rows:
        result.plot(out / "sensitivity.png")
        written.append("sensitivity.png")
    summary["files"] = [str(out / name) for name in written]
    (out / "sensitivity.json").write_text(json.dumps(summary, indent=2))
    chosen = summary["layer_ratios"]
    print(
        table + f"\n[lightning-prune] sensitivity: {len(chosen)}/{len(result.groups)} groups can lose channels within "
        f"{max_drop:g} mAP points alone (the others: `sensitive_groups` in sensitivity.json); wrote "
        + ", ".join(summary["files"]),
        flush=True,
    )
