"""Distillation in real (tiny) Trainer runs: the loss added, the teacher frozen and kept out of checkpoints."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from test_pruning import FAMILIES, make_loader, make_trainer
from torch import nn

from lightning_prune.callbacks import Distillation, StructuredPruning, pruning_history
from lightning_prune.callbacks._features import _adapter_optimizer, _ground_truth
from lightning_prune.losses import FeatureAdapter
from lightning_prune.models import YOLOv3
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


def test_a_teacher_of_other_classes_is_refused_before_training(tmp_path):
    teacher_path = tmp_path / "teacher.ckpt"
    trainer = make_trainer(tmp_path, [], max_epochs=1)
    trainer.fit(YOLOv3("tiny", num_classes=3, img_size=64), make_loader())
    trainer.save_checkpoint(teacher_path)
    student = FAMILIES["yolov3"]()
    before = checksum(student)
    trainer = make_trainer(tmp_path, [Distillation(teacher=str(teacher_path))], max_epochs=1)
    expected = r"Expected argument `teacher` to be a model of the student's 2 classes but got one of 3"
    with pytest.raises(MisconfigurationException, match=expected):
        trainer.fit(student, make_loader())
    assert checksum(student) == before  # no step was taken


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
        (
            {"loss": "l2"},
            r"Expected argument `loss` to be one of \['fm_nms', 'hinton'\], a callable or None but got 'l2",
        ),
        ({"weight": -1.0}, r"Expected argument `weight` to be a float >= 0 but got -1.0."),
        ({"temperature": 0}, r"Expected argument `temperature` to be a float > 0 but got 0."),
        ({"schedule": "step"}, r"Expected argument `schedule` to be one of \['constant', 'warmup', 'linear', 'cos"),
        ({"start_epoch": -1}, r"Expected argument `start_epoch` to be an int >= 0 but got -1."),
        ({"start_epoch": 2, "stop_epoch": 2}, r"Expected argument `stop_epoch` to be None or an int > `start_epo"),
        ({"schedule": "cosine"}, r"Expected argument `stop_epoch` to be set for schedule 'cosine' but got None."),
        ({"features": "neck.set3"}, r"Expected argument `features` to be None, a list of layer names or a dict of "),
        ({"features": {"neck.set3": 3}}, r"Expected argument `features` to be None, a list of layer names or a dict"),
        ({"features": []}, r"Expected argument `features` to be None, a list of layer names or a dict of student"),
        ({"feature_loss": "l1"}, r"Expected argument `feature_loss` to be one of \['cwd', 'fine_grained', 'mse'\] but"),
        ({"feature_weight": -1.0}, r"Expected argument `feature_weight` to be a float >= 0 but got -1.0."),
        ({"feature_temperature": 0}, r"Expected argument `feature_temperature` to be a float > 0 but got 0."),
        ({"loss": None}, r"Expected argument `features` to name layers when `loss` is None but got None."),
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
            "feature": float(trainer.callback_metrics["train/kd_feature_loss"]),
            "adapters": {{n: a.conv.weight.tolist() for n, a in distillation.adapters.items()}},
            "widths": {{n: a.student_channels for n, a in distillation.adapters.items()}},
        }}, open({out!r} + f"/rank{{trainer.global_rank}}.json", "w"))

if __name__ == "__main__":
    torch.set_num_threads(1)
    pl.seed_everything(0)
    distillation = Distillation(teacher="self", features=["neck.set3", "neck.set5"], feature_loss="fine_grained")
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, limit_train_batches=2,
                         limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir={out!r},
                         callbacks=[distillation, StructuredPruning(pruning_ratio=0.4, epochs=[1]), Report()])
    trainer.fit(YOLOv3("tiny", num_classes=2, img_size=64), make_loader(8, 2))
"""


@pytest.mark.slow
def test_ddp_every_rank_has_the_same_frozen_teacher_student_and_adapters(tmp_path):
    here = Path(__file__).resolve().parent
    script = tmp_path / "ddp_kd.py"
    script.write_text(DDP_SCRIPT.format(root=str(here.parents[1]), here=str(here), out=str(tmp_path)))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in ranks:
        assert rank["wrapped"] == "DistributedDataParallel" and rank["teacher_type"] == "YOLOv3"  # never wrapped
        assert not any(rank["teacher_grads"]) and rank["kd"] > 0 and rank["feature"] > 0
        assert rank["widths"]["neck.set3"] < 16  # rebuilt after the prune
    assert ranks[0]["teacher"] == ranks[1]["teacher"] and ranks[0]["student"] == ranks[1]["student"]
    assert ranks[0]["adapters"] == ranks[1]["adapters"]  # their gradients are averaged as the student's


