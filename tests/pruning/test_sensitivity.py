"""Per-group sensitivity analysis: exact rows, ranking and ratios with a known evaluate, restoring the model, ranks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from _nets import ResCatNet
from torch import nn
from torch.utils.data import DataLoader

from lightning_prune.callbacks import StructuredPruning
from lightning_prune.models.yolov8 import YOLOv8
from lightning_prune.pruning.sensitivity import (
    SensitivityAnalysis,
    SensitivityResult,
    SensitivityRow,
    load_layer_ratios,
    merge_results,
)
from lightning_prune.report.plots import plot_sensitivity

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

RATIOS = (0.25, 0.5, 0.75)  # of 16 or 32 channels: whole numbers, no rounding in torch-pruning's int(n * (1 - r))
GAINS = {"a.0": 0.2, "fuse.0": 0.05}  # mAP lost per unit fraction of the group's channels removed
EXAMPLE = torch.zeros(1, 3, 8, 8)


def fake_map(pruned: nn.Module) -> float:
    """0.9 minus, per chosen group, its gain times the fraction of its channels removed (widths of ResCatNet(16))."""
    widths = {"a.0": 16, "fuse.0": 32}
    return 0.9 - sum(k * (1 - pruned.get_submodule(g).out_channels / widths[g]) for g, k in GAINS.items())


def analysis(**kwargs) -> SensitivityAnalysis:
    torch.manual_seed(0)
    return SensitivityAnalysis(ResCatNet(16), EXAMPLE, fake_map, ratios=RATIOS, **kwargs)


# ---------------------------------------------------------------------------------------------- exact results
def test_groups_rows_ranking_and_ratios_are_exact():
    sensitivity = analysis()
    # the stem and the residual branch's last conv share channels (x + b(a(x))): one group, named by the stem
    assert sensitivity.layers == {"stem.0": ["stem.0", "b.0"], "a.0": ["a.0"], "c.0": ["c.0"], "fuse.0": ["fuse.0"]}
    assert sensitivity.ignored_layers == ["head"]  # the output layer, found on the traced graph
    result = sensitivity.run()
    assert result.baseline == pytest.approx(0.9)
    assert [(r.group, r.ratio, r.channels) for r in result.rows] == [
        (g, ratio, int(width * (1 - ratio)))
        for g, width in [("stem.0", 16), ("a.0", 16), ("c.0", 16), ("fuse.0", 32)]
        for ratio in RATIOS
    ]
    deltas = {(r.group, r.ratio): round(100 * r.delta, 9) for r in result.rows}
    assert deltas == {
        **{(g, ratio): 0.0 for g in ("stem.0", "c.0") for ratio in RATIOS},
        ("a.0", 0.25): -5.0, ("a.0", 0.5): -10.0, ("a.0", 0.75): -15.0,
        ("fuse.0", 0.25): -1.25, ("fuse.0", 0.5): -2.5, ("fuse.0", 0.75): -3.75,
    }  # fmt: skip
    for group in result.groups:  # MACs saved grow with the ratio, and never reach the whole model
        saved = [r.macs_saved for r in result.rows if r.group == group]
        assert 0 < saved[0] < saved[1] < saved[2] < 1
    assert result.ranking() == ["a.0", "fuse.0", "stem.0", "c.0"]  # ties keep module order
    assert result.sensitivity()["a.0"] == pytest.approx(10.0)
    assert result.layer_ratios(max_drop=3.0) == {"stem\\.0": 0.75, "c\\.0": 0.75, "fuse\\.0": 0.5}
    assert result.layer_ratios(max_drop=10.0) == {"stem\\.0": 0.75, "a\\.0": 0.5, "c\\.0": 0.75, "fuse\\.0": 0.75}
    assert result.layer_ratios(max_drop=0.0) == {"stem\\.0": 0.75, "c\\.0": 0.75}
    assert result.sensitive_groups(max_drop=3.0) == ["a\\.0"]


def test_yaml_markdown_json_and_plot(tmp_path):
    result = analysis().run()
    path = tmp_path / "layer_ratios.yaml"
    path.write_text(result.to_yaml(max_drop=3.0))
    assert "ignored_layers`: ['a\\\\.0']" in path.read_text()  # the left-out group, named in a comment
    assert load_layer_ratios(path, ResCatNet(16)) == result.layer_ratios(max_drop=3.0)
    table = result.to_markdown(max_drop=3.0)
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| # | group | channels | Δ@0.25 | Δ@0.5 | Δ@0.75 | mean Δ | ratio (≤ 3 pts)")
    assert lines[1] == "| 1 | `a.0` | 16 | -5.00 | -10.00 | -15.00 | -10.00 | — | — |"
    assert lines[3].startswith("| 3 | `stem.0` +1 | 16 | +0.00 | +0.00 | +0.00 | +0.00 | 0.75 |")
    assert SensitivityResult.from_dict(result.to_dict()) == result
    assert result.plot(tmp_path / "s.png").stat().st_size > 0


def test_a_curve_that_dips_and_recovers_stops_at_the_dip():
    rows = [SensitivityRow("x", r, m, m - 0.5, r / 10, 8) for r, m in [(0.1, 0.5), (0.3, 0.48), (0.5, 0.499)]]
    result = SensitivityResult(0.5, 1e6, [0.1, 0.3, 0.5], {"x": 8}, rows)
    assert result.layer_ratios(max_drop=1.0) == {"x": 0.1}  # 0.5 costs 0.1 points, but 0.3 costs 2
    assert result.layer_ratios(max_drop=2.0) == {"x": 0.5}


def test_round_to_that_keeps_every_channel_skips_the_evaluation():
    calls = []

    def evaluate(pruned: nn.Module) -> float:
        calls.append(pruned)
        return 0.5

    torch.manual_seed(0)
    result = SensitivityAnalysis(ResCatNet(16), EXAMPLE, evaluate, ratios=[0.1], groups=["a\\.0"], round_to=8).run()
    assert result.rows == [SensitivityRow("a.0", 0.1, 0.5, 0.0, 0.0, 16)]  # 14 kept, rounded up to 16
    assert len(calls) == 1  # the baseline only


# ---------------------------------------------------------------------------------------------- ranks
def test_ranks_split_the_groups_and_merge_into_the_single_run():
    single = analysis().run()
    parts = [analysis().run(rank=r, world_size=3) for r in range(3)]
    assert [sorted({row.group for row in p.rows}) for p in parts] == [["fuse.0", "stem.0"], ["a.0"], ["c.0"]]
    assert merge_results(parts) == single
    assert merge_results(parts[::-1]).rows == single.rows  # ordered by group and ratio, whatever the rank order
    with pytest.raises(ValueError, match="Expected each trial once across the results but got"):
        merge_results([parts[0], parts[0]])
    other = analysis(groups=["a\\.0"]).run()
    with pytest.raises(ValueError, match="Expected every result to come from the same analysis"):
        merge_results([parts[0], other])
    with pytest.raises(ValueError, match="Expected argument `parts` to hold at least one SensitivityResult"):
        merge_results([])


# ---------------------------------------------------------------------------------------------- real detector
def test_yolov8_is_untouched_by_every_trial_and_its_output_layers_are_kept():
    torch.manual_seed(0)
    model = YOLOv8("n", num_classes=2, img_size=64).train()
    model.backbone.stem.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    params = sum(p.numel() for p in model.parameters())
    seen = []

    def evaluate(pruned: nn.Module) -> float:
        state = model.state_dict()
        assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in before)
        seen.append(sum(p.numel() for p in pruned.parameters()))
        return 0.5

    full = SensitivityAnalysis(model, torch.zeros(1, 3, 64, 64), evaluate)
    assert len(full.groups) == 59
    assert not {f"head.{b}.{i}.2" for b in ("box", "cls") for i in range(3)} & {
        n for layers in full.layers.values() for n in layers
    }
    chosen = ["backbone\\.stage2\\.1\\.cv1\\.conv", "neck\\.td3\\.cv2\\.conv"]
    analysis = SensitivityAnalysis(model, torch.zeros(1, 3, 64, 64), evaluate, ratios=[0.5, 0.9], groups=chosen)
    assert analysis.layers["backbone.stage2.1.cv1.conv"] == [
        "backbone.stage2.1.cv1.conv",
        "backbone.stage2.1.m.0.cv2.conv",
    ]
    result = analysis.run()
    assert len(result.rows) == 4 and seen[0] == params and all(n < params for n in seen[1:])
    state = model.state_dict()
    assert all(torch.equal(state[k], before[k]) for k in before)  # bit for bit
    assert [m.training for m in model.modules()] == modes and [p.requires_grad for p in model.parameters()] == flags


class _Wrapped(pl.LightningModule):
    """ResCatNet as a LightningModule with a dummy loss, for StructuredPruning."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = ResCatNet(16)
        self.example_input_array = EXAMPLE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self(batch).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_the_yaml_prunes_those_groups_in_structured_pruning_to_the_analysed_widths(tmp_path):
    module = _Wrapped()
    result = SensitivityAnalysis(module.net, EXAMPLE, fake_map, ratios=RATIOS).run()
    path = tmp_path / "layer_ratios.yaml"
    path.write_text(result.to_yaml(max_drop=3.0))  # stem.0 and c.0 by 0.75, fuse.0 by 0.5, a.0 left out
    ratios = {f"net\\.{k}": v for k, v in load_layer_ratios(path, module.net).items()}  # names in the LightningModule
    sensitive = [f"net\\.{g}" for g in result.sensitive_groups(max_drop=3.0)]
    pruning = StructuredPruning(pruning_ratio=0.5, layer_ratios=ratios, ignored_layers=sensitive)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[pruning],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, DataLoader(torch.rand(2, 3, 8, 8), batch_size=2))
    kept = {(r.group, r.ratio): r.channels for r in result.rows}
    widths = {g: module.net.get_submodule(g).out_channels for g in result.groups}
    assert widths == {"stem.0": kept["stem.0", 0.75], "a.0": 16, "c.0": kept["c.0", 0.75], "fuse.0": 16}
    assert module.net.b[0].out_channels == widths["stem.0"]  # tied by the residual add


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"ratios": [0.5, 1.0]},
            ValueError,
            r"Expected argument `ratios` to be a non-empty list of floats in \(0, 1\)",
        ),
        ({"ratios": [0.0]}, ValueError, r"`ratios` to be a non-empty list of floats in \(0, 1\) but got \[0.0\]"),
        ({"ratios": []}, ValueError, r"`ratios` to be a non-empty list of floats in \(0, 1\) but got \[\]"),
        ({"ratios": 0.5}, ValueError, r"`ratios` to be a non-empty list"),
        ({"ratios": [True]}, ValueError, r"`ratios` to be a non-empty list"),
        ({"importance": "taylor"}, ValueError, "Expected argument `importance` to be a data-free criterion"),
        ({"importance": "nope"}, ValueError, "Expected argument `importance` to be one of"),
        ({"round_to": 0}, ValueError, "Expected argument `round_to` to be None or an int >= 1 but got 0"),
        ({"ignored_layers": ["nope"]}, ValueError, r"regex of `ignored_layers` to fully match a module name .* 'nope'"),
        ({"ignored_layers": "head"}, ValueError, "Expected argument `ignored_layers` to be a list of regex strings"),
        ({"ignored_layers": ["("]}, ValueError, "Expected argument `ignored_layers` to hold valid regexes"),
        (
            {"groups": ["b\\.0"]},
            ValueError,
            r"regex of `groups` to fully match a group name of the model but 'b\\\\.0'",
        ),
        ({"evaluate": 0.5}, TypeError, "Expected argument `evaluate` to be a callable"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = {"ratios": RATIOS, "evaluate": fake_map, **kwargs}
    with pytest.raises(error, match=match):
        SensitivityAnalysis(ResCatNet(16), EXAMPLE, **args)


def test_bad_run_and_summary_arguments(tmp_path):
    sensitivity = analysis(groups=["a\\.0"])
    with pytest.raises(ValueError, match="Expected arguments `rank` and `world_size` to be ints with 0 <= rank"):
        sensitivity.run(rank=2, world_size=2)
    result = sensitivity.run()
    for call in (result.layer_ratios, result.to_yaml, result.to_markdown):
        with pytest.raises(ValueError, match=r"Expected argument `max_drop` to be a float >= 0 \(mAP points\)"):
            call(max_drop=-1.0)
    with pytest.raises(ValueError, match="Expected at least one group with a"):
        plot_sensitivity({}, 0.5, tmp_path / "s.png")


def test_a_chunked_c2f_is_refused_with_the_converter_named():
    class ChunkedC2f(nn.Module):  # Ultralytics' layout: cv1 → chunk(2) → m → cv2
        def __init__(self) -> None:
            super().__init__()
            self.cv1, self.cv2 = nn.Sequential(nn.Conv2d(3, 8, 1)), nn.Sequential(nn.Conv2d(12, 4, 1))
            self.cv1.conv, self.cv2.conv = self.cv1[0], self.cv2[0]
            self.m = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = list(self.cv1(x).chunk(2, 1))
            y.append(self.m[0](y[-1]))
            return self.cv2(torch.cat(y, 1))

    with pytest.raises(
        ValueError, match=re.escape("HINT: convert it first with `lightning_prune.adapters.convert_c2f")
    ):
        SensitivityAnalysis(nn.Sequential(ChunkedC2f()), EXAMPLE, fake_map)


def test_load_layer_ratios_refuses_files_that_do_not_fit_the_model(tmp_path: Path):
    path = tmp_path / "r.yaml"
    with pytest.raises(FileNotFoundError, match="Expected argument `path` to be an existing YAML file"):
        load_layer_ratios(path, ResCatNet(16))
    path.write_text("a\\.0: 0.5\nbackbone\\.missing: 0.3\n")
    with pytest.raises(ValueError, match=r"'backbone\\\\.missing' matches none. HINT: the model has e.g. \['stem.0', "):
        load_layer_ratios(path, ResCatNet(16))
    path.write_text("a\\.0: 1.5\n")
    with pytest.raises(ValueError, match=r"to map each regex to a ratio in \(0, 1\) but got 'a\\\\.0': 1.5"):
        load_layer_ratios(path, ResCatNet(16))
    path.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="to hold a mapping of layer-name regexes to ratios in"):
        load_layer_ratios(path, ResCatNet(16))
