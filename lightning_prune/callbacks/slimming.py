"""Network slimming's pruning step: one global threshold on BatchNorm |γ|, after sparsity training."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch_pruning as tp
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn
from typing_extensions import override

from lightning_prune.callbacks.pruning import StructuredPruning
from lightning_prune.pruning.sparsity import bn_groups


class NetworkSlimming(StructuredPruning):
    """Remove the channels whose BatchNorm |γ| is under one global threshold (Liu et al. 2017), at ``epochs``.

    The threshold is a ``percentile`` of all prunable |γ| or an absolute ``threshold``, and never exceeds the
    smallest per-layer max |γ| (so no layer would be emptied; SlimYOLOv3's rule). Channels coupled by residual adds
    are scored by the mean |γ| of their BatchNorms and removed jointly. Each layer keeps at least
    ``min_channels_ratio`` of its original channels. Train with
    :class:`~lightning_prune.callbacks.SparsityRegularization` first so that the γ of unneeded channels are near 0.

    Everything else (optimizer patching, DDP, checkpoints, logging, ``round_to``, ``ignored_layers``) is
    :class:`~lightning_prune.callbacks.StructuredPruning`'s. ``threshold_used`` holds the threshold of each step.

    Paper: Liu et al., "Learning Efficient Convolutional Networks through Network Slimming" (ICCV 2017),
    https://arxiv.org/abs/1708.06519

    Args:
        percentile: prune the channels under this percentile of all prunable |γ|, in (0, 100).
        threshold: or under this absolute |γ|, > 0.
        min_channels_ratio: fraction of its original channels every layer keeps, in (0, 1).
        epochs: epochs at whose start a step happens (each recomputes the threshold); default ``[0]``.
        fold_bias: fold the constant ``act(β)`` a removed channel still emitted into the layers that read it
            (:class:`~lightning_prune.callbacks.StructuredPruning`'s option, on by default here).
        **kwargs: ``calibration_batches``, ``round_to``, ``ignored_layers``, ``lr_scale``, ``submodule``,
            ``example_input`` of :class:`~lightning_prune.callbacks.StructuredPruning`.

    Raises:
        ValueError: not exactly one of ``percentile`` and ``threshold``, a value out of range, or a channel ratio or
            MACs/params target given as well.
        MisconfigurationException: at a step, an absolute ``threshold`` above every prunable |γ| (it would remove
            every channel; the per-layer cap would quietly turn it into the smallest per-layer max).

    Example:
        >>> NetworkSlimming(percentile=50).max_layer_ratio
        0.9
    """

    def __init__(
        self,
        percentile: float | None = None,
        threshold: float | None = None,
        min_channels_ratio: float = 0.1,
        epochs: list[int] | None = None,
        fold_bias: bool = True,
        **kwargs: Any,
    ) -> None:
        if (percentile is None) == (threshold is None):
            raise ValueError(
                f"Expected exactly one of `percentile` and `threshold` but got {percentile!r} and {threshold!r}."
            )
        if percentile is not None and not (_is_number(percentile) and 0 < percentile < 100):
            raise ValueError(f"Expected argument `percentile` to be a float in (0, 100) but got {percentile!r}.")
        if threshold is not None and not (_is_number(threshold) and threshold > 0):
            raise ValueError(f"Expected argument `threshold` to be a float > 0 but got {threshold!r}.")
        if not (_is_number(min_channels_ratio) and 0 < min_channels_ratio < 1):
            raise ValueError(
                f"Expected argument `min_channels_ratio` to be a float in (0, 1) but got {min_channels_ratio!r}."
            )
        targets = ("pruning_ratio", "target_macs_ratio", "target_params_ratio", "target_latency_ratio")
        given = {k: kwargs.pop(k) for k in targets if k in kwargs}
        for name, value in given.items():
            if value is not None:
                raise ValueError(
                    f"Expected argument `{name}` to be None for NetworkSlimming (the |γ| threshold decides how much "
                    f"to prune) but got {value!r}. HINT: use StructuredPruning(importance='bn_scale', {name}=...)."
                )
        epochs = [0] if epochs is None else epochs
        super().__init__(
            importance=tp.importance.BNScaleImportance(normalizer=None),  # raw mean |γ|: comparable to a threshold
            schedule="linear" if len(epochs) > 1 else "one_shot",
            epochs=epochs,
            max_layer_ratio=1.0 - float(min_channels_ratio),
            global_pruning=True,
            fold_bias=fold_bias,
            **kwargs,
        )
        self.percentile, self.threshold = percentile, threshold
        self.threshold_used: list[float] = []

    @override
    def step_ratio(self, pl_module: pl.LightningModule, target: nn.Module, example: Any) -> float:
        ignored = [target.get_submodule(n) for n in self._ignored_layers(pl_module, target, example)]
        groups = bn_groups(target, example, ignored)
        scores, layer_max = [], []
        for group in groups:
            size = 1 + max(max(root) for _, _, root in group)
            total, count = torch.zeros(size), torch.zeros(size)
            for name, local, root in group:
                gamma = target.get_submodule(name).weight.detach().abs().float().cpu()[local]
                total.index_add_(0, torch.tensor(root), gamma)
                count.index_add_(0, torch.tensor(root), torch.ones(len(root)))
                layer_max.append(float(gamma.max()))
            scores.append(total[count > 0] / count[count > 0])
        if not scores:
            return 0.0
        flat = torch.cat(scores)
        if self.threshold is not None and self.threshold > float(flat.max()):
            raise MisconfigurationException(
                f"Expected argument `threshold` ({self.threshold}) to leave some channels but every prunable |γ| is "
                f"under it (the largest is {float(flat.max()):.4g}). HINT: use `percentile`, or a threshold on the "
                "scale of the trained |γ| (logged as sparsity/gamma_below_* by SparsityRegularization)."
            )
        wanted = float(torch.quantile(flat, self.percentile / 100)) if self.percentile is not None else self.threshold
        threshold = min(float(wanted), min(layer_max))  # never above a layer's largest |γ|
        self.threshold_used.append(threshold)
        return float((flat < threshold).sum()) / flat.numel()


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
