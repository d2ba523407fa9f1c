"""Latency-aware allocation: the latency table measures only what is asked, and the greedy (on made-up tables, so no
timing decides a test) prunes where importance per millisecond is lowest, within blocks, caps and budgets."""

from __future__ import annotations

import math

import pytest
import torch
import torch_pruning as tp
from _nets import ResCatNet
from torch import nn
from torch.nn import functional as F

from lightning_prune.pruning import PruningHistory, prune_channels
from lightning_prune.pruning.latency import LatencyAllocation, LatencyTable, LayerSpec, trace_layers, width_ratios
from lightning_prune.report.summary import model_stats

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

X = torch.zeros(1, 3, 16, 16)


def chain(width: int = 32) -> nn.Sequential:
    """conv "0" → conv "2" → conv "4" → output conv "6": groups "0" (0 out, 2 in), "2" (2 out, 4 in), "4" (4, 6)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 4, 1),
    )


class Uniform(tp.importance.Importance):
    """Every channel of a group scores ``scale`` (``scales`` by root name): only latency tells groups apart."""

    def __init__(self, model: nn.Module, scales: dict[str, float] | None = None) -> None:
        self.names = {id(m): n for n, m in model.named_modules()}
        self.scales = scales or {}

    def __call__(self, group: tp.Group) -> torch.Tensor:
        root = group[0][0].target.module
        n = root.out_channels if isinstance(root, nn.Conv2d) else root.out_features
        return torch.full((n,), self.scales.get(self.names[id(root)], 1.0))


def macs_cost(expensive: str | None = None, factor: float = 10.0):
    """A made-up table: latency proportional to MACs, ``factor`` times dearer for the layer named ``expensive``."""

    def cost(layer: LayerSpec, c_in: int, c_out: int) -> float:
        return layer.macs(c_in, c_out) * (factor if layer.name == expensive else 1.0) * 1e-6

    return cost


def allocate(net: nn.Module, cost, importance=None, **kwargs) -> LatencyAllocation:
    kwargs.setdefault("ignored_layers", [net[6]])
    return LatencyAllocation(net, X, importance or Uniform(net), cost, **kwargs)


# ---------------------------------------------------------------------------------------------- the table
def conv_spec(name: str = "") -> LayerSpec:
    return LayerSpec("conv2d", 16, 16, (8, 8), (8, 8), 1, (3, 3), (1, 1), (1, 1), (1, 1), name=name)


def counting_conv(monkeypatch) -> list[tuple[int, ...]]:
    """Replace F.conv2d by a counter of the weight shapes it is called with (in call order)."""
    calls: list[tuple[int, ...]] = []
    real = F.conv2d

    def conv2d(x, w, *args):
        calls.append(tuple(w.shape))
        return real(x, w, *args)

    monkeypatch.setattr(F, "conv2d", conv2d)
    return calls


def test_table_memoizes_by_configuration_and_measures_only_what_is_asked(monkeypatch):
    calls = counting_conv(monkeypatch)
    table = LatencyTable(warmup=1, repeats=3)
    first = table(conv_spec("a"), 16, 8)
    assert first > 0 and len(table) == 1 and len(calls) == 4  # one entry: 1 warm-up + 3 timed calls
    assert table(conv_spec("a"), 16, 8) == first and table(conv_spec("b"), 16, 8) == first  # same configuration
    assert len(calls) == 4
    table.measure([(conv_spec(), 16, 8), (conv_spec(), 8, 8), (conv_spec(), 8, 8), (conv_spec(), 16, 16)])
    assert len(table) == 3 and len(calls) == 4 + 2 * 4  # only the two new entries
    table.measure([(conv_spec(), 16, 16)])
    assert len(calls) == 12  # nothing new: nothing timed
    other = LayerSpec("conv2d", 16, 16, (8, 8), (8, 8), 2, (3, 3), (1, 1), (1, 1), (1, 1))  # batch 2: another key
    table(other, 16, 8)
    assert len(table) == 4 and len(calls) == 12 + 4 and table.seconds > 0


def test_table_interleaves_the_entries_of_a_batch(monkeypatch):
    calls = counting_conv(monkeypatch)
    LatencyTable(warmup=1, repeats=2).measure([(conv_spec(), 16, 8), (conv_spec(), 8, 16)])
    assert calls == [(8, 16, 3, 3), (16, 8, 3, 3)] * 3  # every round runs each entry once, in turn


def test_table_times_in_chunks_within_max_bytes(monkeypatch):
    calls = counting_conv(monkeypatch)
    LatencyTable(warmup=0, repeats=2, max_bytes=1).measure([(conv_spec(), 16, 8), (conv_spec(), 8, 16)])
    assert calls == [(8, 16, 3, 3)] * 2 + [(16, 8, 3, 3)] * 2  # one entry at a time


def test_table_times_linear_and_depthwise_layers():
    table = LatencyTable(warmup=0, repeats=1)
    linear = LayerSpec("linear", 8, 4, (5,), (5,), 2)
    depthwise = LayerSpec("conv2d", 8, 8, (6, 6), (6, 6), 1, (3, 3), (1, 1), (1, 1), (1, 1), 8, True)
    assert table(linear, 6, 3) > 0 and table(depthwise, 4, 4) > 0
    assert depthwise.groups_at(4, 4) == 4 and depthwise.macs(4, 4) == 4 * 9 * 36


# ---------------------------------------------------------------------------------------------- tracing
def test_trace_layers_records_each_layer_as_called():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.Flatten(1),
        nn.Linear(8 * 8 * 8, 5),
    ).train()
    layers = trace_layers(net, torch.zeros(2, 3, 16, 16), batch_size=4)
    assert sorted(layers) == ["0", "1", "3"] and net.training  # modes restored
    conv = layers["0"][0]
    assert (conv.kind, conv.input_size, conv.output_size, conv.batch, conv.stride) == (
        "conv2d",
        (16, 16),
        (8, 8),
        4,
        (2, 2),
    )
    assert layers["1"][0].depthwise and not conv.depthwise
    assert (layers["3"][0].kind, layers["3"][0].input_size, layers["3"][0].batch) == ("linear", (), 4)
    assert trace_layers(net, torch.zeros(2, 3, 16, 16))["0"][0].batch == 2  # default: the example's batch


class Pooled(nn.Module):
    """conv a → SiLU → (cat with conv b) → pool, and the same pool on a's output alone."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1)
        self.bn, self.act, self.pool = nn.BatchNorm2d(8), nn.SiLU(), nn.MaxPool2d(3, 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.act(self.bn(self.a(x)))
        return self.pool(torch.cat([y, self.b(x)], 1)), self.pool(y)


def test_trace_layers_follows_a_conv_s_channels_through_parameter_free_modules():
    layers = trace_layers(Pooled(), X)
    assert [(s.kind, s.op) for s in layers["a"]] == [  # BatchNorm (fused as deployed) is not timed
        ("conv2d", ""),
        ("module", "SiLU()"),
        ("module", "MaxPool2d(kernel_size=3, stride=1, padding=1, dilation=1, ceil_mode=False)"),
    ]
    assert [s.kind for s in layers["b"]] == ["conv2d"]  # the pool after the concatenation belongs to no conv
    pool = layers["a"][2]
    assert (pool.in_channels, pool.input_size, pool.macs(8, 8)) == (8, (16, 16), 0.0)
    table = LatencyTable(warmup=0, repeats=1)
    assert table(pool, 4, 4) > 0 and table(layers["a"][1], 4, 4) > 0


def test_modules_after_a_conv_count_in_its_group_s_latency():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.SiLU(), nn.Conv2d(16, 16, 3), nn.Conv2d(16, 4, 1))

    def cost(layer: LayerSpec, c_in: int, c_out: int) -> float:  # only the SiLU takes time, by its channels
        return float(c_in) if layer.kind == "module" else 0.0

    allocation = LatencyAllocation(net, X, Uniform(net), cost, ignored_layers=[net[3]])
    assert allocation.latency[0] == 16.0
    assert allocation.extend(latency=8.0) and allocation.widths() == {"0": 8}  # conv "2" has no module after it


