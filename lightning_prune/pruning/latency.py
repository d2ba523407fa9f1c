"""Latency-aware channel allocation (HALP, simplified): widths chosen by latency measured on the device, not by MACs.

MACs ignore what the hardware does with a width. On a CPU, oneDNN runs channel counts that are multiples of 16 much
faster than odd multiples of 8, and PyTorch sends a small batch-1 conv (input C·H·W <= 20480 elements, kernel <= 3×3)
to a slower native kernel instead of oneDNN: a layer pruned by MACs alone can get *slower*. Two parts fix that:

- :class:`LatencyTable`, a lookup table of the median wall time of each conv / linear *alone* (as deployed: BatchNorm
  fused, i.e. the layer with a bias; eval, ``torch.inference_mode``) at the (input, output) widths asked, on the
  layer's device, for the input size and batch it was traced with (:func:`trace_layers`). It is measured lazily, only
  for the widths asked, memoized by the full configuration (identical layers share entries), and a batch of requests
  is timed interleaved (every round runs each layer once, so drifts of a shared machine hit all alike).
- :class:`LatencyAllocation`, a greedy on torch-pruning's dependency groups: from the current widths, it repeatedly
  removes a block of channels (the least important ones) from the group whose removal costs the least importance per
  millisecond saved, until an estimated MACs or latency budget is met. The importance is the criterion's, normalized
  as torch-pruning's global ranking sees it, summed over the block; the latency saved is the table's before − after
  over every conv / linear whose input or output channels the group changes. A group may drop one block or up to
  ``lookahead`` blocks at once (so the table chooses 8 vs 16) and, where none of these saves time (a width under
  which a slower kernel takes over), 2, 4, 8, ... times as many, until one does; removals that save no time are
  taken only while a MACs budget is unmet, least importance per MAC first. ``max_layer_ratio`` (against the original
  widths) holds, a layer keeps at least one block, and ignored layers keep their output channels.

The chosen widths are realised by :func:`~lightning_prune.pruning.channels.prune_channels` with per-layer ratios
(:meth:`LatencyAllocation.layer_ratios`, ``global_pruning=False``), which removes the same least important channels,
so recorded history, bias folding, optimizer patching and replay are those of any step.

Paper: Shen et al., "Structural Pruning via Latency-Saliency Knapsack" (NeurIPS 2022), https://arxiv.org/abs/2110.10811

Example:
    >>> net = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(), nn.Conv2d(32, 4, 1))
    >>> x = torch.zeros(1, 3, 16, 16)
    >>> table = LatencyTable(warmup=1, repeats=3)
    >>> layer = trace_layers(net, x)["2"][0]
    >>> (layer.in_channels, layer.out_channels, layer.input_size), table(layer, 32, 24) > 0, len(table)
    ((32, 32, (14, 14)), True, 1)
    >>> def cost(layer, c_in, c_out):  # a made-up table: conv "0" is ten times dearer per MAC
    ...     return layer.macs(c_in, c_out) * (10.0 if layer.name == "0" else 1.0)
    >>> allocation = LatencyAllocation(net, x, tp.importance.GroupMagnitudeImportance(), cost, ignored_layers=[net[4]])
    >>> allocation.extend(macs=0.6 * allocation.macs[0])
    True
    >>> allocation.widths()  # the group of conv "0" (its outputs, the inputs of conv "2") gives the channels
    {'0': 16}
    >>> from lightning_prune.pruning import prune_channels
    >>> ratios = allocation.layer_ratios(net)
    >>> records = prune_channels(net, x, tp.importance.GroupMagnitudeImportance(), 0.0, layer_ratios=ratios,
    ...                          global_pruning=False, ignored_layers=[net[4]])
    >>> net[0].out_channels, net[2].in_channels
    (16, 16)
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.nn import functional as F
from torch_pruning.pruner.importance import Importance

from lightning_prune.pruning.channels import _keep, _original_widths
from lightning_prune.pruning.history import PruningHistory
from lightning_prune.pruning.importance import ActivationImportance
from lightning_prune.pruning.tracing import restored, traceable

__all__ = ["Cost", "LatencyAllocation", "LatencyTable", "LayerSpec", "trace_layers", "width_ratios"]

#: a latency table: milliseconds of ``layer`` at ``(c_in, c_out)``; :class:`LatencyTable` or any such function
Cost = Callable[["LayerSpec", int, int], float]


@dataclass(frozen=True)
class LayerSpec:
    """A conv or linear as traced: what its latency depends on besides its widths (the key of a table entry).

    ``name`` is not part of the key: layers of the same configuration share their entries. A depthwise conv's groups
    follow its width; other grouped convs keep their groups. ``input_size`` is the spatial size of a conv's input
    (the leading dims between batch and features for a linear), ``output_size`` that of its output. A ``"module"``
    is a parameter-free module (activation, pooling, upsampling) run on a conv's output channels: its ``op`` (repr)
    is part of the key, its width the conv's output width.
    """

    kind: str  # "conv1d", "conv2d", "conv3d", "linear" or "module" (a parameter-free module after a conv)
    in_channels: int
    out_channels: int
    input_size: tuple[int, ...]
    output_size: tuple[int, ...]
    batch: int
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    depthwise: bool = False
    dtype: str = "float32"
    device: str = "cpu"
    op: str = ""  # a "module"'s repr
    name: str = field(default="", compare=False)
    module: nn.Module | None = field(default=None, compare=False, repr=False)  # a "module" to run

    def groups_at(self, c_in: int, c_out: int) -> int:
        return c_out if self.depthwise else self.groups

    def macs(self, c_in: int, c_out: int) -> float:
        """Multiply-accumulates of one sample at these widths (bias excluded; none for a "module")."""
        if self.kind == "module":
            return 0.0
        per_output = (c_in // self.groups_at(c_in, c_out)) * math.prod(self.kernel_size)
        return float(per_output * c_out * math.prod(self.output_size))


def trace_layers(model: nn.Module, example_input: Any, batch_size: int | None = None) -> dict[str, list[LayerSpec]]:
    """The configuration of every conv / linear of ``model`` at each of its calls in one eval forward, followed by the
    parameter-free modules (activations, pooling, upsampling; ``kind="module"``) that then run on its output channels
    (through BatchNorms, which fusion removes, and other channel-preserving modules, not through concatenations).

    Args:
        model: the model (its modes are restored afterwards).
        example_input: a tensor, a tuple of positional inputs or a dict of keyword inputs.
        batch_size: the batch the layers are to be timed at; default the example's.
    """
    found: dict[str, list[LayerSpec]] = {}
    origin: dict[int, tuple[str, torch.Tensor]] = {}  # id(activation) -> (the conv whose channels it holds, it)

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            x = inputs[0] if inputs else None
            if not (isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor)):
                return
            kind = _kind(module)
            if kind is not None:
                found.setdefault(name, []).append(_spec(name, module, x, output, batch_size))
                if kind != "linear":
                    origin[id(output)] = (name, output)
                return
            source = origin.get(id(x))
            if source is None or source[1] is not x or output.dim() != x.dim() or output.shape[1] != x.shape[1]:
                return
            origin[id(output)] = (source[0], output)  # references kept: ids stay unique
            if _runs(module):
                found[source[0]].append(
                    LayerSpec(
                        "module",
                        x.shape[1],
                        x.shape[1],
                        tuple(x.shape[2:]),
                        tuple(output.shape[2:]),
                        batch_size or x.shape[0],
                        dtype=str(x.dtype).removeprefix("torch."),
                        device=str(x.device),
                        op=repr(module),
                        name=name,
                        module=module,
                    )
                )

        return record

    handles = [
        m.register_forward_hook(hook(name))
        for name, m in model.named_modules()
        if next(m.children(), None) is None and not getattr(m, "transposed", False)
    ]
    try:
        with restored(model, keep_grads=True), torch.no_grad():
            model.eval()
            if isinstance(example_input, dict):
                model(**example_input)
            elif isinstance(example_input, (tuple, list)):
                model(*example_input)
            else:
                model(example_input)
    finally:
        for h in handles:
            h.remove()
    return found


def _runs(module: nn.Module) -> bool:
    """Whether ``module`` costs time of its own as deployed: parameter-free, not a no-op (BatchNorm is fused)."""
    if isinstance(module, (nn.Identity, nn.modules.dropout._DropoutNd, nn.Flatten, nn.Unflatten)):
        return False
    return next(module.parameters(recurse=False), None) is None and next(module.buffers(recurse=False), None) is None


class LatencyTable:
    """Median wall time in ms of single layers at given widths, measured lazily on the layers' device and memoized.

    Each entry is one layer alone, with a bias (as after BatchNorm fusion), on random inputs, in
    ``torch.inference_mode``. Requests are timed in batches: ``warmup`` untimed rounds, then ``repeats`` timed rounds
    that each run every layer of the batch once in turn (drifts of a shared machine hit all candidates alike); the
    median over rounds is kept. Per-layer times are 0.01-2 ms on a CPU, so few repeats are needed; the inputs and
    weights of a batch are created once per entry, at most ``max_bytes`` of them at a time. A greedy asks for the
    candidates of a round at once, so the widths it compares are mostly timed side by side. Under heavy load (another
    process on the same cores) single entries can still be off by 2-4x: measure on a quiet machine.

    Args:
        warmup: untimed rounds (the first call of a new shape creates its oneDNN primitive).
        repeats: timed rounds; the median is kept.
        max_bytes: memory for the tensors of a batch of entries timed together.

    Raises:
        ValueError: ``warmup < 0``, ``repeats < 1`` or ``max_bytes < 1``.

    Example:
        >>> table = LatencyTable(warmup=1, repeats=3)
        >>> layer = LayerSpec("conv2d", 16, 16, (8, 8), (8, 8), 1, (3, 3), (1, 1), (1, 1), (1, 1))
        >>> table.measure([(layer, 16, 16), (layer, 16, 8), (layer, 16, 8)])  # two entries, timed interleaved
        >>> len(table), table(layer, 16, 8) > 0, len(table)
        (2, True, 2)
    """

    def __init__(self, warmup: int = 1, repeats: int = 5, max_bytes: int = 2**28) -> None:
        if isinstance(warmup, bool) or not (isinstance(warmup, int) and warmup >= 0):
            raise ValueError(f"Expected argument `warmup` to be an int >= 0 but got {warmup!r}.")
        if isinstance(repeats, bool) or not (isinstance(repeats, int) and repeats >= 1):
            raise ValueError(f"Expected argument `repeats` to be an int >= 1 but got {repeats!r}.")
        if isinstance(max_bytes, bool) or not (isinstance(max_bytes, int) and max_bytes >= 1):
            raise ValueError(f"Expected argument `max_bytes` to be an int >= 1 but got {max_bytes!r}.")
        self.warmup, self.repeats, self.max_bytes = warmup, repeats, max_bytes
        self.entries: dict[tuple[LayerSpec, int, int], float] = {}
        #: seconds spent measuring
        self.seconds = 0.0

    def __len__(self) -> int:
        return len(self.entries)

    def __call__(self, layer: LayerSpec, c_in: int, c_out: int) -> float:
        key = (layer, c_in, c_out)
        if key not in self.entries:
            self.measure([key])
        return self.entries[key]

    @torch.inference_mode()
    def measure(self, requests: Iterable[tuple[LayerSpec, int, int]]) -> None:
        """Measure the requested entries not in the table yet, interleaved (in chunks of ``max_bytes``)."""
        missing = list(dict.fromkeys(key for key in requests if key not in self.entries))
        start = time.perf_counter()
        while missing:
            chunk, size = [], 0
            while missing and (not chunk or size + _bytes(*missing[0]) <= self.max_bytes):
                size += _bytes(*missing[0])
                chunk.append(missing.pop(0))
            self.entries.update(self._time(chunk))
        self.seconds += time.perf_counter() - start

    def _time(self, keys: list[tuple[LayerSpec, int, int]]) -> dict[tuple[LayerSpec, int, int], float]:
        """Median ms of each entry, timed in interleaved rounds."""
        runs = [_runner(*key) for key in keys]
        cuda = any(key[0].device.startswith("cuda") for key in keys)
        times: list[list[float]] = [[] for _ in runs]
        for round_ in range(self.warmup + self.repeats):
            for run, ts in zip(runs, times):
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                run()
                if cuda:
                    torch.cuda.synchronize()
                if round_ >= self.warmup:
                    ts.append(time.perf_counter() - t0)
        return {key: statistics.median(ts) * 1e3 for key, ts in zip(keys, times)}


@dataclass
class _Group:
    root: str
    size: int  # channels at the start
    width: int  # channels kept so far
    floor: int  # fewest channels the group may keep
    removed: torch.Tensor  # cumulative importance of the least important channels, (size + 1,)
    touches: list[tuple[str, str, int]]  # (layer, "in" | "out", channels per channel of the group)


@dataclass
class _Move:
    group: int
    width: int  # channels kept after it
    importance: float
    latency: float  # ms saved
    macs: float  # MACs removed
    widths: dict[str, tuple[int, int]]  # layer -> (in, out) after it

    def key(self, latency_only: bool) -> tuple[int, float, int, int] | None:
        """Lower is better: importance per ms saved; removals that save no time by importance per MAC, last."""
        if self.latency > 0:
            return 0, self.importance / self.latency, self.group, -self.width
        if latency_only or self.macs <= 0:
            return None
        return 1, self.importance / self.macs, self.group, -self.width


class LatencyAllocation:
    """Greedy latency-aware widths for the dependency groups of ``model`` (see the module docstring).

    Built on the model as it is now (its groups, importance scores and traced layers); :meth:`extend` runs the greedy
    until a budget is met and can be called again with a smaller one; ``moves[:n]`` give the widths :meth:`widths`
    and :meth:`layer_ratios` return for any prefix ``n``, ``macs[n]`` and ``latency[n]`` the estimates after it.

    Args:
        model: the model to allocate channels of (not modified).
        example_input: input to trace with (its resolution is the one timed).
        importance: the criterion (data-dependent ones calibrated beforehand).
        cost: the latency table, ``cost(layer, c_in, c_out) -> ms``; a :class:`LatencyTable` is asked for every
            candidate of a round at once (timed interleaved).
        ignored_layers: layers whose output channels stay.
        history: the model's earlier steps: ``max_layer_ratio`` applies to the widths before the first.
        max_layer_ratio: no group loses more than this fraction of its original channels.
        block: channels removed at a time; widths stay multiples of it (a layer keeps at least one block).
        lookahead: a group may lose up to this many blocks in one move (so a cheaper width further down is seen).
        batch_size: the batch the layers are timed at.

    Raises:
        ValueError: ``block``, ``lookahead`` or ``batch_size`` is not an int >= 1, or ``max_layer_ratio`` is not in
            (0, 1].
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: Any,
        importance: Importance,
        cost: Cost,
        *,
        ignored_layers: list[nn.Module] | None = None,
        history: PruningHistory | None = None,
        max_layer_ratio: float = 0.95,
        block: int = 8,
        lookahead: int = 2,
        batch_size: int = 1,
    ) -> None:
        for name, value in (("block", block), ("lookahead", lookahead), ("batch_size", batch_size)):
            if isinstance(value, bool) or not (isinstance(value, int) and value >= 1):
                raise ValueError(f"Expected argument `{name}` to be an int >= 1 but got {value!r}.")
        if isinstance(max_layer_ratio, bool) or not (
            isinstance(max_layer_ratio, (int, float)) and 0 < max_layer_ratio <= 1
        ):
            raise ValueError(
                f"Expected argument `max_layer_ratio` to be a float in (0, 1] but got {max_layer_ratio!r}."
            )
        self.cost, self.block, self.lookahead = cost, block, lookahead
        self.layers = trace_layers(model, example_input, batch_size)
        self.groups = _groups(model, example_input, importance, self.layers, ignored_layers, history, max_layer_ratio)
        for g in self.groups:
            g.floor = max(block, math.ceil(g.floor / block) * block)
        self._trace_batch = _batch_of(example_input)
        self._widths = {name: (specs[0].in_channels, specs[0].out_channels) for name, specs in self.layers.items()}
        self._sharing: list[set[int]] = []  # per group, the groups that change a layer it changes (itself included)
        by_layer: dict[str, set[int]] = {}
        for i, g in enumerate(self.groups):
            for layer, _, _ in g.touches:
                by_layer.setdefault(layer, set()).add(i)
        for g in self.groups:
            self._sharing.append(set().union(*(by_layer[layer] for layer, _, _ in g.touches)))
        self._prefetch([_at(spec, *self._widths[n]) for n, specs in self.layers.items() for spec in specs])
        #: ``(group root, channels kept)`` of each move, in order
        self.moves: list[tuple[str, int]] = []
        #: estimated MACs of the model's convs / linears after each prefix of ``moves`` (``[0]``: now), in the units of
        #: torch-pruning's counter on ``example_input``
        self.macs = [sum(self._macs(n, *w) for n, w in self._widths.items())]
        #: estimated latency (ms) of the model's convs / linears after each prefix of ``moves`` (``[0]``: now)
        self.latency = [sum(self._cost(n, *w) for n, w in self._widths.items())]
        self._candidates: list[list[_Move]] = [[] for _ in self.groups]
        self._refresh(range(len(self.groups)))

    # ------------------------------------------------------------------ the greedy
    def extend(self, macs: float | None = None, latency: float | None = None) -> bool:
        """Continue the greedy until the estimated MACs (or latency, ms) are at most the given budget.

        Returns whether the budget was met (else no group can give more channels: ``max_layer_ratio``, blocks, or, for
        a latency budget, no removal left that saves time). Budgets already met add no move.
        """
        if (macs is None) == (latency is None):
            raise ValueError(f"Expected exactly one of `macs` and `latency` but got {macs!r} and {latency!r}.")

        def unmet() -> bool:
            return self.macs[-1] > macs if macs is not None else self.latency[-1] > float(latency or 0.0)

        while unmet():
            keyed = [(m.key(latency is not None), m) for ms in self._candidates for m in ms]
            ranked = [(k, m) for k, m in keyed if k is not None]
            if not ranked:
                return False
            move = min(ranked, key=lambda km: km[0])[1]
            group = self.groups[move.group]
            group.width = move.width
            self._widths.update(move.widths)
            self.moves.append((group.root, move.width))
            self.macs.append(self.macs[-1] - move.macs)
            self.latency.append(self.latency[-1] - move.latency)
            self._refresh(self._sharing[move.group])
        return True

    def widths(self, moves: int | None = None) -> dict[str, int]:
        """``{group root: channels kept}`` of the groups narrowed by the first ``moves`` moves (default all)."""
        kept: dict[str, int] = {}
        for root, width in self.moves[: len(self.moves) if moves is None else moves]:
            kept[root] = width
        return kept

    def layer_ratios(self, model: nn.Module, moves: int | None = None) -> dict[nn.Module, float]:
        """:func:`width_ratios` of :meth:`widths` on ``model`` (the model the allocation was built on, or a copy)."""
        return width_ratios(model, self.widths(moves))

    # ------------------------------------------------------------------ candidates
    def _refresh(self, groups: Iterable[int]) -> None:
        """Recompute the candidate moves of ``groups``, their table entries measured together first.

        A group whose next ``lookahead`` blocks save no time (a width under which a slower kernel takes over) also
        gets candidates 2, 4, 8, ... times further down, until one saves time: the table sees past the cliff.
        """
        near = range(1, self.lookahead + 1)
        proposals = {i: self._proposals(i, near) for i in groups}
        self._prefetch([key for props in proposals.values() for _, changed in props for key in self._keys(changed)])
        for i, props in proposals.items():
            moves = [self._move(i, width, changed) for width, changed in props]
            blocks = 2 * self.lookahead
            while moves and all(m.latency <= 0 for m in moves):
                far = self._proposals(i, [blocks])
                if not far:
                    break
                self._prefetch(self._keys(far[0][1]))
                moves.append(self._move(i, *far[0]))
                blocks *= 2
            self._candidates[i] = moves

    def _keys(self, changed: dict[str, tuple[tuple[int, int], tuple[int, int]]]) -> list[tuple[LayerSpec, int, int]]:
        """The table entries a candidate compares: each changed layer before and after."""
        return [_at(spec, *w) for name, (old, new) in changed.items() for w in (old, new) for spec in self.layers[name]]

    def _proposals(
        self, i: int, blocks: Iterable[int]
    ) -> list[tuple[int, dict[str, tuple[tuple[int, int], tuple[int, int]]]]]:
        """The widths group ``i`` may drop to by removing each number of ``blocks`` (not under its floor), each with
        ``{layer: ((in, out) now, (in, out) after)}``."""
        g = self.groups[i]
        top = (g.width - 1) // self.block * self.block  # the next multiple of the block below: one block removed
        out = []
        for n in blocks:
            width = top - (n - 1) * self.block
            if width < g.floor:
                break
            changed: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}
            for layer, side, per in g.touches:
                c_in, c_out = changed[layer][1] if layer in changed else self._widths[layer]
                drop = per * (g.width - width)
                if self.layers[layer][0].depthwise:
                    c_in = c_out = c_out - drop
                elif side == "out":
                    c_out -= drop
                else:
                    c_in -= drop
                changed[layer] = (self._widths[layer], (c_in, c_out))
            out.append((width, changed))
        return out

    def _move(self, i: int, width: int, changed: dict[str, tuple[tuple[int, int], tuple[int, int]]]) -> _Move:
        g = self.groups[i]
        latency = macs = 0.0
        for name, (old, new) in changed.items():
            latency += self._cost(name, *old) - self._cost(name, *new)
            macs += self._macs(name, *old) - self._macs(name, *new)
        importance = float(g.removed[g.size - width] - g.removed[g.size - g.width])
        return _Move(i, width, importance, latency, macs, {n: new for n, (_, new) in changed.items()})

    def _cost(self, name: str, c_in: int, c_out: int) -> float:
        return sum(self.cost(*_at(spec, c_in, c_out)) for spec in self.layers[name])

    def _macs(self, name: str, c_in: int, c_out: int) -> float:
        return sum(spec.macs(c_in, c_out) for spec in self.layers[name]) * self._trace_batch

    def _prefetch(self, requests: list[tuple[LayerSpec, int, int]]) -> None:
        if isinstance(self.cost, LatencyTable):
            self.cost.measure(requests)


