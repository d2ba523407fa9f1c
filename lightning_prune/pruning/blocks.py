"""Remove whole residual blocks: the layer-pruning step of YOLOv3 slimming pipelines.

A module whose forward is ``x + f(x)`` can be removed exactly: replacing it by ``nn.Identity()`` gives the function
the model had with the branch ``f`` zeroed. After network slimming (Liu et al., https://arxiv.org/abs/1708.06519) has
driven the BatchNorm scales of a branch towards zero, removing it changes little; ranking shortcut blocks by the mean
|γ| of their BatchNorms is the layer pruning of tanluren/yolov3-channel-and-layer-pruning.

- :func:`find_residual_blocks` finds the blocks on the autograd graph of one forward, with no knowledge of the
  architecture;
- :func:`block_scores` ranks them (``"bn_scale"``, ``"last_bn"`` or a callable ``(name, module) -> float``);
- :func:`select_blocks` takes the lowest scores;
- :func:`remove_blocks` replaces them by ``nn.Identity()`` and returns one ``"block"`` record each
  (:mod:`lightning_prune.pruning.history`), so that the removal replays on a fresh model.

Torch-pruning's dependency graph builds on the model afterwards, and channel pruning goes on as before: where a block
fed a concatenation (YOLOv8's C2f concatenates every bottleneck's output), the concatenation now reads its input
twice, which torch-pruning maps to the same channels.

Example:
    >>> import torch
    >>> class Block(nn.Module):
    ...     def __init__(self) -> None:
    ...         super().__init__()
    ...         self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
    ...     def forward(self, x: torch.Tensor) -> torch.Tensor:
    ...         return x + self.bn(self.conv(x))
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 1), Block(), Block(), nn.Conv2d(4, 2, 1))
    >>> _ = nn.init.constant_(net[2].bn.weight, 0.1)  # a slimmed branch
    >>> blocks = find_residual_blocks(net, torch.zeros(1, 3, 8, 8))
    >>> blocks
    ['1', '2']
    >>> select_blocks(block_scores(net, blocks, "bn_scale"), 1)
    ['2']
    >>> remove_blocks(net, ["2"])
    [{'module': '2', 'kind': 'block', 'idxs': [], 'size': None}]
    >>> net[2]
    Identity()
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_prune.pruning.history import Record, apply_records
from lightning_prune.pruning.tracing import restored

BlockImportance = Callable[[str, nn.Module], float]


def find_residual_blocks(model: nn.Module, example_input: Any, ignored_layers: Sequence[str] = ()) -> list[str]:
    """The qualified names of the modules of ``model`` whose forward is ``x + f(x)``, in ``named_modules`` order.

    One forward in eval mode (the modes are given back), with a copy of the example input that requires grad. A module
    is a residual block when, at every call, it takes one tensor and returns a tensor of the same shape whose
    ``grad_fn`` is an addition reading the input itself (its ``grad_fn``, or its ``AccumulateGrad`` for the example
    input), and it holds at least one parameter. So a block that ends in an activation after the add (ResNet's) is not
    one: replacing it by ``nn.Identity()`` would not be exact.

    A wrapper whose output *is* a block's addition (a ``Sequential`` holding just that block) is the same block: only
    the innermost module is kept. A block nested in another found block is left out (removing the outer removes it).

    Args:
        model: the model; not changed.
        example_input: a tensor (``model(x)``), a tuple or list (``model(*x)``) or a mapping (``model(**x)``).
        ignored_layers: qualified module names to keep: a block that is, contains or lies inside one is not returned.

    Raises:
        ValueError: an ignored layer is not a module of ``model``.
    """
    modules = dict(model.named_modules())
    unknown = [name for name in ignored_layers if name not in modules]
    if unknown:
        raise ValueError(f"Expected `ignored_layers` to name modules of the model but got {unknown}.")
    owner = {m: name for name, m in modules.items()}  # `named_modules` names a shared module once
    pending: dict[nn.Module, list[Any]] = {}  # per module, a stack of input `grad_fn`s (False: not one tensor)
    adds: dict[str, list[Any]] = {}  # per module name, the addition node of each call (None: not residual)

    def before(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        one_tensor = len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor)
        # the input's node is read before the forward: an in-place op on the input would replace it
        pending.setdefault(module, []).append(args[0].grad_fn if one_tensor else False)

    def after(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        node = pending[module].pop()
        adds.setdefault(owner[module], []).append(None if node is False else _residual_add(args[0], node, output))

    hooks = [
        h
        for m in owner
        for h in (
            m.register_forward_pre_hook(before, with_kwargs=True),
            m.register_forward_hook(after, with_kwargs=True),
        )
    ]
    try:
        with restored(model, keep_grads=True), torch.enable_grad():
            model.eval()
            _call(model, _requiring_grad(example_input))
    finally:
        for h in hooks:
            h.remove()
    found = {
        name: set(nodes)
        for name, nodes in adds.items()
        if all(n is not None for n in nodes) and any(True for _ in modules[name].parameters())
    }
    found = {name: nodes for name, nodes in found.items() if not any(_overlaps(name, ig) for ig in ignored_layers)}
    # a wrapper sharing its addition with a block inside it is that block
    found = {
        name: nodes
        for name, nodes in found.items()
        if not any(_inside(inner, name) and nodes & other for inner, other in found.items())
    }
    names = [name for name in modules if name in found]
    return [name for name in names if not any(_inside(name, outer) for outer in names)]


def block_scores(
    model: nn.Module, names: Iterable[str], criterion: str | BlockImportance = "bn_scale"
) -> dict[str, float]:
    """Score blocks for removal: lower scores are removed first.

    Args:
        model: the model.
        names: qualified names of the blocks (usually :func:`find_residual_blocks`).
        criterion: ``"bn_scale"`` (mean |γ| over every BatchNorm channel in the block: network slimming,
            https://arxiv.org/abs/1708.06519, applied to shortcut blocks), ``"last_bn"`` (mean |γ| of the block's last
            BatchNorm in ``named_modules`` order, the one scaling the branch's output) or a callable
            ``(name, module) -> float``.

    Returns:
        ``{name: score}`` in the order of ``names``.

    Raises:
        ValueError: ``criterion`` is unknown, a name is not a module of ``model``, or a block has no BatchNorm with
            learnable γ under a BatchNorm criterion.
    """
    score = resolve_block_importance(criterion)
    scores = {}
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"Expected block names of modules of the model but got `{name}`.") from None
        scores[name] = float(score(name, module))
    return scores


def select_blocks(scores: Mapping[str, float], n: int) -> list[str]:
    """The ``n`` blocks with the lowest scores, lowest first (ties in the order of ``scores``).

    Raises:
        ValueError: ``n`` is not an int between 0 and the number of blocks.
    """
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(scores):
        raise ValueError(
            f"Expected argument `remove_blocks` to be an int between 0 and the {len(scores)} residual blocks found "
            f"but got {n!r}."
        )
    return sorted(scores, key=scores.__getitem__)[:n]  # a stable sort: ties stay in module order


def remove_blocks(model: nn.Module, names: Iterable[str]) -> list[Record]:
    """Replace each named block by ``nn.Identity()`` in place: the model's function with the blocks' branches zeroed.

    Exact only for modules whose forward is ``x + f(x)`` (what :func:`find_residual_blocks` returns). Every name is
    checked before any block is removed.

    Returns:
        One history record per block, ``{"module": name, "kind": "block", "idxs": [], "size": None}``, for
        :class:`~lightning_prune.pruning.history.PruningHistory`.

    Raises:
        ValueError: a name is the root, not a module of ``model``, already an ``nn.Identity``, repeated, or inside
            another named block.
    """
    names = list(names)
    for name in names:
        if not name:
            raise ValueError("Expected the names of blocks to remove but got `''`: the root module cannot be removed.")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"Expected the names of blocks to remove but got `{name}`: not a module of the model."
            ) from None
        if isinstance(module, nn.Identity):
            raise ValueError(f"Expected the names of blocks to remove but got `{name}`: already an `nn.Identity`.")
    for name in names:
        if names.count(name) > 1 or any(_inside(name, other) for other in names):
            raise ValueError(
                f"Expected distinct, non-nested blocks to remove but got `{name}` twice or inside another."
            )
    records: list[Record] = [{"module": name, "kind": "block", "idxs": [], "size": None} for name in names]
    apply_records(model, records)
    return records


def resolve_block_importance(criterion: str | BlockImportance) -> BlockImportance:
    """The scoring function a criterion name stands for, or a callable passed through.

    Raises:
        ValueError: ``criterion`` is neither one of ``BLOCK_IMPORTANCES`` nor callable.
    """
    if callable(criterion):
        return criterion
    if isinstance(criterion, str) and criterion in BLOCK_IMPORTANCES:
        return BLOCK_IMPORTANCES[criterion]
    raise ValueError(
        f"Expected argument `block_importance` to be one of {sorted(BLOCK_IMPORTANCES)} or a callable but got "
        f"{criterion!r}."
    )


def _bn_scale(name: str, module: nn.Module) -> float:
    return float(torch.cat([bn.weight.detach().abs().flatten() for bn in _batch_norms(name, module)]).mean())


def _last_bn(name: str, module: nn.Module) -> float:
    return float(_batch_norms(name, module)[-1].weight.detach().abs().mean())


BLOCK_IMPORTANCES: dict[str, BlockImportance] = {"bn_scale": _bn_scale, "last_bn": _last_bn}


def _batch_norms(name: str, module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None]
    if not bns:
        raise ValueError(
            f"Expected block `{name}` ({type(module).__name__}) to hold a BatchNorm with learnable γ but found none. "
            "HINT: pass a callable `block_importance`."
        )
    return bns


def _residual_add(x: torch.Tensor, node: Any, output: Any) -> Any:
    """The addition node of ``output`` if it adds ``x`` (whose ``grad_fn`` was ``node`` at the call), else None."""
    if not isinstance(output, torch.Tensor) or output.shape != x.shape or output.grad_fn is None:
        return None
    add = output.grad_fn
    if type(add).__name__ != "AddBackward0":
        return None
    for fn, _ in add.next_functions:
        if fn is not None and (fn is node if node is not None else getattr(fn, "variable", None) is x):
            return add
    return None


def _requiring_grad(example: Any) -> Any:
    if isinstance(example, torch.Tensor):
        return example.detach().clone().requires_grad_(example.is_floating_point() or example.is_complex())
    if isinstance(example, Mapping):
        return {k: _requiring_grad(v) for k, v in example.items()}
    if isinstance(example, (tuple, list)):
        return type(example)(_requiring_grad(v) for v in example)
    return example


def _call(model: nn.Module, example: Any) -> Any:
    if isinstance(example, Mapping):
        return model(**example)
    if isinstance(example, (tuple, list)):
        return model(*example)
    return model(example)


def _inside(name: str, outer: str) -> bool:
    return name != outer and (outer == "" or name.startswith(f"{outer}."))


def _overlaps(name: str, other: str) -> bool:
    return name == other or _inside(name, other) or _inside(other, name)