def test_layer_macs_are_the_counter_s():
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=1, bias=False)
    x = torch.zeros(1, 6, 16, 16)
    spec = trace_layers(conv, x)[""][0]
    assert spec.macs(6, 10) == model_stats(conv, x)["macs"]
    assert spec.macs(3, 5) == model_stats(nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=False), x[:, :3])["macs"]


# ---------------------------------------------------------------------------------------------- the greedy
def test_greedy_prunes_the_group_whose_channels_save_the_most_time():
    net = chain()
    allocation = allocate(net, macs_cost(expensive="2"))  # conv "2" reads group "0", writes group "2"
    assert allocation.extend(macs=0.8 * allocation.macs[0])
    assert {root for root, _ in allocation.moves} <= {"0", "2"}
    assert allocation.moves[0][0] == "2"  # saves on conv "2" and conv "4" (group "0": on the cheap conv "0" and "2")
    # with the table neutral, the group whose channels are least important goes first
    neutral = allocate(net, macs_cost(), Uniform(net, {"4": 0.1}))
    assert neutral.extend(macs=0.8 * neutral.macs[0])
    assert set(neutral.widths()) == {"4"}


def test_greedy_jumps_over_a_slow_width():
    def cost(layer: LayerSpec, c_in: int, c_out: int) -> float:  # 24 output channels run slower than 32
        slow = 5.0 if layer.name == "2" and c_out == 24 else 1.0
        return layer.macs(c_in, c_out) * slow * 1e-6

    net = chain()
    allocation = allocate(net, cost, lookahead=2)
    allocation.extend(macs=0.5 * allocation.macs[0])
    assert ("2", 16) in allocation.moves and ("2", 24) not in allocation.moves


