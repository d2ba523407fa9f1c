"""``lightning-prune export``: a (pruned) checkpoint to ONNX or TorchScript, and optionally to INT8 ONNX.

The checkpoint is enough: it names its module's class (written by
:class:`~lightning_prune.pruning.checkpoint.PrunableMixin`; ``--model_class`` for others) and carries the pruning
history, which is replayed before the weights load, so the pruned architecture is rebuilt without the user's help.
Every exported file is checked against the PyTorch model on the example input (max |difference| ≤ ``--atol``).

``--int8`` quantizes the ONNX file with ONNX Runtime's static quantizer (QDQ, entropy calibration by default) on
``--calibration`` images, or on the training images of ``--config``'s data; the output convs stay in float unless
``--int8_outputs``. With ``--config``, the mAP of the fp32 and INT8 files is measured through ONNX Runtime on that
data's validation split, decoded by the model's own NMS.

Example:
    lightning-prune export --ckpt runs/pruned/last.ckpt --format onnx
    lightning-prune export --ckpt last.ckpt --format onnx --int8 --config recipes/shapes/yolov8n-prune-kd.yaml
    lightning-prune export --ckpt last.ckpt --format torchscript --output model.pt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_prune.pruning.checkpoint import CLASS_KEY, import_class
from lightning_prune.report.summary import format_stats, model_stats

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}


def load_module(ckpt: str | Path, model_class: str | None = None) -> nn.Module:
    """The module saved in a Lightning checkpoint, pruned structure included, on the CPU in eval mode.

    Args:
        ckpt: a checkpoint written by Lightning (``ModelCheckpoint``, ``trainer.save_checkpoint``).
        model_class: the module's class path; default the class the checkpoint records.

    Raises:
        FileNotFoundError: ``ckpt`` does not exist.
        ValueError: the file is not a Lightning checkpoint, records no class and none is given, or the class
            cannot be imported or is not a LightningModule.
    """
    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"Expected argument `--ckpt` to be an existing checkpoint file but got {str(path)!r}.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises pickle, zip and runtime errors alike for a foreign file
        raise ValueError(
            f"Expected argument `--ckpt` to be a Lightning checkpoint but {str(path)!r} could not be read by "
            f"`torch.load(weights_only=True)`: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
        ) from None
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict)):
        raise ValueError(
            f"Expected argument `--ckpt` to be a Lightning checkpoint (a dict with a `state_dict`) but {str(path)!r} "
            f"holds {type(checkpoint).__name__}"
            + (f" with keys {sorted(checkpoint)[:6]}." if isinstance(checkpoint, dict) else ".")
        )
    class_path = model_class or checkpoint.get(CLASS_KEY)
    if class_path is None:
        raise ValueError(
            f"Expected the checkpoint {str(path)!r} to record its module's class but it does not (it was not saved "
            "by a lightning_prune module). HINT: pass `--model_class package.module.MyDetector`."
        )
    cls = import_class(class_path, "--model_class")
    loader = getattr(cls, "load_from_checkpoint", None)
    if loader is None:
        raise ValueError(f"Expected argument `--model_class` to be a LightningModule class but got {class_path!r}.")
    return loader(path, map_location="cpu", weights_only=True).eval()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-prune export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint (pruned or not)")
    parser.add_argument("--format", default="onnx", help=f"one of {list(FORMATS)} (default onnx)")
    parser.add_argument("--output", default=None, help="output file (default: next to the checkpoint)")
    parser.add_argument("--model_class", default=None, help="class path, when the checkpoint does not record it")
    parser.add_argument("--img_size", type=int, default=None, help="input side (default: the model's)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument("--atol", type=float, default=1e-4, help="max |difference| to the PyTorch outputs")
    parser.add_argument("--int8", action="store_true", help="also write an INT8 ONNX file (<output>.int8.onnx)")
    parser.add_argument("--calibration", default=None, help="folder of calibration images for --int8")
    parser.add_argument("--num_calibration", type=int, default=64, help="calibration images (default 64)")
    parser.add_argument("--calibration_method", default="entropy", help="entropy (default), minmax or percentile")
    parser.add_argument(
        "--int8_outputs",
        action="store_true",
        help="quantize the output convs too (default: they stay in float), for runtimes that run nothing in float",
    )
    parser.add_argument("--config", default=None, help="recipe whose data calibrates --int8 and measures mAP")
    return parser


def main(args: list[str]) -> dict[str, Any]:
    """Run ``lightning-prune export``; what was written and measured (also printed, and as ``<output>.json``)."""
    known = build_parser().parse_args(args)
    _check_args(known)
    if known.format == "onnx":
        from lightning_prune.report.export import require_export_extra

        require_export_extra()
    data = _datamodule(known.config) if known.config else None  # a bad recipe fails before any export
    calibration_folder = None
    if known.int8 and data is None:
        calibration_folder = Path(known.calibration)
        if not calibration_folder.is_dir():
            raise FileNotFoundError(
                f"Expected argument `--calibration` to be an existing folder of images but got {known.calibration!r}."
            )

    model = load_module(known.ckpt, known.model_class)
    example = example_input(model, known.img_size)
    output = Path(known.output) if known.output else _default_output(Path(known.ckpt), known.format)
    output.parent.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"ckpt": str(known.ckpt), "model": type(model).__name__, **model_stats(model, example)}
    from lightning_prune.report.export import check_export, export_onnx, export_torchscript, file_size_mb

    # written unchecked: the one check below both refuses a file beyond `--atol` and gives the difference reported
    if known.format == "onnx":
        export_onnx(model, example, output, opset=known.opset, check=False)
    else:
        export_torchscript(model, example, output, check=False)
    summary.update(
        output=str(output),
        output_mb=file_size_mb(output),
        max_abs_diff=check_export(model, output, example, atol=known.atol),
    )
    lines = [
        f"[lightning-prune] export: {type(model).__name__} | {format_stats(summary)}",
        f"[lightning-prune] wrote {output} ({summary['output_mb']:.2f} MB), max |difference| to PyTorch "
        f"{summary['max_abs_diff']:.2e} (≤ {known.atol:g})",
    ]

    if known.int8:
        summary.update(_int8(model, int(example.shape[-1]), output, data, calibration_folder, known))
        lines.append(
            f"[lightning-prune] wrote {summary['int8_output']} ({summary['int8_mb']:.2f} MB, "
            f"×{summary['int8_mb'] / summary['output_mb']:.2f} of fp32), {known.calibration_method} calibration on "
            f"{summary['calibration_images']} images"
        )
        if "int8_mAP" in summary:
            lines.append(
                f"[lightning-prune] val mAP50-95 through ONNX Runtime: fp32 {summary['mAP']:.4f}, INT8 "
                f"{summary['int8_mAP']:.4f} | mAP50: fp32 {summary['mAP50']:.4f}, INT8 {summary['int8_mAP50']:.4f}"
            )
    output.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    print("\n".join(lines), flush=True)
    return summary


def _check_args(known: argparse.Namespace) -> None:
    from lightning_prune.report.quantize import CALIBRATION_METHODS

    if known.format not in FORMATS:
        raise ValueError(f"Expected argument `--format` to be one of {list(FORMATS)} but got {known.format!r}.")
    if known.int8_outputs and not known.int8:
        raise ValueError("Expected `--int8` with `--int8_outputs` (it says how INT8 quantizes) but got no `--int8`.")
    if known.int8 and known.format != "onnx":
        raise ValueError(f"Expected `--format onnx` with `--int8` (INT8 is ONNX Runtime's) but got {known.format!r}.")
    if known.int8 and known.calibration is None and known.config is None:
        raise ValueError(
            "Expected argument `--calibration` (a folder of images) or `--config` (a recipe whose training images "
            "calibrate) with `--int8` but got neither."
        )
    if known.calibration_method not in CALIBRATION_METHODS:
        raise ValueError(
            f"Expected argument `--calibration_method` to be one of {list(CALIBRATION_METHODS)} but got "
            f"{known.calibration_method!r}."
        )
    if not known.atol > 0:
        raise ValueError(f"Expected argument `--atol` to be > 0 but got {known.atol}.")
    if known.num_calibration < 1:
        raise ValueError(f"Expected argument `--num_calibration` to be >= 1 but got {known.num_calibration}.")
    check_input_side(known.img_size, "--img_size")


def check_input_side(size: int | None, option: str) -> None:
    """``None`` or a positive multiple of 32 (the detectors' largest stride), or a ``ValueError`` naming ``option``."""
    if size is not None and (size < 32 or size % 32):
        raise ValueError(f"Expected argument `{option}` to be a positive multiple of 32 but got {size}.")


def example_input(
    model: nn.Module, size: int | None, option: str = "--img_size", purpose: str = "export"
) -> torch.Tensor:
    """A zero (1, 3, size, size) input, or else the model's ``example_input_array`` (its first image)."""
    if size is not None:
        return torch.zeros(1, 3, size, size)
    example = getattr(model, "example_input_array", None)
    if not isinstance(example, torch.Tensor):
        raise ValueError(
            f"Expected `{type(model).__name__}.example_input_array` to be a tensor to {purpose} with but got "
            f"{type(example).__name__}. HINT: pass `{option}`."
        )
    return example[:1]


def _default_output(ckpt: Path, fmt: str) -> Path:
    return ckpt.with_name(ckpt.stem + SUFFIXES[fmt])


def _datamodule(config: str) -> Any:
    """The recipe's data module, set up for fitting (calibration reads its training split)."""
    from lightning_prune.cli import load_recipe, recipe_datamodule

    dm = recipe_datamodule(load_recipe(config))
    dm.setup("fit")
    return dm


def _int8(
    model: nn.Module, img_size: int, fp32: Path, data: Any, folder: Path | None, known: argparse.Namespace
) -> dict[str, Any]:
    from lightning_prune.report.evaluate import evaluate_map
    from lightning_prune.report.export import file_size_mb
    from lightning_prune.report.onnx_runtime import OnnxModel
    from lightning_prune.report.quantize import load_calibration_images, quantize_onnx

    if folder is not None:
        images = load_calibration_images(folder, img_size, limit=known.num_calibration)
    else:
        images = data.calibration_images(known.num_calibration)
    int8 = quantize_onnx(
        fp32,
        fp32.with_suffix(".int8.onnx"),
        images,
        method=known.calibration_method,
        float_outputs=not known.int8_outputs,
    )
    out: dict[str, Any] = {
        "int8_output": str(int8),
        "int8_mb": file_size_mb(int8),
        "calibration_images": sum(int(x.shape[0]) for x in images),
    }
    if data is not None:
        postprocess = model.postprocess  # the model's own decoding and NMS for both files
        for prefix, path in (("", fp32), ("int8_", int8)):
            result = evaluate_map(OnnxModel(path), postprocess, data.val_dataloader())
            out[f"{prefix}mAP"], out[f"{prefix}mAP50"] = result["mAP"], result["mAP50"]
    return out
