"""Fine-grained (unstructured) magnitude pruning of any LightningModule during ``fit``, on a schedule of epochs."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_prune.callbacks._modules import (
    adapter_output_layers,
    check_epochs,
    check_patterns_match,
    compile_pattern,
    is_int,
    resolve_target,
)
from lightning_prune.pruning.masks import (
    add_mask_buffers,
    apply_masks,
    format_storage,
    magnitude_masks,
    make_permanent,
    mask_gradients,
    mask_optimizer_state,
    masked_parameters,
    prunable_parameters,
    reapply_masks,
    storage_report,
)
from lightning_prune.pruning.schedules import Schedule, build_schedule


class UnstructuredPruning(pl.Callback):
    """Zero the smallest-magnitude single weights of conv and linear layers at the start of scheduled epochs.

    Each step raises the sparsity of the selected weights to the schedule's next value: exactly ``round(s · n)`` of
    their ``n`` entries are zero, ranked by ``|w|`` across all layers (``global_pruning``) or within each layer, and a
    pruned weight stays pruned. Masks are boolean ``<param>_mask`` buffers beside unchanged parameters (see
    :mod:`lightning_prune.pruning.masks` for why not ``torch.nn.utils.prune``). The zeros are kept through training:
    gradients are masked before every optimizer step (after DDP's all-reduce and AMP's unscale, before clipping), the
    optimizer state at pruned entries is zeroed at each step (SGD and Adam(W) then leave them at zero) and the weights
    are masked again after every batch, for any optimizer.

    Masks are in the module's state dict: ``fit(ckpt_path=...)`` resumes them (the callback creates the buffers before
    the strict load) and ``load_from_checkpoint`` rebuilds them for modules with
    :class:`~lightning_prune.pruning.checkpoint.PrunableMixin`; the callback's state holds only the schedule position.
    Under DDP every rank computes the same masks from its identical weights (ties broken by position), no broadcast.

    The model does not get faster on dense kernels. At fit end the callback prints what its weights would take in a
    sparse encoding (:func:`~lightning_prune.pruning.masks.storage_report`), to compare with structural pruning.

    Paper: Zhu & Gupta, "To prune, or not to prune: exploring the efficacy of pruning for model compression" (2017),
    https://arxiv.org/abs/1710.01878

    Args:
        amount: fraction of the selected weights that are zero after the last step, in (0, 1).
        global_pruning: one magnitude threshold across all selected layers (as Lightning's
            ``ModelPruning(use_global_unstructured=True)``), or the same sparsity in every layer.
        schedule: ``"one_shot"``, ``"linear"``, ``"cubic"``, ``"geometric"`` (or a callable): cumulative sparsity
            after each step (:mod:`lightning_prune.pruning.schedules`).
        epochs: epochs at whose start a step happens, strictly increasing; default ``[0]`` (one-shot only).
        every_n_epochs: instead of ``epochs``, a step every this many epochs from epoch 0, ``steps`` of them.
        steps: the number of steps with ``every_n_epochs``.
        parameter_names: which parameters of each conv/linear layer are pruned; default ``["weight"]``. Frozen
            parameters never are.
        ignored_layers: regexes fully matching module names (of the pruned module) never pruned, with the layers
            inside them; added to the module's adapter output layers.
        permanent_at_end: remove the masks at the end of ``fit`` (the weights keep their zeros), so that what is
            saved or exported afterwards is a plain model. Checkpoints written during ``fit`` keep their masks.
        submodule: dotted name of the submodule to prune; default the whole module.

    Raises:
        ValueError: an argument is out of range or of the wrong type.
        MisconfigurationException: at ``setup``, an ``ignored_layers`` pattern matches no module, ``submodule`` names
            none, or a name of ``parameter_names`` is no trainable parameter of any layer left to prune.

    Example:
        >>> callback = UnstructuredPruning(amount=0.8, schedule="cubic", every_n_epochs=2, steps=3)
        >>> callback.epochs, [round(s, 3) for s in callback.sparsities]
        ([0, 2, 4], [0.563, 0.77, 0.8])
    """

    def __init__(
        self,
        amount: float = 0.5,
        global_pruning: bool = True,
        schedule: str | Schedule = "one_shot",
        epochs: list[int] | None = None,
        every_n_epochs: int | None = None,
        steps: int | None = None,
        parameter_names: list[str] | None = None,
        ignored_layers: list[str] | None = None,
        permanent_at_end: bool = True,
        submodule: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0.0 < amount < 1.0:
            raise ValueError(f"Expected argument `amount` to be a float in (0, 1) but got {amount!r}.")
        self.epochs = _resolve_epochs(schedule, epochs, every_n_epochs, steps)
        #: cumulative sparsity of the selected weights after each step
        self.sparsities = build_schedule(schedule, float(amount), len(self.epochs))
        names = ["weight"] if parameter_names is None else parameter_names
        if not (isinstance(names, (list, tuple)) and names and all(isinstance(n, str) and n for n in names)):
            raise ValueError(
                f"Expected argument `parameter_names` to be a non-empty list of parameter names but got {names!r}."
            )
        self.parameter_names = list(names)
        self.patterns = [compile_pattern(p, "ignored_layers") for p in ignored_layers or []]
        self.global_pruning = bool(global_pruning)
        self.permanent_at_end = bool(permanent_at_end)
        self.submodule = submodule
        self.steps_done = 0
        self._hook: RemovableHandle | None = None

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        target = self._target(pl_module)
        check_patterns_match(target, "ignored_layers", self.patterns)
        self.pruned_parameters(target)
        if self._hook is None:  # a resumed checkpoint's masks need their buffers before the strict load that follows
            self._hook = pl_module.register_load_state_dict_pre_hook(_add_mask_buffers)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        while self.steps_done < len(self.epochs) and trainer.current_epoch >= self.epochs[self.steps_done]:
            self.prune_step(trainer, pl_module)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        mask_gradients(self._target(pl_module))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        reapply_masks(self._target(pl_module))

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        target = self._target(pl_module)
        if trainer.is_global_zero:
            rank_zero_info(
                f"UnstructuredPruning: {format_storage(storage_report(target))}; dense kernels run no faster."
            )
        if self.permanent_at_end:
            make_permanent(target)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps_done = int(state_dict.get("steps_done", 0))

    # ------------------------------------------------------------------ pruning
    def prune_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Raise the sparsity to the schedule's next value (every rank alike), and zero the optimizer state there."""
        target = self._target(pl_module)
        params = self.pruned_parameters(target)
        before = _sparsity(params)
        current = {name: mask for name, _, mask in masked_parameters(target)}
        masks = magnitude_masks(params, self.sparsities[self.steps_done], self.global_pruning, current)
        apply_masks(target, masks)
        for optimizer in trainer.optimizers:
            mask_optimizer_state(optimizer, target)
        self.steps_done += 1
        after = _sparsity(params)
        if not trainer.is_global_zero:
            return
        emptied = [name for name, mask in masks.items() if not mask.any()]
        if emptied:
            rank_zero_warn(
                f"UnstructuredPruning zeroed every entry of {len(emptied)} tensors ({', '.join(emptied[:3])}"
                f"{', ...' if len(emptied) > 3 else ''}): one global threshold empties layers whose weights are small. "
                "HINT: `global_pruning=False`, or name them in `ignored_layers`."
            )
        if trainer.logger is not None:
            trainer.logger.log_metrics({"unstructured/sparsity": after}, step=trainer.global_step)
        rank_zero_info(
            f"UnstructuredPruning step {self.steps_done}/{len(self.epochs)} at epoch {trainer.current_epoch}: "
            f"sparsity {before:.3f} → {after:.3f} of {sum(p.numel() for p in params.values()) / 1e6:.3f}M weights in "
            f"{len(params)} tensors ({'one global threshold' if self.global_pruning else 'per layer'})"
        )

    def pruned_parameters(self, target: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters pruned: ``parameter_names`` of the conv/linear layers neither ignored nor adapter outputs.

        Raises:
            MisconfigurationException: a name of ``parameter_names`` is no trainable parameter of those layers.
        """
        skip = [n for n, _ in target.named_modules() if any(p.fullmatch(n) for p in self.patterns)]
        params = prunable_parameters(target, self.parameter_names, skip + (adapter_output_layers(target) or []))
        for name in self.parameter_names:
            if not any(key.rpartition(".")[2] == name for key in params):
                raise MisconfigurationException(
                    f"Expected every name of `parameter_names` to be a trainable parameter of a conv or linear layer "
                    f"left to prune but {name!r} is none. HINT: check `ignored_layers` and that the layers are "
                    "not frozen."
                )
        return params

    def _target(self, pl_module: pl.LightningModule) -> nn.Module:
        return resolve_target(pl_module, self.submodule)


def _add_mask_buffers(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    add_mask_buffers(module, state_dict, prefix)


def _sparsity(params: dict[str, nn.Parameter]) -> float:
    numel = sum(p.numel() for p in params.values())
    return 1.0 - sum(int(torch.count_nonzero(p)) for p in params.values()) / max(numel, 1)


def _resolve_epochs(schedule: Any, epochs: Any, every_n_epochs: Any, steps: Any) -> list[int]:
    """The epochs of the steps, from ``epochs`` or from ``every_n_epochs`` and ``steps``."""
    if every_n_epochs is not None or steps is not None:
        if epochs is not None:
            raise ValueError(
                f"Expected either argument `epochs` or `every_n_epochs` with `steps` but got epochs={epochs!r}, "
                f"every_n_epochs={every_n_epochs!r}, steps={steps!r}."
            )
        for name, value in (("every_n_epochs", every_n_epochs), ("steps", steps)):
            if not (is_int(value) and value >= 1):
                raise ValueError(f"Expected argument `{name}` to be an int >= 1 but got {value!r}.")
        return [i * every_n_epochs for i in range(steps)]
    if epochs is None:
        if schedule != "one_shot":
            raise ValueError(
                f"Expected argument `epochs` (or `every_n_epochs` and `steps`) to be given for schedule {schedule!r}."
            )
        return [0]
    return check_epochs(epochs)