def test_greedy_probes_past_a_cliff_of_several_blocks():
    def cost(layer: LayerSpec, c_in: int, c_out: int) -> float:  # under 64 outputs a slower kernel, until 32
        slow = 3.0 if layer.name == "2" and 32 < c_out < 64 else 1.0
        return layer.macs(c_in, c_out) * slow * 1e-6

    net = chain(width=64)
    allocation = allocate(net, cost, lookahead=2)  # 56 and 48 are slower: then 4 blocks down, 32
    move = next(m for m in allocation._candidates[1] if m.latency > 0)
    assert allocation.groups[1].root == "2" and move.width == 32
    allocation.extend(macs=0.5 * allocation.macs[0])
    assert ("2", 32) in allocation.moves and not any(root == "2" and 32 < w < 64 for root, w in allocation.moves)


def test_greedy_respects_blocks_the_cap_and_ignored_layers():
    net = chain(width=40)
    allocation = allocate(net, macs_cost(), max_layer_ratio=0.7, block=8)
    assert not allocation.extend(macs=0.0)  # unreachable: every group at its floor
    assert allocation.widths() == {"0": 16, "2": 16, "4": 16}  # ceil(40 · 0.3) = 12 → the block above
    assert all(width % 8 == 0 for _, width in allocation.moves)
    assert allocation.moves[0][1] in (32, 24)  # one or two blocks at a time
    no_cap = allocate(net, macs_cost(), max_layer_ratio=1.0, block=16)
    assert not no_cap.extend(macs=0.0)
    assert no_cap.widths() == {"0": 16, "2": 16, "4": 16}  # a layer keeps one block
    assert "6" not in allocation.widths()  # the ignored output layer keeps its channels


def test_cap_applies_to_the_widths_before_the_first_step():
    net = chain()
    history = PruningHistory()
    pruner = tp.pruner.BasePruner(
        net, X, tp.importance.GroupMagnitudeImportance(), pruning_ratio=0.25, ignored_layers=[net[6]]
    )
    history.prune_step(pruner.step(interactive=True), net)
    assert net[0].out_channels == 24
    allocation = allocate(net, macs_cost(), history=history, max_layer_ratio=0.5)
    allocation.extend(macs=0.0)
    assert allocation.widths() == {"0": 16, "2": 16, "4": 16}  # half of the original 32, not of 24


