"""Carry an optimizer across a structural prune, so surviving channels keep their momentum / Adam state.

Torch-pruning replaces every pruned weight by a *new* ``nn.Parameter``, and it does so in exactly one place:
``BasePruningFunc._prune_parameter_and_grad(weight, keep_idxs, dim)``, which index-selects the kept indices along one
dimension. :func:`track_pruning` wraps that method for the duration of a ``with`` block and records, for every
original parameter, the parameter that finally replaced it and the ``(dim, kept indices)`` selections that led there
(a conv weight pruned on its outputs, then on its inputs, is one chain of two selections). :meth:`PruningTracker.patch`
then swaps the parameters in the optimizer's ``param_groups`` and applies the same selections to every state tensor
shaped like its parameter (SGD ``momentum_buffer``, Adam ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq``, ...); scalar
state such as Adam's ``step`` is kept. The optimizer then continues exactly as if it had always trained the pruned
model's surviving weights. With the model given, parameters that left it (a removed residual block) leave the
optimizer too.

The new parameters also get the ``requires_grad`` flag of the ones they replace (torch-pruning makes every pruned
parameter trainable again).

Example:
    >>> import torch, torch_pruning as tp
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 1))
    >>> optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    >>> with track_pruning(net) as tracker:
    ...     _ = tp.prune_conv_out_channels(net[0], idxs=[0, 1])
    ...     _ = tp.prune_conv_in_channels(net[1], idxs=[0, 1])
    >>> tracker.patch(optimizer)
    3
    >>> [tuple(p.shape) for p in optimizer.param_groups[0]["params"]]
    [(6, 3, 3, 3), (6,), (4, 6, 1, 1), (4,)]
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch_pruning.pruner.function import BasePruningFunc

_LOCK = threading.RLock()  # the wrapped method is class-wide: one thread tracks at a time (nesting is fine)


@dataclass
class _Replacement:
    old: torch.Tensor
    new: torch.Tensor
    selections: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (dim, kept indices), in order


class PruningTracker:
    """Which parameters a prune replaced, and how; filled inside :func:`track_pruning`."""

    def __init__(self, model: nn.Module | None = None) -> None:
        self._names_before = {id(p): (name, p) for name, p in model.named_parameters()} if model is not None else {}
        self._model = model
        self._by_old: dict[int, _Replacement] = {}
        self._old_of_new: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._by_old)

    def replacement(self, param: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]]] | None:
        """The parameter that replaced ``param`` and the ``(dim, kept indices)`` selections, or ``None``."""
        r = self._by_old.get(id(param))
        return None if r is None else (r.new, list(r.selections))

    def patch(self, optimizer: torch.optim.Optimizer) -> int:
        """Swap replaced parameters in ``optimizer`` and index-select their state in place.

        With a tracked model, parameters of it that are no longer part of it (a residual block replaced by
        ``nn.Identity()``, :func:`~lightning_prune.pruning.blocks.remove_blocks`) leave their group and their state is
        dropped; a group may end up empty (kept, so that schedulers still find every group).

        Returns:
            The number of parameters swapped (removed ones not counted).

        Raises:
            RuntimeError: the optimizer holds a parameter of the tracked model that was replaced outside
                torch-pruning's ``_prune_parameter_and_grad`` (its kept indices are unknown).
            ValueError: a non-scalar state tensor is not shaped like its parameter.
        """
        dead = self._untracked_replacements()
        live = None if self._model is None else {id(p) for p in self._model.parameters()}
        swapped = 0
        for group in optimizer.param_groups:
            params = []
            for param in group["params"]:
                if id(param) in dead:
                    raise RuntimeError(
                        f"Parameter `{dead[id(param)]}` was replaced during pruning outside torch-pruning's "
                        "`_prune_parameter_and_grad`, so its optimizer state cannot be carried over. "
                        "HINT: rebuild the optimizer instead of patching it."
                    )
                r = self._by_old.get(id(param))
                new = r.new if r is not None and r.old is param else param
                if live is not None and id(param) in self._names_before and id(new) not in live:
                    optimizer.state.pop(param, None)  # removed with its module (possibly pruned before)
                    continue
                params.append(new)
                if r is None or new is param:
                    continue
                if param in optimizer.state:
                    state = optimizer.state.pop(param)
                    optimizer.state[new] = {k: _select(k, v, r) for k, v in state.items()}
                swapped += 1
            group["params"] = params
        return swapped

    def _observe(self, old: torch.Tensor, new: torch.Tensor, keep_idxs: Any, dim: int) -> None:
        if isinstance(old, nn.Parameter) and isinstance(new, nn.Parameter):
            new.requires_grad_(old.requires_grad)
        keep = torch.as_tensor(keep_idxs, dtype=torch.long).flatten()
        selection = (dim % old.ndim, keep)
        origin = self._old_of_new.pop(id(old), None)
        if origin is None:  # first prune of an original parameter
            self._by_old[id(old)] = _Replacement(old, new, [selection])
            origin = id(old)
        else:  # pruned again (e.g. outputs, then inputs): extend the chain
            r = self._by_old[origin]
            r.new = new
            r.selections.append(selection)
        self._old_of_new[id(new)] = origin

    def _untracked_replacements(self) -> dict[int, str]:
        if self._model is None:
            return {}
        now = {name: p for name, p in self._model.named_parameters()}
        # a name that is gone was removed with its module (or renamed): only a name holding another parameter is dead
        return {
            pid: name
            for pid, (name, p) in self._names_before.items()
            if name in now and now[name] is not p and pid not in self._by_old
        }


@contextmanager
def track_pruning(model: nn.Module | None = None) -> Iterator[PruningTracker]:
    """Record the parameters that torch-pruning replaces inside the block (see the module docstring).

    Args:
        model: optional; when given, :meth:`PruningTracker.patch` also drops the parameters that left it (removed
            residual blocks) from the optimizer, and refuses to patch an optimizer holding one of its parameters that
            was replaced by other means than torch-pruning's pruning functions.

    Yields:
        The tracker, filled when the block exits.
    """
    tracker = PruningTracker(model)
    with _LOCK:
        original = BasePruningFunc._prune_parameter_and_grad

        def observed(self: BasePruningFunc, weight: torch.Tensor, keep_idxs: Any, pruning_dim: int) -> torch.Tensor:
            new = original(self, weight, keep_idxs, pruning_dim)
            tracker._observe(weight, new, keep_idxs, pruning_dim)
            return new

        BasePruningFunc._prune_parameter_and_grad = observed  # type: ignore[method-assign]
        try:
            yield tracker
        finally:
            BasePruningFunc._prune_parameter_and_grad = original  # type: ignore[method-assign]


def _select(key: str, value: Any, r: _Replacement) -> Any:
    if not isinstance(value, torch.Tensor) or value.ndim == 0:
        return value  # step counters, None momentum buffers
    if value.shape != r.old.shape:
        raise ValueError(
            f"Expected optimizer state `{key}` to be shaped like its parameter {tuple(r.old.shape)} but got "
            f"{tuple(value.shape)}. HINT: rebuild the optimizer instead of patching it."
        )
    for dim, keep in r.selections:
        value = torch.index_select(value, dim, keep.to(value.device))
    return value
