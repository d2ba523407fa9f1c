"""StructuredPruning(allocation="sensitivity"): a sensitivity table's budget allocation meets the target in a fit."""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from test_pruning import FAMILIES, fake_trainer, make_loader, make_trainer

from lightning_prune.callbacks import StructuredPruning, pruning_history
from lightning_prune.pruning.channels import layer_widths
from lightning_prune.pruning.sensitivity import SensitivityAnalysis, SensitivityResult, SensitivityRow
from lightning_prune.report.summary import model_stats

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

FRAGILE = ("backbone.stem.conv", "backbone.stage5.0.conv")  # a large mAP drop per MAC saved in the tables below


def made_up_table(model: pl.LightningModule) -> SensitivityResult:
    """The model's real groups (one trace), with invented trials at ratio 0.5: the FRAGILE groups cost 50 points,
    every other group 0.1 point; each saves 1% of the MACs (the allocation orders by drop per MAC saved)."""
    groups = SensitivityAnalysis(model, model.example_input_array, lambda m: 0.0, ratios=[0.5]).channels
    rows = [
        SensitivityRow(g, 0.5, 0.9 - (0.5 if g in FRAGILE else 0.001), -(0.5 if g in FRAGILE else 0.001), 0.01, w // 2)
        for g, w in groups.items()
    ]
    return SensitivityResult(0.9, 1e6, [0.5], groups, rows)


def test_the_budget_goes_to_the_cheap_groups_and_the_target_is_met(tmp_path):
    pl.seed_everything(0)
    model = FAMILIES["yolov8"]()
    path = tmp_path / "sensitivity.json"
    path.write_text(json.dumps(made_up_table(model).to_dict()))
    before_widths, before = layer_widths(model), model_stats(model, model.example_input_array)
    callback = StructuredPruning(allocation="sensitivity", sensitivity=str(path), target_macs_ratio=0.6, round_to=4)
    make_trainer(tmp_path, [callback], max_epochs=1).fit(model, make_loader())

    after = model_stats(model, model.example_input_array)
    assert after["macs"] / before["macs"] == pytest.approx(0.6, rel=StructuredPruning.tolerance)
    widths = layer_widths(model)
    assert all(widths[g] == before_widths[g] for g in FRAGILE)  # the cheap groups were enough
    narrowed = [n for n in widths if widths[n] < before_widths[n]]
    assert len(narrowed) > 10 and all(widths[n] % 4 == 0 for n in narrowed)
    assert all(widths[n] >= before_widths[n] // 2 for n in widths)  # never past the table's largest ratio
    assert len(pruning_history(model)) == 1 and callback.state_dict()["original"] == before


def test_an_unreachable_budget_and_a_table_of_another_model_are_refused():
    model = FAMILIES["yolov8"]()
    table = made_up_table(model)
    callback = StructuredPruning(allocation="sensitivity", sensitivity=table, target_macs_ratio=0.1)
    with pytest.raises(MisconfigurationException, match=r"every group of the sensitivity table pruned to its largest"):
        callback.on_train_epoch_start(fake_trainer(), model)
    assert len(pruning_history(model)) == 0
    other = FAMILIES["yolov3"]()
    callback = StructuredPruning(allocation="sensitivity", sensitivity=table, target_macs_ratio=0.5)
    with pytest.raises(MisconfigurationException, match=r"Expected every group of argument `sensitivity` to be a"):
        callback.setup(None, other, "fit")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"allocation": "sensitivity", "target_macs_ratio": 0.5},
            r"Expected argument `sensitivity` \(a sensitivity table\) exactly with allocation='sensitivity' but got "
            r"allocation='sensitivity' and sensitivity=None.",
        ),
        (
            {"sensitivity": {"rows": []}, "target_macs_ratio": 0.5},
            r"exactly with allocation='sensitivity' but got allocation='importance'",
        ),
        (
            {"allocation": "sensitivity", "sensitivity": {}, "pruning_ratio": 0.5},
            r"Expected `target_macs_ratio`, `target_params_ratio` or `target_latency_ms` with "
            r"allocation='sensitivity' but got `pruning_ratio=0.5`.",
        ),
        (
            {"allocation": "sensitivity", "sensitivity": {}, "target_macs_ratio": 0.5, "layer_ratios": {"a": 0.5}},
            r"Expected argument `layer_ratios` to be None with allocation='sensitivity' but got \{'a': 0.5\}.",
        ),
        (
            {"allocation": "sensitivity", "sensitivity": {"rows": []}, "target_macs_ratio": 0.5},
            r"Expected argument `sensitivity` to be a sensitivity table \(keys 'baseline'",
        ),
        (
            {"allocation": "sensitivity", "sensitivity": "missing.json", "target_macs_ratio": 0.5},
            r"Expected argument `sensitivity` to be an existing sensitivity.json",
        ),
        (
            {"target_latency_ms": 0},
            r"Expected argument `target_latency_ms` to be a float > 0 \(milliseconds\) but got 0.",
        ),
        (
            {"target_latency_ms": 5.0, "target_macs_ratio": 0.5},
            r"Expected at most one of `target_latency_ms` and `target_macs_ratio`",
        ),
        ({"target_latency_ms": 5.0, "pruning_ratio": 0.5}, r"`target_latency_ms` and `pruning_ratio` but got"),
        (
            {"target_latency_ms": 5.0, "schedule": "linear", "epochs": [0, 1]},
            r"Expected the 'one_shot' schedule \(one epoch\) with `target_latency_ms` but got 2 epochs.",
        ),
        (
            {"target_latency_ms": 5.0, "allocation": "latency"},
            r"Expected argument `allocation` to be 'importance' or 'sensitivity' with `target_latency_ms`",
        ),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        StructuredPruning(**kwargs)


