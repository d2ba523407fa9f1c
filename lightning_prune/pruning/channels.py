"""Remove channels with torch-pruning's dependency graph, as our callbacks need it (no Trainer imports).

:func:`prune_channels` is one pruning step on a model: torch-pruning's ``BasePruner`` with three fixes we rely on:

- a layer never loses more than ``max_layer_ratio`` of its *original* channels (torch-pruning caps against the
  model the pruner was built on, i.e. each step), through an importance that keeps the required channels;
- ``round_to`` rounds the kept channel count *up* (torch-pruning 1.6.1 rounds it down, to 0 for narrow layers,
  which then escape pruning while wide layers drop below the cap);
- with global ranking, no more is asked than the capped layers can give (else the threshold becomes +inf).

It returns the step's records (:mod:`lightning_prune.pruning.history`), so the step can be replayed elsewhere.
:func:`check_traceable` names the module whose forward fails during tracing; :func:`output_layers` finds the
layers whose width encodes the model's outputs.

Example:
    >>> import torch
    >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 1))
    >>> graph = check_traceable(net, torch.zeros(1, 3, 8, 8))
    >>> output_layers(net, graph)
    ['3']
    >>> records = prune_channels(net, torch.zeros(1, 3, 8, 8), tp.importance.GroupMagnitudeImportance(), 0.5,
    ...                          ignored_layers=[net[3]], round_to=4)
    >>> net[0].out_channels, len(records) > 0
    (8, True)
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.pruner.importance import Importance

from lightning_prune.pruning.folding import InputMeans, fold_removed_inputs
from lightning_prune.pruning.history import PruningHistory, Record, group_records
from lightning_prune.pruning.importance import ActivationImportance
from lightning_prune.pruning.tracing import restored, traceable


def prune_channels(
    model: nn.Module,
    example_input: Any,
    importance: Importance,
    ratio: float,
    *,
    ignored_layers: list[nn.Module] | None = None,
    layer_ratios: dict[nn.Module, float] | None = None,
    history: PruningHistory | None = None,
    global_pruning: bool = True,
    max_layer_ratio: float = 0.95,
    round_to: int | None = None,
    fold: InputMeans | None = None,
) -> list[Record]:
    """Prune ``ratio`` of the channels of ``model`` in place (one step); the step's records.

    Args:
        model: the model (or a copy of it: dry runs).
        example_input: input to trace with.
        importance: the criterion (data-dependent ones calibrated beforehand).
        ratio: fraction of the *current* channels to remove (of the ranked layers).
        ignored_layers: layers whose output channels stay.
        layer_ratios: ``{module: ratio of its current channels}`` pruned by their own ratio, ranked among themselves.
        history: the model's earlier steps: ``max_layer_ratio`` applies to the widths before the first.
        global_pruning: rank channels across layers, or prune each layer by ``ratio``.
        max_layer_ratio: no layer loses more than this fraction of its original channels.
        round_to: keep channel counts multiples of this (rounded up).
        fold: input means measured on ``model`` just before: what the removed channels contributed is folded into
            the layers that read them (:func:`~lightning_prune.pruning.folding.fold_removed_inputs`).
    """
    widths = _original_widths(model, history)
    if isinstance(importance, ActivationImportance):
        importance.bind(model)  # its statistics are by layer name: `model` may be a dry run's copy
    capped = _CappedImportance(importance, widths, max_layer_ratio)
    with traceable(model):
        pruner = tp.pruner.BasePruner(
            model,
            example_input,
            capped,
            global_pruning=global_pruning,
            pruning_ratio=ratio,
            pruning_ratio_dict=layer_ratios or {},
            max_pruning_ratio=max_layer_ratio,
            ignored_layers=ignored_layers or [],
            round_to=round_to,
        )
    if round_to:
        pruner._round_to = _round_kept_up
    if global_pruning:
        pruner.per_step_pruning_ratio = [0.0, min(ratio, _available_ratio(pruner, widths, max_layer_ratio))]
    records: list[Record] = []
    names = {id(m): name for name, m in model.named_modules()}
    for group in pruner.step(interactive=True):
        group_recs = group_records(group, model, names)
        if fold is not None:
            fold_removed_inputs(model, group_recs, fold)
        records.extend(group_recs)
        group.prune()
    del pruner  # the graph pins traced activations
    return records


class _CappedImportance:
    """Wraps a criterion so that a layer keeps at least ``1 - max_layer_ratio`` of its *original* channels.

    Torch-pruning's ``max_pruning_ratio`` is relative to the model the pruner was built on (each step here), so the
    channels a layer must keep get an infinite score instead: no threshold selects them. NaN scores count as 0.
    """

    def __init__(self, importance: Importance, widths: dict[int, int], max_ratio: float) -> None:
        self.importance, self.widths, self.max_ratio = importance, widths, max_ratio

    def __call__(self, group: tp.Group, **kwargs: Any) -> torch.Tensor | None:
        imp = self.importance(group, **kwargs)
        if imp is None:
            return None
        keep = _keep(self.widths.get(id(group[0][0].target.module), len(imp)), len(imp), self.max_ratio)
        # a group scoring all zeros (Taylor on a branch without gradient) comes back NaN from torch-pruning's mean
        # normalizer (0 / 0); NaN would poison the global threshold (nothing at all would be pruned)
        imp = torch.nan_to_num(imp, nan=0.0)
        imp[torch.topk(imp, keep).indices] = float("inf")
        return imp


def check_traceable(target: nn.Module, example: Any) -> tp.DependencyGraph:
    """Build torch-pruning's dependency graph once; on failure, name the innermost module whose forward failed."""
    entered: list[str] = []

    def push(name: str) -> Any:
        return lambda *_: entered.append(name)

    def pop(*_: Any) -> None:
        entered.pop()

    hooks = [
        h
        for n, m in target.named_modules()
        for h in (m.register_forward_pre_hook(push(n)), m.register_forward_hook(pop))
    ]
    try:
        with restored(target), traceable(target):
            return tp.DependencyGraph().build_dependency(target, example_inputs=example)
    except Exception as err:
        where = (
            f"in module `{entered[-1]}` ({type(target.get_submodule(entered[-1])).__name__})"
            if entered
            else ("after the forward pass, while building the graph")
        )
        raise ValueError(
            f"Expected torch-pruning to trace {type(target).__name__} on its example input but it failed {where}: "
            f"{type(err).__name__}: {err}"
        ) from err
    finally:
        for h in hooks:
            h.remove()


