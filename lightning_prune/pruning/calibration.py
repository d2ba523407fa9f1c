"""Gather what a data-dependent criterion reads, over a few batches, without disturbing the model.

:func:`~lightning_prune.pruning.importance.needs_calibration` criteria score channels from data: Taylor reads the
loss gradients summed over the batches, Hessian (OBD) the mean squared gradient of each batch (the empirical Fisher
diagonal), the activation criteria what their forward hooks recorded. A :class:`Calibration` block sets that up,
takes one loss per batch, and leaves the result where the criterion reads it (``.grad`` of the weights, or the
criterion's own scores). The model's buffers (BatchNorm running statistics, which the training-mode forwards of
the calibration update) are put back afterwards, so calibrating changes nothing but what the criterion reads.

Under data parallelism every rank calibrates on its own batches and the statistics are averaged across ranks
(``tensors()`` lists them for one all-reduce), so the decision that follows sees the same numbers everywhere.

This module imports no Trainer internals: the caller computes the losses.

Example:
    >>> import torch_pruning as tp
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 1, 1))
    >>> before = net[1].running_mean.clone()
    >>> with Calibration(tp.importance.GroupHessianImportance(), net) as calibration:
    ...     for _ in range(3):
    ...         calibration.step(net(torch.randn(2, 3, 4, 4)).square().mean())
    >>> calibration.batches, bool((net[0].weight.grad >= 0).all()), torch.equal(net[1].running_mean, before)
    (3, True, True)
"""

from __future__ import annotations

from contextlib import ExitStack
from types import TracebackType

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.pruner.importance import Importance

from lightning_prune.pruning.importance import ActivationImportance, needs_gradients


class Calibration:
    """Context manager: ``with Calibration(importance, model) as c: c.step(loss)`` once per batch.

    Args:
        importance: the criterion to calibrate (any, or ``None``; those needing nothing make the block a no-op but
            for the forwards the caller runs and the buffers it puts back).
        model: the module whose layers the criterion scores.
    """

    def __init__(self, importance: Importance | None, model: nn.Module) -> None:
        self.importance, self.model = importance, model
        self.squared = isinstance(importance, tp.importance.GroupHessianImportance)
        self.backward = importance is not None and needs_gradients(importance)
        self.batches = 0
        self._stack = ExitStack()
        self._buffers: dict[str, torch.Tensor] = {}
        self._squares: dict[str, torch.Tensor] = {}

    def __enter__(self) -> Calibration:
        self._buffers = {name: b.detach().clone() for name, b in self.model.named_buffers()}
        self._squares = {}
        self.batches = 0
        self.model.zero_grad(set_to_none=True)
        if isinstance(self.importance, ActivationImportance):
            self._stack.enter_context(self.importance.recording(self.model))
        return self

    def step(self, loss: torch.Tensor) -> None:
        """Take one batch's loss (its forward ran inside the block): backpropagate it if the criterion needs it."""
        self.batches += 1
        if not self.backward:
            return
        loss.backward()
        if self.squared:  # per-batch gradients, squared and accumulated; the gradients themselves start afresh
            for name, p in self.model.named_parameters():
                if p.grad is not None:
                    g2 = p.grad.detach().square()
                    self._squares[name] = self._squares[name] + g2 if name in self._squares else g2
                    p.grad = None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stack.close()
        with torch.no_grad():
            buffers = dict(self.model.named_buffers())
            for name, saved in self._buffers.items():
                if name in buffers and buffers[name].shape == saved.shape:
                    buffers[name].copy_(saved)
            if self.squared and exc_type is None:
                for name, p in self.model.named_parameters():
                    if name in self._squares:
                        p.grad = self._squares[name] / self.batches
        self._buffers, self._squares = {}, {}

    def tensors(self) -> list[torch.Tensor]:
        """The statistics to average across ranks, in an order every rank agrees on (after the block)."""
        if isinstance(self.importance, ActivationImportance):
            return [self.importance.scores[name] for name in sorted(self.importance.scores)]
        if self.backward:
            return [p.grad for _, p in sorted(self.model.named_parameters()) if p.grad is not None]
        return []
