"""``lightning-prune pipeline``: baseline → sparsity training → pruning → finetuning from one recipe, resumable.

A pipeline recipe is an ordinary recipe (model, data, trainer: shared by every stage) plus a ``pipeline`` mapping
with one section per stage, each merged over the shared config for that stage only::

    _base_: [yolov3-tiny.yaml]
    pipeline:
      baseline: {trainer: {max_epochs: 20}}
      sparsity:
        trainer: {max_epochs: 20}
        callbacks: [{class_path: lightning_prune.callbacks.SparsityRegularization, init_args: {penalty: 0.001}}]
      prune:
        callbacks: [{class_path: lightning_prune.callbacks.NetworkSlimming, init_args: {percentile: 50}}]
      finetune: {trainer: {max_epochs: 10}, model: {init_args: {lr: 0.0002}}}

``callbacks`` of a stage are added to the shared trainer callbacks. ``{out}`` in a stage's strings is the output
folder, so that a stage can name an earlier stage's weights (a distillation teacher: ``"{out}/sparsity.ckpt"``).
``baseline`` and ``prune`` are required (``--baseline CKPT`` replaces training the baseline); ``sparsity`` and
``finetune`` are optional. Each stage starts from the weights the previous one ended with (a fresh optimizer and
schedule). ``prune`` trains nothing: its callbacks prune at the start of a fit that stops before the first batch.

Everything goes into ``--out``: each stage's checkpoints (``<stage>/checkpoints``, ``last.ckpt`` among them), its
final weights (``<stage>.ckpt``), ``pipeline.json`` (stages done, their checkpoints and validation mAP) and the
report (``report.md``, ``report.json``, :func:`~lightning_prune.report.compression.compression_report`): rows
Baseline / Sparse / Pruned / Finetuned, columns params, MACs, size (MB), latency (ms; CPU eager with BatchNorm fused
and ONNX Runtime with the ``export`` extra, batch 1 and 8, medians of interleaved runs), and each stage's validation
mAP50 and mAP50-95. The ONNX files of the stages are left in ``--out/onnx``. A stopped pipeline
run again with the same arguments skips the stages done and resumes the interrupted one from its ``last.ckpt``.

Runs in one process (one device); multi-GPU stages are ``lightning-prune fit`` runs on a stage's checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import yaml
from typing_extensions import override

from lightning_prune.cli import PIPELINE_KEY, LightningPruneCLI, load_recipe, merge_configs
from lightning_prune.report.compression import compression_report, write_report

STAGES = ("baseline", "sparsity", "prune", "finetune")
ROWS = {"baseline": "Baseline", "sparsity": "Sparse", "prune": "Pruned", "finetune": "Finetuned"}
_CHECKPOINT = "pytorch_lightning.callbacks.ModelCheckpoint"


def split_recipe(recipe: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The shared config and each present stage's section (in pipeline order) of a pipeline recipe.

    Raises:
        ValueError: no ``pipeline`` mapping, an unknown stage, a section that is not a mapping, ``prune`` without
            callbacks, or ``callbacks`` that are not a list.
    """
    sections = recipe.get(PIPELINE_KEY)
    if not isinstance(sections, dict):
        raise ValueError(
            f"Expected the recipe to have a `{PIPELINE_KEY}` mapping of stages {list(STAGES)} but got "
            f"{type(sections).__name__}. HINT: `lightning-prune fit` runs a single-stage recipe."
        )
    unknown = sorted(set(sections) - set(STAGES))
    if unknown:
        raise ValueError(f"Expected `{PIPELINE_KEY}` stages among {list(STAGES)} but got {unknown}.")
    stages: dict[str, dict[str, Any]] = {}
    for name in STAGES:
        if name not in sections and name not in ("baseline", "prune"):
            continue
        section = sections.get(name) or {}
        if not isinstance(section, dict):
            raise ValueError(f"Expected `{PIPELINE_KEY}.{name}` to be a mapping but got {type(section).__name__}.")
        callbacks = section.get("callbacks", [])
        if not isinstance(callbacks, list):
            raise ValueError(
                f"Expected `{PIPELINE_KEY}.{name}.callbacks` to be a list but got {type(callbacks).__name__}."
            )
        if name == "prune" and not callbacks:
            raise ValueError(
                f"Expected `{PIPELINE_KEY}.prune.callbacks` to list the pruning callbacks (e.g. "
                "lightning_prune.callbacks.NetworkSlimming) but got none."
            )
        stages[name] = section
    shared = {k: v for k, v in recipe.items() if k != PIPELINE_KEY}
    return shared, stages