def _at(spec: LayerSpec, c_in: int, c_out: int) -> tuple[LayerSpec, int, int]:
    """The table entry of ``spec`` in a layer of these widths (a module after it runs on its output channels)."""
    return (spec, c_out, c_out) if spec.kind == "module" else (spec, c_in, c_out)


def width_ratios(model: nn.Module, widths: dict[str, int]) -> dict[nn.Module, float]:
    """``layer_ratios`` for :func:`~lightning_prune.pruning.channels.prune_channels` (``global_pruning=False``) that
    leave each group ``{root module name: channels}`` of ``model`` with exactly that many channels.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 16, 3))
        >>> width_ratios(net, {"0": 12})  # torch-pruning keeps int(16 · (1 - 0.21875)) = 12
        {Conv2d(3, 16, kernel_size=(3, 3), stride=(1, 1)): 0.21875}
    """
    ratios = {}
    for root, width in widths.items():
        module = model.get_submodule(root)
        current = module.out_channels if isinstance(module, nn.modules.conv._ConvNd) else module.out_features
        if width < current:  # torch-pruning keeps int(current · (1 - ratio)) channels: `width`, away from rounding
            ratios[module] = 1.0 - (width + 0.5) / current
    return ratios


def _groups(
    model: nn.Module,
    example_input: Any,
    importance: Importance,
    layers: dict[str, list[LayerSpec]],
    ignored_layers: list[nn.Module] | None,
    history: PruningHistory | None,
    max_ratio: float,
) -> list[_Group]:
    """The prunable groups of ``model``, as torch-pruning's pruner sees them, with the layers each changes."""
    widths = _original_widths(model, history)
    names = {id(m): name for name, m in model.named_modules()}
    if isinstance(importance, ActivationImportance):
        importance.bind(model)
    with restored(model, keep_grads=True), traceable(model):
        pruner = tp.pruner.BasePruner(model, example_input, importance, ignored_layers=ignored_layers or [])
    graph = pruner.DG
    groups = []
    for group in graph.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types):
        if not pruner._check_pruning_ratio(group) or pruner._get_channel_groups(group) > 1:
            continue  # a layer of one channel, or grouped convs: left as they are
        if pruner._is_atten_group(group)[0]:
            continue
        imp = importance(group)
        if imp is None:
            continue
        imp = imp.detach().double().cpu().nan_to_num(nan=0.0)
        root = group[0][0].target.module
        n = len(imp)
        channels: dict[tuple[str, str], set[int]] = {}
        for dep, idxs in group:
            name = names.get(id(dep.target.module))
            if name not in layers:
                continue  # not a traced conv / linear: no latency of its own
            if graph.is_out_channel_pruning_fn(dep.handler):
                side = "out"
            elif graph.is_in_channel_pruning_fn(dep.handler):
                side = "in"
            else:
                continue
            if layers[name][0].depthwise:
                side = "out"  # a depthwise conv's inputs, outputs and groups shrink together
            channels.setdefault((name, side), set()).update(int(i) for i in idxs)
        touches = [(name, side, max(1, round(len(ch) / n))) for (name, side), ch in channels.items()]
        if not touches or any(layers[name][0].groups > 1 and not layers[name][0].depthwise for name, _, _ in touches):
            continue
        removed = torch.cat([torch.zeros(1, dtype=torch.float64), imp.sort().values.cumsum(0)])
        floor = _keep(widths.get(id(root), n), n, max_ratio)
        groups.append(_Group(names[id(root)], n, n, floor, removed, touches))
    del pruner  # the graph pins traced activations
    return groups


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return f"conv{len(module.kernel_size)}d"
    return None


