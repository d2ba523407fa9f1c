"""StructuredPruning with MACs/params targets: the bisection on dry runs meets them and leaves the real model alone."""

from __future__ import annotations

import doctest
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from test_pruning import FAMILIES, fake_trainer, make_loader, make_trainer
from torch import nn

import lightning_prune.callbacks.pruning as pruning_module
from lightning_prune.callbacks import StructuredPruning, pruning_history
from lightning_prune.report.summary import model_stats

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def prune_once(
    model: pl.LightningModule, **kwargs: Any
) -> tuple[StructuredPruning, dict[str, float], dict[str, float]]:
    example = model.example_input_array
    before = model_stats(model, example)
    callback = StructuredPruning(**kwargs)
    callback.on_train_epoch_start(fake_trainer(), model)
    return callback, before, model_stats(model, example)


# ---------------------------------------------------------------------------------------------- targets are met
@pytest.mark.parametrize(
    ("family", "metric", "global_pruning"),
    [("yolov3", "macs", True), ("yolov8", "macs", True), ("yolov8", "params", True), ("yolov3", "macs", False)],
)
def test_one_shot_target_is_met_within_tolerance(family, metric, global_pruning):
    model = FAMILIES[family]()
    callback, before, after = prune_once(model, global_pruning=global_pruning, **{f"target_{metric}_ratio": 0.5})
    assert after[metric] / before[metric] == pytest.approx(0.5, rel=StructuredPruning.tolerance)
    assert callback.state_dict() == {"steps_done": 1, "original": before}
    assert len(pruning_history(model)) == 1


@pytest.mark.parametrize("round_to", [8, 16])
def test_round_to_keeps_multiples_and_still_meets_the_target(round_to):
    model = FAMILIES["yolov8"]()
    widths = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    _, before, after = prune_once(model, target_macs_ratio=0.5, round_to=round_to)
    assert after["macs"] / before["macs"] == pytest.approx(0.5, rel=StructuredPruning.tolerance)
    now = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    narrowed = [n for n in widths if now[n] != widths[n]]
    assert narrowed and all(now[n] % round_to == 0 and now[n] >= round_to for n in narrowed)


def test_cubic_steps_meet_their_targets_of_the_original_in_a_fit(tmp_path):
    pl.seed_everything(0)
    model = FAMILIES["yolov3"]()
    original = model_stats(model, model.example_input_array)
    callback = StructuredPruning(target_macs_ratio=0.4, schedule="cubic", epochs=[1, 2])
    trainer = make_trainer(tmp_path, [callback], max_epochs=3, logger=CSVLogger(tmp_path, name="logs"))
    trainer.fit(model, make_loader())

    goals = [1.0 - r for r in callback.ratios]  # the schedule applies to the MACs reduction 1 - 0.4
    assert goals == pytest.approx([1.0 - 0.6 * 7 / 8, 0.4])
    logged = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = logged[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=True)) for line in logged[1:]]
    achieved = [float(r["prune/macs_of_original"]) for r in rows if r.get("prune/macs_of_original")]
    assert achieved == pytest.approx(goals, rel=StructuredPruning.tolerance)
    final = model_stats(model, model.example_input_array)
    assert final["macs"] / original["macs"] == pytest.approx(achieved[-1])
    assert callback.state_dict()["original"] == original


def test_resumed_callback_measures_against_the_stored_original():
    model = FAMILIES["yolov3"]()
    first = StructuredPruning(target_macs_ratio=0.5, schedule="linear", epochs=[0, 1])
    first.on_train_epoch_start(fake_trainer(epoch=0), model)
    resumed = StructuredPruning(target_macs_ratio=0.5, schedule="linear", epochs=[0, 1])
    resumed.load_state_dict(first.state_dict())
    resumed.on_train_epoch_start(fake_trainer(epoch=1), model)
    after = model_stats(model, model.example_input_array)
    assert after["macs"] / first.state_dict()["original"]["macs"] == pytest.approx(0.5, rel=0.03)

    fresh = StructuredPruning(target_macs_ratio=0.5, schedule="linear", epochs=[0, 1])
    fresh.load_state_dict({"steps_done": 1})  # a checkpoint of a run without a target
    with pytest.raises(MisconfigurationException, match=r"Expected the callback state to hold the original .* macs"):
        fresh.on_train_epoch_start(fake_trainer(epoch=1), model)