def stage_config(shared: dict[str, Any], name: str, section: dict[str, Any], out: Path) -> dict[str, Any]:
    """The full LightningCLI config of one stage: ``section`` merged over ``shared``, its callbacks added.

    Fit stages checkpoint into ``out/<name>/checkpoints`` (``last.ckpt`` included, for resuming); the prune stage
    runs only its own callbacks, without checkpointing or logging.
    """
    section = _with_out(dict(section), str(out))
    extra = list(section.pop("callbacks", []))
    config = merge_configs(shared, section)
    trainer = dict(config.get("trainer") or {})
    callbacks = trainer.get("callbacks") or []
    callbacks = copy.deepcopy(callbacks if isinstance(callbacks, list) else [callbacks])
    trainer["default_root_dir"] = str(out / name)
    if name == "prune":
        trainer.update(callbacks=extra, max_epochs=1, enable_checkpointing=False, logger=False)
    else:
        directory = str(out / name / "checkpoints")
        saves_last = False
        for callback in callbacks:
            if isinstance(callback, dict) and str(callback.get("class_path", "")).endswith("ModelCheckpoint"):
                args = callback.setdefault("init_args", {})
                args["dirpath"] = directory
                saves_last = saves_last or bool(args.get("save_last"))
        if not saves_last:
            callbacks.append({"class_path": _CHECKPOINT, "init_args": {"dirpath": directory, "save_last": True}})
        trainer.update(callbacks=callbacks + extra, enable_checkpointing=True)
    config["trainer"] = trainer
    return config


def _with_out(value: Any, out: str) -> Any:
    """``value`` with ``{out}`` replaced by ``out`` in every string inside it."""
    if isinstance(value, str):
        return value.replace("{out}", out)
    if isinstance(value, dict):
        return {k: _with_out(v, out) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_out(v, out) for v in value]
    return value


class _StopBeforeTraining(pl.Callback):
    """Ends ``fit`` at the first epoch start, after the callbacks before it (the pruning ones) ran theirs."""

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.should_stop = True


