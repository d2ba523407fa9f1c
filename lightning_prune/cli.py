"""The ``lightning-prune`` command: LightningCLI over our detectors and data.

Example:
    lightning-prune fit --config recipes/shapes/yolov3-tiny.yaml
    lightning-prune pipeline --config recipes/shapes/yolov3-slim.yaml
    lightning-prune export --ckpt lightning_logs/version_0/checkpoints/last.ckpt --format onnx --int8 --calibration imgs
    lightning-prune validate --config recipes/coco/yolov8s.yaml --data.root /data/coco --ckpt_path best.ckpt
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.utilities import rank_zero_only

from lightning_prune.data import DetectionDataModule
from lightning_prune.models import DetectorModule
from lightning_prune.report import format_stats, model_stats


class LightningPruneCLI(LightningCLI):
    """LightningCLI whose model is any :class:`DetectorModule` (``class_path``) and data our data module."""

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(
            DetectorModule,
            DetectionDataModule,
            subclass_mode_model=True,
            args=args,
            run=run,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # the network input size follows the data's letterbox size: one number to set, never two to disagree
        parser.link_arguments("data.img_size", "model.init_args.img_size")

    def after_fit(self) -> None:
        self._print_summary("fit")

    def after_validate(self) -> None:
        self._print_summary("validate")

    @rank_zero_only
    def _print_summary(self, stage: str) -> None:
        model = self.model
        example = model.example_input_array
        if not isinstance(example, torch.Tensor):
            return
        stats = model_stats(model, example.to(model.device))
        metrics = self.trainer.callback_metrics
        maps = " | ".join(
            f"{name} {float(metrics[key]):.4f}"
            for name, key in (("mAP50-95", "val/mAP"), ("mAP50", "val/mAP50"))
            if key in metrics
        )
        lines = [f"[lightning-prune] {stage} done: {type(model).__name__} | {format_stats(stats)}"]
        lines.append(f"[lightning-prune] val {maps}" if maps else "[lightning-prune] val mAP: not computed")
        best = getattr(self.trainer.checkpoint_callback, "best_model_path", "")
        if best:
            lines.append(f"[lightning-prune] best checkpoint: {best}")
        print("\n".join(lines), flush=True)


BASE_KEY = "_base_"
PIPELINE_KEY = "pipeline"  # a multi-stage recipe, run by `lightning-prune pipeline` (lightning_prune.pipeline)


def load_recipe(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a recipe YAML, merging the files it lists under ``_base_`` first (paths relative to it).

    Mappings merge key by key (the recipe wins); any other value, lists included, is replaced.

    Raises:
        FileNotFoundError: the recipe or one of its bases does not exist.
        ValueError: a recipe is not a mapping, or bases form a cycle.
    """
    path = Path(path).resolve()
    if path in _seen:
        raise ValueError(f"Expected `{BASE_KEY}` recipes to form no cycle but {path} includes itself.")
    if not path.is_file():
        raise FileNotFoundError(f"Expected argument `--config` to be an existing YAML file but got {str(path)!r}.")
    config = yaml.safe_load(path.read_text()) or {}
    if not isinstance(config, dict):
        raise ValueError(f"Expected recipe {str(path)!r} to be a YAML mapping but got {type(config).__name__}.")
    bases = config.pop(BASE_KEY, [])
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = merge_configs(merged, load_recipe(path.parent / base, (*_seen, path)))
    return merge_configs(merged, config)


def recipe_datamodule(recipe: dict[str, Any]) -> DetectionDataModule:
    """The data module a recipe's ``data`` section builds (plain init args or ``class_path``/``init_args``), not set
    up: what commands outside ``fit`` (export, sensitivity) read the recipe's images from."""
    data = recipe.get("data") or {}
    init = data.get("init_args", data) if isinstance(data, dict) else {}
    return DetectionDataModule(**{k: v for k, v in init.items() if k != "class_path"})


def merge_configs(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` merged over ``base``: mappings key by key (``override`` wins), any other value replaced."""
    out = dict(base)
    for key, value in override.items():
        out[key] = (
            merge_configs(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def expand_configs(argv: list[str]) -> list[str]:
    """Replace every ``--config FILE`` whose YAML uses ``_base_`` by the merged config, given inline."""
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "--config" or arg.startswith("--config="):
            value = arg.split("=", 1)[1] if "=" in arg else next(it, None)
            keys = _peek_keys(value) if value is not None and value.endswith((".yaml", ".yml")) else set()
            if PIPELINE_KEY in keys:
                raise ValueError(
                    f"Expected `--config` to be a single-stage recipe but {value} is a pipeline recipe. "
                    f"HINT: run `lightning-prune pipeline --config {value}`."
                )
            if BASE_KEY in keys:
                value = yaml.safe_dump(load_recipe(value), sort_keys=False)
            out += ["--config"] + ([] if value is None else [value])
        else:
            out.append(arg)
    return out


def _peek_keys(path: str) -> set[str]:
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return set()  # let LightningCLI report the file as it usually does
    return set(loaded) if isinstance(loaded, dict) else set()


def main(args: list[str] | None = None) -> None:
    """Entry point of ``lightning-prune`` and ``python -m lightning_prune``."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["pipeline"]:
        from lightning_prune.pipeline import main as run_pipeline  # it builds on this module

        run_pipeline(argv[1:])
        return
    if argv[:1] == ["export"]:
        from lightning_prune.export import main as run_export

        run_export(argv[1:])
        return
    if argv[:1] == ["sensitivity"]:
        from lightning_prune.sensitivity import main as run_sensitivity

        run_sensitivity(argv[1:])
        return
    LightningPruneCLI(args=expand_configs(argv))


if __name__ == "__main__":
    main()
