"""Fold what removed channels still contributed into the layers that read them (no Trainer imports).

A channel whose BatchNorm γ is 0 is not silent: it emits the constant ``act(β)`` everywhere, and the next layers add
``W[:, c] · act(β)`` to every output. Removing the channel drops that term. Folding puts it back as a constant: into
the reading layer's bias, or, when the reading conv has no bias and feeds a BatchNorm, into that BatchNorm's
running mean (``BN(y + δ)`` with mean ``μ`` equals ``BN(y)`` with mean ``μ - δ``).

The channels are measured where they are read, at the input of every conv (``groups=1``) and linear layer, so
whatever happens between (activations, residual adds, concatenations, upsampling) is accounted for. Only channels
that are constant there over the measured batches are folded (standard deviation <= ``tolerance`` · |mean|, 5% by
default; γ = 0 gives exactly constant channels, small γ nearly). Replacing a channel that varies by its mean (mean
replacement) keeps the next layer's mean but not the means after the following nonlinearities: on the slimming
benchmark (``benchmarks/RESULTS.md``, pruning at the 50th |γ| percentile of a model whose γ were not driven to 0)
it lowered mAP50-95 right after pruning from 0.589 to 0.518, so such channels are removed without folding.

Exact for 1×1 convs and linear layers. A k×k conv with zero padding reads fewer copies of the constant at the border
than inside, so there the fold is exact on the interior and approximate on a border ``k // 2`` wide.

Example:
    >>> import torch
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    >>> with torch.no_grad():
    ...     net[1].weight[:2] = 0.0  # channels 0 and 1 now emit relu(β)
    >>> x = torch.randn(2, 3, 5, 5)
    >>> with InputMeans(net) as recorder, torch.no_grad():
    ...     expected = net(x)
    >>> from lightning_prune.pruning.history import apply_records
    >>> kinds = [("0", "out"), ("1", "out"), ("3", "in")]  # conv 0 and BN 1 lose channels 0, 1; so does conv 3's input
    >>> records = [{"module": m, "kind": k, "idxs": [0, 1], "size": 4} for m, k in kinds]
    >>> fold_removed_inputs(net, records, recorder)
    ['3']
    >>> apply_records(net, records)
    >>> net[3].in_channels, torch.allclose(net(x), expected, atol=1e-6)
    (2, True)
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_prune.pruning.history import Record

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def reads_channels(module: nn.Module) -> bool:
    """Whether ``module`` mixes its input channels into every output (a dense conv or a linear layer)."""
    return isinstance(module, nn.Linear) or (isinstance(module, _CONVS) and module.groups == 1)


class InputMeans:
    """Context manager: while open, record the mean of each input channel of every conv (``groups=1``) and linear.

    After the block, :attr:`means` and :attr:`squares` hold ``{layer name: mean of each input channel}`` and of its
    square (float64, on the layers' device), and :attr:`bn_after` ``{bias-free conv: the BatchNorm applied to its
    output}`` (the fold's fallback).

    Args:
        model: the module to watch.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._sums: dict[str, torch.Tensor] = {}
        self._squares: dict[str, torch.Tensor] = {}
        self._counts: dict[str, float] = {}
        self.means: dict[str, torch.Tensor] = {}
        self.squares: dict[str, torch.Tensor] = {}
        self.bn_after: dict[str, str] = {}
        self._handles: list[Any] = []
        self._last: dict[int, tuple[str, weakref.ref[torch.Tensor]]] = {}

    def __enter__(self) -> InputMeans:
        for name, module in self.model.named_modules():
            if reads_channels(module):
                self._handles.append(module.register_forward_pre_hook(self._reader(name)))
                if module.bias is None and isinstance(module, _CONVS):
                    self._handles.append(module.register_forward_hook(self._producer(name)))
            elif isinstance(module, _BatchNorm):
                self._handles.append(module.register_forward_pre_hook(self._consumer(name)))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._last = [], {}
        self.means = {name: total / self._counts[name] for name, total in self._sums.items()}
        self.squares = {name: total / self._counts[name] for name, total in self._squares.items()}

    def _reader(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or x.dim() < 2:
                return
            x = x.detach().double()
            rows = x.reshape(-1, x.shape[-1]) if isinstance(module, nn.Linear) else x.transpose(0, 1).flatten(1).T
            total, square, count = rows.sum(0), rows.square().sum(0), float(rows.shape[0])
            self._sums[name] = self._sums[name] + total if name in self._sums else total
            self._squares[name] = self._squares[name] + square if name in self._squares else square
            self._counts[name] = self._counts.get(name, 0.0) + count

        return hook

    def _producer(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if isinstance(out, torch.Tensor):
                self._last[id(out)] = (name, weakref.ref(out))

        return hook

    def _consumer(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0] if args else None
            entry = self._last.get(id(x))
            if entry is not None and entry[1]() is x:
                self.bn_after[entry[0]] = name

        return hook

    def tensors(self) -> list[torch.Tensor]:
        """The statistics to average across ranks, in an order every rank agrees on (after the block)."""
        return [stats[name] for name in sorted(self.means) for stats in (self.means, self.squares)]


def fold_removed_inputs(
    model: nn.Module, records: Iterable[Record], measured: InputMeans, tolerance: float = 0.05
) -> list[str]:
    """Fold the constant inputs that ``records`` are about to remove; the names of the layers that got a fold.

    Call it with one step's (or one group's) records *before* they are applied. The statistics (measured on the
    unpruned layers) are updated in place to the layers' remaining inputs, so that the records of a step can be
    folded group by group. A layer whose inputs cannot be folded (no bias and no BatchNorm right after) is skipped.

    Args:
        model: the model before the records are applied.
        records: pruning records; only ``"in"`` records of dense convs and linear layers fold anything.
        measured: the input statistics of ``model``'s layers (updated in place to the inputs that remain).
        tolerance: a removed channel is folded if its standard deviation is at most ``tolerance`` · |mean|.
    """
    means, squares, bn_after = measured.means, measured.squares, measured.bn_after
    folded = []
    for record in records:
        name = record["module"]
        if record["kind"] != "in" or name not in means:
            continue
        layer = model.get_submodule(name)
        mean = means[name]
        if not reads_channels(layer) or mean.numel() != layer.weight.shape[1]:
            continue
        idxs = torch.as_tensor(record["idxs"], dtype=torch.long, device=mean.device)
        keep = torch.ones(mean.numel(), dtype=torch.bool, device=mean.device)
        keep[idxs] = False
        square = squares[name]
        means[name], squares[name] = mean[keep], square[keep]
        std = (square[idxs] - mean[idxs].square()).clamp_min(0).sqrt()
        idxs = idxs[std <= tolerance * mean[idxs].abs() + 1e-6]  # constant channels only (see the module docstring)
        if not len(idxs):
            continue
        weight = layer.weight.detach()[:, idxs.to(layer.weight.device)].double()
        delta = (weight.flatten(2).sum(2) if weight.dim() > 2 else weight) @ mean[idxs].to(weight.device)
        bn = model.get_submodule(bn_after[name]) if name in bn_after else None
        with torch.no_grad():
            if layer.bias is not None:
                layer.bias.add_(delta.to(layer.bias.dtype))
            elif isinstance(bn, _BatchNorm) and bn.running_mean is not None and len(bn.running_mean) == len(delta):
                bn.running_mean.sub_(delta.to(bn.running_mean.dtype))
            else:
                continue
        folded.append(name)
    return folded
