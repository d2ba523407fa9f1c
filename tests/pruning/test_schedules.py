import itertools
import math
import re

import pytest
import torch
import torch_pruning as tp
from torch import nn

from lightning_prune.pruning import (
    SCHEDULES,
    build_schedule,
    cubic,
    geometric,
    linear,
    one_shot,
    relative_ratios,
    resolve_schedule,
    to_torch_pruning_scheduler,
)


@pytest.mark.parametrize("name", ["cubic", "geometric", "linear"])
@pytest.mark.parametrize("steps", [1, 2, 5])
def test_schedule_is_monotonic_and_ends_at_target(name, steps):
    ratios = SCHEDULES[name](0.6, steps)
    assert len(ratios) == steps
    assert ratios[-1] == 0.6
    assert all(0 < a < b for a, b in itertools.pairwise(ratios))


def test_one_shot():
    assert one_shot(0.3) == [0.3]
    assert one_shot(0.3, 1) == [0.3]
    with pytest.raises(ValueError, match=r"Expected argument `steps` to be 1 for the 'one_shot' schedule but got 3\."):
        one_shot(0.3, 3)


def test_closed_forms():
    assert linear(0.5, 4) == pytest.approx([0.125, 0.25, 0.375, 0.5])
    assert cubic(0.5, 2) == pytest.approx([0.5 * (1 - 0.5**3), 0.5])
    assert geometric(0.75, 2) == pytest.approx([0.5, 0.75])


def test_cubic_is_front_loaded():
    assert cubic(0.5, 4)[0] > linear(0.5, 4)[0]
    assert cubic(0.5, 4)[0] > geometric(0.5, 4)[0] > linear(0.5, 4)[0]


def test_geometric_removes_the_same_fraction_of_what_remains():
    rel = relative_ratios(geometric(0.75, 4))
    assert rel == pytest.approx([rel[0]] * 4)
    assert math.prod(1 - r for r in rel) == pytest.approx(0.25)


def test_relative_ratios():
    assert relative_ratios(linear(0.5, 2)) == pytest.approx([0.25, 1 / 3])
    with pytest.raises(ValueError, match=r"non-decreasing ratios in \[0, 1\) but got \[0.5, 0.2\]"):
        relative_ratios([0.5, 0.2])
    with pytest.raises(ValueError, match=r"non-empty list of ratios but got \[\]"):
        relative_ratios([])


@pytest.mark.parametrize("target", [0, 1, 1.5, -0.1, "0.5", True])
@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_target_is_validated(name, target):
    with pytest.raises(ValueError, match=r"Expected argument `pruning_ratio` to be a float in \(0, 1\) but got"):
        SCHEDULES[name](target, 1)


def test_error_message_format():
    with pytest.raises(ValueError, match=r"^Expected argument `pruning_ratio` to be a float in \(0, 1\) but got 1.5.$"):
        linear(1.5, 2)
    with pytest.raises(ValueError, match=r"^Expected argument `steps` to be an int >= 1 but got 0.$"):
        cubic(0.5, 0)
    with pytest.raises(ValueError, match=r"Expected argument `steps` to be an int >= 1 but got 2\.0\."):
        geometric(0.5, 2.0)


def test_resolve_schedule():
    assert resolve_schedule("cubic") is cubic

    def custom(target, steps):
        return [target] * steps

    assert resolve_schedule(custom) is custom
    msg = "Expected argument `schedule` to be one of ['cubic', 'geometric', 'linear', 'one_shot'] or a callable but got"
    with pytest.raises(ValueError, match=re.escape(f"{msg} 'x'.")):
        resolve_schedule("x")


def test_build_schedule_checks_custom_callables():
    assert build_schedule("linear", 0.5, 2) == [0.25, 0.5]
    assert build_schedule(lambda t, n: [t / 2, t], 0.4, 2) == [0.2, 0.4]
    with pytest.raises(ValueError, match=r"Expected the schedule to return 2 non-decreasing ratios in \(0, 1\) ending"):
        build_schedule(lambda t, n: [t, t / 2], 0.4, 2)
    with pytest.raises(ValueError, match="Expected the schedule to return 3"):
        build_schedule(lambda t, n: [t], 0.4, 3)


def test_torch_pruning_scheduler_drives_iterative_pruning():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 1))
    scheduler = to_torch_pruning_scheduler("cubic")
    assert scheduler(0.0, 2) == [0.0, 0.0, 0.0]
    pruner = tp.pruner.BasePruner(
        net,
        torch.randn(1, 3, 8, 8),
        tp.importance.MagnitudeImportance(),
        pruning_ratio=0.5,
        iterative_steps=2,
        iterative_pruning_ratio_scheduler=scheduler,
        ignored_layers=[net[2]],
    )
    widths = []
    for _ in range(2):
        pruner.step()
        widths.append(net[0].out_channels)
    assert widths == [int(16 * (1 - r)) for r in cubic(0.5, 2)] == [9, 8]