def _spec(name: str, module: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int | None) -> LayerSpec:
    kind = _kind(module)
    assert kind is not None
    common = dict(dtype=str(module.weight.dtype).removeprefix("torch."), device=str(module.weight.device), name=name)
    if kind == "linear":
        batch = batch_size or (x.shape[0] if x.dim() > 1 else 1)
        lead = tuple(x.shape[1:-1]) if x.dim() > 1 else ()
        return LayerSpec(kind, module.in_features, module.out_features, lead, lead, batch, **common)  # type: ignore[arg-type]
    dims = len(module.kernel_size)
    batched = x.dim() == dims + 2
    return LayerSpec(
        kind,
        module.in_channels,
        module.out_channels,
        tuple(x.shape[-dims:]),
        tuple(y.shape[-dims:]),
        batch_size or (x.shape[0] if batched else 1),
        tuple(module.kernel_size),
        tuple(module.stride),
        module.padding if isinstance(module.padding, str) else tuple(module.padding),
        tuple(module.dilation),
        module.groups,
        module.groups == module.out_channels and module.out_channels > 1,  # torch-pruning's depthwise rule
        **common,  # type: ignore[arg-type]
    )


def _batch_of(example_input: Any) -> int:
    """The batch size of the example (its first tensor's first dim), for MACs in the counter's units."""
    if isinstance(example_input, torch.Tensor):
        return int(example_input.shape[0]) if example_input.dim() > 0 else 1
    values = example_input.values() if isinstance(example_input, dict) else example_input
    for value in values if isinstance(values, Iterable) else []:
        if isinstance(value, torch.Tensor):
            return _batch_of(value)
    return 1