@pytest.mark.parametrize("allocation", ["importance", "latency"])
def test_search_leaves_the_real_model_untouched(monkeypatch, allocation):
    model = FAMILIES["yolov8"]()
    model.backbone.requires_grad_(False)  # frozen layers are unfrozen on the copies only
    model.neck.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    seen: dict[str, Any] = {}

    def snapshot(self, trainer, pl_module, target, example, ratio, fold, keep=None, planned=None):  # after the search
        seen["ratio"], seen["keep"] = ratio, keep
        seen["state"] = {k: v.clone() for k, v in pl_module.state_dict().items()}
        seen["modes"] = {n: m.training for n, m in pl_module.named_modules()}
        seen["flags"] = {n: p.requires_grad for n, p in pl_module.named_parameters()}
        return []

    monkeypatch.setattr(StructuredPruning, "_decide_and_prune", snapshot)
    callback = StructuredPruning(target_macs_ratio=0.6, allocation=allocation)
    callback.latency_table = lambda layer, c_in, c_out: layer.macs(c_in, c_out) * 1e-6  # with allocation="latency"
    callback.on_train_epoch_start(fake_trainer(), model)
    if allocation == "latency":  # the latency allocation's dry runs and tracing
        assert seen["keep"] and all(w % 8 == 0 for w in seen["keep"].values())
    else:
        assert 0.0 < seen["ratio"] < 0.95 and seen["keep"] is None
    assert list(seen["state"]) == list(state)
    assert all(torch.equal(seen["state"][k], state[k]) for k in state)
    assert seen["modes"] == modes and seen["flags"] == flags


def test_a_target_already_met_prunes_nothing(monkeypatch):
    model = FAMILIES["yolov3"]()
    callback = StructuredPruning(target_params_ratio=0.99)
    monkeypatch.setattr(StructuredPruning, "tolerance", 0.02)  # 1.00 is within 2% of 0.99
    callback.on_train_epoch_start(fake_trainer(), model)
    assert pruning_history(model).steps == [[]]


def test_docstring_example():
    results = doctest.testmod(pruning_module, verbose=False)
    assert results.attempted >= 4 and results.failed == 0


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"target_macs_ratio": 0.5, "target_params_ratio": 0.5},
            r"Expected at most one of `target_macs_ratio`, `target_params_ratio` and `target_latency_ratio` but got "
            r"target_macs_ratio=0.5 and target_params_ratio=0.5.",
        ),
        ({"target_macs_ratio": 1.0}, r"Expected argument `target_macs_ratio` to be a float in \(0, 1\) but got 1.0."),
        ({"target_params_ratio": 0}, r"Expected argument `target_params_ratio` to be a float in \(0, 1\) but got 0."),
        ({"target_macs_ratio": True}, r"Expected argument `target_macs_ratio` to be a float in \(0, 1\) but got True"),
        (
            {"target_macs_ratio": 0.5, "pruning_ratio": 0.3},
            r"Expected argument `pruning_ratio` to be None with `target_macs_ratio` but got 0.3. HINT: the target",
        ),
    ],
)
def test_bad_target_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StructuredPruning(**kwargs)


def test_unreachable_target_names_what_was_reachable():
    model = FAMILIES["yolov3"]()
    callback = StructuredPruning(target_macs_ratio=0.05, max_layer_ratio=0.3)
    with pytest.raises(
        MisconfigurationException,
        match=r"Expected argument `target_macs_ratio` \(0.05\) to be reachable but step 1 needs 0.050 of the original "
        r"macs and pruning every layer up to `max_layer_ratio` \(0.3\) leaves 0\.\d{3}. HINT: raise `max_layer_ratio`",
    ):
        callback.on_train_epoch_start(fake_trainer(), model)
    assert len(pruning_history(model)) == 0 and callback.steps_done == 0
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("importance", ["taylor", "hessian"])
def test_gradient_criteria_meet_a_target_on_dry_runs_that_carry_the_gradients(importance):
    # nn.Parameter's deepcopy drops .grad: the dry runs' copies must get the calibrated gradients back
    model = FAMILIES["yolov8"]()
    before = model_stats(model, model.example_input_array)
    callback = StructuredPruning(importance=importance, target_macs_ratio=0.5, calibration_batches=1)
    callback.on_train_epoch_start(fake_trainer(loader=make_loader()), model)
    after = model_stats(model, model.example_input_array)
    assert after["macs"] / before["macs"] == pytest.approx(0.5, rel=StructuredPruning.tolerance)
    assert all(p.grad is None for p in model.parameters())  # calibration gradients cleared after the step