# ---------------------------------------------------------------------------------------------- latency in ms
def fake_probe(models: list, example) -> list[float]:
    """A deterministic stand-in for the wall clock: 1 ms per MMAC plus 0.5 ms of fixed cost."""
    return [model_stats(m, example)["macs"] / 1e6 + 0.5 for m in models]


@pytest.mark.parametrize("allocation", ["importance", "sensitivity"])
def test_a_latency_target_in_ms_is_met_on_measured_dry_runs(allocation, tmp_path):
    model = FAMILIES["yolov8"]()
    start = fake_probe([model], model.example_input_array)[0]
    kwargs = {"sensitivity": made_up_table(model)} if allocation == "sensitivity" else {}
    callback = StructuredPruning(allocation=allocation, target_latency_ms=0.6 * start, **kwargs)
    callback.latency_probe = fake_probe
    callback.on_train_epoch_start(fake_trainer(), model)
    achieved = fake_probe([model], model.example_input_array)[0]
    assert achieved == pytest.approx(0.6 * start, rel=StructuredPruning.tolerance)
    assert callback._latency == pytest.approx((start, achieved))
    assert callback.state_dict()["original"]["latency_ms"] == pytest.approx(start)


def test_latency_is_timed_at_the_latency_batch_size_and_an_unreachable_target_is_refused():
    model = FAMILIES["yolov3"]()
    seen = []

    def probe(models, example):
        seen.append(tuple(example.shape))
        return [1.0 for _ in models]  # nothing gets faster: unreachable

    callback = StructuredPruning(target_latency_ms=0.5, latency_batch_size=3)
    callback.latency_probe = probe
    with pytest.raises(MisconfigurationException, match=r"Expected argument `target_latency_ms` \(0.5\) to be reach"):
        callback.on_train_epoch_start(fake_trainer(), model)
    assert len(pruning_history(model)) == 0
    ms = StructuredPruning(target_latency_ms=1.0).latency_probe([model], model.example_input_array)
    assert seen and all(shape[0] == 3 for shape in seen) and ms[0] > 0
