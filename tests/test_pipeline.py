"""`lightning-prune pipeline`: every stage of a slimming recipe, the report, resuming, and bad recipes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
import pytorch_lightning as pl
import torch
import yaml

from lightning_prune.cli import load_recipe, main
from lightning_prune.models import YOLOv3
from lightning_prune.pipeline import Pipeline, split_recipe, stage_config

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "pipeline" in load_recipe(p))

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(tmp_path: Path, recipe: Path, pipeline: dict[str, Any] | None = None) -> Path:
    """``recipe`` on a few 64 px images, one epoch per stage unless ``pipeline`` says otherwise."""
    config = {
        "_base_": [str(recipe)],
        "data": {"img_size": 64, "num_train": 8, "num_val": 4, "batch_size": 4, "num_workers": 0},
        "trainer": {
            "accelerator": "cpu",
            "limit_train_batches": 2,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
        "pipeline": pipeline
        or {stage: {"trainer": {"max_epochs": 1}} for stage in ("baseline", "sparsity", "finetune")},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(recipe: Path, out: Path, tmp_path: Path, *extra: str) -> None:
    args = ["--config", str(recipe), "--out", str(out), "--latency_repeats", "2", "--data.root", str(tmp_path / "c")]
    main(["pipeline", *args, *extra])


@pytest.mark.parametrize("recipe", PIPELINES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_every_stage_of_every_pipeline_recipe_parses(recipe: Path, tmp_path: Path, capsys) -> None:
    shared, stages = split_recipe(load_recipe(recipe))
    assert list(stages)[:1] == ["baseline"] and "prune" in stages
    for name, section in stages.items():
        config = yaml.safe_dump(stage_config(shared, name, section, tmp_path))
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", config, "--data.root", str(tmp_path), "--print_config"])
        assert exit_info.value.code in (0, None)
        printed = yaml.safe_load(capsys.readouterr().out)
        classes = [c["class_path"] for c in printed["trainer"]["callbacks"]]
        for callback in section.get("callbacks", []):
            assert callback["class_path"] in classes


class Interrupt(pl.Callback):
    """Fails at the start of epoch 1 while ``armed``; records the epochs started."""

    armed: ClassVar[bool] = False
    started: ClassVar[list[int]] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        Interrupt.started.append(trainer.current_epoch)
        if Interrupt.armed and trainer.current_epoch == 1:
            Interrupt.armed = False
            raise RuntimeError("interrupted")


@pytest.mark.slow
def test_slimming_pipeline_runs_every_stage_reports_and_resumes(tmp_path: Path, capsys) -> None:
    """The distillation variant: its finetuning stage is taught by the sparsity stage's weights (``{out}``)."""
    stages = {stage: {"trainer": {"max_epochs": 1}} for stage in ("baseline", "sparsity")}
    kd = load_recipe(ROOT / "recipes/shapes/yolov3-slim-kd.yaml")["pipeline"]["finetune"]["callbacks"]
    interrupt = {"class_path": "test_pipeline.Interrupt"}
    stages["finetune"] = {"trainer": {"max_epochs": 2}, "callbacks": [*kd, interrupt]}
    recipe, out = tiny(tmp_path, ROOT / "recipes/shapes/yolov3-slim-kd.yaml", stages), tmp_path / "out"
    Interrupt.armed, Interrupt.started = True, []
    with pytest.raises(RuntimeError, match="interrupted"):
        run(recipe, out, tmp_path)
    state = json.loads((out / "pipeline.json").read_text())
    assert list(state["stages"]) == ["baseline", "sparsity", "prune"]  # finetune stopped in its epoch 1
    assert (out / "finetune/checkpoints/last.ckpt").is_file() and not (out / "finetune.ckpt").exists()
    done = {name: (out / f"{name}.ckpt").stat().st_mtime_ns for name in ("baseline", "sparsity", "prune")}
    capsys.readouterr()

    run(recipe, out, tmp_path)  # the same command again: resumes finetuning at epoch 1
    assert Interrupt.started == [0, 1, 1]
    assert {name: (out / f"{name}.ckpt").stat().st_mtime_ns for name in done} == done  # not run again
    printed = capsys.readouterr().out
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert [r["stage"] for r in rows] == ["Baseline", "Sparse", "Pruned", "Finetuned"]
    assert rows[0]["params"] == rows[1]["params"] > rows[2]["params"] == rows[3]["params"]
    assert all(r["latency_ms"]["cpu_b1"] > 0 and 0 <= r["val/mAP"] == r["mAP"] <= r["mAP50"] <= 1 for r in rows)
    table = (out / "report.md").read_text()
    assert table.strip() in printed and "| Pruned |" in table and "Finetuned vs Baseline: params −" in table
    # the pruned checkpoints load in a fresh module (PrunableMixin replays the structure)
    pruned = YOLOv3.load_from_checkpoint(out / "finetune.ckpt", map_location="cpu", weights_only=True)
    assert sum(p.numel() for p in pruned.parameters()) == rows[3]["params"]
    assert torch.load(out / "prune.ckpt", weights_only=True)["state_dict"].keys() == pruned.state_dict().keys()
    states = torch.load(out / "finetune/checkpoints/last.ckpt", weights_only=True)["callbacks"]
    teachers = [state["teacher"] for key, state in states.items() if key.startswith("Distillation")]
    assert teachers == [str(out / "sparsity.ckpt")]  # `{out}` filled in; the teacher loaded from it


