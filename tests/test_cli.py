"""The `lightning-prune` command and the recipes, run as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_prune.cli import LightningPruneCLI, expand_configs, load_recipe, main

ROOT = Path(__file__).resolve().parents[1]
ALL_RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "_base" not in p.parts)
PIPELINES = [p for p in ALL_RECIPES if "pipeline" in load_recipe(p)]  # tests/test_pipeline.py
RECIPES = [p for p in ALL_RECIPES if p not in PIPELINES]
SHAPES_RECIPES = [p for p in RECIPES if p.parent.name == "shapes"]


def recipe_id(path: Path) -> str:
    return str(path.relative_to(ROOT / "recipes"))


def test_recipes_exist() -> None:
    names = {recipe_id(p) for p in RECIPES}
    assert {"shapes/yolov3-tiny.yaml", "shapes/yolov8n.yaml", "coco/yolov8s.yaml", "coco/yolov3.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=recipe_id)
def test_every_recipe_parses(recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each recipe validates against the model/data/trainer signatures (`--print_config` parses, then exits)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(recipe), "--data.root", str(tmp_path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("lightning_prune.models.")
    assert "img_size" not in printed["model"]["init_args"]  # linked from data.img_size, never set twice


@pytest.mark.parametrize("recipe", RECIPES, ids=recipe_id)
def test_every_recipe_instantiates(recipe: Path, tmp_path: Path) -> None:
    """Model, data module and trainer build from each recipe (on CPU, full precision)."""
    cli = LightningPruneCLI(
        args=expand_configs(
            [
                "--config",
                str(recipe),
                "--data.root",
                str(tmp_path),
                "--trainer.accelerator",
                "cpu",
                "--trainer.precision",
                "32-true",
                "--trainer.default_root_dir",
                str(tmp_path),
            ]
        ),
        run=False,
    )
    assert cli.model.num_classes == load_recipe(recipe)["model"]["init_args"]["num_classes"]
    assert cli.model.img_size == cli.datamodule.img_size == load_recipe(recipe)["data"].get("img_size", 320)


@pytest.mark.parametrize("recipe", SHAPES_RECIPES, ids=recipe_id)
def test_shapes_recipe_fast_dev_run(recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`fit` runs end to end on freshly generated built-in data and prints the summary."""
    main(
        [
            "fit",
            "--config",
            str(recipe),
            "--trainer.fast_dev_run",
            "true",
            "--trainer.accelerator",
            "cpu",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--data.root",
            str(tmp_path / "cache"),
            "--data.num_train",
            "8",
            "--data.num_val",
            "4",
            "--data.batch_size",
            "4",
            "--data.num_workers",
            "0",
            "--data.img_size",
            "128",
        ]
    )
    out = capsys.readouterr().out
    assert "[lightning-prune] fit done:" in out
    assert "MACs" in out and "params" in out
    assert "mAP50-95" in out  # fast_dev_run still runs one validation batch


def test_unknown_model_class_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                "--config",
                str(ROOT / "recipes/shapes/yolov3-tiny.yaml"),
                "--model.class_path",
                "lightning_prune.models.YOLOv9",
                "--data.root",
                str(tmp_path),
            ]
        )
    assert exit_info.value.code != 0
    assert "YOLOv9" in capsys.readouterr().err


def test_unknown_data_format_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "recipes/shapes/yolov3-tiny.yaml"), "--data.format", "voc"])
    assert exit_info.value.code != 0
    assert "voc" in capsys.readouterr().err


def test_num_classes_mismatch_fails_before_training(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"Expected argument `num_classes` to match the data \(4 classes\) but got 7"):
        main(
            [
                "fit",
                "--config",
                str(ROOT / "recipes/shapes/yolov3-tiny.yaml"),
                "--model.init_args.num_classes",
                "7",
                "--trainer.accelerator",
                "cpu",
                "--trainer.default_root_dir",
                str(tmp_path),
                "--data.root",
                str(tmp_path / "cache"),
                "--data.num_train",
                "4",
                "--data.num_val",
                "2",
                "--data.num_workers",
                "0",
            ]
        )
    assert not list(tmp_path.rglob("*.ckpt"))


def test_base_recipes_merge(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("trainer: {max_epochs: 3, precision: 32-true}\ndata: {batch_size: 2}\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\ntrainer: {max_epochs: 5}\nmodel: {x: [1, 2]}\n")
    assert load_recipe(tmp_path / "b.yaml") == {
        "trainer": {"max_epochs": 5, "precision": "32-true"},
        "data": {"batch_size": 2},
        "model": {"x": [1, 2]},
    }
    inline = expand_configs(["fit", "--config", str(tmp_path / "b.yaml"), "--trainer.max_epochs", "1"])
    assert inline[0] == "fit" and inline[-2:] == ["--trainer.max_epochs", "1"]
    assert yaml.safe_load(inline[2])["trainer"]["precision"] == "32-true"


def test_base_recipe_errors(tmp_path: Path) -> None:
    (tmp_path / "loop.yaml").write_text("_base_: loop.yaml\n")
    with pytest.raises(ValueError, match="form no cycle"):
        load_recipe(tmp_path / "loop.yaml")
    (tmp_path / "missing.yaml").write_text("_base_: nowhere.yaml\n")
    with pytest.raises(FileNotFoundError, match=r"Expected argument `--config` to be an existing YAML file"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="to be a YAML mapping but got list"):
        load_recipe(tmp_path / "list.yaml")


def test_python_dash_m_entry_point() -> None:
    proc = subprocess.run([sys.executable, "-m", "lightning_prune", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "fit" in proc.stdout and "validate" in proc.stdout and "predict" in proc.stdout
