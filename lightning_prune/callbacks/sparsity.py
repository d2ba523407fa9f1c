"""Sparsity regularization (network slimming) of any LightningModule during ``fit``."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.apply_func import move_data_to_device
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn
from typing_extensions import override

from lightning_prune.callbacks._modules import (
    adapter_output_layers,
    check_epoch_schedule,
    check_number,
    check_patterns_match,
    compile_pattern,
    example_from_shape,
    resolve_example,
    resolve_target,
)
from lightning_prune.pruning.checkpoint import pruning_history
from lightning_prune.pruning.sparsity import BNGroup, L1Subgradient, bn_groups, gamma_stats, penalty_at


class SparsityRegularization(pl.Callback):
    """Add ``λ·sign(γ)`` (or its group-lasso form) to the BatchNorm γ gradients before every optimizer step.

    At ``on_before_optimizer_step`` the gradients are final: all-reduced under DDP, unscaled under AMP, and
    accumulated over ``accumulate_grad_batches`` (the hook runs once per optimizer step). Only BatchNorms whose
    channels structured pruning can remove are regularized (see :mod:`lightning_prune.pruning.sparsity`); the
    groups are traced again after a :class:`~lightning_prune.callbacks.StructuredPruning` step changes the model.

    Logs each epoch ``sparsity/penalty``, ``sparsity/gamma_below_1e-2`` and ``sparsity/gamma_below_1e-3`` (shares of
    the regularized |γ|), and a histogram ``sparsity/gamma`` when the logger is TensorBoard.

    Paper: Liu et al., "Learning Efficient Convolutional Networks through Network Slimming" (ICCV 2017),
    https://arxiv.org/abs/1708.06519

    Args:
        penalty: λ, >= 0 (typical 1e-4 .. 1e-3).
        schedule: ``"constant"``, ``"warmup"`` (ramp over ``warmup_epochs``), ``"linear"`` or ``"cosine"`` decay to 0
            at ``stop_epoch``; evaluated per epoch.
        start_epoch: first regularized epoch.
        stop_epoch: first epoch no longer regularized (required by ``"linear"`` / ``"cosine"``).
        warmup_epochs: epochs of the ``"warmup"`` ramp.
        group_lasso: regularize BatchNorms coupled in a dependency group (shortcut chains) jointly per channel.
        ignored_layers: regexes of module names whose output channels must stay (their groups are not regularized);
            added to the module's adapter output layers.
        submodule: dotted name of the submodule to regularize; default the whole module.
        example_input: input to trace with (a tensor or a shape); default ``example_input_array``.

    Raises:
        ValueError: an argument is out of range or of the wrong type.
        MisconfigurationException: at ``setup``, a pattern matches no module, the module has no example input, or it
            has no BatchNorm that pruning could shrink.

    Example:
        >>> SparsityRegularization(penalty=1e-3, schedule="cosine", stop_epoch=10).penalty_at(5)
        0.0005
    """

    def __init__(
        self,
        penalty: float = 1e-4,
        schedule: str = "constant",
        start_epoch: int = 0,
        stop_epoch: int | None = None,
        warmup_epochs: int = 0,
        group_lasso: bool = False,
        ignored_layers: list[str] | None = None,
        submodule: str | None = None,
        example_input: Any = None,
    ) -> None:
        super().__init__()
        check_number("penalty", penalty, ">= 0")
        check_epoch_schedule(schedule, start_epoch, stop_epoch, warmup_epochs)
        self.penalty, self.schedule = float(penalty), schedule
        self.start_epoch, self.stop_epoch, self.warmup_epochs = start_epoch, stop_epoch, warmup_epochs
        self.group_lasso = bool(group_lasso)
        self.patterns = [compile_pattern(p, "ignored_layers") for p in ignored_layers or []]
        self.submodule = submodule
        self.example_input = example_from_shape(example_input)
        self.groups: list[BNGroup] = []
        self._subgradient: L1Subgradient | None = None
        self._traced_at = -1  # the number of pruning steps the groups were traced after
        self._last_step = -1

    def penalty_at(self, epoch: int) -> float:
        """λ in ``epoch``."""
        return penalty_at(
            self.penalty, self.schedule, epoch, 0.0, self.start_epoch, self.stop_epoch, self.warmup_epochs
        )

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        target = self._target(pl_module)
        check_patterns_match(target, "ignored_layers", self.patterns)
        if stage == "fit":
            self._trace(pl_module)
            if not self.groups:
                raise MisconfigurationException(
                    f"Expected {type(target).__name__} to have BatchNorms whose channels pruning can remove but it "
                    "has none: network slimming regularizes BatchNorm scales."
                )

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if trainer.global_step == self._last_step:  # several optimizers: once per step
            return
        self._last_step = trainer.global_step
        penalty = self.penalty_at(trainer.current_epoch)
        if penalty == 0:
            return
        self._current_groups(pl_module)  # traced again after a pruning step
        assert self._subgradient is not None
        self._subgradient(penalty, self.group_lasso)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        gammas, shares = gamma_stats(self._target(pl_module), self._current_groups(pl_module))
        pl_module.log("sparsity/penalty", self.penalty_at(trainer.current_epoch), on_epoch=True)
        for key, value in shares.items():
            pl_module.log(f"sparsity/{key}", value, on_epoch=True)
        experiment = getattr(trainer.logger, "experiment", None) if trainer.is_global_zero else None
        if hasattr(experiment, "add_histogram") and gammas.numel():
            experiment.add_histogram("sparsity/gamma", gammas, global_step=trainer.current_epoch)

    # ------------------------------------------------------------------ internals
    def _current_groups(self, pl_module: pl.LightningModule) -> list[BNGroup]:
        """The groups, traced again if a pruning step changed the model since."""
        if len(pruning_history(pl_module)) != self._traced_at:
            self._trace(pl_module)
        return self.groups

    def _trace(self, pl_module: pl.LightningModule) -> None:
        target = self._target(pl_module)
        ignored = [m for n, m in target.named_modules() if any(p.fullmatch(n) for p in self.patterns)]
        ignored += [target.get_submodule(n) for n in adapter_output_layers(target) or []]
        example = resolve_example(
            self.example_input, pl_module, target, "SparsityRegularization", "find the prunable BatchNorms"
        )
        device = next(target.parameters()).device
        self.groups = bn_groups(target, move_data_to_device(example, device), ignored)
        self._subgradient = L1Subgradient(target, self.groups)
        self._traced_at = len(pruning_history(pl_module))

    def _target(self, pl_module: pl.LightningModule) -> nn.Module:
        return resolve_target(pl_module, self.submodule)
