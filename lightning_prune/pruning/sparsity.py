"""Sparsity regularization of BatchNorm scales (network slimming), on the channels pruning can really remove.

Liu et al., "Learning Efficient Convolutional Networks through Network Slimming" (ICCV 2017),
https://arxiv.org/abs/1708.06519: an L1 penalty ``λ·Σ|γ|`` on the BatchNorm scales drives the γ of unneeded
channels to zero, so that pruning them later changes little. The penalty's subgradient ``λ·sign(γ)`` is added to
the gradients just before the optimizer step.

Only BatchNorms whose channels can be removed are regularized: torch-pruning's dependency groups say which
(a group's channels are removed together; the prediction layers' groups are ignored). BatchNorms coupled in one
group (residual adds make a shortcut chain share its channels) can be regularized as a group (group lasso,
``λ·Σ_c ||γ_·,c||₂`` over the coupled BatchNorms), so that a channel of the chain becomes sparse in all of them
together.

This module imports no Trainer internals.

Example:
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    >>> groups = bn_groups(net, torch.zeros(1, 3, 8, 8), ignored_layers=[net[3]])
    >>> [[name for name, *_ in group] for group in groups]
    [['1']]
    >>> net[1].weight.grad = torch.zeros(4)
    >>> add_l1_subgradient(net, groups, penalty=0.1)
    >>> net[1].weight.grad
    tensor([0.1000, 0.1000, 0.1000, 0.1000])
"""

from __future__ import annotations

import math

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.pruner import function

from lightning_prune.pruning.tracing import restored, traceable

#: a group: ``(BatchNorm name, its channel indices, the group's channel index of each)`` per coupled BatchNorm
BNGroup = list[tuple[str, list[int], list[int]]]
SCHEDULES = ("constant", "warmup", "linear", "cosine")


def bn_groups(model: nn.Module, example_input: object, ignored_layers: list[nn.Module] | None = None) -> list[BNGroup]:
    """The BatchNorms of every prunable dependency group of ``model``, with their channels aligned to the group's.

    Args:
        model: the model (traced once with torch-pruning; its modes and flags are restored).
        example_input: an input to trace with.
        ignored_layers: layers whose output channels must stay (the prediction convs): their groups are skipped.
    """
    names = {id(m): n for n, m in model.named_modules()}
    groups: list[BNGroup] = []
    with restored(model, keep_grads=True), traceable(model):
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
        for group in graph.get_all_groups(
            ignored_layers=[m for layer in ignored_layers or [] for m in layer.modules()],
            root_module_types=[nn.modules.conv._ConvNd, nn.Linear],
        ):
            members = []
            for i, (dep, idxs) in enumerate(group):
                root = group[i].root_idxs
                if dep.handler != function.prune_batchnorm_out_channels or any(r is None for r in root):
                    continue
                if dep.target.module.affine:
                    members.append((names[id(dep.target.module)], list(map(int, idxs)), list(map(int, root))))
            if members:
                groups.append(members)
    return groups


class L1Subgradient:
    """:func:`add_l1_subgradient` for fixed groups, with the indexing worked out once (called every optimizer step).

    A group of one BatchNorm over all its channels (most groups) takes ``λ·sign(γ)`` directly, for L1 and group lasso
    alike (the norm over one BatchNorm is ``|γ|``); coupled or partial groups go through precomputed indices.
    Build it again after the model's structure changes.

    Args:
        model: the model the groups were found on.
        groups: from :func:`bn_groups`.
    """

    def __init__(self, model: nn.Module, groups: list[BNGroup]) -> None:
        self.whole: list[nn.Module] = []
        self.coupled: list[tuple[int, list[tuple[nn.Module, torch.Tensor, torch.Tensor]]]] = []
        for group in groups:
            layers = [(model.get_submodule(name), local, root) for name, local, root in group]
            bn, local, _ = layers[0]
            if len(layers) == 1 and local == list(range(bn.weight.numel())):
                self.whole.append(bn)
                continue
            device = bn.weight.device
            size = 1 + max(max(root) for _, _, root in layers)
            self.coupled.append(
                (size, [(m, _index(loc, m.weight), torch.as_tensor(r, device=device)) for m, loc, r in layers])
            )

    @torch.no_grad()
    def __call__(self, penalty: float, group_lasso: bool = False) -> None:
        if penalty == 0:
            return
        for bn in self.whole:
            _grad(bn.weight).add_(torch.sign(bn.weight), alpha=penalty)
        for size, layers in self.coupled:
            norms = None
            if group_lasso:
                squares = torch.zeros(size, device=layers[0][0].weight.device, dtype=torch.float32)
                for bn, local, root in layers:
                    squares.index_add_(0, root, bn.weight[local].float().square())
                norms = squares.sqrt()
            for bn, local, root in layers:
                gamma = bn.weight[local]
                if norms is None:
                    step = penalty * torch.sign(gamma)
                else:
                    norm = norms[root]
                    step = penalty * torch.where(norm > 0, gamma.float() / norm.clamp_min(1e-12), 0.0)
                grad = _grad(bn.weight)
                grad.index_add_(0, local, step.to(grad.dtype))


