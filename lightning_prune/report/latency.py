"""Inference latency of several models side by side, as deployed (eval mode, BatchNorm fused), no Trainer imports."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_prune.report.fuse import fuse_batchnorm


@torch.no_grad()
def latency_ms(
    models: Sequence[nn.Module], example_input: torch.Tensor, warmup: int = 3, repeats: int = 20, fuse: bool = True
) -> list[float]:
    """Median wall time in ms of one forward of each model on ``example_input``, measured interleaved.

    Every round times each model once, in turn, so that drifts of a shared machine (frequency, other processes) hit
    all models alike; the median over rounds is robust to outliers. The models are not modified: each is timed as
    an eval-mode copy with BatchNorm fused into its conv (``fuse=True``, as deployed), on the input's device.

    Args:
        models: the models to compare.
        example_input: the input batch (its batch size and resolution are what is measured).
        warmup: untimed rounds first.
        repeats: timed rounds.
        fuse: fold BatchNorm into the convs before timing.

    Raises:
        ValueError: ``warmup < 0`` or ``repeats < 1``.

    Example:
        >>> a, b = nn.Conv2d(3, 64, 3), nn.Conv2d(3, 8, 3)
        >>> ms = latency_ms([a, b], torch.zeros(1, 3, 64, 64), warmup=1, repeats=3)
        >>> len(ms), all(t > 0 for t in ms)
        (2, True)
    """
    check_timing(warmup, repeats)
    small = example_input[:1]
    timed = [(fuse_batchnorm(m, small) if fuse else copy.deepcopy(m).eval()).to(example_input.device) for m in models]
    return interleaved_ms(timed, example_input, warmup, repeats, cuda=example_input.device.type == "cuda")


def check_timing(warmup: int, repeats: int) -> None:
    """Raise the argument error of a bad ``warmup`` (int >= 0) or ``repeats`` (int >= 1)."""
    if not (isinstance(warmup, int) and warmup >= 0):
        raise ValueError(f"Expected argument `warmup` to be an int >= 0 but got {warmup!r}.")
    if not (isinstance(repeats, int) and repeats >= 1):
        raise ValueError(f"Expected argument `repeats` to be an int >= 1 but got {repeats!r}.")


def interleaved_ms(
    models: Sequence[Callable[[Any], Any]], x: Any, warmup: int, repeats: int, cuda: bool = False
) -> list[float]:
    """Median ms of ``model(x)`` for each model, every round timing each model once in turn (``warmup`` untimed)."""
    times: list[list[float]] = [[] for _ in models]
    for round_ in range(warmup + repeats):
        for i, model in enumerate(models):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(x)
            if cuda:
                torch.cuda.synchronize()
            if round_ >= warmup:
                times[i].append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]