# ---------------------------------------------------------------------------------------------- feature imitation
class Terms(pl.Callback):
    """Per batch: the loss the wrapped step returned and the logged task, head KD and feature KD losses."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        metrics = trainer.callback_metrics
        row = {"returned": float(outputs["loss"])}
        for key in ("loss", "kd_loss", "kd_feature_loss"):
            if f"train/{key}" in metrics:
                row[key] = float(metrics[f"train/{key}"])
        self.rows.append(row)


class TeacherWatch(pl.Callback):
    """The teacher's parameters at every batch end of the first epoch (the "self" teacher is refreshed at its end)."""

    def __init__(self, distillation: Distillation) -> None:
        self.distillation, self.sums = distillation, []

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.current_epoch == 0:
            self.sums.append([float(p.double().sum()) for p in self.distillation.teacher.parameters()])


NECKS = {"yolov3": ["neck.set3", "neck.set5"], "yolov8": ["neck.td3", "neck.bu4"]}


@pytest.mark.parametrize(
    ("family", "loss", "feature_loss", "feature_weight"),
    [
        ("yolov3", "fm_nms", "fine_grained", None),
        ("yolov8", None, "cwd", 3.0),
        ("yolov8", "hinton", "fine_grained", 0.02),
    ],
)
def test_feature_imitation_adds_its_term_and_trains_the_adapters(tmp_path, family, loss, feature_loss, feature_weight):
    pl.seed_everything(0)
    model = FAMILIES[family]()
    distillation = Distillation(
        loss=loss, weight=2.0, features=NECKS[family], feature_loss=feature_loss, feature_weight=feature_weight
    )
    terms, watch = Terms(), TeacherWatch(distillation)
    make_trainer(tmp_path, [distillation, terms, watch], max_epochs=2).fit(model, make_loader())
    w_feature = 0.01 if feature_weight is None else feature_weight
    for row in terms.rows:  # returned = the module's own loss + weight · kd + feature_weight · feature, logged apart
        assert row["kd_feature_loss"] > 0 and math.isfinite(row["kd_feature_loss"])
        head = 2.0 * row["kd_loss"] if loss else 0.0
        assert ("kd_loss" in row) == bool(loss)
        assert row["returned"] == pytest.approx(row["loss"] + head + w_feature * row["kd_feature_loss"], rel=1e-5)
    assert all(sums == watch.sums[0] for sums in watch.sums)  # the teacher never moved within the epoch
    assert all(p.grad is None and not p.requires_grad for p in distillation.teacher.parameters())
    assert sorted(distillation.adapters) == sorted(NECKS[family])
    for adapter in distillation.adapters.values():
        width = adapter.teacher_channels
        assert adapter.student_channels == width  # the student is its teacher's copy: a square adapter ...
        assert not torch.equal(adapter.conv.weight.detach(), torch.eye(width).view(width, width, 1, 1))  # ... trained
        assert adapter.conv.weight.grad is not None
    assert len(model.state_dict()) == len(FAMILIES[family]().state_dict())  # no adapter in the student
    assert all(n in distillation.state_dict()["adapters"]["weights"] for n in NECKS[family])


