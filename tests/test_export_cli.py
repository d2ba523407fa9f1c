"""`lightning-prune export`: a pruned checkpoint alone becomes ONNX / TorchScript / INT8, and bad input is refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import onnx
import pytest
import pytorch_lightning as pl
import torch
import yaml
from PIL import Image

from lightning_prune.callbacks import StructuredPruning
from lightning_prune.cli import main as cli_main
from lightning_prune.data import DetectionDataModule
from lightning_prune.export import load_module, main
from lightning_prune.models import YOLOv8
from lightning_prune.models.base import count_parameters
from lightning_prune.pruning.checkpoint import CLASS_KEY
from lightning_prune.report.export import check_export

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def pruned_ckpt(tmp_path_factory) -> tuple[Path, YOLOv8, str]:
    """A YOLOv8n pruned by StructuredPruning in a real fit, saved as a Lightning checkpoint; its data root."""
    tmp = tmp_path_factory.mktemp("export")
    data = DetectionDataModule(
        root=str(tmp / "shapes"), num_train=4, num_val=2, img_size=64, batch_size=2, num_workers=0
    )
    pl.seed_everything(0)
    model = YOLOv8("n", num_classes=4, img_size=64)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[StructuredPruning(pruning_ratio=0.5)],
        default_root_dir=tmp,
    )
    trainer.fit(model, data)
    path = tmp / "pruned.ckpt"
    trainer.save_checkpoint(path)
    return path, model.eval(), str(tmp / "shapes")


def test_a_pruned_checkpoint_exports_to_onnx_without_rebuilding_it(pruned_ckpt, tmp_path, capsys):
    ckpt, model, _ = pruned_ckpt
    assert torch.load(ckpt, weights_only=True)[CLASS_KEY] == "lightning_prune.models.yolov8.YOLOv8"
    loaded = load_module(ckpt)
    assert count_parameters(loaded) == count_parameters(model) and not loaded.training
    summary = main(["--ckpt", str(ckpt), "--output", str(tmp_path / "m.onnx")])
    assert summary["max_abs_diff"] <= 1e-4 and summary["params"] == count_parameters(model)
    assert check_export(model, tmp_path / "m.onnx", torch.rand(3, 3, 64, 64)) <= 1e-4  # the checkpoint's weights
    assert json.loads((tmp_path / "m.json").read_text())["output"] == str(tmp_path / "m.onnx")
    assert "[lightning-prune] wrote" in capsys.readouterr().out


def test_torchscript_and_the_default_output_next_to_the_checkpoint(pruned_ckpt, tmp_path):
    ckpt, model, _ = pruned_ckpt
    copy = tmp_path / "last.ckpt"
    copy.write_bytes(ckpt.read_bytes())
    cli_main(["export", "--ckpt", str(copy), "--format", "torchscript"])  # through the `lightning-prune` entry point
    assert check_export(model, tmp_path / "last.torchscript.pt", torch.rand(2, 3, 64, 64)) <= 1e-4


def test_int8_from_a_folder_of_images_and_from_a_recipe(pruned_ckpt, tmp_path):
    ckpt, _, root = pruned_ckpt
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (80, 60), (40 * i, 100, 200)).save(images / f"{i}.png")
    summary = main(["--ckpt", str(ckpt), "--output", str(tmp_path / "a.onnx"), "--int8", "--calibration", str(images)])
    assert summary["calibration_images"] == 3 and summary["int8_mb"] < summary["output_mb"]
    assert Path(summary["int8_output"]) == tmp_path / "a.int8.onnx"
    recipe = tmp_path / "recipe.yaml"
    data = {"format": "shapes", "root": root, "num_train": 4, "num_val": 2, "img_size": 64, "num_workers": 0}
    recipe.write_text(yaml.safe_dump({"data": data}))
    summary = main(
        [
            "--ckpt",
            str(ckpt),
            "--output",
            str(tmp_path / "b.onnx"),
            "--int8",
            "--config",
            str(recipe),
            "--calibration_method",
            "minmax",
            "--num_calibration",
            "2",
            "--int8_outputs",
        ]
    )
    assert summary["calibration_images"] == 2
    graph = onnx.load(summary["int8_output"]).graph
    producers = {out: node for node in graph.node for out in node.output}
    assert {producers[o.name].op_type for o in graph.output} == {"DequantizeLinear"}  # outputs quantized too
    graph = onnx.load(str(tmp_path / "a.int8.onnx")).graph  # the default: the output convs in float
    producers = {out: node for node in graph.node for out in node.output}
    assert "DequantizeLinear" not in {producers[o.name].op_type for o in graph.output}
    assert 0 <= summary["mAP"] <= 1 and 0 <= summary["int8_mAP"] <= 1  # both through ONNX Runtime


def test_bad_input(pruned_ckpt, tmp_path, monkeypatch):
    ckpt, _, _ = pruned_ckpt
    with pytest.raises(FileNotFoundError, match=r"Expected argument `--ckpt` to be an existing checkpoint file"):
        main(["--ckpt", str(tmp_path / "missing.ckpt")])
    (tmp_path / "noise.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"Expected argument `--ckpt` to be a Lightning checkpoint but .* could not"):
        main(["--ckpt", str(tmp_path / "noise.ckpt")])
    torch.save({"weights": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match=r"to be a Lightning checkpoint \(a dict with a `state_dict`\) but"):
        main(["--ckpt", str(tmp_path / "plain.pt")])
    state = torch.load(ckpt, weights_only=True)
    del state[CLASS_KEY]
    torch.save(state, tmp_path / "anonymous.ckpt")
    with pytest.raises(ValueError, match=r"to record its module's class but it does not.*HINT: pass `--model_class"):
        main(["--ckpt", str(tmp_path / "anonymous.ckpt")])
    assert (
        main(
            [
                "--ckpt",
                str(tmp_path / "anonymous.ckpt"),
                "--model_class",
                "lightning_prune.models.YOLOv8",
                "--output",
                str(tmp_path / "c.onnx"),
            ]
        )["max_abs_diff"]
        <= 1e-4
    )
    with pytest.raises(ValueError, match=r"Expected argument `--model_class` to be an importable class path"):
        main(["--ckpt", str(ckpt), "--model_class", "no.such.Class"])
    with pytest.raises(ValueError, match=r"Expected argument `--format` to be one of \['onnx', 'torchscript'\]"):
        main(["--ckpt", str(ckpt), "--format", "tflite"])
    with pytest.raises(ValueError, match=r"Expected `--format onnx` with `--int8`"):
        main(["--ckpt", str(ckpt), "--format", "torchscript", "--int8", "--calibration", str(tmp_path)])
    with pytest.raises(ValueError, match=r"Expected argument `--calibration` \(a folder of images\) or `--config`"):
        main(["--ckpt", str(ckpt), "--int8"])
    with pytest.raises(FileNotFoundError, match=r"Expected argument `--calibration` to be an existing folder"):
        main(["--ckpt", str(ckpt), "--int8", "--calibration", str(tmp_path / "nowhere")])
    with pytest.raises(ValueError, match=r"Expected `--int8` with `--int8_outputs` .* but got no `--int8`."):
        main(["--ckpt", str(ckpt), "--int8_outputs"])
    with pytest.raises(ValueError, match=r"Expected argument `--calibration_method` to be one of"):
        main(["--ckpt", str(ckpt), "--int8", "--calibration", str(tmp_path), "--calibration_method", "kl"])
    with pytest.raises(ValueError, match=r"Expected argument `--atol` to be > 0 but got 0.0."):
        main(["--ckpt", str(ckpt), "--atol", "0"])
    with pytest.raises(ValueError, match=r"Expected argument `--img_size` to be a positive multiple of 32"):
        main(["--ckpt", str(ckpt), "--img_size", "50"])
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'lightning_prune\[export\]'"):
        main(["--ckpt", str(ckpt)])
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == ["c.onnx"]  # the refused calls wrote nothing