class Pipeline:
    """The stages of one pipeline recipe, run into ``out``; see the module docstring.

    Args:
        recipe: path of the pipeline recipe.
        out: folder for checkpoints, state and report.
        baseline: a checkpoint to start from instead of training the baseline.
        overrides: LightningCLI arguments applied to every stage (e.g. ``["--trainer.accelerator", "cpu"]``).
        latency_repeats: timed rounds of the latency measurement.

    Raises:
        FileNotFoundError: the recipe or the baseline checkpoint does not exist.
        ValueError: the recipe is not a valid pipeline recipe, or ``out`` holds a pipeline of another recipe.
    """

    def __init__(
        self,
        recipe: str | Path,
        out: str | Path,
        baseline: str | Path | None = None,
        overrides: list[str] | None = None,
        latency_repeats: int = 20,
    ) -> None:
        self.shared, self.stages = split_recipe(load_recipe(recipe))
        if baseline is not None and not Path(baseline).is_file():
            raise FileNotFoundError(
                f"Expected argument `--baseline` to be an existing checkpoint but got {baseline!r}."
            )
        self.out = Path(out)
        self.baseline = None if baseline is None else Path(baseline)
        self.overrides = list(overrides or [])
        self.latency_repeats = latency_repeats
        fingerprint = json.dumps([self.shared, self.stages, self.overrides, str(self.baseline)], sort_keys=True)
        self.fingerprint = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
        self.state = self._load_state()

    # ------------------------------------------------------------------ state
    @property
    def state_path(self) -> Path:
        return self.out / "pipeline.json"

    def _load_state(self) -> dict[str, Any]:
        if not self.state_path.is_file():
            return {"fingerprint": self.fingerprint, "stages": {}}
        state = json.loads(self.state_path.read_text())
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"Expected `--out` {str(self.out)!r} to be empty or to hold this pipeline, but it holds a pipeline of "
                "another recipe, baseline or overrides. HINT: give a new `--out` (nothing there is overwritten)."
            )
        return state

    def _save_state(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2))
        os.replace(tmp, self.state_path)

    # ------------------------------------------------------------------ running
    def run(self) -> str:
        """Run the stages not done yet, then measure and write the report; the report as markdown."""
        previous: Path | None = None
        for name, section in self.stages.items():
            done = self.state["stages"].get(name)
            if done is None:
                done = self._run_stage(name, section, previous)
                self.state["stages"][name] = done
                self._save_state()
            previous = Path(done["checkpoint"])
        return self.report()

    def _cli(self, config: dict[str, Any], extra: list[str] | None = None) -> LightningPruneCLI:
        args = ["--config", yaml.safe_dump(config, sort_keys=False), *self.overrides, *(extra or [])]
        argv, sys.argv = sys.argv, sys.argv[:1]  # the stage's arguments are `args`, not this command's
        try:
            return LightningPruneCLI(args=args, run=False)
        finally:
            sys.argv = argv

    def _run_stage(self, name: str, section: dict[str, Any], previous: Path | None) -> dict[str, Any]:
        config = stage_config(self.shared, name, section, self.out)
        forced = ["--trainer.max_epochs", "1"] if name == "prune" else []
        cli = self._cli(config, forced)
        model, trainer = cli.model, cli.trainer
        final = self.out / f"{name}.ckpt"
        if name == "baseline" and self.baseline is not None:
            _load_weights(model, self.baseline)
            final = self.baseline
        else:
            if previous is not None:
                _load_weights(model, previous)
            if name == "prune":
                trainer.callbacks.append(_StopBeforeTraining())
            last = self.out / name / "checkpoints" / "last.ckpt"
            trainer.fit(model, datamodule=cli.datamodule, ckpt_path=last if last.is_file() else None)
            trainer.save_checkpoint(final, weights_only=True)
        metrics = trainer.validate(model, datamodule=cli.datamodule, verbose=False)
        scores = {k: float(v) for k, v in (metrics[0] if metrics else {}).items() if k in ("val/mAP", "val/mAP50")}
        return {"checkpoint": str(final), "metrics": scores}

    # ------------------------------------------------------------------ report
    def report(self) -> str:
        """Measure every stage's final model side by side; write ``report.md`` and ``report.json``; the markdown."""
        cli = self._cli(stage_config(self.shared, "baseline", self.stages["baseline"], self.out))
        fresh = cli.model.cpu()
        example = fresh.example_input_array
        models = {}
        for name, done in self.state["stages"].items():
            models[ROWS[name]] = copy.deepcopy(fresh)
            _load_weights(models[ROWS[name]], Path(done["checkpoint"]))
        # mAP as each stage's own validation measured it (pipeline.json), not measured again
        rows = compression_report(models, example, out_dir=self.out / "onnx", repeats=self.latency_repeats)
        for row, done in zip(rows, self.state["stages"].values(), strict=True):
            metrics = done["metrics"]
            row.update(stage=row["name"], checkpoint=done["checkpoint"], **metrics)
            row.update(mAP=metrics.get("val/mAP"), mAP50=metrics.get("val/mAP50"))
        write_report(rows, self.out, tuple(example.shape), stem="report")
        return (self.out / "report.md").read_text().strip()


def _load_weights(model: pl.LightningModule, checkpoint: Path) -> None:
    """Load a checkpoint's weights into ``model`` (its pruning history is replayed first, by ``PrunableMixin``)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model.load_state_dict(state["state_dict"] if "state_dict" in state else state)


def main(args: list[str]) -> str:
    """``lightning-prune pipeline --config RECIPE [--out DIR] [--baseline CKPT] [LightningCLI overrides ...]``."""
    parser = argparse.ArgumentParser(prog="lightning-prune pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="pipeline recipe (YAML with a `pipeline` mapping)")
    parser.add_argument("--out", help="output folder; default pipelines/<recipe name>")
    parser.add_argument("--baseline", help="checkpoint to start from instead of training the baseline")
    parser.add_argument("--latency_repeats", type=int, default=20, help="timed rounds per model (default 20)")
    known, overrides = parser.parse_known_args(args)
    out = known.out or str(Path("pipelines") / Path(known.config).stem)
    table = Pipeline(known.config, out, known.baseline, overrides, known.latency_repeats).run()
    print(f"[lightning-prune] pipeline report ({out}/report.md):\n{table}", flush=True)
    return table
