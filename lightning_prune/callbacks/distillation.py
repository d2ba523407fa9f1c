"""Knowledge distillation into any detector's training, without touching its ``training_step``."""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn
from typing_extensions import override

from lightning_prune.callbacks._modules import check_epoch_schedule
from lightning_prune.losses import fm_nms_loss, hinton_detection_loss
from lightning_prune.pruning.checkpoint import pruning_history
from lightning_prune.pruning.sparsity import penalty_at

LOSSES = ("fm_nms", "hinton")
_TEACHER_FILE = "distillation_teacher.pt"


class Distillation(pl.Callback):
    """Add ``weight · kd_loss(student, teacher)`` to the loss the module's own ``training_step`` returns.

    Lightning hooks cannot change a returned loss, so at ``setup`` the callback wraps the module's
    ``training_step`` (restored at ``teardown``): a forward hook captures the input and raw head output of the
    module's first forward call in the step, the teacher runs on the same input in eval mode without gradients
    (inside the step, so on the same device and under the same autocast), the two raw outputs are read with the
    module's ``adapter`` (:class:`~lightning_prune.adapters.HeadAdapter`, one per detector family) and the loss is
    added; ``train/kd_loss`` is logged on its own. The teacher is held by the callback: it is never DDP-wrapped,
    gets no gradients and is not part of the student's checkpoint (the callback state records its source).

    Teachers:

    - ``"self"``: a frozen copy of the student taken just before its first pruning step (refreshed at every epoch
      end while the student is unpruned), so the unpruned model teaches its pruned self within one ``fit``. Once the
      student is pruned the copy is saved next to the logs (``distillation_teacher.pt``) so that a resumed run gets
      it back; rebuilding it needs the module's saved hyperparameters (``save_hyperparameters()``).
    - a checkpoint path: a Lightning checkpoint of the module's own class, or of ``teacher_class`` (a class path,
      e.g. a larger model of the same family).

    Losses (:mod:`lightning_prune.losses`): ``"fm_nms"`` (Mehta & Ozturk 2018, ``lambda_d`` = 1 inside, the
    callback's ``weight`` outside) or ``"hinton"`` (``temperature``), or any callable
    ``(student_levels, teacher_levels) -> loss`` or ``-> (loss, parts)``.

    Args:
        teacher: ``"self"`` or a checkpoint path.
        teacher_class: class path of the teacher's LightningModule when it is not the student's class.
        loss: ``"fm_nms"``, ``"hinton"`` or a callable on lists of :class:`~lightning_prune.adapters.HeadLevel`.
        weight: the loss weight, >= 0.
        schedule: weight schedule, one of ``constant``, ``warmup``, ``linear``, ``cosine`` (as
            :class:`~lightning_prune.callbacks.SparsityRegularization`'s penalty).
        start_epoch: first epoch with distillation.
        stop_epoch: first epoch without it (``None``: never stops; required by ``linear``/``cosine``).
        warmup_epochs: epochs of the linear ramp of ``warmup``.
        temperature: Hinton's temperature, > 0.

    Raises:
        ValueError: an argument out of range or of the wrong type, or an unknown loss or schedule.
        MisconfigurationException: at ``setup``, the module has no ``adapter`` or the checkpoint does not exist; at
            ``fit`` start, ``teacher="self"`` on an already pruned module without its saved copy.

    Example:
        >>> Distillation(teacher="self", loss="fm_nms", weight=1.0, schedule="warmup", warmup_epochs=2).weight_at(1)
        0.5
    """

    def __init__(
        self,
        teacher: str = "self",
        teacher_class: str | None = None,
        loss: str | Callable[..., Any] = "fm_nms",
        weight: float = 1.0,
        schedule: str = "constant",
        start_epoch: int = 0,
        stop_epoch: int | None = None,
        warmup_epochs: int = 0,
        temperature: float = 4.0,
    ) -> None:
        super().__init__()
        if not isinstance(teacher, (str, Path)) or not str(teacher):
            raise ValueError(f"Expected argument `teacher` to be 'self' or a checkpoint path but got {teacher!r}.")
        if isinstance(loss, str) and loss not in LOSSES:
            raise ValueError(f"Expected argument `loss` to be one of {list(LOSSES)} or a callable but got {loss!r}.")
        if not (isinstance(loss, str) or callable(loss)):
            raise ValueError(f"Expected argument `loss` to be one of {list(LOSSES)} or a callable but got {loss!r}.")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ValueError(f"Expected argument `weight` to be a float >= 0 but got {weight!r}.")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature <= 0:
            raise ValueError(f"Expected argument `temperature` to be a float > 0 but got {temperature!r}.")
        check_epoch_schedule(schedule, start_epoch, stop_epoch, warmup_epochs)
        self.teacher_source = str(teacher)
        self.teacher_class = teacher_class
        self.loss, self.weight, self.temperature = loss, float(weight), float(temperature)
        self.schedule, self.start_epoch, self.stop_epoch = schedule, start_epoch, stop_epoch
        self.warmup_epochs = warmup_epochs
        self.teacher: nn.Module | None = None
        self.teacher_file: str | None = None  # where the "self" teacher was saved once the student got pruned
        self._original_step: Any = None
        self._hook: Any = None
        self._captured: tuple[Any, Any] | None = None
        self._capturing = False

    def weight_at(self, epoch: int) -> float:
        """The loss weight in ``epoch``."""
        return penalty_at(self.weight, self.schedule, epoch, 0.0, self.start_epoch, self.stop_epoch, self.warmup_epochs)

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not hasattr(getattr(pl_module, "adapter", None), "split"):
            raise MisconfigurationException(
                f"Expected {type(pl_module).__name__} to have an `adapter` attribute (a HeadAdapter that reads its raw "
                "head output) but it has none. HINT: set `self.adapter = YOLOv3Adapter(...)` (or your own "
                "HeadAdapter) in the module's __init__."
            )
        if self.teacher_source != "self" and not Path(self.teacher_source).is_file():
            raise MisconfigurationException(
                f"Expected argument `teacher` to be 'self' or an existing checkpoint but got {self.teacher_source!r}."
            )
        self._wrap(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.teacher is None:
            self.teacher = self._build_teacher(pl_module)
        self._freeze(pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.teacher_source == "self" and not len(pruning_history(pl_module)):
            self.teacher = _copy_module(pl_module)  # the latest unpruned weights: pruning may come next epoch
            self._freeze(pl_module)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.teacher_source == "self" and self.teacher_file is None and len(pruning_history(pl_module)):
            path = Path(trainer.log_dir or trainer.default_root_dir) / _TEACHER_FILE
            if trainer.is_global_zero and self.teacher is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"state_dict": self.teacher.state_dict()}, path)
            self.teacher_file = str(path.resolve())

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._original_step is not None:
            pl_module.__dict__.pop("training_step", None)  # the class's method again
            self._original_step = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher_source, "teacher_class": self.teacher_class, "teacher_file": self.teacher_file}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.teacher_file = state_dict.get("teacher_file")

    # ------------------------------------------------------------------ internals
    def _wrap(self, pl_module: pl.LightningModule) -> None:
        if self._original_step is not None:
            return
        original = pl_module.training_step

        def training_step(*args: Any, **kwargs: Any) -> Any:
            weight = self.weight_at(pl_module.current_epoch)
            if weight == 0 or self.teacher is None:
                return original(*args, **kwargs)
            self._captured, self._capturing = None, True
            try:
                out = original(*args, **kwargs)
            finally:
                self._capturing = False
            if self._captured is None:
                return out
            inputs, raw = self._captured
            self._captured = None
            kd = self._kd_loss(pl_module, inputs, raw)
            pl_module.log("train/kd_loss", kd.detach(), prog_bar=True, batch_size=_batch_size(inputs))
            if isinstance(out, dict):
                return {**out, "loss": out["loss"] + weight * kd}
            return out + weight * kd

        def capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if self._capturing and self._captured is None:
                self._captured = ((args, kwargs), output)

        self._original_step = original
        pl_module.training_step = training_step  # type: ignore[method-assign]
        self._hook = pl_module.register_forward_hook(capture, with_kwargs=True)

    def _kd_loss(
        self, pl_module: pl.LightningModule, inputs: tuple[tuple[Any, ...], dict[str, Any]], raw: Any
    ) -> torch.Tensor:
        assert self.teacher is not None
        args, kwargs = inputs
        with torch.no_grad():
            teacher_raw = self.teacher(*args, **kwargs)
        adapter = pl_module.adapter
        student = adapter.split([r.float() for r in raw])
        teacher = getattr(self.teacher, "adapter", adapter).split([r.float() for r in teacher_raw])
        if self.loss == "fm_nms":
            return fm_nms_loss(student, teacher)[0]
        if self.loss == "hinton":
            return hinton_detection_loss(student, teacher, self.temperature)
        result = self.loss(student, teacher)  # type: ignore[operator]
        return result[0] if isinstance(result, tuple) else result

    def _build_teacher(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.teacher_source != "self":
            cls = _import(self.teacher_class) if self.teacher_class else type(pl_module)
            teacher = cls.load_from_checkpoint(self.teacher_source, map_location="cpu", weights_only=True)
            rank_zero_info(f"Distillation: teacher {cls.__name__} from {self.teacher_source}")
            return teacher
        if not len(pruning_history(pl_module)):
            return _copy_module(pl_module)
        if self.teacher_file is None or not Path(self.teacher_file).is_file():
            raise MisconfigurationException(
                f"Expected teacher='self' to start from the unpruned {type(pl_module).__name__}, but it is already "
                f"pruned ({len(pruning_history(pl_module))} steps) and no saved copy of the unpruned model was found "
                f"({self.teacher_file}). HINT: pass the unpruned checkpoint as `teacher`."
            )
        if not getattr(pl_module, "hparams", None):
            raise MisconfigurationException(
                f"Expected {type(pl_module).__name__} to save its hyperparameters (to rebuild the unpruned teacher "
                "from its saved copy) but it has none. HINT: call `self.save_hyperparameters()` in __init__, or "
                f"pass the unpruned checkpoint as `teacher`."
            )
        teacher = type(pl_module)(**pl_module.hparams)
        teacher.load_state_dict(torch.load(self.teacher_file, map_location="cpu", weights_only=True)["state_dict"])
        return teacher

    def _freeze(self, pl_module: pl.LightningModule) -> None:
        assert self.teacher is not None
        self.teacher.to(pl_module.device).eval().requires_grad_(False)


def _copy_module(pl_module: pl.LightningModule) -> pl.LightningModule:
    """A deep copy of the module without its Trainer (and the callbacks' hooks on it)."""
    memo = {id(getattr(pl_module, "_trainer", None)): None}
    teacher = copy.deepcopy(pl_module, memo)
    teacher._forward_hooks.clear()
    teacher._forward_hooks_with_kwargs.clear()
    teacher.__dict__.pop("training_step", None)
    return teacher


def _import(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(
            f"Expected argument `teacher_class` to be an importable class path but got {class_path!r}."
        ) from err


def _batch_size(inputs: tuple[tuple[Any, ...], dict[str, Any]]) -> int | None:
    args, _ = inputs
    return int(args[0].shape[0]) if args and isinstance(args[0], torch.Tensor) and args[0].dim() else None
