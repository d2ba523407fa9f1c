"""Distillation in real (tiny) Trainer runs: the loss added, the teacher frozen and kept out of checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from test_pruning import FAMILIES, make_loader, make_trainer
from torch import nn

from lightning_prune.callbacks import Distillation, StructuredPruning, pruning_history
from lightning_prune.models.base import count_parameters

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class StepLosses(pl.Callback):
    """Per batch: the loss the (wrapped) training step returned, and the task and KD losses it logged."""

    def __init__(self) -> None:
        self.rows: list[tuple[float, float, float | None]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        metrics = trainer.callback_metrics
        kd = metrics.get("train/kd_loss")
        self.rows.append((float(outputs["loss"]), float(metrics["train/loss"]), None if kd is None else float(kd)))


def checksum(module: nn.Module) -> float:
    return float(sum(p.detach().double().sum() for p in module.parameters()))


@pytest.mark.parametrize("family", ["yolov3", "yolov8"])
def test_the_unpruned_self_teaches_the_pruned_student(tmp_path, family):
    pl.seed_everything(0)
    model = FAMILIES[family]()
    original = count_parameters(model)
    distillation = Distillation(teacher="self", loss="fm_nms", weight=2.0)
    losses = StepLosses()
    pruning = StructuredPruning(pruning_ratio=0.4, epochs=[1])
    trainer = make_trainer(tmp_path, [distillation, pruning, losses], max_epochs=2)
    trainer.fit(model, make_loader())
    teacher = distillation.teacher
    assert count_parameters(model) < original == count_parameters(teacher)
    assert len(pruning_history(model)) == 1 and not len(pruning_history(teacher))
    assert not teacher.training and all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    for returned, task, kd in losses.rows:  # returned = the module's own loss + weight · kd, logged apart
        assert kd is not None and kd > 0
        assert returned == pytest.approx(task + 2.0 * kd, rel=1e-5)
    assert "training_step" not in model.__dict__ and not model._forward_hooks  # restored at teardown
    state = model.state_dict()
    assert len(state) == len(FAMILIES[family]().state_dict())  # the teacher is not part of the student


def test_the_self_teacher_is_the_model_just_before_its_first_pruning_step(tmp_path):
    pl.seed_everything(0)
    model = FAMILIES["yolov3"]()
    seen: dict[str, float] = {}

    class Watch(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 1:  # the last epoch before pruning (at the start of epoch 2)
                seen["student"] = checksum(pl_module)

        def on_train_end(self, trainer, pl_module):
            seen["teacher"] = checksum(distillation.teacher)

    distillation = Distillation(teacher="self", loss="hinton", start_epoch=2)
    callbacks = [StructuredPruning(pruning_ratio=0.4, epochs=[2]), Watch(), distillation]  # any order works
    make_trainer(tmp_path, callbacks, max_epochs=3).fit(model, make_loader())
    assert seen["teacher"] == seen["student"]


def test_a_checkpoint_teacher_and_resume_with_the_saved_self_teacher(tmp_path):
    pl.seed_everything(0)
    teacher_path = tmp_path / "teacher.ckpt"
    trainer = make_trainer(tmp_path, [], max_epochs=1)
    trainer.fit(FAMILIES["yolov3"](), make_loader())
    trainer.save_checkpoint(teacher_path)
    distillation = Distillation(teacher=str(teacher_path), loss="hinton", temperature=2.0)
    make_trainer(tmp_path, [distillation], max_epochs=1).fit(FAMILIES["yolov3"](), make_loader())
    saved = torch.load(teacher_path, weights_only=True)["state_dict"]
    assert checksum(distillation.teacher) == pytest.approx(
        sum(float(saved[k].double().sum()) for k in saved if k in dict(distillation.teacher.named_parameters()))
    )
    assert distillation.state_dict()["teacher"] == str(teacher_path)

    # teacher="self", pruned at epoch 1, stopped after epoch 1, resumed: the unpruned copy comes back from its file
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = Distillation(teacher="self")
    model = FAMILIES["yolov3"]()
    original = count_parameters(model)
    run = make_trainer(
        tmp_path,
        [first, StructuredPruning(pruning_ratio=0.4, epochs=[1]), checkpoints],
        max_epochs=2,
        enable_checkpointing=True,
    )
    run.fit(model, make_loader())
    assert first.teacher_file is not None
    second = Distillation(teacher="self")
    resumed = make_trainer(
        tmp_path,
        [second, StructuredPruning(pruning_ratio=0.4, epochs=[1]), ModelCheckpoint()],
        max_epochs=3,
        enable_checkpointing=True,
    )
    fresh = FAMILIES["yolov3"]()
    resumed.fit(fresh, make_loader(), ckpt_path=tmp_path / "ckpt/last.ckpt")
    assert count_parameters(second.teacher) == original > count_parameters(fresh)
    assert checksum(second.teacher) == pytest.approx(checksum(first.teacher))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"teacher": ""}, r"Expected argument `teacher` to be 'self' or a checkpoint path but got ''."),
        ({"loss": "l2"}, r"Expected argument `loss` to be one of \['fm_nms', 'hinton'\] or a callable but got 'l2'."),
        ({"weight": -1.0}, r"Expected argument `weight` to be a float >= 0 but got -1.0."),
        ({"temperature": 0}, r"Expected argument `temperature` to be a float > 0 but got 0."),
        ({"schedule": "step"}, r"Expected argument `schedule` to be one of \['constant', 'warmup', 'linear', 'cos"),
        ({"start_epoch": -1}, r"Expected argument `start_epoch` to be an int >= 0 but got -1."),
        ({"start_epoch": 2, "stop_epoch": 2}, r"Expected argument `stop_epoch` to be None or an int > `start_epo"),
        ({"schedule": "cosine"}, r"Expected argument `stop_epoch` to be set for schedule 'cosine' but got None."),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Distillation(**kwargs)


class NoAdapter(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_setup_and_fit_start_errors(tmp_path):
    with pytest.raises(MisconfigurationException, match=r"Expected NoAdapter to have an `adapter` attribute"):
        Distillation().setup(None, NoAdapter(), "fit")
    missing = str(tmp_path / "missing.ckpt")
    with pytest.raises(MisconfigurationException, match=r"Expected argument `teacher` to be 'self' or an existing ch"):
        Distillation(teacher=missing).setup(None, FAMILIES["yolov3"](), "fit")
    with pytest.raises(ValueError, match=r"Expected argument `teacher_class` to be an importable class path but got"):
        Distillation(teacher=__file__, teacher_class="lightning_prune.models.YOLOv9")._build_teacher(NoAdapter())
    model = FAMILIES["yolov3"]()
    StructuredPruning(pruning_ratio=0.3).on_train_epoch_start(__import__("test_pruning").fake_trainer(), model)
    with pytest.raises(MisconfigurationException, match=r"Expected teacher='self' to start from the unpruned YOLOv3"):
        Distillation().on_fit_start(None, model)


def test_mixed_precision_and_gradient_accumulation(tmp_path):
    pl.seed_everything(0)
    model = FAMILIES["yolov8"]()
    distillation = Distillation(teacher="self", schedule="warmup", warmup_epochs=1)
    losses = StepLosses()
    trainer = make_trainer(
        tmp_path, [distillation, losses], max_epochs=2, precision="bf16-mixed", accumulate_grad_batches=2
    )
    trainer.fit(model, make_loader())
    assert distillation.weight_at(0) == 0.0 and distillation.weight_at(1) == 1.0
    assert [kd is None for _, _, kd in losses.rows] == [True, True, False, False]  # no teacher run at weight 0
    assert all(torch.isfinite(torch.tensor(r[:2])).all() for r in losses.rows)
    assert all(p.grad is None for p in distillation.teacher.parameters())


DDP_SCRIPT = """
import json, sys
import pytorch_lightning as pl
import torch
sys.path[:0] = [{root!r}, {here!r}]
from test_pruning import YOLOv3, make_loader
from lightning_prune.callbacks import Distillation, StructuredPruning

