"""Tracing a model with torch-pruning without side effects on it.

Building a dependency graph calls ``model.eval()`` and never restores train mode, needs grad mode, and skips frozen
layers; these context managers give the model back as it was.

Example:
    >>> import torch_pruning as tp
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train()
    >>> net[0].weight.requires_grad_(False)  # doctest: +ELLIPSIS
    Parameter containing:...
    >>> with restored(net), traceable(net):
    ...     _ = tp.DependencyGraph().build_dependency(net, example_inputs=torch.zeros(1, 3, 4, 4))
    >>> net.training, net[0].weight.requires_grad
    (True, False)
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


@contextmanager
def traceable(target: nn.Module) -> Iterator[None]:
    """Grad mode on and frozen parameters unfrozen while torch-pruning traces ``target`` (it skips frozen layers)."""
    frozen = [p for p in target.parameters() if not p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


@contextmanager
def restored(module: nn.Module, keep_grads: bool = False) -> Iterator[None]:
    """Give back train/eval modes and ``requires_grad`` flags (graph building calls ``eval()`` and unfreezes)."""
    modes = {m: m.training for m in module.modules()}
    frozen = [p for p in module.parameters() if not p.requires_grad]
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)
        for m, training in modes.items():
            m.train(training)
        if not keep_grads:
            for p in module.parameters():
                p.grad = None


def copy_with_grads(module: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """A deep copy of ``module`` whose parameters also carry copies of the gradients (``nn.Parameter``'s deepcopy drops
    ``.grad``, which gradient criteria such as Taylor read on dry-run copies); ``memo`` as ``copy.deepcopy``'s.

    Example:
        >>> net = nn.Linear(2, 1)
        >>> net(torch.ones(1, 2)).sum().backward()
        >>> copy_with_grads(net).weight.grad
        tensor([[1., 1.]])
    """
    copied = copy.deepcopy(module, memo)
    for original, twin in zip(module.parameters(), copied.parameters(), strict=True):
        twin.grad = None if original.grad is None else original.grad.detach().clone()
    return copied
