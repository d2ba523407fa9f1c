"""lightning_prune side by side with what users would pick instead, on the built-in data, equal training budgets.

Usage: python benchmarks/compare.py [--models yolov8s,yolov3] [--img_size 256] [--seeds 0,1,2] [--baseline_epochs 15]
       [--finetune_epochs 5] [--target_macs 0.5] [--methods "Torch-Pruning one-shot,slimming"] [--threads 2]
       [--latency_sizes 128,256] [--out DIR] [--results benchmarks/RESULTS.md] [--section compare] [--quick]

For every model and seed, one baseline is trained (``--baseline_epochs``, the family's recipe: ``recipes/shapes/
yolov8n.yaml`` or ``yolov3-tiny.yaml`` with the scale of the name; ``yolov3`` is the reference ``m`` scale of
``recipes/coco/yolov3.yaml``), then each method starts from a copy of it and trains exactly ``--finetune_epochs``
epochs (same data, seed, optimizer and learning rate, no warmup; pruning steps happen inside that budget):

- ``ModelPruning l1_unstructured`` / ``ln_structured``: Lightning's ``ModelPruning`` on the conv weights (the head's
  output convs excepted), ``amount`` = the nominal ratio ``1 - target_macs`` (global |w| for ``l1_unstructured``;
  L2 over each conv's output filters, per layer, for ``ln_structured``), applied at the end of the first epoch (it
  prunes at epoch ends), no lottery-ticket rewind, masks made permanent at the end. Zeros in dense tensors: the
  MACs (counted dense) stay and the latency does not move; the params column adds the nonzero count.
- ``Torch-Pruning one-shot``: plain Torch-Pruning as ``benchmarks/pruning_speed.py`` runs it (``MagnitudePruner``,
  ``GroupMagnitudeImportance(p=2)``, one ratio for every layer bisected to the MACs target, output convs ignored),
  then finetuning. ``Torch-Pruning iterative``: its YOLOv8 example's loop (a new ``GroupNormPruner`` per step, the
  same share of the current channels each step, then a new training run), N = min(5, epochs) steps sharing the
  epochs; the example's share is ``1 - (1 - r)^(1/N)``, here bisected so that the N steps meet the MACs target.
- lightning_prune, each also ``+ KD`` (``Distillation(teacher=<baseline checkpoint>, **KD[family])`` from the first
  pruning epoch on: FM-NMS, on YOLOv8 with weight 100 plus CWD on the neck with weight 10, as in ``KD``):
  ``slimming`` (``SparsityRegularization`` as the family's slimming recipe sets it, over the first half of the epochs,
  then ``StructuredPruning(importance="bn_scale", target_macs_ratio=...)``); ``Taylor iterative``
  (``importance="taylor"``, cubic schedule, up to 3 steps over the first half); ``budget-allocated``
  (``lightning_prune.pruning.SensitivityAnalysis`` of the baseline, each group pruned alone at ``--ratios``, scored on
  unaugmented training images, then ``StructuredPruning(allocation="sensitivity", ...)`` one-shot; the analysis's time
  counts in the compression's); ``uniform one-shot`` (``StructuredPruning(importance="l2", global_pruning=False)``,
  the peers' one ratio for every layer, one step). Ours use ``round_to=8`` (``--round_to``: another multiple, kept in
  stage files of their own).

Columns: params, MACs, CPU latency (BatchNorm-fused eager forward of the first seed's models, all interleaved with
the baseline; :func:`lightning_prune.report.latency_ms`) at batch 1 and 8, at the training side or at each of
``--latency_sizes`` (the architecture, hence the MACs reduction, is the same at every side; the fixed per-op cost
that pruning cannot remove weighs more on small inputs, see ``benchmarks/latency_floor.py``), speedup fidelity
(latency speedup ÷ MACs reduction), mAP50-95 on the validation split (:func:`lightning_prune.report.evaluate_map`,
mean ± std over seeds), wall time of the compression (pruning and the finetuning epochs). Then the step-time
overhead of SparsityRegularization and of Distillation on the first model (``benchmarks/slimming.py`` and
``benchmarks/distillation.py``'s interleaved measurements) and the cost of one pruning event on a YOLOv8s-size model
(``benchmarks/pruning_speed.py``'s).

Targets (issue #8): lightning_prune's best recipe (best mAP among its rows within 3% of the MACs target) beats every
peer row: higher mAP50-95 at <= MACs (3% tolerance); its CPU speedup >= 1.8× at batch 1 and 8; one pruning event on
YOLOv8s-size <= 1 s (calibration excluded). Stated met / NOT met; nothing is asserted.

``--out DIR`` keeps each stage (``DIR/<model>-<px>px-b<baseline epochs>/seed<s>/baseline.ckpt``, beside it one
``<method>-e<finetune epochs>-t<target>.pt`` per method and the budget-allocated rows' sensitivity table,
``sensitivity-r<ratios>-s<selection batches>.json``, with the seconds it took) and reuses what is there: a stopped run
picks up where it was. The full run (yolov8s and yolov3 at 256 px, 3 seeds, 15 + 5 epochs, 12 methods) takes an
estimated 2 days on 2 CPU cores: per model and seed, 15 baseline epochs, 12 × 5 method epochs (on models mostly half
as large) and a sensitivity analysis of about 10 min; an unpruned epoch on the 1000 training images (no validation)
is about 5 min for YOLOv8s and 11 for YOLOv3-m (extrapolated by MACs from YOLOv8n at 128 px, 0.35 min on one
thread). At 128 px a seed of the first 10 methods took about 40 min for YOLOv8s and 75 for YOLOv3-m (measured,
RESULTS).
``--img_size 128``, fewer ``--seeds`` or ``--methods`` scale it down. ``--quick`` (64 px, 8 images, 1 + 2 epochs of 2
batches, one seed, YOLOv8n and YOLOv3-tiny; about a minute) is the smoke test: its numbers mean nothing.

Writes the section "compare" of benchmarks/RESULTS.md (or ``--results``; ``--section``: another name, e.g. for a
model whose seeds are not all trained yet: ``--models yolov3 --seeds 0,1 --section compare_draft``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch_pruning as tp
from pytorch_lightning.callbacks import ModelPruning
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import _results
import distillation
import pruning_speed
from _timing import quiet_trainer, timed_steps
from slimming import sparsity_overhead

from lightning_prune.callbacks import Distillation, SparsityRegularization, StructuredPruning
from lightning_prune.cli import load_recipe, recipe_datamodule
from lightning_prune.data import DetectionDataModule
from lightning_prune.export import load_module
from lightning_prune.models import DetectorModule
from lightning_prune.pruning import resize_to_state_dict
from lightning_prune.pruning.checkpoint import import_class
from lightning_prune.pruning.sensitivity import SensitivityAnalysis, SensitivityResult
from lightning_prune.report import evaluate_map, latency_ms, model_stats

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = {  # family -> (its recipe on the built-in data, the slimming recipe whose sparsity penalty we take)
    "yolov8": ("recipes/shapes/yolov8n.yaml", "recipes/shapes/yolov8n-slim.yaml"),
    "yolov3": ("recipes/shapes/yolov3-tiny.yaml", "recipes/shapes/yolov3-slim.yaml"),
}
ALIASES = {"yolov3": "yolov3m"}  # the reference YOLOv3 of recipes/coco/yolov3.yaml
TOLERANCE = 0.03  # StructuredPruning's: a MACs target is met within 3%
ROUND_TO = 8  # our rows' default `round_to` (--round_to); the file names of other values say it
# family -> the "+ KD" rows' Distillation (besides teacher and start epoch; the cached runs in --out do not record it).
# YOLOv8: FM-NMS averages over every candidate while YOLOv8's loss is per positive, weight 1 does nothing there; this is
# the setting benchmarks/distillation.py measured first (+0.40; its default is now stronger)
KD: dict[str, dict[str, Any]] = {
    "yolov8": {"loss": "fm_nms", "weight": 100, "features": distillation.YOLOV8_NECK, "feature_weight": 10},
    "yolov3": {"loss": "fm_nms", "weight": 1.0},
}
TP_STEPS = 5  # steps of Torch-Pruning's iterative loop (its example: 16 steps of 10 epochs each; ours share the budget)
# option: (full run, --quick) defaults; img_size None: the recipe's
DEFAULTS: dict[str, tuple[Any, Any]] = {
    "models": ("yolov8s,yolov3", "yolov8n,yolov3-tiny"),
    "img_size": (None, 64),
    "seeds": ("0,1,2", "0"),
    "baseline_epochs": (15, 1),
    "finetune_epochs": (5, 2),
    "ratios": ("0.25,0.5,0.75", "0.75"),
    "selection_batches": (4, 1),
    "repeats": (20, 2),
    "steps": (12, 3),
    "rounds": (4, 1),
    "event_runs": (5, 1),
}
QUICK_DATA = {"num_train": 8, "num_val": 4, "batch_size": 4, "num_workers": 0}
QUICK_TRAINER = {"limit_train_batches": 2}


@dataclass
class Spec:
    """One model of the comparison, built from its family's recipe."""

    name: str
    model: dict[str, Any]  # class_path, init_args (the scale set)
    data: dict[str, Any]  # the recipe's data section
    sparsity: dict[str, Any]  # SparsityRegularization arguments of the family's slimming recipe
    kd: dict[str, Any]  # Distillation arguments of the family's "+ KD" rows (KD)

    def build(self) -> DetectorModule:
        cls = import_class(self.model["class_path"], "--models")
        return cls(**{**self.model["init_args"], "img_size": self.data["img_size"]})

    @property
    def shared(self) -> dict[str, Any]:
        """As a recipe's shared section, for the step-time measurements of the other benchmarks."""
        return {"model": self.model, "data": self.data}


