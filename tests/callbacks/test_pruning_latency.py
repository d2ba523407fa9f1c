"""StructuredPruning(allocation="latency"): targets met, widths follow the latency table, training goes on, only rank 0
measures. Made-up tables decide every assertion on widths; the one real table only has to let the fit run."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from test_pruning import FAMILIES, Recorder, fake_trainer, make_loader, make_trainer, optimizer_params
from torch import nn

from lightning_prune.callbacks import StructuredPruning, pruning_history
from lightning_prune.models.base import count_parameters
from lightning_prune.pruning.latency import LatencyTable, LayerSpec
from lightning_prune.report.summary import model_stats

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

EXPENSIVE = "neck.td4.m.0.cv1.conv"  # the root of its own group: only that group changes its output channels


def macs_table(expensive: str | None = None):
    """Latency proportional to MACs; the output channels of ``expensive`` cost 1000 times more."""

    def cost(layer: LayerSpec, c_in: int, c_out: int) -> float:
        extra = 1e3 * layer.macs(c_in, c_out) if layer.name == expensive else 0.0
        return (layer.macs(c_in, c_out) + extra) * 1e-6

    return cost


def prune_with(model: pl.LightningModule, table: Any, **kwargs: Any) -> tuple[StructuredPruning, float]:
    """One step of the callback with ``table`` as its latency table; the MACs left, of the model before."""
    before = model_stats(model, model.example_input_array)["macs"]
    callback = StructuredPruning(allocation="latency", **kwargs)
    callback.latency_table = table
    callback.on_train_epoch_start(fake_trainer(), model)
    return callback, model_stats(model, model.example_input_array)["macs"] / before


def conv_widths(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


# ---------------------------------------------------------------------------------------------- targets
@pytest.mark.parametrize(("family", "round_to"), [("yolov8", None), ("yolov8", 16), ("yolov3", 8)])
def test_macs_target_is_met_and_outputs_keep_their_shapes(family, round_to):
    model = FAMILIES[family]()
    example = model.example_input_array
    shapes = [tuple(r.shape) for r in model.eval()(example)]
    widths = conv_widths(model)
    callback, left = prune_with(model.train(), macs_table(), target_macs_ratio=0.5, round_to=round_to)
    assert left == pytest.approx(0.5, rel=StructuredPruning.tolerance)
    assert [tuple(r.shape) for r in model.eval()(example)] == shapes
    now = conv_widths(model)
    narrowed = [n for n in widths if now[n] != widths[n]]
    assert narrowed and all(now[n] % (round_to or 8) == 0 for n in narrowed)
    assert all(now[n] == widths[n] for n in model.adapter.output_layers(model))
    assert len(pruning_history(model)) == 1
    state = callback.state_dict()
    assert state["steps_done"] == 1 and state["original"]["latency"] > 0  # the table's sum, as before the step


def test_widths_follow_the_latency_table():
    plain, expensive = FAMILIES["yolov8"](), FAMILIES["yolov8"]()
    prune_with(plain, macs_table(), target_macs_ratio=0.7)
    prune_with(expensive, macs_table(EXPENSIVE), target_macs_ratio=0.7)
    original = FAMILIES["yolov8"]().get_submodule(EXPENSIVE).out_channels
    assert expensive.get_submodule(EXPENSIVE).out_channels == 8 < original  # down to its last block, first
    assert plain.get_submodule(EXPENSIVE).out_channels > 8


def test_latency_target_is_met_by_the_table_and_logged(tmp_path):
    pl.seed_everything(0)
    model = FAMILIES["yolov8"]()
    callback = StructuredPruning(allocation="latency", target_latency_ratio=0.5, schedule="linear", epochs=[1, 2])
    callback.latency_table = macs_table()
    trainer = make_trainer(tmp_path, [callback], max_epochs=3, logger=CSVLogger(tmp_path, name="logs"))
    trainer.fit(model, make_loader())

    logged = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = logged[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=True)) for line in logged[1:]]
    achieved = [float(r["prune/latency_of_original"]) for r in rows if r.get("prune/latency_of_original")]
    assert len(achieved) == 2 and achieved[0] <= 0.75 and achieved[1] <= 0.5
    assert achieved[1] == pytest.approx(0.5, abs=0.1)  # the first moves under each budget
    original = callback.state_dict()["original"]["latency"]
    estimate = [float(r["prune/latency_estimate_ms"]) for r in rows if r.get("prune/latency_estimate_ms")]
    assert estimate[1] / original == pytest.approx(achieved[1])


def test_unreachable_target_names_the_latency_allocation():
    model = FAMILIES["yolov3"]()
    callback = StructuredPruning(allocation="latency", target_macs_ratio=0.05, max_layer_ratio=0.3)
    callback.latency_table = macs_table()
    with pytest.raises(
        MisconfigurationException,
        match=r"Expected argument `target_macs_ratio` \(0.05\) to be reachable but step 1 needs 0.050 of the original "
        r"macs and the latency allocation, every group down to `max_layer_ratio` \(0.3\) .* leaves 0\.\d{3}. HINT:",
    ):
        callback.on_train_epoch_start(fake_trainer(), model)
    assert len(pruning_history(model)) == 0 and all(m.training for m in model.modules())


def test_other_ranks_apply_rank_zero_s_decision_without_measuring():
    decided = FAMILIES["yolov8"]()
    prune_with(decided, macs_table(EXPENSIVE), target_macs_ratio=0.6)
    records = pruning_history(decided).steps[-1]
    model = FAMILIES["yolov8"]()
    trainer = SimpleNamespace(
        **{**vars(fake_trainer()), "is_global_zero": False, "world_size": 2},
    )
    trainer.strategy = SimpleNamespace(broadcast=lambda obj, src: (records, None), batch_to_device=lambda b: b)
    callback = StructuredPruning(allocation="latency", target_macs_ratio=0.6)
    callback.on_train_epoch_start(trainer, model)
    assert callback.latency_table is None  # no table measured off rank 0
    assert conv_widths(model) == conv_widths(decided)


# ---------------------------------------------------------------------------------------------- a real fit
def test_fit_with_a_measured_table_prunes_and_training_continues(tmp_path):
    pl.seed_everything(0)
    model = FAMILIES["yolov8"]()
    example = model.example_input_array
    shapes = [tuple(r.shape) for r in model.eval()(example)]
    before_macs = model_stats(model, example)["macs"]
    before = count_parameters(model)
    recorder = Recorder()
    callback = StructuredPruning(allocation="latency", target_macs_ratio=0.5, epochs=[1], importance="l2")
    trainer = make_trainer(tmp_path, [callback, recorder], max_epochs=2)
    trainer.fit(model, make_loader())

    assert isinstance(callback.latency_table, LatencyTable) and len(callback.latency_table) > 0
    assert recorder.params[0] == before > recorder.params[1] == count_parameters(model)
    assert model_stats(model, example)["macs"] / before_macs == pytest.approx(0.5, rel=StructuredPruning.tolerance)
    assert len(recorder.losses) == 4 and all(math.isfinite(x) for x in recorder.losses)
    assert [tuple(r.shape) for r in model.eval()(example)] == shapes
    live = list(model.parameters())
    assert sorted(map(id, optimizer_params(trainer))) == sorted(map(id, live))
    assert all("momentum_buffer" in trainer.optimizers[0].state[p] for p in live)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"allocation": "fast"},
            r"Expected argument `allocation` to be one of \['importance', 'latency', 'sensitivity', 'netadapt'\] "
            r"but got",
        ),
        (
            {"allocation": "latency"},
            r"Expected `target_macs_ratio` or `target_latency_ratio` with allocation='latency' but got neither. HINT:",
        ),
        (
            {"allocation": "latency", "pruning_ratio": 0.3},
            r"Expected `target_macs_ratio` or `target_latency_ratio` with allocation='latency' but got "
            r"`pruning_ratio=0.3`.",
        ),
        (
            {"allocation": "latency", "target_params_ratio": 0.5},
            r"Expected `target_macs_ratio` or `target_latency_ratio` .* but got `target_params_ratio`.",
        ),
        (
            {"target_latency_ratio": 0.5},
            r"Expected argument `allocation` to be 'latency' with `target_latency_ratio` but got 'importance'. HINT:",
        ),
        (
            {"allocation": "latency", "target_macs_ratio": 0.5, "layer_ratios": {"backbone.*": 0.5}},
            r"Expected argument `layer_ratios` to be None with allocation='latency' but got \{'backbone.\*': 0.5\}.",
        ),
        (
            {"allocation": "latency", "target_macs_ratio": 0.5, "target_latency_ratio": 0.5},
            r"Expected at most one of `target_macs_ratio`, `target_params_ratio` and `target_latency_ratio` but got "
            r"target_macs_ratio=0.5 and target_latency_ratio=0.5.",
        ),
        (
            {"allocation": "latency", "target_latency_ratio": 1.5},
            r"Expected argument `target_latency_ratio` to be a float in \(0, 1\) but got 1.5.",
        ),
        (
            {"allocation": "latency", "target_macs_ratio": 0.5, "latency_batch_size": 0},
            r"Expected argument `latency_batch_size` to be an int >= 1 but got 0.",
        ),
        (
            {"allocation": "latency", "target_macs_ratio": 0.5, "latency_batch_size": True},
            r"Expected argument `latency_batch_size` to be an int >= 1 but got True.",
        ),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StructuredPruning(**kwargs)


def test_resumed_latency_target_needs_the_stored_original():
    model = FAMILIES["yolov3"]()
    first = StructuredPruning(allocation="latency", target_latency_ratio=0.5, schedule="linear", epochs=[0, 1])
    first.latency_table = macs_table()
    first.on_train_epoch_start(fake_trainer(epoch=0), model)
    state = first.state_dict()
    resumed = StructuredPruning(allocation="latency", target_latency_ratio=0.5, schedule="linear", epochs=[0, 1])
    resumed.latency_table = macs_table()
    resumed.load_state_dict(state)
    resumed.on_train_epoch_start(fake_trainer(epoch=1), model)
    assert resumed._latency is not None and resumed._latency[1] <= 0.5 * state["original"]["latency"]
    lost = StructuredPruning(allocation="latency", target_latency_ratio=0.5, schedule="linear", epochs=[0, 1])
    lost.latency_table = macs_table()
    lost.load_state_dict({"steps_done": 1, "original": {k: v for k, v in state["original"].items() if k != "latency"}})
    with pytest.raises(MisconfigurationException, match=r"Expected the callback state to hold the original .* latency"):
        lost.on_train_epoch_start(fake_trainer(epoch=1), model)
