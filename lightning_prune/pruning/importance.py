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
``taylor``        first-order Taylor |w · ∂L/∂w| (Molchanov et al., https://arxiv.org/abs/1906.10771);
                  needs gradients of the training loss on the weights when the pruner runs
================  ======================================================================================

Example:
    >>> type(resolve_importance("l2")).__name__
    'GroupMagnitudeImportance'
    >>> resolve_importance("l2").p
    2
"""

from __future__ import annotations

from collections.abc import Callable

import torch_pruning as tp
from torch_pruning.pruner.importance import Importance

IMPORTANCES: dict[str, Callable[[], Importance]] = {
    "bn_scale": tp.importance.BNScaleImportance,
    "fpgm": tp.importance.FPGMImportance,
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