def test_adapters_follow_the_pruned_student_and_keep_training(tmp_path, monkeypatch):
    pl.seed_everything(0)
    model = FAMILIES["yolov3"]()
    features = ["neck.set3", "neck.set4"]
    bn = {name: f"{name}.2.bn" for name in features}  # the BatchNorm after each layer's last conv
    rebuilds: list[tuple[torch.Tensor, list[int] | None, torch.Tensor]] = []
    original_rebuild = FeatureAdapter.rebuild

    def spy(self, student_channels, kept=None):
        old = self.conv.weight.detach().clone()
        original_rebuild(self, student_channels, kept)
        rebuilds.append((old, None if kept is None else list(kept), self.conv.weight.detach().clone()))

    monkeypatch.setattr(FeatureAdapter, "rebuild", spy)
    means: dict[str, list[torch.Tensor]] = {name: [] for name in features}

    class Means(pl.Callback):  # BN running means just before and just after the prune: the surviving channels
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 0:
                for name in features:
                    means[name].append(pl_module.get_submodule(bn[name]).running_mean.clone())

        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                for name in features:
                    means[name].append(pl_module.get_submodule(bn[name]).running_mean.clone())

    distillation = Distillation(loss="fm_nms", features=features, feature_loss="cwd", feature_weight=2.0)
    terms = Terms()
    callbacks = [distillation, StructuredPruning(pruning_ratio=0.4, epochs=[1]), Means(), terms]
    make_trainer(tmp_path, callbacks, max_epochs=3).fit(model, make_loader())

    assert len(rebuilds) == len(features)  # once per layer, at the first step after the prune
    for name, (old, kept, new) in zip(features, rebuilds):
        before, after = means[name]
        survivors = [before.tolist().index(v) for v in after.tolist()]  # running means are index-selected exactly
        assert len(survivors) < len(before) and kept == survivors
        assert torch.equal(new, old[:, survivors])
        adapter = distillation.adapters[name]
        assert adapter.student_channels == model.get_submodule(f"{name}.2.conv").out_channels == len(survivors)
        assert adapter.teacher_channels == len(before)  # the unpruned teacher keeps its width
        assert not torch.equal(adapter.conv.weight.detach(), new)  # trained after the rebuild
        optimizer = distillation._imitation.optimizer
        optimized = [p for g in optimizer.param_groups for p in g["params"]]
        assert any(p is adapter.conv.weight for p in optimized) and not any(p.shape == old.shape for p in optimized)
        assert optimizer.state[adapter.conv.weight]["momentum_buffer"].shape == adapter.conv.weight.shape
    assert len(terms.rows) == 6 and all(math.isfinite(v) for row in terms.rows for v in row.values())
    assert all(p.grad is None for p in distillation.teacher.parameters())
    assert len(pruning_history(model)) == 1 and not len(pruning_history(distillation.teacher))


def test_feature_imitation_under_bf16(tmp_path):
    pl.seed_everything(0)
    model = FAMILIES["yolov8"]()
    distillation = Distillation(loss="fm_nms", features=["neck.td3"], feature_loss="fine_grained")
    terms = Terms()
    make_trainer(tmp_path, [distillation, terms], max_epochs=1, precision="bf16-mixed").fit(model, make_loader())
    for row in terms.rows:
        assert all(math.isfinite(v) for v in row.values()) and row["kd_feature_loss"] > 0
        expected = row["loss"] + row["kd_loss"] + 0.01 * row["kd_feature_loss"]
        assert row["returned"] == pytest.approx(expected, rel=1e-3)
    adapter = distillation.adapters["neck.td3"]
    assert adapter.conv.weight.dtype == torch.float32 and adapter.conv.weight.grad is not None


def test_resume_restores_the_adapters_and_their_optimizer(tmp_path):
    pl.seed_everything(0)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = Distillation(loss=None, features=["neck.set3"], feature_loss="mse")
    run = make_trainer(tmp_path, [first, checkpoints], max_epochs=1, enable_checkpointing=True)
    run.fit(FAMILIES["yolov3"](), make_loader())
    saved = {k: v.clone() for k, v in first.adapters["neck.set3"].state_dict().items()}
    momentum = first._imitation.optimizer.state[first.adapters["neck.set3"].conv.weight]["momentum_buffer"].clone()

    second = Distillation(loss=None, features=["neck.set3"], feature_loss="mse")
    loaded: dict[str, torch.Tensor] = {}
    build = second._imitation._build_adapters

    def spy(pl_module, widths):
        build(pl_module, widths)
        adapter = second.adapters["neck.set3"]
        loaded.update({k: v.clone() for k, v in adapter.state_dict().items()})
        loaded["momentum"] = second._imitation.optimizer.state[adapter.conv.weight]["momentum_buffer"].clone()

    second._imitation._build_adapters = spy
    callbacks = [second, StructuredPruning(pruning_ratio=0.4, epochs=[1]), ModelCheckpoint()]
    resumed = make_trainer(tmp_path, callbacks, max_epochs=2, enable_checkpointing=True)
    fresh = FAMILIES["yolov3"]()
    resumed.fit(fresh, make_loader(), ckpt_path=tmp_path / "ckpt/last.ckpt")
    assert all(torch.equal(loaded[k], v) for k, v in saved.items()) and torch.equal(loaded["momentum"], momentum)
    assert second.adapters["neck.set3"].student_channels == fresh.neck.set3[2].conv.out_channels < 16  # then pruned
    state = torch.load(tmp_path / "ckpt/last.ckpt", weights_only=True)
    assert not any("adapter" in k for k in state["state_dict"])