def test_a_given_baseline_replaces_training_it(tmp_path: Path) -> None:
    torch.manual_seed(0)
    baseline = tmp_path / "baseline.ckpt"
    model = YOLOv3("tiny", num_classes=4, img_size=64)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(0.0, 1.0)  # as trained: a fresh model's γ are all 1, none under the median
    torch.save({"state_dict": model.state_dict()}, baseline)
    recipe = tiny(tmp_path, ROOT / "recipes/shapes/yolov3-slim.yaml", {"baseline": {}, "sparsity": None})
    config = yaml.safe_load(recipe.read_text())
    config["_base_"] = [str(ROOT / "recipes/shapes/yolov3-tiny.yaml")]
    config["pipeline"] = {"prune": load_recipe(ROOT / "recipes/shapes/yolov3-slim.yaml")["pipeline"]["prune"]}
    recipe.write_text(yaml.safe_dump(config))
    run(recipe, tmp_path / "out", tmp_path, "--baseline", str(baseline))
    rows = json.loads((tmp_path / "out/report.json").read_text())["rows"]
    assert [r["stage"] for r in rows] == ["Baseline", "Pruned"]
    assert rows[0]["checkpoint"] == str(baseline) and rows[1]["params"] < rows[0]["params"]
    assert not (tmp_path / "out/baseline/checkpoints").exists()  # nothing trained


@pytest.mark.parametrize(
    ("pipeline", "match"),
    [
        (None, r"Expected the recipe to have a `pipeline` mapping of stages \['baseline', 'sparsity', 'prune', 'f"),
        ({"prune": {"callbacks": [{}]}, "distill": {}}, r"Expected `pipeline` stages among .* but got \['distill'\]"),
        ({"prune": {}}, r"Expected `pipeline.prune.callbacks` to list the pruning callbacks .* but got none."),
        ({"prune": {"callbacks": [{}]}, "sparsity": [1]}, r"Expected `pipeline.sparsity` to be a mapping but got list"),
        ({"prune": {"callbacks": {"class_path": "x"}}}, r"Expected `pipeline.prune.callbacks` to be a list but got d"),
    ],
)
def test_bad_pipeline_recipes(pipeline: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        split_recipe({"model": {}, "pipeline": pipeline})


def test_bad_command_lines(tmp_path: Path) -> None:
    recipe = ROOT / "recipes/shapes/yolov3-slim.yaml"
    with pytest.raises(ValueError, match=r"Expected `--config` to be a single-stage recipe but .* is a pipeline"):
        main(["fit", "--config", str(recipe)])
    with pytest.raises(FileNotFoundError, match=r"Expected argument `--baseline` to be an existing checkpoint but"):
        Pipeline(recipe, tmp_path / "out", baseline=tmp_path / "missing.ckpt")
    (tmp_path / "out").mkdir()
    (tmp_path / "out/pipeline.json").write_text(json.dumps({"fingerprint": "another", "stages": {}}))
    with pytest.raises(ValueError, match=r"Expected `--out` .* to be empty or to hold this pipeline, but it holds"):
        Pipeline(recipe, tmp_path / "out")


def test_stage_configs_checkpoint_into_the_output_folder(tmp_path: Path) -> None:
    shared, stages = split_recipe(load_recipe(ROOT / "recipes/shapes/yolov3-slim.yaml"))
    sparsity = stage_config(shared, "sparsity", stages["sparsity"], tmp_path)
    callbacks = sparsity["trainer"]["callbacks"]
    assert callbacks[0]["init_args"]["dirpath"] == str(tmp_path / "sparsity/checkpoints")
    assert callbacks[-1]["class_path"] == "lightning_prune.callbacks.SparsityRegularization"
    assert sparsity["trainer"]["max_epochs"] == 10 and shared["trainer"]["max_epochs"] == 20  # shared untouched
    prune = stage_config(shared, "prune", stages["prune"], tmp_path)
    assert [c["class_path"] for c in prune["trainer"]["callbacks"]] == ["lightning_prune.callbacks.NetworkSlimming"]
    assert prune["trainer"]["enable_checkpointing"] is False
