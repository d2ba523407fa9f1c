"""Structural pruning history as plain data, replayable on a fresh copy of the model.

A pruned model's ``state_dict`` only loads into a model of the same (pruned) shapes. Lightning restores the module's
weights before any callback state, and ``torch.load(weights_only=True)`` refuses pickled objects, so the structure
travels as a :class:`PruningHistory`: lists of dicts of strings and ints, replayed on the freshly built model (for
example in ``LightningModule.on_load_checkpoint``) before the strict ``load_state_dict``.

One record is one call of a torch-pruning pruning function on one layer, or one removed residual block::

    {"module": "backbone.conv3", "kind": "out", "idxs": [2, 7], "size": 32}
    {"module": "pos_embed", "kind": "param", "idxs": [0], "size": 16, "dim": 2}
    {"module": "backbone.stages.2.1", "kind": "block", "idxs": [], "size": None}

``kind`` is ``"out"``/``"in"`` (the layer's ``prune_out_channels``/``prune_in_channels``), ``"param"`` (an unwrapped
``nn.Parameter``) or ``"block"`` (the module replaced by ``nn.Identity()``, see :mod:`lightning_prune.pruning.blocks`;
``idxs`` empty and ``size`` ``None``), ``size`` the number of channels along that dimension before the call (``None``
where the pruning function does not say), ``dim`` torch-pruning's ``pruning_dim`` when not the default -1. A step is
the list of records of all groups pruned at once, in execution order; replay runs them in the same order through the
same torch-pruning functions, so the replayed layers hold the same channels in the same order.

Example:
    >>> import torch, torch_pruning as tp
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Conv2d(8, 4, 1))
    >>> pruner = tp.pruner.BasePruner(net, torch.randn(1, 3, 8, 8), tp.importance.MagnitudeImportance(),
    ...                               pruning_ratio=0.5, ignored_layers=[net[2]])
    >>> history = PruningHistory()
    >>> _ = history.prune_step(pruner.step(interactive=True), net)
    >>> fresh = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Conv2d(8, 4, 1))
    >>> PruningHistory.from_state(history.to_state()).replay(fresh).load_state_dict(net.state_dict())
    <All keys matched successfully>
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import ops
from torch_pruning.pruner.function import BasePruningFunc, ParameterPruner, PrunerBox

Record = dict[str, Any]
_KINDS = ("out", "in", "param", "block")
_STATE_VERSION = 1  # "block" came without a new version: older states simply hold none
M = TypeVar("M", bound=nn.Module)


class PruningHistory:
    """The pruning steps applied to a model, as JSON-able records (see the module docstring).

    Args:
        steps: previously recorded steps (lists of records); copied.
    """

    def __init__(self, steps: Iterable[Iterable[Record]] | None = None) -> None:
        self._steps: list[list[Record]] = [[_check_record(r) for r in step] for step in (steps or [])]

    @property
    def steps(self) -> list[list[Record]]:
        return [[{**r, "idxs": list(r["idxs"])} for r in step] for step in self._steps]

    def __len__(self) -> int:
        return len(self._steps)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PruningHistory) and self._steps == other._steps

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={len(self)}, records={sum(len(s) for s in self._steps)})"

    def prune_step(self, groups: Iterable[tp.Group], model: nn.Module) -> list[Record]:
        """Prune each group and record it, as one step.

        Takes the groups lazily (``pruner.step(interactive=True)`` computes each group on the model as the previous
        ones left it), records each just before pruning it, and appends the step.

        Args:
            groups: torch-pruning groups, usually ``pruner.step(interactive=True)``.
            model: the root the module names are relative to; replay on a model with the same root.

        Returns:
            The step's records.
        """
        step: list[Record] = []
        for group in groups:
            step.extend(group_records(group, model))
            group.prune()
        self.append(step)
        return step

    def append(self, step: Iterable[Record]) -> None:
        """Add a step recorded elsewhere (e.g. broadcast from rank 0 and applied with :func:`apply_records`)."""
        self._steps.append([_check_record(r) for r in step])

    def replay(self, model: M, start: int = 0, pruners: Mapping[type, BasePruningFunc] | None = None) -> M:
        """Apply steps ``start:`` to ``model`` in place and return it.

        Args:
            model: a model with the architecture (and root) the history was recorded on, as it was before step
                ``start`` (unpruned for ``start=0``).
            start: the first step to apply.
            pruners: pruning functions by layer type, for layers torch-pruning was given as ``customized_pruners``.

        Raises:
            ValueError: the model lacks a recorded module or parameter, a layer's width does not match the record, or a
                removed block is already an ``nn.Identity``.
        """
        for i, step in enumerate(self._steps[start:], start=start):
            apply_records(model, step, pruners=pruners, step=i)
        return model

    def to_state(self) -> dict[str, Any]:
        """Plain dicts, lists, strings and ints: safe for ``torch.load(weights_only=True)`` and JSON."""
        return {"version": _STATE_VERSION, "steps": self.steps}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> PruningHistory:
        """Inverse of :meth:`to_state`.

        Raises:
            ValueError: ``state`` is not a history state of a known version.
        """
        if not isinstance(state, Mapping) or not isinstance(state.get("steps"), list):
            raise ValueError(f"Expected a pruning history state with a list of `steps` but got {state!r:.200}.")
        if state.get("version", _STATE_VERSION) != _STATE_VERSION:
            raise ValueError(
                f"Expected a pruning history state of version {_STATE_VERSION} but got {state.get('version')!r}."
            )
        return cls(state["steps"])


def group_records(group: tp.Group, model: nn.Module, module_names: Mapping[int, str] | None = None) -> list[Record]:
    """The records of one torch-pruning group; call it *before* ``group.prune()`` (sizes are read from the layers).

    Couplings that change no layer (element-wise ops, concat/split bookkeeping) are left out.

    Args:
        group: the group about to be pruned.
        model: the model it belongs to.
        module_names: ``{id(module): qualified name}`` of ``model`` (pruning keeps the modules, so one map serves
            every group of a step); built from ``model`` when not given.

    Raises:
        ValueError: a pruned layer or parameter is not part of ``model``.
    """
    modules = module_names if module_names is not None else {id(m): name for name, m in model.named_modules()}
    params: dict[int, str] | None = None  # pruning replaces parameters: looked up afresh, and only when needed
    records = []
    for dep, idxs in group:
        handler = dep.handler
        pruner = getattr(handler, "__self__", None)
        if isinstance(pruner, ops.DummyPruner):
            continue
        target = dep.target.module
        plain = [int(i) for i in tp._helpers.to_plain_idxs(idxs)]
        dim = int(dep.target.pruning_dim)
        if isinstance(target, nn.Parameter):
            params = params if params is not None else {id(p): name for name, p in model.named_parameters()}
            if id(target) not in params:
                raise ValueError(f"The pruned parameter {tuple(target.shape)} is not a parameter of the given model.")
            record = {"module": params[id(target)], "kind": "param", "idxs": plain, "size": target.shape[dim]}
        else:
            if id(target) not in modules:
                raise ValueError(f"The pruned layer {target!r} is not a submodule of the given model.")
            if handler == pruner.prune_out_channels:
                kind, size = "out", pruner.get_out_channels(target)
            elif handler == pruner.prune_in_channels:
                kind, size = "in", pruner.get_in_channels(target)
            else:
                raise ValueError(f"Expected a `prune_out_channels` or `prune_in_channels` handler but got {handler!r}.")
            record = {"module": modules[id(target)], "kind": kind, "idxs": plain, "size": size}
        if dim != -1:
            record["dim"] = dim
        records.append(record)
    return records


def apply_records(
    model: nn.Module,
    records: Iterable[Record],
    pruners: Mapping[type, BasePruningFunc] | None = None,
    step: int | None = None,
) -> None:
    """Apply one step's records to ``model`` in place, in order, with torch-pruning's pruning functions.

    Args:
        model: the model as it was before the step.
        records: the step's records.
        pruners: pruning functions by layer type, for layers torch-pruning was given as ``customized_pruners``.
        step: the step's index, for error messages.

    Raises:
        ValueError: the model lacks a recorded module or parameter, a layer's width does not match the record, or a
            removed block is the root or already an ``nn.Identity``.
    """
    where = ":" if step is None else f" step {step}:"
    for record in records:
        record = _check_record(record)
        name, kind, idxs, dim = record["module"], record["kind"], record["idxs"], record.get("dim", -1)
        if kind == "block":
            _remove_block(model, name, where)
            continue
        if kind == "param":
            parent_name, _, attr = name.rpartition(".")
            parent = _get(model, parent_name, where)
            param = getattr(parent, attr, None)
            if not isinstance(param, nn.Parameter):
                raise ValueError(f"Cannot replay{where} the model has no parameter `{name}`.")
            _check_width(record, param.shape[dim], f"channels along dim {dim} of parameter `{name}`", where)
            setattr(parent, attr, ParameterPruner(pruning_dim=dim).prune_out_channels(param, idxs))
            continue
        module = _get(model, name, where)
        pruner = (pruners or {}).get(type(module)) or PrunerBox.get(ops.module2type(module))
        if pruner is None:
            raise ValueError(
                f"Cannot replay{where} torch-pruning has no pruning function for `{name}` ({type(module).__name__}). "
                "HINT: pass the `customized_pruners` the model was pruned with as `pruners`."
            )
        width = pruner.get_out_channels(module) if kind == "out" else pruner.get_in_channels(module)
        _check_width(record, width, f"{kind}put channels of `{name}` ({type(module).__name__})", where)
        pruner.pruning_dim = dim  # as torch-pruning's Dependency does before every call
        (pruner.prune_out_channels if kind == "out" else pruner.prune_in_channels)(module, idxs)


def resize_to_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Reshape conv, batch-norm and linear layers to the shapes in ``state_dict``, with uninitialized weights.

    A fallback for checkpoints of pruned models that carry no history: afterwards ``model.load_state_dict(state_dict)``
    loads strictly. Only the layers change; channel counts hard-coded in a forward (``split`` sizes) are not touched.

    Returns:
        The names of the resized layers.

    Raises:
        ValueError: a layer whose shape differs is of another type, or a grouped convolution that is not depthwise.
    """
    resized = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        local = {k: state_dict[prefix + k] for k, _ in _direct_tensors(module) if prefix + k in state_dict}
        if all(tuple(v.shape) == tuple(getattr(module, k).shape) for k, v in local.items()):
            continue
        if isinstance(module, nn.modules.conv._ConvNd):
            _resize_conv(module, name, local)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.num_features = int(local["weight" if "weight" in local else "running_mean"].shape[0])
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = (int(s) for s in local["weight"].shape)
        else:
            raise ValueError(
                f"Cannot resize `{name}` ({type(module).__name__}): only convolution, batch-norm and linear layers are "
                "supported. HINT: store and replay a `PruningHistory` instead."
            )
        for key, value in local.items():
            old = getattr(module, key)
            new = torch.empty(value.shape, dtype=old.dtype, device=old.device)
            is_param = key in module._parameters
            setattr(module, key, nn.Parameter(new, requires_grad=old.requires_grad) if is_param else new)
        resized.append(name)
    return resized


