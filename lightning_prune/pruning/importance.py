"""Channel importance criteria by name: the strategies that rank channels for structured pruning.

Each name maps to a builder of a torch-pruning :class:`~torch_pruning.pruner.importance.Importance`; an instance is
passed through unchanged, so any torch-pruning criterion (or your own subclass) plugs in.

================  ======================================================================================
name              criterion
================  ======================================================================================
``l1``, ``l2``    group weight magnitude, p = 1 / 2 (Li et al., https://arxiv.org/abs/1608.08710)
``bn_scale``      |γ| of the batch-norm layers (network slimming, https://arxiv.org/abs/1708.06519)
``lamp``          layer-adaptive magnitude (Lee et al., https://arxiv.org/abs/2010.07611)
``fpgm``          distance to the geometric median (He et al., https://arxiv.org/abs/1811.00250)
``random``        uniform random scores (a baseline)
``taylor``        first-order Taylor |w · ∂L/∂w| (Molchanov et al., https://arxiv.org/abs/1906.10771), with the
                  loss gradients summed over calibration batches
``hessian``       second-order, Optimal Brain Damage ½ w² H_ww (LeCun et al., NeurIPS 1989), the Hessian diagonal
                  approximated by the empirical Fisher: the mean over calibration batches of squared gradients
``activation``    mean |activation| of a channel where the next layers read it (Polyak & Wolf 2015), over
                  calibration batches
``apoz``          1 − APoZ, the share of a channel's activations that are positive where the next layers read it
                  (Hu et al., https://arxiv.org/abs/1607.03250), over calibration batches
================  ======================================================================================

The last four are *data-dependent*: :func:`needs_calibration` says so, and
:class:`~lightning_prune.pruning.calibration.Calibration` gathers what they read over a few batches.

Example:
    >>> type(resolve_importance("l2")).__name__
    'GroupMagnitudeImportance'
    >>> resolve_importance("l2").p
    2
    >>> resolve_importance("apoz").statistic
    'apoz'
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.pruner import function
from torch_pruning.pruner.importance import Importance

STATISTICS = ("mean", "apoz")
# torch-pruning functions that prune the *input* channels of a layer: where an activation is read
_READERS = (
    function.prune_conv_in_channels,
    function.prune_linear_in_channels,
    function.prune_depthwise_conv_in_channels,
    function.prune_depthwise_conv_out_channels,  # a depthwise conv's channel c reads input channel c
)


class ActivationImportance(tp.importance.GroupMagnitudeImportance):
    """Score channels by the activations that the next layers read from them, gathered over calibration batches.

    Forward pre-hooks on every conv and linear record, per *input* channel, the mean of ``|x|`` (``"mean"``) or the
    share of positive values (``"apoz"``: 1 − APoZ, the average percentage of zeros after a ReLU; for SiLU and
    leaky ReLUs the same sign split). A channel's score is the mean over the layers that read it, so channels
    concatenated into several consumers are scored where they are used. Statistics are kept by module name, so
    the scores also apply to a deep copy of the calibrated model (the dry runs of a MACs target).

    Args:
        statistic: ``"mean"`` or ``"apoz"``.
        group_reduction: how a channel's scores from several readers combine (torch-pruning's choices).
        normalizer: how a group's scores are normalized before global ranking (torch-pruning's choices).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))
        >>> importance = ActivationImportance()
        >>> with importance.recording(net):
        ...     _ = net(torch.randn(2, 3, 8, 8))
        >>> importance.scores["2"].shape  # per input channel of the layer named "2"
        torch.Size([4])
    """

    def __init__(self, statistic: str = "mean", group_reduction: str = "mean", normalizer: str | None = "mean") -> None:
        if statistic not in STATISTICS:
            raise ValueError(f"Expected argument `statistic` to be one of {list(STATISTICS)} but got {statistic!r}.")
        super().__init__(
            p=1,
            group_reduction=group_reduction,
            normalizer=normalizer,
            target_types=[nn.modules.conv._ConvNd, nn.Linear],
        )
        self.statistic = statistic
        self.scores: dict[str, torch.Tensor] = {}  # module name -> per input channel statistic
        self.batches = 0
        self._names: dict[int, str] = {}

    def bind(self, model: nn.Module) -> None:
        """Read the scores of ``model``'s layers by their names in ``model`` (the calibrated model or a copy)."""
        self._names = {id(m): name for name, m in model.named_modules()}

    @contextmanager
    def recording(self, model: nn.Module) -> Iterator[None]:
        """Record the statistic over every forward of ``model`` inside the block (previous scores are dropped)."""
        self.bind(model)
        sums: dict[str, torch.Tensor] = {}
        calls: dict[str, int] = {}

        def hook(name: str) -> Callable[..., None]:
            @torch.no_grad()
            def record(module: nn.Module, inputs: tuple[Any, ...]) -> None:
                x = inputs[0].detach().float()
                dim = 1 if isinstance(module, nn.modules.conv._ConvNd) else x.dim() - 1
                x = x.movedim(dim, 0).flatten(1)
                value = x.abs().mean(1) if self.statistic == "mean" else (x > 0).float().mean(1)
                sums[name] = sums[name] + value if name in sums else value
                calls[name] = calls.get(name, 0) + 1

            return record

        handles = [
            m.register_forward_pre_hook(hook(name))
            for name, m in model.named_modules()
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self.scores = {name: total / calls[name] for name, total in sums.items()}
            self.batches = max(calls.values(), default=0)

    @torch.no_grad()
    def __call__(self, group: tp.Group) -> torch.Tensor | None:
        group_imp, group_idxs = [], []
        for i, (dep, idxs) in enumerate(group):
            layer = dep.target.module
            if dep.handler not in _READERS or not isinstance(layer, tuple(self.target_types)):
                continue
            scores = self.scores.get(self._names.get(id(layer), ""))
            if scores is None or len(scores) <= max(idxs, default=0):
                continue
            group_imp.append(scores[sorted(idxs)])
            group_idxs.append(group[i].root_idxs)
        if not group_imp:
            return None
        return self._normalize(self._reduce(group_imp, group_idxs), self.normalizer)


IMPORTANCES: dict[str, Callable[[], Importance]] = {
    "activation": ActivationImportance,
    "apoz": lambda: ActivationImportance("apoz"),
    "bn_scale": tp.importance.BNScaleImportance,
    "fpgm": tp.importance.FPGMImportance,
    "hessian": tp.importance.GroupHessianImportance,
    "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
    "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    "lamp": tp.importance.LAMPImportance,
    "random": tp.importance.RandomImportance,
    "taylor": tp.importance.GroupTaylorImportance,
}


def resolve_importance(importance: str | Importance) -> Importance:
    """Build a registered criterion by name, or pass an ``Importance`` instance through.

    Args:
        importance: one of ``IMPORTANCES`` or a torch-pruning ``Importance``.

    Raises:
        ValueError: ``importance`` is neither a registered name nor an ``Importance``.
    """
    if isinstance(importance, Importance):
        return importance
    if isinstance(importance, str) and importance in IMPORTANCES:
        return IMPORTANCES[importance]()
    raise ValueError(
        f"Expected argument `importance` to be one of {sorted(IMPORTANCES)} or a torch_pruning Importance but got "
        f"{importance!r}."
    )


def needs_gradients(importance: Importance) -> bool:
    """Whether ``importance`` reads ``.grad`` of the weights (Taylor and Hessian criteria)."""
    return isinstance(importance, (tp.importance.GroupTaylorImportance, tp.importance.GroupHessianImportance))


def needs_calibration(importance: Importance) -> bool:
    """Whether ``importance`` needs statistics from a few batches of data before it can score."""
    return needs_gradients(importance) or isinstance(importance, ActivationImportance)
