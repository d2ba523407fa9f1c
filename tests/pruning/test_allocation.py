"""Sensitivity allocation: hull segments by measured loss per MAC, widths along a position, the bracket search."""

from __future__ import annotations

import json

import pytest
from torch import nn

from lightning_prune.pruning.allocation import (
    SensitivityAllocation,
    bracket_search,
    check_sensitivity_model,
    load_sensitivity,
)
from lightning_prune.pruning.sensitivity import SensitivityResult, SensitivityRow


def table(curves: dict[str, list[tuple[float, float, float, int]]], widths: dict[str, int]) -> SensitivityResult:
    """``{group: [(ratio, mAP, macs_saved, channels), ...]}`` with baseline 0.9."""
    rows = [SensitivityRow(g, r, m, m - 0.9, s, c) for g, points in curves.items() for r, m, s, c in points]
    ratios = sorted({r for points in curves.values() for r, *_ in points})
    return SensitivityResult(0.9, 1e6, ratios, dict(widths), rows)


def test_segments_follow_the_lower_hull_of_the_monotone_drop_curve():
    result = table(
        {
            # a: concave (a cheap first half, an expensive second): two segments, slopes 10 then 70
            "a": [(0.25, 0.89, 0.1, 24), (0.5, 0.88, 0.2, 16), (0.75, 0.81, 0.3, 8)],
            # b: its middle point dips and recovers (noise): the drop is kept monotone, then the hull skips the
            # point above the chord: one segment from 0 to the last point
            "b": [(0.25, 0.85, 0.1, 24), (0.5, 0.87, 0.2, 16), (0.75, 0.84, 0.3, 8)],
        },
        {"a": 32, "b": 32},
    )
    allocation = SensitivityAllocation(result)
    assert [(round(s, 6), g, c0, c1) for s, g, c0, c1 in allocation.segments] == [
        (10.0, "a", 32, 16),
        (20.0, "b", 32, 8),
        (70.0, "a", 16, 8),
    ]
    assert len(allocation) == 3
    assert allocation.widths(0) == {"a": 32, "b": 32}
    assert allocation.widths(1) == {"a": 16, "b": 32}
    assert allocation.widths(1.5) == {"a": 16, "b": 20}
    assert allocation.widths(3) == allocation.widths(99) == {"a": 8, "b": 8}


def test_widths_shrink_monotonically_and_respect_round_to_and_max_layer_ratio():
    result = table({"a": [(0.5, 0.8, 0.3, 16), (0.9, 0.5, 0.5, 3)], "b": [(0.5, 0.85, 0.3, 16)]}, {"a": 32, "b": 32})
    allocation = SensitivityAllocation(result, round_to=8, max_layer_ratio=0.75)
    previous = allocation.widths(0)
    for step in range(1, 31):
        widths = allocation.widths(step / 10)
        assert all(widths[g] <= previous[g] for g in widths)
        assert all(w % 8 == 0 and 8 <= w for w in widths.values())
        previous = widths
    assert previous == {"a": 8, "b": 16}  # a's 3 channels: floor of 32 · (1 - 0.75) = 8


def test_rounding_equal_rows_add_no_segment():
    # round_to in the analysis kept 16 channels at both ratios: the second row adds nothing
    result = table({"a": [(0.1, 0.9, 0.0, 16), (0.5, 0.8, 0.2, 8)]}, {"a": 16})
    assert [s[1:] for s in SensitivityAllocation(result).segments] == [("a", 16, 8)]


def test_bracket_search_meets_the_goal_of_a_step_function():
    def achieved(x: float) -> float:
        return 1.0 - round(x * 20) / 20  # steps of 0.05

    x, value = bracket_search(achieved, 0.4, 0.0, 1.0, (1.0, 0.0), 0.03, 10)
    assert value == pytest.approx(0.4) and achieved(x) == value


def test_load_sensitivity_reads_the_command_s_json_and_checks_the_model(tmp_path):
    result = table({"0": [(0.5, 0.8, 0.4, 4)]}, {"0": 8})
    path = tmp_path / "sensitivity.json"
    path.write_text(json.dumps({"ranking": ["0"], **result.to_dict()}))  # as `lightning-prune sensitivity` writes
    assert load_sensitivity(path) == result
    assert load_sensitivity(result.to_dict()) == result and load_sensitivity(result) is result
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 2, 1))
    check_sensitivity_model(result, net)
    net[0] = nn.Conv2d(3, 6, 3)
    with pytest.raises(ValueError, match=r"`0`: 8 channels in the table, 6 in the module"):
        check_sensitivity_model(result, net)
    check_sensitivity_model(result, net, history_steps=1)  # pruned since: widths may differ
    with pytest.raises(ValueError, match=r"got 1 it lacks: \['0'\]"):
        check_sensitivity_model(result, nn.Sequential(nn.Identity(), nn.Conv2d(3, 2, 1)))


def test_bad_tables(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Expected argument `sensitivity` to be an existing sensitivity\.json"):
        load_sensitivity(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"Expected argument `sensitivity` \(.*bad.json'\) to be JSON"):
        load_sensitivity(bad)
    with pytest.raises(ValueError, match=r"Expected argument `sensitivity` to be a sensitivity table .* but got"):
        load_sensitivity({"rows": []})
    empty = SensitivityResult(0.9, 1e6, [0.5], {"a": 8}, [])
    with pytest.raises(ValueError, match="to be a sensitivity table with trials"):
        SensitivityAllocation(empty)
    full = table({"a": [(0.5, 0.8, 0.4, 4)]}, {"a": 8})
    with pytest.raises(ValueError, match="Expected argument `round_to` to be None or an int >= 1 but got 0"):
        SensitivityAllocation(full, round_to=0)
    with pytest.raises(ValueError, match=r"`max_layer_ratio` to be a float in \(0, 1\] but got 1.5"):
        SensitivityAllocation(full, max_layer_ratio=1.5)