@dataclass
class Budget:
    """What every method of one model and seed gets: the same baseline, training epochs and MACs goal."""

    epochs: int
    target_macs: float
    teacher: Path  # the baseline's checkpoint: the KD teacher
    sparsity: dict[str, Any]
    kd: dict[str, Any]  # the "+ KD" rows' Distillation arguments
    selection: list[Any]  # unaugmented training batches the sensitivity analysis scores on
    ratios: list[float]  # of the sensitivity analysis
    search_iterations: int  # of Torch-Pruning's ratio bisection
    trainer: dict[str, Any]  # more Trainer arguments (the quick run's batch limit)
    stages: Path | None = None  # the seed's stages folder: the sensitivity table is kept there too
    round_to: int = ROUND_TO  # our rows' StructuredPruning(round_to=...) and the sensitivity analysis's
    cache: dict[str, Any] = field(default_factory=dict)  # the sensitivity table (and its seconds), shared by two rows


Method = Callable[[DetectorModule, DetectionDataModule, Budget], tuple[nn.Module, float]]


def resolve_spec(name: str, img_size: int | None, data: dict[str, Any]) -> Spec:
    """The :class:`Spec` of ``yolov8n`` / ``yolov8s`` / ``yolov3`` / ``yolov3-tiny`` / ``yolov3s`` / ...

    Raises:
        ValueError: an unknown name.
    """
    match = re.fullmatch(r"(yolov8|yolov3)-?(tiny|n|s|m|l)", ALIASES.get(name, name))
    if match is None:
        raise ValueError(
            f"Expected argument `--models` to list yolov8n/s/m, yolov3 (= yolov3m) or yolov3-tiny/n/s/m/l but got "
            f"{name!r}."
        )
    family, scale = match.groups()
    recipe_path, slim_path = FAMILIES[family]
    recipe = load_recipe(ROOT / recipe_path)
    model = {**recipe["model"], "init_args": {**recipe["model"]["init_args"], "scale": scale}}
    section = {k: v for k, v in {**recipe["data"], **data, "img_size": img_size}.items() if v is not None}
    section.setdefault("img_size", recipe["data"]["img_size"])
    return Spec(name, model, section, _sparsity_args(load_recipe(ROOT / slim_path)), KD[family])


