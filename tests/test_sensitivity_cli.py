"""`lightning-prune sensitivity`: a recipe (or a pruned checkpoint) in, a table, curves and layer ratios out; ranks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml

from lightning_prune.callbacks import StructuredPruning
from lightning_prune.cli import main as cli_main
from lightning_prune.data import DetectionDataModule
from lightning_prune.models import YOLOv8
from lightning_prune.pruning.sensitivity import SensitivityResult, load_layer_ratios
from lightning_prune.sensitivity import main

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ROOT = Path(__file__).resolve().parents[1]
GROUPS = r"backbone\.stage2\..*"  # 5 of YOLOv8n's 59 groups: each trial is an evaluation
ARGS = ["--groups", GROUPS, "--ratios", "0.9", "0.5", "--val_batches", "1", "--device", "cpu"]


def write_recipe(path: Path, data_root: Path, **model_args) -> Path:
    recipe = {
        "model": {"class_path": "lightning_prune.models.YOLOv8", "init_args": {"scale": "n", "num_classes": 4}},
        "data": {"format": "shapes", "root": str(data_root), "num_train": 4, "num_val": 2, "img_size": 64,
                 "batch_size": 2, "num_workers": 0},
    }  # fmt: skip
    recipe["model"]["init_args"].update(model_args)
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict]:
    """The recipe and the summary of one run on it (5 groups × 2 ratios)."""
    tmp = tmp_path_factory.mktemp("sensitivity")
    recipe = write_recipe(tmp / "recipe.yaml", tmp / "shapes")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before `one_thread`; two threads spin on a shared 2-core machine
    try:
        return recipe, main(["--config", str(recipe), *ARGS, "--out", str(tmp / "out")])
    finally:
        torch.set_num_threads(threads)


def test_writes_the_table_the_curves_the_json_and_layer_ratios(run):
    recipe, summary = run
    out = recipe.parent / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "layer_ratios.yaml",
        "sensitivity.json",
        "sensitivity.md",
        "sensitivity.png",
    ]
    assert json.loads((out / "sensitivity.json").read_text()) == summary
    result = SensitivityResult.from_dict(summary)
    assert result.ratios == [0.5, 0.9] and len(result.rows) == 10
    assert list(result.groups) == [
        "backbone.stage2.0.conv",
        "backbone.stage2.1.cv0.conv",
        "backbone.stage2.1.cv1.conv",  # with the bottleneck's last conv (residual add)
        "backbone.stage2.1.m.0.cv1.conv",
        "backbone.stage2.1.cv2.conv",
    ]
    assert summary["layer_ratios"] == result.layer_ratios(1.0) and summary["ranking"] == result.ranking()
    model = YOLOv8("n", num_classes=4, img_size=64)
    assert load_layer_ratios(out / "layer_ratios.yaml", model) == summary["layer_ratios"]
    table = (out / "sensitivity.md").read_text()
    assert table == result.to_markdown(1.0) and "| `backbone.stage2.1.cv1.conv` +1 | 16 |" in table


def test_the_command_prints_the_table(run, tmp_path, capsys):
    recipe, _ = run
    cli_main(["sensitivity", "--config", str(recipe), "--groups", r"backbone\.stem\.conv", "--ratios", "0.5",
              "--val_batches", "1", "--max_drop", "0.5", "--out", str(tmp_path)])  # fmt: skip
    printed = capsys.readouterr().out
    assert "| # | group | channels | Δ@0.5 | mean Δ | ratio (≤ 0.5 pts) | MACs saved |" in printed
    assert "`backbone.stem.conv`" in printed and "1 groups × 1 ratios" in printed


def test_the_layer_ratios_prune_a_fit_and_its_checkpoint_is_analysed_as_pruned(run, tmp_path):
    recipe, summary = run
    data = DetectionDataModule(root=str(recipe.parent / "shapes"), num_train=4, num_val=2, img_size=64,
                               batch_size=2, num_workers=0)  # fmt: skip
    model = YOLOv8("n", num_classes=4, img_size=64)
    ratios = load_layer_ratios(recipe.parent / "out" / "layer_ratios.yaml", model)
    assert ratios  # an untrained model: nothing to lose, every group may go to 0.9
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[StructuredPruning(pruning_ratio=0.1, layer_ratios=ratios)],
        default_root_dir=tmp_path,
    )
    trainer.fit(model, data)
    kept = {(r["group"], r["ratio"]): r["channels"] for r in summary["rows"]}
    for pattern, ratio in ratios.items():
        group = pattern.replace("\\", "")
        assert model.get_submodule(group).out_channels == kept[group, ratio]  # as in the analysed trial
    ckpt = tmp_path / "pruned.ckpt"
    trainer.save_checkpoint(ckpt)
    pruned = main(["--config", str(recipe), "--ckpt", str(ckpt), "--groups", GROUPS, "--ratios", "0.5",
                   "--val_batches", "1", "--out", str(tmp_path / "out")])  # fmt: skip
    assert pruned["groups"] == {g.replace("\\", ""): kept[g.replace("\\", ""), r] for g, r in ratios.items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_share_the_groups_and_rank_zero_writes_the_merged_result(run, tmp_path):
    recipe, single = run
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "lightning_prune", "sensitivity", "--config", str(recipe), *ARGS]
    procs = [
        subprocess.Popen(
            [*command, "--out", str(tmp_path / f"out{rank}")],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        for rank in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "5 groups × 2 ratios, up to 3 groups on each of 2 ranks" in outputs[0][0]  # 3 on rank 0, 2 on rank 1
    assert outputs[1][0].count("[rank 1]: group") == 2 and "| # | group" not in outputs[1][0]
    assert not (tmp_path / "out1").exists()  # rank 0 writes
    merged = json.loads((tmp_path / "out0" / "sensitivity.json").read_text())
    assert merged["rows"] == single["rows"] and merged["baseline"] == single["baseline"]


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (["--ratios", "0", "0.5"], ValueError, r"Expected argument `--ratios` to be a non-empty list of floats in \(0"),
        (["--ratios", "0.5", "1.5"], ValueError, r"`--ratios` to be a non-empty list of floats in \(0, 1\) but got"),
        (["--max_drop", "-1"], ValueError, r"Expected argument `--max_drop` to be a float >= 0 \(mAP points\)"),
        (["--val_batches", "0"], ValueError, "Expected argument `--val_batches` to be an int >= 1 but got 0"),
        (["--trace_size", "50"], ValueError, "Expected argument `--trace_size` to be a positive multiple of 32"),
        (["--groups", "nope"], ValueError, "Expected every regex of `groups` to fully match a group name"),
    ],
)
def test_bad_arguments(run, args, error, match, tmp_path):
    recipe, _ = run
    with pytest.raises(error, match=match):
        main(["--config", str(recipe), "--out", str(tmp_path), *args])
    assert not any(tmp_path.iterdir())


def test_bad_recipes(run, tmp_path):
    recipe, _ = run
    with pytest.raises(FileNotFoundError, match="Expected argument `--config` to be an existing YAML file"):
        main(["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(SystemExit):  # argparse: `--ratios` needs at least one value
        main(["--config", str(recipe), "--ratios"])
    wrong = write_recipe(tmp_path / "wrong.yaml", recipe.parent / "shapes", num_classes=3)
    with pytest.raises(ValueError, match=r"Expected the model's `num_classes` to match the data \(4 classes\)"):
        main(["--config", str(wrong)])
    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump({"data": yaml.safe_load(recipe.read_text())["data"]}))
    with pytest.raises(ValueError, match=r"Expected the recipe .* to give `model.class_path` \(or `--ckpt`"):
        main(["--config", str(bare)])