def _shapes(layer: LayerSpec, c_in: int, c_out: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Input and weight shapes of ``layer`` at these widths."""
    if layer.kind == "module":
        return (layer.batch, c_in, *layer.input_size), (0,)
    if layer.kind == "linear":
        return (layer.batch, *layer.input_size, c_in), (c_out, c_in)
    groups = layer.groups_at(c_in, c_out)
    return (layer.batch, c_in, *layer.input_size), (c_out, c_in // groups, *layer.kernel_size)


def _bytes(layer: LayerSpec, c_in: int, c_out: int) -> int:
    x, w = _shapes(layer, c_in, c_out)
    return 4 * (math.prod(x) + math.prod(w) + c_out)


def _runner(layer: LayerSpec, c_in: int, c_out: int) -> Callable[[], Any]:
    """A call of ``layer`` alone at these widths, on fresh random tensors."""
    x_shape, w_shape = _shapes(layer, c_in, c_out)
    options: dict[str, Any] = {"dtype": getattr(torch, layer.dtype), "device": layer.device}
    x = torch.randn(x_shape, **options)
    w = torch.randn(w_shape, **options) * (1.0 / math.sqrt(max(1, math.prod(w_shape[1:]))))
    b = torch.randn(c_out, **options)
    if layer.kind == "module":
        module = layer.module
        assert module is not None, "a traced module to run"
        return lambda: module(x)
    if layer.kind == "linear":
        return lambda: F.linear(x, w, b)
    conv = {"conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d}[layer.kind]
    groups = layer.groups_at(c_in, c_out)
    return lambda: conv(x, w, b, layer.stride, layer.padding, layer.dilation, groups)