def _sparsity_args(recipe: dict[str, Any]) -> dict[str, Any]:
    """The penalty (and group lasso) of a slimming recipe's SparsityRegularization; the epochs are the budget's."""
    stages = recipe.get("pipeline", {})
    callbacks = [*recipe.get("trainer", {}).get("callbacks", []), *stages.get("sparsity", {}).get("callbacks", [])]
    args = next(c["init_args"] for c in callbacks if c["class_path"].endswith("SparsityRegularization"))
    return {k: v for k, v in args.items() if k in ("penalty", "group_lasso")}


# ---------------------------------------------------------------------------------------------- training
def fit(
    module: pl.LightningModule, data: DetectionDataModule, epochs: int, callbacks: list, trainer_args: dict[str, Any]
) -> pl.Trainer:
    """``epochs`` epochs on the CPU without validation, logger or checkpoints (mAP is measured afterwards), in
    training mode: the Trainer keeps each submodule's mode, and a module loaded for evaluation (``load_module``,
    ``tp_prune``) would otherwise finetune with frozen BatchNorm statistics (measured: YOLOv8s diverged to NaN)."""
    module.train()
    trainer = quiet_trainer(devices=1, max_epochs=epochs, num_sanity_val_steps=0, callbacks=callbacks, **trainer_args)
    trainer.fit(module, datamodule=data)
    return trainer


def finetune(
    base: DetectorModule, data: DetectionDataModule, budget: Budget, callbacks: list
) -> tuple[nn.Module, float]:
    start = time.perf_counter()
    fit(base, data, budget.epochs, callbacks, budget.trainer)
    return base, time.perf_counter() - start


def kd(budget: Budget, start_epoch: int) -> Distillation:
    return Distillation(teacher=str(budget.teacher), **budget.kd, start_epoch=start_epoch)


def prune_epochs(epochs: int, steps: int = 3) -> list[int]:
    """Up to ``steps`` pruning epochs spread over the first half of ``epochs`` (the rest finetunes the final size)."""
    last = (epochs - 1) // 2
    n = min(steps, last + 1)
    return sorted({round(i * last / (n - 1)) for i in range(n)}) if n > 1 else [0]


