"""Pruning schedules: how much of the original model is removed after each pruning step.

A schedule is a pure function ``(target, steps) -> list[float]`` returning the *cumulative* pruning ratio after each
of ``steps`` steps, relative to the original (unpruned) model; the last element is exactly ``target``. Pluggable
callables with the same signature are accepted wherever a name is (see :func:`resolve_schedule`).

Example:
    >>> cubic(0.5, 3)
    [0.3518518518518518, 0.48148148148148145, 0.5]
    >>> relative_ratios(linear(0.5, 2))  # what to remove from the already pruned model at each step
    [0.25, 0.33333333333333337]
"""

from __future__ import annotations

import math
from collections.abc import Callable

Schedule = Callable[[float, int], list[float]]


def _check(target: float, steps: int) -> None:
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < target < 1.0:
        raise ValueError(f"Expected argument `pruning_ratio` to be a float in (0, 1) but got {target!r}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Expected argument `steps` to be an int >= 1 but got {steps!r}.")


def one_shot(target: float, steps: int = 1) -> list[float]:
    """Everything at once: ``[target]``.

    Args:
        target: final pruning ratio in (0, 1).
        steps: must be 1.

    Raises:
        ValueError: ``target`` is not in (0, 1) or ``steps`` is not 1.
    """
    _check(target, steps)
    if steps != 1:
        raise ValueError(f"Expected argument `steps` to be 1 for the 'one_shot' schedule but got {steps!r}.")
    return [float(target)]


def linear(target: float, steps: int) -> list[float]:
    """Equal increments of the cumulative ratio: ``r_t = target · t / n``.

    Raises:
        ValueError: ``target`` is not in (0, 1) or ``steps`` < 1.
    """
    _check(target, steps)
    return [float(target) * t / steps for t in range(1, steps)] + [float(target)]


def cubic(target: float, steps: int) -> list[float]:
    """Automated gradual pruning, front-loaded while the network still has redundancy:
    ``r_t = target · (1 − (1 − t/n)³)``.

    Paper: Zhu & Gupta, "To prune, or not to prune" (2017), https://arxiv.org/abs/1710.01878

    Raises:
        ValueError: ``target`` is not in (0, 1) or ``steps`` < 1.
    """
    _check(target, steps)
    return [float(target) * (1.0 - (1.0 - t / steps) ** 3) for t in range(1, steps)] + [float(target)]


def geometric(target: float, steps: int) -> list[float]:
    """Each step removes the same fraction of what remains: ``r_t = 1 − (1 − target)^(t/n)``.

    Raises:
        ValueError: ``target`` is not in (0, 1) or ``steps`` < 1.
    """
    _check(target, steps)
    keep = 1.0 - float(target)
    return [1.0 - keep ** (t / steps) for t in range(1, steps)] + [float(target)]


SCHEDULES: dict[str, Schedule] = {"cubic": cubic, "geometric": geometric, "linear": linear, "one_shot": one_shot}


def resolve_schedule(schedule: str | Schedule) -> Schedule:
    """Look a schedule up by name, or pass a callable ``(target, steps) -> list[float]`` through.

    Raises:
        ValueError: ``schedule`` is neither a registered name nor a callable.
    """
    if callable(schedule):
        return schedule
    if isinstance(schedule, str) and schedule in SCHEDULES:
        return SCHEDULES[schedule]
    raise ValueError(
        f"Expected argument `schedule` to be one of {sorted(SCHEDULES)} or a callable but got {schedule!r}."
    )


def relative_ratios(cumulative: list[float]) -> list[float]:
    """Turn cumulative ratios (of the original model) into per-step ratios of the model as it is before each step.

    A step that takes the model from ``1 − c_{t−1}`` to ``1 − c_t`` of its original size removes
    ``1 − (1 − c_t) / (1 − c_{t−1})`` of what is there: the ratio to give a pruner built on the already pruned model.

    Raises:
        ValueError: the list is empty, not non-decreasing, or leaves [0, 1).
    """
    if not cumulative:
        raise ValueError("Expected argument `cumulative` to be a non-empty list of ratios but got [].")
    ratios, previous = [], 0.0
    for c in cumulative:
        if not previous <= c < 1.0:
            raise ValueError(
                f"Expected argument `cumulative` to be non-decreasing ratios in [0, 1) but got {list(cumulative)}."
            )
        ratios.append(1.0 - (1.0 - c) / (1.0 - previous))
        previous = c
    return ratios


def to_torch_pruning_scheduler(schedule: str | Schedule) -> Callable[[float, int], list[float]]:
    """Adapt a schedule to torch-pruning's ``iterative_pruning_ratio_scheduler`` convention.

    Torch-pruning expects ``steps + 1`` ratios starting with 0 (before the first step), and calls the scheduler with
    a ratio of 0 for layers or heads it must not prune.
    """
    fn = resolve_schedule(schedule)

    def scheduler(pruning_ratio: float, steps: int) -> list[float]:
        if pruning_ratio == 0:
            return [0.0] * (steps + 1)
        return [0.0, *fn(pruning_ratio, steps)]

    return scheduler


def build_schedule(schedule: str | Schedule, target: float, steps: int) -> list[float]:
    """Resolve ``schedule``, call it and check what a custom callable returned.

    Raises:
        ValueError: unknown name, bad ``target``/``steps``, or a result that is not ``steps`` non-decreasing ratios in
            (0, 1) ending at ``target``.
    """
    _check(target, steps)
    ratios = [float(r) for r in resolve_schedule(schedule)(target, steps)]
    ok = len(ratios) == steps and all(0.0 < r < 1.0 for r in ratios) and ratios == sorted(ratios)
    if not ok or not math.isclose(ratios[-1], target, rel_tol=1e-9, abs_tol=1e-12):
        raise ValueError(
            f"Expected the schedule to return {steps} non-decreasing ratios in (0, 1) ending at {target} but got "
            f"{ratios}."
        )
    return ratios