def _resize_conv(module: nn.modules.conv._ConvNd, name: str, local: Mapping[str, torch.Tensor]) -> None:
    shape = local["weight"].shape  # (out, in / groups, *k), transposed: (in, out / groups, *k)
    depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
    if module.groups > 1 and not depthwise:
        raise ValueError(f"Cannot resize `{name}`: grouped convolutions other than depthwise are not supported.")
    out_channels, in_channels = (shape[1], shape[0]) if module.transposed else (shape[0], shape[1])
    if depthwise:
        in_channels = out_channels = module.groups = int(shape[1] if module.transposed else shape[0])
    module.out_channels, module.in_channels = int(out_channels), int(in_channels)


def _direct_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in [*module._parameters.items(), *module._buffers.items()] if v is not None and v.ndim > 0]


def _get(model: nn.Module, name: str, where: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(
            f"Cannot replay{where} the model has no module `{name}`. "
            "HINT: replay a history on the architecture (and root module) it was recorded on."
        ) from None


def _remove_block(model: nn.Module, name: str, where: str) -> None:
    if not name:
        raise ValueError(f"Cannot replay{where} the root module cannot be removed as a block.")
    module = _get(model, name, where)
    if isinstance(module, nn.Identity):
        raise ValueError(
            f"Cannot replay{where} block `{name}` is already an `nn.Identity`. "
            "HINT: replay a history on the model as it was before the history's first step."
        )
    parent_name, _, attr = name.rpartition(".")
    setattr(_get(model, parent_name, where), attr, nn.Identity())


def _check_width(record: Record, width: int | None, what: str, where: str) -> None:
    size, idxs = record.get("size"), record["idxs"]
    if size is not None and width is not None and int(width) != size:
        raise ValueError(f"Cannot replay{where} expected {size} {what} but got {width}.")
    if width is not None and any(not 0 <= i < width for i in idxs):
        raise ValueError(f"Cannot replay{where} index {max(idxs)} is out of range for {width} {what}.")


def _check_record(record: Mapping[str, Any]) -> Record:
    ok = (
        isinstance(record, Mapping)
        and isinstance(record.get("module"), str)
        and record.get("kind") in _KINDS
        and isinstance(record.get("idxs"), (list, tuple))
        and all(isinstance(i, int) for i in record["idxs"])
        and isinstance(record.get("size"), (int, type(None)))
        and isinstance(record.get("dim", -1), int)
        and (record.get("kind") != "block" or (not record["idxs"] and record.get("size") is None))
    )
    if not ok:
        raise ValueError(
            "Expected a pruning record {'module': str, 'kind': 'out' | 'in' | 'param' | 'block', 'idxs': list[int], "
            f"'size': int | None}} but got {record!r:.200}."
        )
    return {**record, "idxs": list(record["idxs"])}