# ---------------------------------------------------------------------------------------------- methods: peers
def model_pruning(pruning_fn: str) -> Method:
    """Lightning's ModelPruning as its docs show it, on the conv weights at the nominal ratio."""

    def method(base: DetectorModule, data: DetectionDataModule, budget: Budget) -> tuple[nn.Module, float]:
        outputs = set(base.adapter.output_layers(base))
        weights = [(m, "weight") for n, m in base.named_modules() if isinstance(m, nn.Conv2d) and n not in outputs]
        amount = 1.0 - budget.target_macs
        how = (
            {"use_global_unstructured": True}
            if pruning_fn == "l1_unstructured"
            else {"use_global_unstructured": False, "pruning_dim": 0, "pruning_norm": 2}
        )
        callback = ModelPruning(
            pruning_fn,
            parameters_to_prune=weights,
            amount=lambda epoch: amount if epoch == 0 else 0.0,  # once: each call prunes a share of what is left
            use_lottery_ticket_hypothesis=False,  # a rewind to the weights at fit start would undo the finetuning
            make_pruning_permanent=True,
            **how,
        )
        return finetune(base, data, budget, [callback])

    return method


def tp_one_shot(base: DetectorModule, data: DetectionDataModule, budget: Budget) -> tuple[nn.Module, float]:
    start = time.perf_counter()
    pruned, _ = pruning_speed.search_tp_ratio(
        base, 1.0 - budget.target_macs, None, budget.search_iterations, base.img_size
    )
    fit(pruned, data, budget.epochs, [], budget.trainer)
    return pruned, time.perf_counter() - start