def add_l1_subgradient(model: nn.Module, groups: list[BNGroup], penalty: float, group_lasso: bool = False) -> None:
    """Add the penalty's subgradient to the γ gradients of the grouped BatchNorms, in place.

    L1: ``λ·sign(γ)`` per channel. Group lasso: ``λ·γ / ||γ_·,c||₂`` where the norm runs over the BatchNorms coupled
    on channel ``c`` of the group (0 where all of them are 0). A γ without a gradient gets one. Every optimizer step:
    build an :class:`L1Subgradient` once instead.
    """
    L1Subgradient(model, groups)(penalty, group_lasso)


def _grad(param: torch.Tensor) -> torch.Tensor:
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    return param.grad


def penalty_at(
    penalty: float,
    schedule: str,
    epoch: int,
    progress: float = 0.0,
    start_epoch: int = 0,
    stop_epoch: int | None = None,
    warmup_epochs: int = 0,
) -> float:
    """The penalty at ``epoch + progress`` (``progress`` in [0, 1) within the epoch): 0 outside ``[start, stop)``.

    ``constant``: ``penalty``. ``warmup``: linear ramp from 0 over ``warmup_epochs`` after ``start_epoch``, then
    constant. ``linear`` / ``cosine``: decay from ``penalty`` at ``start_epoch`` to 0 at ``stop_epoch`` (required).

    Example:
        >>> penalty_at(1e-3, "cosine", epoch=5, start_epoch=0, stop_epoch=10)
        0.0005
    """
    if epoch < start_epoch or (stop_epoch is not None and epoch >= stop_epoch):
        return 0.0
    t = epoch - start_epoch + progress
    if schedule == "constant":
        return penalty
    if schedule == "warmup":
        return penalty * min(1.0, t / warmup_epochs) if warmup_epochs > 0 else penalty
    if stop_epoch is None:
        raise ValueError(f"Expected argument `stop_epoch` to be set for schedule {schedule!r} but got None.")
    frac = min(1.0, t / max(stop_epoch - start_epoch, 1))
    if schedule == "linear":
        return penalty * (1.0 - frac)
    if schedule == "cosine":
        return round(penalty * 0.5 * (1.0 + math.cos(math.pi * frac)), 15)
    raise ValueError(f"Expected argument `schedule` to be one of {list(SCHEDULES)} but got {schedule!r}.")


def gamma_stats(model: nn.Module, groups: list[BNGroup]) -> tuple[torch.Tensor, dict[str, float]]:
    """All regularized |γ| as one tensor, and the share of them under 1e-2 and 1e-3."""
    values = [
        model.get_submodule(name).weight.detach()[local].abs().float().cpu() for g in groups for name, local, _ in g
    ]
    gammas = torch.cat(values) if values else torch.zeros(0)
    n = max(gammas.numel(), 1)
    return gammas, {
        "gamma_below_1e-2": float((gammas < 1e-2).sum()) / n,
        "gamma_below_1e-3": float((gammas < 1e-3).sum()) / n,
    }


def _index(idxs: list[int], like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(idxs, dtype=torch.long, device=like.device)