def test_estimates_match_the_realised_model_and_its_widths():
    net = ResCatNet(width=16)  # residual add (stem + b), concat into fuse, linear head
    x = torch.zeros(1, 3, 12, 12)
    allocation = LatencyAllocation(
        net, x, tp.importance.GroupMagnitudeImportance(), macs_cost(expensive="fuse.0"), ignored_layers=[net.head]
    )
    before = model_stats(net, x)["macs"]
    assert allocation.extend(macs=0.6 * allocation.macs[0])
    widths = allocation.widths()
    assert widths and all(w % 8 == 0 for w in widths.values())
    prune_channels(
        net,
        x,
        tp.importance.GroupMagnitudeImportance(),
        0.0,
        layer_ratios=allocation.layer_ratios(net),
        global_pruning=False,
        ignored_layers=[net.head],
    )
    for root, width in widths.items():
        assert net.get_submodule(root).out_channels == width
    assert net(x).shape == (1, 5)
    after = {name: specs[0] for name, specs in trace_layers(net, x).items()}
    assert sum(s.macs(s.in_channels, s.out_channels) for s in after.values()) == pytest.approx(allocation.macs[-1])
    assert model_stats(net, x)["macs"] < before


def test_depthwise_convs_follow_their_group():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 32, 1), nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.Conv2d(32, 4, 1))
    allocation = LatencyAllocation(
        net, X, tp.importance.GroupMagnitudeImportance(), macs_cost(), ignored_layers=[net[2]]
    )
    assert allocation.extend(macs=0.5 * allocation.macs[0])
    (root, width), *_ = allocation.widths().items()
    prune_channels(
        net,
        X,
        tp.importance.GroupMagnitudeImportance(),
        0.0,
        layer_ratios=width_ratios(net, {root: width}),
        global_pruning=False,
        ignored_layers=[net[2]],
    )
    assert net[0].out_channels == net[1].groups == net[1].out_channels == net[2].in_channels == width < 32
    assert net(X).shape == (1, 4, 16, 16)


def test_latency_budget_takes_only_moves_that_save_time():
    net = chain()
    flat = allocate(net, lambda layer, c_in, c_out: 1.0)  # no width is faster than another
    assert not flat.extend(latency=0.5 * flat.latency[0]) and flat.moves == []
    assert flat.extend(macs=0.7 * flat.macs[0]) and flat.moves  # a MACs budget still takes them
    timed = allocate(net, macs_cost(expensive="2"))
    assert timed.extend(latency=0.6 * timed.latency[0])
    assert timed.latency[-1] <= 0.6 * timed.latency[0] < timed.latency[-2]  # stops at the first move under it
    start = sum(macs_cost("2")(s, s.in_channels, s.out_channels) for specs in timed.layers.values() for s in specs)
    assert timed.latency[0] == pytest.approx(start)


def test_a_real_table_drives_the_greedy():
    net = chain()
    table = LatencyTable(warmup=0, repeats=1)
    allocation = allocate(net, table)
    measured = len(table)
    assert measured > 0 and all(ms > 0 for ms in table.entries.values())
    allocate(net, table)  # the same widths and first candidates: nothing new to measure
    assert len(table) == measured
    assert allocation.extend(macs=0.7 * allocation.macs[0])


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"warmup": -1}, r"Expected argument `warmup` to be an int >= 0 but got -1."),
        ({"repeats": 0}, r"Expected argument `repeats` to be an int >= 1 but got 0."),
        ({"repeats": True}, r"Expected argument `repeats` to be an int >= 1 but got True."),
        ({"max_bytes": 0.5}, r"Expected argument `max_bytes` to be an int >= 1 but got 0.5."),
    ],
)
def test_bad_table_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LatencyTable(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"block": 0}, r"Expected argument `block` to be an int >= 1 but got 0."),
        ({"lookahead": 1.5}, r"Expected argument `lookahead` to be an int >= 1 but got 1.5."),
        ({"batch_size": 0}, r"Expected argument `batch_size` to be an int >= 1 but got 0."),
        ({"max_layer_ratio": 1.5}, r"Expected argument `max_layer_ratio` to be a float in \(0, 1\] but got 1.5."),
    ],
)
def test_bad_allocation_arguments(kwargs, match):
    net = chain()
    with pytest.raises(ValueError, match=match):
        allocate(net, macs_cost(), **kwargs)


def test_extend_takes_exactly_one_budget():
    allocation = allocate(chain(), macs_cost())
    for kwargs in ({}, {"macs": 1.0, "latency": 1.0}):
        with pytest.raises(ValueError, match=r"Expected exactly one of `macs` and `latency` but got"):
            allocation.extend(**kwargs)
    assert math.isfinite(allocation.latency[0])