def tp_iterative(base: DetectorModule, data: DetectionDataModule, budget: Budget) -> tuple[nn.Module, float]:
    start = time.perf_counter()
    steps = min(TP_STEPS, budget.epochs)
    # the example prunes 1 - (1 - r) ** (1 / steps) of the current channels per step; r is bisected to the target
    _, step_ratio = pruning_speed.search_tp_ratio(
        base, 1.0 - budget.target_macs, None, budget.search_iterations, base.img_size, steps, tp.pruner.GroupNormPruner
    )
    shares = [budget.epochs // steps + (i >= steps - budget.epochs % steps) for i in range(steps)]  # extra at the end
    for epochs in shares:
        pruning_speed.tp_prune(base, step_ratio, size=base.img_size, pruner=tp.pruner.GroupNormPruner)
        fit(base, data, epochs, [], budget.trainer)  # a new training run per step, as the example's `train_v2`
    return base, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- methods: ours
def slimming(with_kd: bool) -> Method:
    def method(base: DetectorModule, data: DetectionDataModule, budget: Budget) -> tuple[nn.Module, float]:
        at = budget.epochs // 2  # sparsity training first, then prune and finetune
        callbacks: list[pl.Callback] = []
        if at > 0:
            callbacks.append(SparsityRegularization(**budget.sparsity, stop_epoch=at))
        callbacks.append(
            StructuredPruning(
                importance="bn_scale", target_macs_ratio=budget.target_macs, epochs=[at], round_to=budget.round_to
            )
        )
        return finetune(base, data, budget, callbacks + ([kd(budget, at)] if with_kd else []))

    return method


def taylor_iterative(with_kd: bool) -> Method:
    def method(base: DetectorModule, data: DetectionDataModule, budget: Budget) -> tuple[nn.Module, float]:
        epochs = prune_epochs(budget.epochs)
        pruning = StructuredPruning(
            importance="taylor",
            target_macs_ratio=budget.target_macs,
            schedule="cubic" if len(epochs) > 1 else "one_shot",
            epochs=epochs,
            round_to=budget.round_to,
        )
        return finetune(base, data, budget, [pruning, *([kd(budget, 0)] if with_kd else [])])

    return method


def uniform_one_shot(with_kd: bool) -> Method:
    """Our callback in the peers' setting: one ratio for every layer (``global_pruning=False``, ``l2``), one shot."""

    def method(base: DetectorModule, data: DetectionDataModule, budget: Budget) -> tuple[nn.Module, float]:
        pruning = StructuredPruning(
            importance="l2", target_macs_ratio=budget.target_macs, global_pruning=False, round_to=budget.round_to
        )
        return finetune(base, data, budget, [pruning, *([kd(budget, 0)] if with_kd else [])])

    return method


def budget_allocated(with_kd: bool) -> Method:
    def method(base: DetectorModule, data: DetectionDataModule, budget: Budget) -> tuple[nn.Module, float]:
        if "sensitivity" not in budget.cache:  # the same baseline's table serves the rows with and without KD
            budget.cache["sensitivity"] = sensitivity_stage(base, budget)
        table, analysis_s = budget.cache["sensitivity"]
        pruning = StructuredPruning(
            allocation="sensitivity", sensitivity=table, target_macs_ratio=budget.target_macs, round_to=budget.round_to
        )
        module, seconds = finetune(base, data, budget, [pruning, *([kd(budget, 0)] if with_kd else [])])
        return module, seconds + analysis_s

    return method


def sensitivity_stage(base: DetectorModule, budget: Budget) -> tuple[SensitivityResult, float]:
    """The sensitivity table of ``base`` and the seconds it took, from ``budget.stages`` if a run kept it there."""
    ratios = ",".join(f"{r:g}" for r in budget.ratios)
    name = f"sensitivity-r{ratios}-s{len(budget.selection)}{round_suffix(budget.round_to)}.json"
    path = None if budget.stages is None else budget.stages / name
    if path is not None and path.is_file():
        saved = json.loads(path.read_text())
        return SensitivityResult.from_dict(saved["table"]), float(saved["seconds"])
    start = time.perf_counter()
    table = sensitivity_table(base, budget)
    seconds = time.perf_counter() - start
    if path is not None:
        path.write_text(json.dumps({"table": table.to_dict(), "seconds": seconds}))
    return table, seconds


def round_suffix(round_to: int) -> str:
    """What a stage file of our rows adds to its name for a ``round_to`` other than :data:`ROUND_TO`."""
    return "" if round_to == ROUND_TO else f"-round{round_to}"


def sensitivity_table(base: DetectorModule, budget: Budget) -> SensitivityResult:
    """Each group of ``base`` pruned alone at ``budget.ratios``, scored by mAP50-95 on the selection batches."""

    def evaluate(pruned: nn.Module) -> float:
        return evaluate_map(pruned.eval(), pruned.postprocess, budget.selection)["mAP"]

    analysis = SensitivityAnalysis(
        base, base.example_input_array, evaluate, ratios=budget.ratios, importance="l2", round_to=budget.round_to
    )
    return analysis.run()


PEERS: dict[str, Method] = {
    "ModelPruning l1_unstructured": model_pruning("l1_unstructured"),
    "ModelPruning ln_structured": model_pruning("ln_structured"),
    "Torch-Pruning one-shot": tp_one_shot,
    "Torch-Pruning iterative": tp_iterative,
}
OURS: dict[str, Method] = {
    f"{name}{' + KD' if with_kd else ''}": make(with_kd)
    for name, make in (
        ("slimming", slimming),
        ("Taylor iterative", taylor_iterative),
        ("budget-allocated", budget_allocated),
        ("uniform one-shot", uniform_one_shot),
    )
    for with_kd in (False, True)
}
METHODS = {**PEERS, **OURS}


# ---------------------------------------------------------------------------------------------- stages
def baseline_checkpoint(
    spec: Spec, data: DetectionDataModule, seed: int, epochs: int, folder: Path, trainer: dict
) -> Path:
    """The trained baseline of ``spec`` for ``seed`` (reused if ``folder`` has it)."""
    path = folder / "baseline.ckpt"
    if not path.is_file():
        pl.seed_everything(seed, verbose=False)
        module = spec.build()
        folder.mkdir(parents=True, exist_ok=True)
        fit(module, data, epochs, [], trainer).save_checkpoint(path)
    return path


def run_method(
    method: Method, baseline: Path, data: DetectionDataModule, budget: Budget, seed: int, path: Path
) -> tuple[nn.Module, float, bool]:
    """The method's model and seconds, from ``path`` if an earlier run saved them (then also ``True``)."""
    template = load_module(baseline)
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        resize_to_state_dict(template, saved["state_dict"])
        template.load_state_dict(saved["state_dict"])
        return template.eval(), float(saved["seconds"]), True
    pl.seed_everything(seed, verbose=False)
    template.warmup_epochs = 0  # continues from a trained model
    module, seconds = method(template, data, budget)
    state = {k: v for k, v in module.state_dict().items() if k != "_extra_state"}  # the shapes say the structure
    torch.save({"state_dict": state, "seconds": seconds}, path)
    return module.eval(), seconds, False


def nonzero(model: nn.Module) -> int:
    return sum(int(p.count_nonzero()) for p in model.parameters())


def compare_model(spec: Spec, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Every method on ``spec`` for every seed: the rows' results, the latencies, how many runs were reused."""
    data = recipe_datamodule({"data": spec.data})
    data.setup("fit")
    selection_data = recipe_datamodule({"data": {**spec.data, "val_split": data.train_split}})  # no augmentation
    selection = list(itertools.islice(selection_data.val_dataloader(), args.selection_batches))
    size = spec.data["img_size"]
    example = torch.zeros(1, 3, size, size)
    rows: dict[str, dict[str, Any]] = {
        name: {"mAP": [], "seconds": [], "failed": []} for name in ["Baseline", *args.methods]
    }
    timed: dict[str, nn.Module] = {}  # the first seed's models, for the latency
    reused = 0
    # what a baseline depends on; a method's file adds its own budget
    stage = f"{spec.name}-{size}px-b{args.baseline_epochs}{'-quick' if args.quick else ''}"
    for seed in args.seeds:
        folder = out / stage / f"seed{seed}"
        trainer = QUICK_TRAINER if args.quick else {}
        ckpt = baseline_checkpoint(spec, data, seed, args.baseline_epochs, folder, trainer)
        baseline = load_module(ckpt)
        rows["Baseline"]["mAP"].append(evaluate_map(baseline, baseline.postprocess, data.val_dataloader())["mAP"])
        if "Baseline" not in timed:  # the first seed's model gives the structure columns and the latency
            rows["Baseline"].update(model_stats(baseline, example), nonzero=nonzero(baseline))
            timed["Baseline"] = baseline
        budget = Budget(
            args.finetune_epochs,
            args.target_macs,
            ckpt,
            spec.sparsity,
            spec.kd,
            selection,
            args.ratios,
            args.search,
            trainer,
            folder,
            args.round_to,
        )
        for name in args.methods:
            slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
            suffix = round_suffix(budget.round_to) if name in OURS else ""  # the peers do not round
            path = folder / f"{slug}-e{args.finetune_epochs}-t{args.target_macs:g}{suffix}.pt"
            try:
                model, seconds, was_saved = run_method(METHODS[name], ckpt, data, budget, seed, path)
            except Exception as err:  # a method that fails gets its row, the run goes on
                rows[name]["failed"].append(
                    f"seed {seed}: {type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}"
                )
                print(f"[compare] {spec.name} seed {seed} {name} failed: {err}", flush=True)
                continue
            reused += was_saved
            rows[name]["mAP"].append(evaluate_map(model, model.postprocess, data.val_dataloader())["mAP"])
            rows[name]["seconds"].append(seconds)
            if name not in timed:
                rows[name].update(model_stats(model, example), nonzero=nonzero(model))
                timed[name] = model
            print(f"[compare] {spec.name} seed {seed} {name}: mAP50-95 {rows[name]['mAP'][-1]:.4f}", flush=True)
    names = list(timed)
    latency = {}  # (px, batch) -> {name: ms}
    for px in args.latency_sizes or [size]:
        for batch in (1, 8):
            x = torch.rand(batch, 3, px, px)
            latency[px, batch] = dict(zip(names, latency_ms([timed[n] for n in names], x, repeats=args.repeats)))
    return {"rows": rows, "latency": latency, "reused": reused}


# ---------------------------------------------------------------------------------------------- report
def model_table(spec: Spec, result: dict[str, Any]) -> list[str]:
    rows, latency = result["rows"], result["latency"]
    base = rows["Baseline"]
    sizes = sorted({px for px, _ in latency})
    lines = [
        "| method | params | MACs | "
        + "".join(f"CPU {px} px b{b} (ms) | " for px, b in latency)
        + "".join(f"fidelity {px} px b1 / b8 | " for px in sizes)
        + "mAP50-95 (mean ± std) | per seed | compression (min) |",
        "| --- | ---: | ---: | " + "---: | " * (len(latency) + len(sizes)) + "---: | --- | ---: |",
    ]
    for name, row in rows.items():
        if not row["mAP"]:
            lines.append(f"| {name} | failed: {row['failed'][0]} |" + " |" * (4 + len(latency) + len(sizes)))
            continue
        params = f"{row['params'] / 1e6:.3f}M"
        if row["nonzero"] < 0.99 * row["params"]:
            params += f" ({row['nonzero'] / 1e6:.3f}M nonzero)"
        cut = base["macs"] / row["macs"]
        speed = {key: latency[key]["Baseline"] / latency[key][name] for key in latency}
        wall = f"{statistics.mean(row['seconds']) / 60:.1f}" if row["seconds"] else "-"
        note = f" (failed: {'; '.join(row['failed'])})" if row["failed"] else ""
        lines.append(
            f"| {name} | {params} | {row['macs'] / 1e9:.3f}G ({row['macs'] / base['macs']:.1%}) "
            + "".join(f"| {latency[key][name]:.1f} (×{speed[key]:.2f}) " for key in latency)
            + "".join(f"| {speed[px, 1] / cut:.2f} / {speed[px, 8] / cut:.2f} " for px in sizes)
            + f"| {_results.mean_std(row['mAP'])} "
            f"| {', '.join(f'{100 * v:.2f}' for v in row['mAP'])}{note} | {wall} |"
        )
    return lines


def targets(spec: Spec, result: dict[str, Any], target_macs: float) -> list[str]:
    """The issue's targets for one model, met / NOT met from the measured rows."""
    rows, latency = result["rows"], result["latency"]
    base = rows["Baseline"]
    ok = {n: r for n, r in rows.items() if r["mAP"] and n != "Baseline"}
    at_target = {n: r for n, r in ok.items() if n in OURS and r["macs"] <= base["macs"] * target_macs * (1 + TOLERANCE)}
    if not at_target:
        return [f"| {spec.name}: a lightning_prune row within 3% of the MACs target | none | NOT met |"]
    best = max(at_target, key=lambda n: statistics.mean(at_target[n]["mAP"]))
    best_map, best_macs = statistics.mean(ok[best]["mAP"]), ok[best]["macs"]
    peers = {n: r for n, r in ok.items() if n in PEERS}
    lost = [
        n
        for n, r in peers.items()
        if not (best_map > statistics.mean(r["mAP"]) and best_macs <= r["macs"] * (1 + TOLERANCE))
    ]
    absent = [n for n in PEERS if n in rows and n not in peers]
    beaten = f"beats {len(peers) - len(lost)} of {len(peers)}" + (f"; not {', '.join(lost)}" if lost else "")
    lines = [
        f"| {spec.name}: best lightning_prune row (`{best}`, {100 * best_map:.2f} mAP50-95 at "
        f"{best_macs / base['macs']:.1%} MACs) beats every peer row: higher mAP50-95 at <= MACs | {beaten}"
        + (f" (failed, not compared: {', '.join(absent)})" if absent else "")
        + f" | {'met' if peers and not lost else 'NOT met'} |"
    ]
    for (px, batch), ms in latency.items():
        speed = ms["Baseline"] / ms[best]
        lines.append(
            f"| {spec.name}: `{best}` CPU speedup >= 1.8× at -{1 - target_macs:.0%} MACs, {px} px, batch {batch} | "
            f"×{speed:.2f} | {'met' if speed >= 1.8 else 'NOT met'} |"
        )
    return lines


def overheads(spec: Spec, args: argparse.Namespace) -> list[str]:
    """Step-time ratios with / without SparsityRegularization and Distillation (the other benchmarks' measurements)."""
    sparsity = sparsity_overhead(spec.shared, spec.sparsity, args.steps, args.rounds)
    distill = distillation.step_cost(spec.shared, args.steps, args.rounds, spec.kd)  # the setting of its "+ KD" rows
    return [
        f"Step-time overheads on {spec.name} (synthetic batches of {spec.data.get('batch_size', 16)} at "
        f"{spec.data['img_size']} px; fits of {args.steps} batches interleaved, {args.rounds} rounds, medians):",
        "",
        "| callback | step without | step with | ratio |",
        "| --- | ---: | ---: | ---: |",
        f"| SparsityRegularization ({spec.sparsity}) | {sparsity['plain'] * 1e3:.0f} ms | "
        f"{sparsity['regularized'] * 1e3:.0f} ms | ×{sparsity['ratio']:.3f} (rounds ×{sparsity['low']:.3f} … "
        f"×{sparsity['high']:.3f}) |",
        f"| Distillation ({spec.kd}; student pruned to half its MACs; the unpruned teacher's forward alone "
        f"{distill['teacher'] * 1e3:.0f} ms) | {distill['student'] * 1e3:.0f} ms | {distill['kd'] * 1e3:.0f} ms | "
        f"×{distill['kd'] / distill['student']:.3f} |",
    ]


def event_lines(args: argparse.Namespace) -> tuple[list[str], float]:
    scale = "n" if args.quick else "s"
    median = pruning_speed.event_medians(scale, "", args.event_runs, with_target=not args.quick)
    target = f"{median['target']:.2f}" if "target" in median else "skipped (--quick)"
    return [
        f"| one pruning event on YOLOv8{scale} (80 classes, traced at {pruning_speed.TRACE} px; median of "
        f"{args.event_runs}) | seconds |",
        "| --- | ---: |",
        f"| lightning_prune, `pruning_ratio=0.5`, l2 (no calibration): prune + SGD optimizer patch + re-wrap | "
        f"{median['ratio']:.2f} |",
        f"| lightning_prune, `target_macs_ratio=0.5` (adds the search of dry runs) | {target} |",
        f"| plain Torch-Pruning: dependency graph + `step()` at ratio 0.5 | {median['tp']:.2f} |",
    ], median["ratio"]


def _sizes(text: str) -> list[int]:
    """``--latency_sizes``: positive ints, comma-separated."""
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 32:
        raise argparse.ArgumentTypeError(f"expected input sides >= 32, comma-separated (e.g. 128,256), got {text!r}")
    return list(dict.fromkeys(sizes))


def _round_to(text: str) -> int:
    """``--round_to``: a positive int."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a channel multiple >= 1 (e.g. 16), got {text!r}")
    return value


def resolve_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke test: 64 px, 8 images, 1 + 2 epochs, one seed")
    parser.add_argument("--models", help=f"comma-separated (default {DEFAULTS['models'][0]})")
    parser.add_argument("--img_size", type=int, help="input side (default the recipe's, 256)")
    parser.add_argument("--seeds", help=f"comma-separated (default {DEFAULTS['seeds'][0]})")
    parser.add_argument("--baseline_epochs", type=int, help=f"default {DEFAULTS['baseline_epochs'][0]}")
    parser.add_argument(
        "--finetune_epochs", type=int, help=f"every method's (default {DEFAULTS['finetune_epochs'][0]})"
    )
    parser.add_argument("--target_macs", type=float, default=0.5, help="fraction of the baseline's MACs left")
    parser.add_argument("--methods", help="comma-separated subset of the rows (default all)")
    parser.add_argument("--ratios", help=f"of the sensitivity analysis (default {DEFAULTS['ratios'][0]})")
    parser.add_argument("--selection_batches", type=int, help="training batches the sensitivity analysis scores on")
    parser.add_argument(
        "--round_to", type=_round_to, default=ROUND_TO, help=f"our rows' channel multiple (default {ROUND_TO})"
    )
    parser.add_argument("--repeats", type=int, help="timed rounds per latency (default 20)")
    parser.add_argument(
        "--latency_sizes",
        type=_sizes,
        help="input sides the latency is measured at, comma-separated (default: the training side)",
    )
    parser.add_argument("--steps", type=timed_steps, help="batches per timed fit of the overheads (default 12)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds of the step-time overheads (default 4)")
    parser.add_argument("--event_runs", type=int, help="runs of the pruning event (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the targets are for 2 CPU cores)")
    parser.add_argument("--data_root", help="the built-in data's cache folder (default ~/.cache/lightning_prune)")
    parser.add_argument("--out", type=Path, help="stages folder, reused when present (default: a temporary one)")
    parser.add_argument("--results", type=Path, default=_results.RESULTS, help="the markdown file to update")
    parser.add_argument("--section", default="compare", help="its section to write (default compare)")
    args = parser.parse_args(argv)
    for key, (full, quick) in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.seeds = [int(s) for s in str(args.seeds).split(",")]
    args.ratios = [float(r) for r in str(args.ratios).split(",")]
    args.methods = list(METHODS) if args.methods is None else [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown --methods {unknown}; expected among {list(METHODS)}")
    args.search = 4 if args.quick else 14  # bisection steps of Torch-Pruning's ratio
    return args


def main(argv: list[str] | None = None) -> str:
    args = resolve_args(argv)
    torch.set_num_threads(args.threads)
    data = {**(QUICK_DATA if args.quick else {}), "root": args.data_root}
    specs = [resolve_spec(name, args.img_size, data) for name in args.models]
    quiet = logging.getLogger("pytorch_lightning")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # a Trainer per row: keep the device banners out of the table
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = args.out or Path(tmp)
            results = {spec.name: compare_model(spec, args, out) for spec in specs}
        train_s = time.perf_counter() - start
        overhead = overheads(specs[0], args)
        event, event_s = event_lines(args)
    finally:
        quiet.setLevel(level)
    sections = []
    verdicts = ["| target (issue #8) | measured | |", "| --- | --- | --- |"]
    for spec in specs:
        result = results[spec.name]
        base = result["rows"]["Baseline"]
        sections += [
            f"### {spec.name} ({spec.data['img_size']} px): baseline {base['params'] / 1e6:.3f}M params, "
            f"{base['macs'] / 1e9:.3f} GMACs"
            + (f"; {result['reused']} method runs reused from `--out`" if result["reused"] else ""),
            "",
            *model_table(spec, result),
            "",
        ]
        verdicts += targets(spec, result, args.target_macs)
    verdicts.append(
        f"| one pruning event on YOLOv8{'n' if args.quick else 's'}-size <= 1 s on 2 CPU cores (calibration excluded; "
        f"{args.threads} threads here) | {event_s:.2f} s | {'met' if event_s <= 1.0 else 'NOT met'} |"
    )
    body = "\n".join(
        [
            f"Command: `{_results.command('compare.py', argv)}`."
            f" Built-in shapes data; seeds {args.seeds}; every method trains {args.finetune_epochs} epochs from the "
            f"same baseline ({args.baseline_epochs} epochs) per seed; MACs target {args.target_macs:.0%} of the "
            f"baseline's; ours with `round_to={args.round_to}`; latency: BatchNorm-fused eager forward, the first "
            f"seed's models interleaved, median of {args.repeats} rounds, {args.threads} threads; fidelity = latency "
            f"speedup ÷ MACs reduction. Baselines, methods, mAP and latency took {train_s / 60:.1f} min."
            + (" **Quick smoke run**: not a measurement." if args.quick else ""),
            "",
            *sections,
            *overhead,
            "",
            *event,
            "",
            *verdicts,
        ]
    )
    return _results.publish(args.section, body, args.results)


if __name__ == "__main__":
    main()