class Report(pl.Callback):
    def on_train_end(self, trainer, pl_module):
        teacher = distillation.teacher
        json.dump({{
            "wrapped": type(trainer.strategy.model).__name__,
            "teacher_type": type(teacher).__name__,
            "teacher_grads": [p.grad is not None for p in teacher.parameters()],
            "teacher": [float(p.double().sum()) for p in teacher.parameters()],
            "student": [float(p.detach().double().sum()) for p in pl_module.parameters()],
            "kd": float(trainer.callback_metrics["train/kd_loss"]),
        }}, open({out!r} + f"/rank{{trainer.global_rank}}.json", "w"))

if __name__ == "__main__":
    torch.set_num_threads(1)
    pl.seed_everything(0)
    distillation = Distillation(teacher="self")
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, limit_train_batches=2,
                         limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir={out!r},
                         callbacks=[distillation, StructuredPruning(pruning_ratio=0.4, epochs=[1]), Report()])
    trainer.fit(YOLOv3("tiny", num_classes=2, img_size=64), make_loader(8, 2))
"""


@pytest.mark.slow
def test_ddp_every_rank_has_the_same_frozen_teacher_and_student(tmp_path):
    here = Path(__file__).resolve().parent
    script = tmp_path / "ddp_kd.py"
    script.write_text(DDP_SCRIPT.format(root=str(here.parents[1]), here=str(here), out=str(tmp_path)))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in ranks:
        assert rank["wrapped"] == "DistributedDataParallel" and rank["teacher_type"] == "YOLOv3"  # never wrapped
        assert not any(rank["teacher_grads"]) and rank["kd"] > 0
    assert ranks[0]["teacher"] == ranks[1]["teacher"] and ranks[0]["student"] == ranks[1]["student"]