def layer_widths(target: nn.Module) -> dict[str, int]:
    """Output channels of every conv / linear of ``target``."""
    widths = {}
    for name, m in target.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            widths[name] = m.out_channels
        elif isinstance(m, nn.Linear):
            widths[name] = m.out_features
    return widths


def _round_kept_up(n_pruned: int, current: int, round_to: int) -> int:
    """Channels to prune so that the kept count is a multiple of ``round_to`` at or above the asked one (>= 1)."""
    kept = max(current - n_pruned, 1)
    return max(current - min(current, math.ceil(kept / round_to) * round_to), 0)


def min_width(original: int, max_ratio: float, round_to: int | None = None) -> int:
    """The fewest channels a layer of ``original`` channels keeps: it loses at most ``max_ratio`` of them, keeps at
    least one, and (with ``round_to``) a multiple of ``round_to``, never more than ``original``.

    >>> min_width(200, 0.95), min_width(200, 0.95, round_to=8), min_width(4, 0.95, round_to=8)
    (10, 16, 4)
    """
    unit = round_to or 1
    kept = max(1, math.ceil(original * (1.0 - max_ratio) - 1e-9))
    return min(original, math.ceil(kept / unit) * unit)


def _keep(original: int, current: int, max_ratio: float) -> int:
    return min(current, min_width(original, max_ratio))


def _available_ratio(pruner: tp.pruner.BasePruner, widths: dict[int, int], max_ratio: float) -> float:
    """The largest global ratio that the capped layers allow (torch-pruning prunes at most ``ratio · total + 1``)."""
    total = available = 0
    for group in pruner.DG.get_all_groups(
        ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
    ):
        root = group[0][0].target.module
        n = pruner.DG.get_out_channels(root)
        total += n
        available += n - _keep(widths.get(id(root), n), n, max_ratio)
    return max(0.0, (available - 1) / max(total, 1))


def _original_widths(target: nn.Module, history: PruningHistory | None) -> dict[int, int]:
    """Output widths of the layers before the first step: the ``size`` of their first ``"out"`` record.

    Layers that are gone (inside a residual block removed since, :mod:`lightning_prune.pruning.blocks`) are skipped.
    """
    modules = dict(target.named_modules())
    widths: dict[int, int] = {}
    for step in history.steps if history is not None else []:
        for record in step:
            if record["kind"] == "out" and record.get("size") is not None and record["module"] in modules:
                widths.setdefault(id(modules[record["module"]]), record["size"])
    return widths


def output_layers(model: nn.Module, graph: tp.DependencyGraph) -> list[str]:
    """Convs/linears whose channels reach a model output through no other channel-mixing layer.

    Walks torch-pruning's traced graph back from its outputs through everything that keeps channels apart (reshape,
    permute, concat, activations, BatchNorm, ...), stopping at the first conv or linear: their widths encode the
    outputs (anchors × (5 + C), box offsets, DFL bins), even when the head reshapes and concatenates them.
    """
    mixing = (nn.modules.conv._ConvNd, nn.Linear)
    found: dict[int, nn.Module] = {}
    seen: set[int] = set()
    stack = [node for node in graph.module2node.values() if not node.outputs]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node.module, mixing):
            found.setdefault(id(node.module), node.module)
            continue
        stack.extend(node.inputs)
    return [name for name, m in model.named_modules() if id(m) in found]
