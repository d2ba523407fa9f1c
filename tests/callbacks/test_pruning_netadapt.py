"""StructuredPruning(allocation="netadapt"): rounds scored on validation batches, the chosen copy's channels applied."""

from __future__ import annotations

from typing import ClassVar

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from test_pruning import FAMILIES, make_loader, make_trainer
from torch import nn

from lightning_prune.callbacks import StructuredPruning, pruning_history
from lightning_prune.models.yolov3 import YOLOv3
from lightning_prune.pruning.channels import layer_widths
from lightning_prune.pruning.netadapt import NetAdapt
from lightning_prune.report.summary import model_stats

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

FRAGILE = "backbone.stages.1.0.conv"  # YOLOv3-tiny's stride-4 conv: the made-up score below punishes it


class MadeUpScore(StructuredPruning):
    """Scores a proposal by its widths alone: the FRAGILE layer's channels cost 50x more than any other's."""

    widths: ClassVar[dict[str, int]] = {}
    calls: ClassVar[int] = 0

    def netadapt_score(self, model: nn.Module, batches: list) -> float:
        type(self).calls += 1
        assert batches and len(batches) == self.netadapt_batches  # real validation batches reach the score
        now = layer_widths(model)
        lost = {n: 1.0 - now[n] / w for n, w in self.widths.items() if n in now}
        return 1.0 - sum(0.5 * v if n == FRAGILE else 0.01 * v for n, v in lost.items())


def test_rounds_spare_the_fragile_layer_meet_the_target_and_reload(tmp_path):
    pl.seed_everything(0)
    model = FAMILIES["yolov3"]()
    MadeUpScore.widths = layer_widths(model)
    before = model_stats(model, model.example_input_array)
    callback = MadeUpScore(allocation="netadapt", target_macs_ratio=0.6, netadapt_step=0.25, netadapt_batches=1)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")
    trainer = make_trainer(
        tmp_path, [callback, checkpoint], max_epochs=1, enable_checkpointing=True, limit_val_batches=1
    )
    trainer.fit(model, make_loader(), make_loader(2))

    after = model_stats(model, model.example_input_array)
    assert after["macs"] / before["macs"] == pytest.approx(0.6, rel=StructuredPruning.tolerance)
    assert layer_widths(model)[FRAGILE] == MadeUpScore.widths[FRAGILE]
    assert MadeUpScore.calls > 2 * 5  # two rounds (0.25, then 0.15), every group proposed in each
    loaded = YOLOv3.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt").eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(loaded(x), model.eval()(x), strict=True):
            assert torch.equal(a, b)
    assert len(pruning_history(model)) == 1


def test_the_default_score_is_the_detector_s_map_on_validation_batches(tmp_path):
    pl.seed_everything(0)
    model = FAMILIES["yolov3"]()
    before = model_stats(model, model.example_input_array)
    callback = StructuredPruning(allocation="netadapt", target_macs_ratio=0.75, netadapt_step=0.3, netadapt_batches=1)
    trainer = make_trainer(tmp_path, [callback], max_epochs=1, limit_val_batches=1)
    trainer.fit(model, make_loader(), make_loader(2))
    after = model_stats(model, model.example_input_array)
    assert after["macs"] / before["macs"] == pytest.approx(0.75, rel=StructuredPruning.tolerance)  # one round


def test_core_netadapt_records_rebuild_the_chosen_model():
    import copy

    from lightning_prune.pruning.history import apply_records

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(), nn.Conv2d(16, 2, 1))
    fresh = copy.deepcopy(net)
    adapt = NetAdapt(net, torch.zeros(1, 3, 16, 16), lambda m: float(m[2].out_channels), step=0.25)
    records = adapt.run(goal=0.5)
    assert all(next(iter(r.widths)) == "0" for r in adapt.rounds)  # free: the score counts layer 2's channels
    assert adapt.rounds[0].cost > 0.5 >= adapt.rounds[-1].cost
    assert [m.out_channels for m in net if isinstance(m, nn.Conv2d)] == [16, 16, 2]  # the model is left alone
    apply_records(fresh, records)
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(fresh(x), adapt.chosen(x))
    assert fresh[0].out_channels == [r.widths["0"] for r in adapt.rounds][-1] < 16


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"allocation": "netadapt", "pruning_ratio": 0.5},
            r"Expected `target_macs_ratio` or `target_params_ratio` with allocation='netadapt' but got "
            r"`pruning_ratio=0.5`.",
        ),
        (
            {"allocation": "netadapt", "target_latency_ms": 3.0},
            r"with allocation='netadapt' but got `target_latency_ms`.",
        ),
        ({"netadapt_step": 0.0}, r"Expected argument `netadapt_step` to be a float in \(0, 1\) but got 0.0."),
        ({"netadapt_batches": 0}, r"Expected argument `netadapt_batches` to be an int >= 1 but got 0."),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StructuredPruning(**kwargs)


def test_netadapt_without_validation_data_is_refused(tmp_path):
    model = FAMILIES["yolov3"]()
    callback = StructuredPruning(allocation="netadapt", target_macs_ratio=0.6)
    trainer = make_trainer(tmp_path, [callback], max_epochs=1)
    with pytest.raises(MisconfigurationException, match=r"Expected validation data to score NetAdapt's proposals"):
        trainer.fit(model, make_loader())
    assert len(pruning_history(model)) == 0


def test_a_short_finetune_between_rounds_gives_the_module_the_finetuned_winner(tmp_path):
    def run(finetune_batches: int) -> nn.Module:
        pl.seed_everything(0)
        model = FAMILIES["yolov3"]()
        MadeUpScore.widths = layer_widths(model)
        callback = MadeUpScore(
            allocation="netadapt",
            target_macs_ratio=0.6,
            netadapt_step=0.25,
            netadapt_batches=1,
            netadapt_finetune_batches=finetune_batches,
        )
        trainer = make_trainer(tmp_path, [callback], max_epochs=1, limit_train_batches=1, limit_val_batches=1)
        trainer.fit(model, make_loader(), make_loader(2))
        return model

    plain, tuned = run(0), run(2)
    assert layer_widths(plain) == layer_widths(tuned)  # the made-up score sees widths only: the same rounds
    differ = [
        n for (n, a), (_, b) in zip(plain.state_dict().items(), tuned.state_dict().items()) if not torch.equal(a, b)
    ]
    assert differ  # the winner of round 1 trained two batches before round 2


def test_short_finetune_argument_errors():
    with pytest.raises(ValueError, match=r"`netadapt_finetune_batches` to be an int >= 0 but got -1."):
        StructuredPruning(netadapt_finetune_batches=-1)
    with pytest.raises(ValueError, match=r"Expected argument `submodule` to be None with `netadapt_finetune_batches`"):
        StructuredPruning(netadapt_finetune_batches=2, submodule="backbone")