def test_feature_errors(tmp_path):
    model = FAMILIES["yolov3"]()
    with pytest.raises(MisconfigurationException, match=r"Expected argument `features` to name layers of the student "):
        Distillation(features=["neck.set9"]).setup(None, model, "fit")
    with pytest.raises(
        MisconfigurationException,
        match=r"has no `neck.set9`. HINT: did you mean \['neck.set5', 'neck.set4', 'neck.set3'\]\? Names",
    ):
        Distillation(features=["neck.set9"]).setup(None, model, "fit")
    with pytest.raises(MisconfigurationException, match=r"to name layers of the teacher YOLOv3 but it has no `neck.x`"):
        Distillation(features={"neck.set3": "neck.x"}).on_fit_start(None, model)
    with pytest.raises(
        MisconfigurationException, match=r"Expected teacher layer `neck.set4` to have the spatial size "
    ):
        distillation = Distillation(features={"neck.set3": "neck.set4"})
        make_trainer(tmp_path, [distillation], max_epochs=1).fit(FAMILIES["yolov3"](), make_loader())
    with pytest.raises(MisconfigurationException, match=r"Expected student layer `neck` to output a \(B, C, H, W\) "):
        make_trainer(tmp_path, [Distillation(features=["neck"])], max_epochs=1).fit(model, make_loader())
    with pytest.raises(MisconfigurationException, match=r"Expected the training batch to be \(images, targets\) with"):
        _ground_truth((torch.zeros(2, 3, 8, 8), 0), {})
    with pytest.raises(MisconfigurationException, match=r"Expected the module to have an optimizer \(the feature ada"):
        _adapter_optimizer(None, [])
    assert _ground_truth(((torch.zeros(1, 3, 8, 4), [{"boxes": torch.zeros(0, 4)}]), 0), {})[0] == 8


@pytest.mark.parametrize("optimizer", [torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD, torch.optim.RMSprop])
def test_the_adapter_optimizer_is_built_for_the_module_optimizers_of_the_recipes(optimizer):
    # AdamW's `defaults` hold `decoupled_weight_decay`, which its constructor does not take (torch >= 2.6)
    main = optimizer([nn.Parameter(torch.zeros(1))], lr=0.25, weight_decay=0.01)
    built = _adapter_optimizer(SimpleNamespace(optimizers=[main]), [nn.Parameter(torch.zeros(2))])
    assert type(built) is optimizer
    assert built.defaults["lr"] == 0.25 and built.defaults["weight_decay"] == 0.01


def test_the_adapter_step_follows_the_module_lr_and_unscales_float16_gradients():
    main = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    scaler = SimpleNamespace(is_enabled=lambda: True, get_scale=lambda: 4.0)
    trainer = SimpleNamespace(optimizers=[main], world_size=1, precision_plugin=SimpleNamespace(scaler=scaler))
    distillation = Distillation(loss=None, features=["a"])
    distillation._imitation._build_adapters(SimpleNamespace(device=torch.device("cpu"), trainer=trainer), {"a": (2, 3)})
    weight = distillation.adapters["a"].conv.weight
    before = weight.detach().clone()
    distillation.on_before_optimizer_step(trainer, None, main)  # no gradient yet: nothing moves
    assert torch.equal(weight, before)
    weight.grad = torch.full_like(weight, 8.0)  # scaled by 4
    distillation.on_before_optimizer_step(trainer, None, main)
    assert torch.allclose(weight, before - 0.5 * 2.0)  # the module's lr, the unscaled gradient
    weight.grad = torch.full_like(weight, float("inf"))
    moved = weight.detach().clone()
    distillation.on_before_optimizer_step(trainer, None, main)  # the scaler skips the step: so do the adapters
    assert torch.equal(weight, moved)
