"""Per-layer widths from a budget: a sensitivity table's equal-loss allocation, and the monotone search that meets it.

A uniform ratio spends accuracy where it is expensive: the early convs and the head's inputs lose much mAP per MAC
saved, wide middle layers little. Given a :class:`~lightning_prune.pruning.sensitivity.SensitivityResult` (every
group pruned alone at several ratios, the mAP measured), :class:`SensitivityAllocation` spends a MACs budget where
the measured loss per MAC saved is lowest, at equal marginal cost across groups (the Lagrangian condition of
minimising the summed loss under a MACs budget, treating the groups' losses as additive):

- each group's curve of (MACs saved, mAP drop) points, from ratio 0 on, is made monotone (a drop never shrinks when
  more channels go: a curve that dips and recovers is noise of the validation subset) and replaced by its lower
  convex hull, a chain of segments of increasing slope (mAP points lost per MAC saved);
- all groups' segments are sorted by slope; a *position* ``p`` in ``[0, len(segments)]`` takes the first ``int(p)``
  segments whole and the next one in part (channels interpolated), which gives every group a width, rounded up to
  ``round_to``;
- widths shrink monotonically with ``p``, so the position that meets a MACs target is found by a bracketed search on
  dry runs (:func:`bracket_search`), as :class:`~lightning_prune.callbacks.StructuredPruning` does for its channel
  ratios.

Paper: Li et al., "Pruning Filters for Efficient ConvNets" (ICLR 2017), https://arxiv.org/abs/1608.08710 (the
sensitivity analysis); the equal-slope allocation is the greedy knapsack of AMC-style budgets (He et al., "AMC",
ECCV 2018, https://arxiv.org/abs/1802.03494) on measured rather than learned costs.

Example:
    >>> from lightning_prune.pruning.sensitivity import SensitivityResult, SensitivityRow
    >>> rows = [SensitivityRow("a", 0.5, 0.80, -0.10, 0.2, 8),   # a: 10 points for 20% of the MACs
    ...         SensitivityRow("b", 0.5, 0.89, -0.01, 0.2, 4)]   # b: 1 point for 20%
    >>> result = SensitivityResult(0.9, 1e6, [0.5], {"a": 16, "b": 8}, rows)
    >>> allocation = SensitivityAllocation(result)
    >>> allocation.segments  # (slope, group, channels before, after), the cheapest first
    [(5.0, 'b', 8, 4), (50.0, 'a', 16, 8)]
    >>> allocation.widths(1.0), allocation.widths(1.5)
    ({'a': 16, 'b': 4}, {'a': 12, 'b': 4})
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from lightning_prune.pruning.channels import layer_widths, min_width
from lightning_prune.pruning.sensitivity import SensitivityResult

Segment = tuple[float, str, int, int]  # (mAP points per MAC fraction saved, group, channels before, after)


class SensitivityAllocation:
    """Group widths at equal measured mAP loss per MAC saved, along a position in ``[0, len(segments)]``.

    Args:
        result: the sensitivity table (all ranks' rows merged), measured on the unpruned model.
        round_to: keep channel counts multiples of this (rounded up), as StructuredPruning's ``round_to``.
        max_layer_ratio: no group loses more than this fraction of its channels, in (0, 1].

    Raises:
        ValueError: ``result`` has no rows, ``round_to`` is not None or an int >= 1, or ``max_layer_ratio`` is
            outside (0, 1].
    """

    def __init__(self, result: SensitivityResult, round_to: int | None = None, max_layer_ratio: float = 1.0) -> None:
        if not isinstance(result, SensitivityResult) or not result.rows:
            raise ValueError(
                f"Expected argument `sensitivity` to be a sensitivity table with trials but got {_describe(result)}. "
                "HINT: run `lightning-prune sensitivity` and pass its sensitivity.json."
            )
        if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
            raise ValueError(f"Expected argument `round_to` to be None or an int >= 1 but got {round_to!r}.")
        if isinstance(max_layer_ratio, bool) or not (
            isinstance(max_layer_ratio, (int, float)) and 0 < max_layer_ratio <= 1
        ):
            raise ValueError(
                f"Expected argument `max_layer_ratio` to be a float in (0, 1] but got {max_layer_ratio!r}."
            )
        self.result, self.round_to, self.max_layer_ratio = result, round_to, float(max_layer_ratio)
        #: ``{group: output channels}`` of the unpruned model, for the groups with trials
        self.original = {g: result.groups[g] for g in result.curves()}
        segments: list[tuple[float, int, int, Segment]] = []
        for order, (group, hull) in enumerate(_hulls(result).items()):
            for i, ((s0, d0, c0), (s1, d1, c1)) in enumerate(itertools.pairwise(hull)):
                segments.append(((d1 - d0) / (s1 - s0), order, i, (0.0, group, c0, c1)))
        segments.sort(key=lambda s: s[:3])  # by slope; a group's own segments stay in order (convex: increasing)
        #: the hull segments, cheapest first: ``(mAP points per MAC fraction saved, group, channels before, after)``
        self.segments: list[Segment] = [(round(slope, 12), *seg[1:]) for slope, _, _, seg in segments]

    def __len__(self) -> int:
        return len(self.segments)

    def widths(self, position: float) -> dict[str, int]:
        """``{group: channels}`` of every group with trials at ``position`` (clamped to ``[0, len(self)]``)."""
        position = min(max(float(position), 0.0), float(len(self.segments)))
        kept: dict[str, float] = {g: float(c) for g, c in self.original.items()}
        whole = int(position)
        for _, group, _, after in self.segments[:whole]:
            kept[group] = float(after)
        if whole < len(self.segments) and position > whole:
            _, group, before, after = self.segments[whole]
            kept[group] = before + (position - whole) * (after - before)
        return {g: self._rounded(g, c) for g, c in kept.items()}

    def _rounded(self, group: str, channels: float) -> int:
        original = self.original[group]
        step = self.round_to or 1
        floor = min_width(original, self.max_layer_ratio, self.round_to)
        kept = max(math.ceil(channels / step - 1e-9) * step, floor)
        return int(min(kept, original))


def load_sensitivity(source: str | Path | Mapping[str, Any] | SensitivityResult) -> SensitivityResult:
    """A sensitivity table from ``lightning-prune sensitivity``'s ``sensitivity.json``, its dict, or the result.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: the file or mapping is not a sensitivity table.
    """
    if isinstance(source, SensitivityResult):
        return source
    data: Any = source
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(
                f"Expected argument `sensitivity` to be an existing sensitivity.json (written by `lightning-prune "
                f"sensitivity`) but got {str(path)!r}."
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"Expected argument `sensitivity` ({str(path)!r}) to be JSON but got: {err}.") from err
    try:
        return SensitivityResult.from_dict(dict(data))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(
            "Expected argument `sensitivity` to be a sensitivity table (keys 'baseline', 'macs', 'ratios', "
            f"'groups', 'rows', as `lightning-prune sensitivity` writes) but got {_describe(source)} ({err!r})."
        ) from err


def check_sensitivity_model(result: SensitivityResult, model: nn.Module, history_steps: int = 0) -> None:
    """Raise unless every group of ``result`` is a layer of ``model`` (with the table's width, if unpruned).

    Raises:
        ValueError: a group names no conv / linear of ``model``, or, with ``history_steps == 0``, a group's width
            differs from the table's (the table was measured on another model).
    """
    widths = layer_widths(model)
    missing = [g for g in result.groups if g not in widths]
    if missing:
        raise ValueError(
            f"Expected every group of argument `sensitivity` to be a conv / linear of the pruned module but got "
            f"{len(missing)} it lacks: {missing[:5]}. The module's first layers: {list(widths)[:5]}. HINT: run the "
            "analysis on this model (and the same `submodule`)."
        )
    if history_steps == 0:
        wrong = {g: (c, widths[g]) for g, c in result.groups.items() if widths[g] != c}
        if wrong:
            name, (table, now) = next(iter(wrong.items()))
            raise ValueError(
                f"Expected the widths of argument `sensitivity`'s groups to match the unpruned module but got "
                f"{len(wrong)} that differ, e.g. `{name}`: {table} channels in the table, {now} in the module. HINT: "
                "run the analysis on the module before its first pruning step."
            )


def bracket_search(
    achieved: Callable[[float], float],
    goal: float,
    lo: float,
    hi: float,
    values: tuple[float, float],
    tolerance: float,
    iterations: int,
) -> tuple[float, float]:
    """``(x, achieved(x))`` closest to ``goal`` for ``achieved`` decreasing in ``x``, by false position on ``[lo, hi]``.

    ``values`` are ``achieved(lo)`` and ``achieved(hi)`` (already computed, the bracket: ``achieved(lo) > goal >=
    achieved(hi)``); stops once within ``tolerance / 3`` (relative) or after ``iterations`` evaluations; each step is
    kept off the bracket's ends (``achieved`` is usually a step function: rounding).

    Example:
        >>> x, value = bracket_search(lambda x: 1.0 - x, 0.5, 0.0, 1.0, (1.0, 0.0), 0.03, 10)
        >>> round(x, 3), round(value, 3)
        (0.5, 0.5)
    """
    a_lo, a_hi = values
    best = (hi, a_hi)

    def error(value: float) -> float:
        return abs(value / goal - 1.0)

    for _ in range(iterations):
        if error(best[1]) < tolerance / 3:
            break
        t = (a_lo - goal) / (a_lo - a_hi) if a_lo > a_hi else 0.5
        mid = lo + (hi - lo) * min(max(t, 0.1), 0.9)
        value = achieved(mid)
        if error(value) < error(best[1]):
            best = (mid, value)
        if value > goal:
            lo, a_lo = mid, value
        else:
            hi, a_hi = mid, value
    return best


def _hulls(result: SensitivityResult) -> dict[str, list[tuple[float, float, int]]]:
    """Per group, the lower convex hull of its (MACs saved, monotone drop in points, channels) points from (0, 0)."""
    by_group: dict[str, list[tuple[float, float, int]]] = {}
    for row in sorted(result.rows, key=lambda r: (r.group, r.ratio)):
        by_group.setdefault(row.group, []).append((row.macs_saved, 100.0 * max(0.0, -row.delta), row.channels))
    hulls: dict[str, list[tuple[float, float, int]]] = {}
    for group in result.curves():
        points = [(0.0, 0.0, result.groups[group])]
        worst = 0.0
        for saved, drop, channels in by_group[group]:
            worst = max(worst, drop)  # more channels removed never costs less
            if channels < points[-1][2] and saved > points[-1][0]:  # a rounding-equal row adds nothing
                points.append((saved, worst, channels))
        hull: list[tuple[float, float, int]] = []
        for p in points:  # monotone chain, lower hull (x increasing)
            while len(hull) >= 2 and _cross(hull[-2], hull[-1], p) <= 0:
                hull.pop()
            hull.append(p)
        hulls[group] = hull
    return hulls


def _cross(o: tuple[float, float, int], a: tuple[float, float, int], b: tuple[float, float, int]) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
