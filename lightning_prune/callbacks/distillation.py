"""Knowledge distillation into any detector's training, without touching its ``training_step``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn
from typing_extensions import override

from lightning_prune.callbacks._features import FEATURE_LOSSES, FeatureImitation, resolve_features
from lightning_prune.callbacks._modules import check_epoch_schedule, check_number, copy_module
from lightning_prune.losses import FeatureAdapter, fm_nms_loss, hinton_detection_loss
from lightning_prune.pruning.checkpoint import import_class, pruning_history
from lightning_prune.pruning.sparsity import penalty_at

LOSSES = ("fm_nms", "hinton")
_TEACHER_FILE = "distillation_teacher.pt"


class Distillation(pl.Callback):
    """Add ``weight · kd_loss + feature_weight · feature_loss`` to the loss the module's own ``training_step`` returns.

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

    Losses on the head (:mod:`lightning_prune.losses`): ``"fm_nms"`` (Mehta & Ozturk 2018, ``lambda_d`` = 1 inside,
    the callback's ``weight`` outside), ``"hinton"`` (``temperature``), any callable
    ``(student_levels, teacher_levels) -> loss`` or ``-> (loss, parts)``, or ``None`` (features only).

    Feature imitation (``features``): forward hooks capture the outputs of the named student layers (neck levels,
    e.g. ``["neck.set3", "neck.set4"]`` of YOLOv3, ``["neck.td3", "neck.bu4"]`` of YOLOv8) and of the teacher's
    layers they map to (same names by default; each at the student layer's spatial size). A 1×1
    :class:`~lightning_prune.losses.FeatureAdapter` per layer maps the student's channels to the teacher's, and the
    ``feature_loss`` terms are summed over the layers (logged as ``train/kd_feature_loss``):

    - ``"cwd"``: channel-wise distillation (Shu et al. 2021, https://arxiv.org/abs/2011.13256), ``feature_temperature``;
    - ``"fine_grained"``: imitation near the objects (Wang et al. 2019, https://arxiv.org/abs/1906.03609), masks from
      the ground truth of the batch, ``batch[1][i]["boxes"]`` ((N, 4) ``x1, y1, x2, y2`` in pixels of the network
      input, as :class:`~lightning_prune.data.DetectionDataModule` gives them), and the teacher's ``anchors``
      ((L, A, 2) pixels, one row per entry of its ``strides``, as :class:`~lightning_prune.models.YOLOv3` has); a
      level without anchors (anchor-free YOLOv8) gets one virtual square anchor of 8 strides per location (see
      :func:`~lightning_prune.losses.fine_grained_mask`);
    - ``"mse"``: the mean squared error over all locations (FitNets, Romero et al. 2015,
      https://arxiv.org/abs/1412.6550).

    The adapters' parameters are the callback's, trained by an optimizer of its own: the class and hyperparameters of
    the module's first optimizer, following its learning rate at every step (warmup, schedules and ``lr_scale`` of
    pruning apply), stepped in ``on_before_optimizer_step`` (after AMP unscaling; their gradients averaged across DDP
    ranks there, as DDP does for the student's). So they are not the module's: StructuredPruning never traces or
    prunes them, the module's optimizer, LR schedulers and checkpoint never see them, and the exported student has
    none; the callback's state saves their weights and optimizer state, so ``fit(ckpt_path=...)`` resumes them. When
    a pruning step narrows a chosen layer, its adapter keeps the columns of the surviving channels (found in the
    module's :class:`~lightning_prune.pruning.PruningHistory` for the layer's last convolution; new weights where
    they cannot be found, e.g. a layer that ends in a concat) and its momentum / Adam state follows them. Gradient
    clipping does not see the adapters.

    Args:
        teacher: ``"self"`` or a checkpoint path.
        teacher_class: class path of the teacher's LightningModule when it is not the student's class.
        loss: ``"fm_nms"``, ``"hinton"``, a callable on lists of :class:`~lightning_prune.adapters.HeadLevel`, or
            ``None`` for feature imitation only.
        weight: the head loss weight, >= 0.
        schedule: weight schedule of both weights, one of ``constant``, ``warmup``, ``linear``, ``cosine`` (as
            :class:`~lightning_prune.callbacks.SparsityRegularization`'s penalty).
        start_epoch: first epoch with distillation.
        stop_epoch: first epoch without it (``None``: never stops; required by ``linear``/``cosine``).
        warmup_epochs: epochs of the linear ramp of ``warmup``.
        temperature: Hinton's temperature, > 0.
        features: student layer names (``model.named_modules()``) imitating the teacher's layers of the same names,
            or a dict ``{student layer: teacher layer}``; ``None``: no feature imitation.
        feature_loss: ``"cwd"``, ``"fine_grained"`` or ``"mse"``.
        feature_weight: the feature loss weight, >= 0; ``None``: 0.01 for ``"fine_grained"`` (the weight in the code of
            Wang et al.: the loss sums over channels, and diverges on our detectors at weight 1 with SGD at lr 0.01),
            else 1.
        feature_temperature: CWD's temperature τ, > 0.

    Raises:
        ValueError: an argument out of range or of the wrong type, an unknown loss or schedule, or neither a head loss
            nor features.
        MisconfigurationException: at ``setup``, the module has no ``adapter`` (with a head loss), lacks a layer of
            ``features`` or the checkpoint does not exist; at ``fit`` start, ``teacher="self"`` on an already pruned
            module without its saved copy, or the teacher lacks a layer of ``features``; at the first step, a layer
            output that is not a (B, C, H, W) tensor, teacher and student layers of different spatial sizes, or (for
            ``"fine_grained"``) a batch without boxes.

    Example:
        >>> Distillation(teacher="self", loss="fm_nms", weight=1.0, schedule="warmup", warmup_epochs=2).weight_at(1)
        0.5
        >>> kd = Distillation(loss=None, features=["neck.set3", "neck.set4"], feature_loss="fine_grained")
        >>> kd.features
        {'neck.set3': 'neck.set3', 'neck.set4': 'neck.set4'}
    """

    def __init__(
        self,
        teacher: str = "self",
        teacher_class: str | None = None,
        loss: str | Callable[..., Any] | None = "fm_nms",
        weight: float = 1.0,
        schedule: str = "constant",
        start_epoch: int = 0,
        stop_epoch: int | None = None,
        warmup_epochs: int = 0,
        temperature: float = 4.0,
        features: list[str] | dict[str, str] | None = None,
        feature_loss: str = "cwd",
        feature_weight: float | None = None,
        feature_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if not isinstance(teacher, (str, Path)) or not str(teacher):
            raise ValueError(f"Expected argument `teacher` to be 'self' or a checkpoint path but got {teacher!r}.")
        if loss is not None and not ((isinstance(loss, str) and loss in LOSSES) or callable(loss)):
            raise ValueError(
                f"Expected argument `loss` to be one of {list(LOSSES)}, a callable or None but got {loss!r}."
            )
        check_number("weight", weight, ">= 0")
        check_number("temperature", temperature, "> 0")
        check_epoch_schedule(schedule, start_epoch, stop_epoch, warmup_epochs)
        self.features = resolve_features(features)
        if feature_loss not in FEATURE_LOSSES:
            raise ValueError(
                f"Expected argument `feature_loss` to be one of {list(FEATURE_LOSSES)} but got {feature_loss!r}."
            )
        if feature_weight is None:  # see the docstring
            feature_weight = 0.01 if feature_loss == "fine_grained" else 1.0
        check_number("feature_weight", feature_weight, ">= 0")
        check_number("feature_temperature", feature_temperature, "> 0")
        if loss is None and not self.features:
            raise ValueError(f"Expected argument `features` to name layers when `loss` is None but got {features!r}.")
        self.teacher_source = str(teacher)
        self.teacher_class = teacher_class
        self.loss, self.weight, self.temperature = loss, float(weight), float(temperature)
        self.schedule, self.start_epoch, self.stop_epoch = schedule, start_epoch, stop_epoch
        self.warmup_epochs = warmup_epochs
        self.feature_loss, self.feature_weight = feature_loss, float(feature_weight)
        self.feature_temperature = float(feature_temperature)
        self.teacher: nn.Module | None = None
        self.teacher_file: str | None = None  # where the "self" teacher was saved once the student got pruned
        self._imitation = FeatureImitation(self.features, feature_loss, self.feature_temperature)
        self._original_step: Any = None
        self._hook: Any = None  # on the student's forward
        self._captured: tuple[Any, Any] | None = None
        self._capturing = False

    @property
    def adapters(self) -> dict[str, FeatureAdapter]:
        """The 1×1 adapter of each student layer of ``features`` (built at the first step with feature imitation)."""
        return self._imitation.adapters

    def weight_at(self, epoch: int) -> float:
        """The head loss weight in ``epoch``."""
        return penalty_at(self.weight, self.schedule, epoch, 0.0, self.start_epoch, self.stop_epoch, self.warmup_epochs)

    def feature_weight_at(self, epoch: int) -> float:
        """The feature loss weight in ``epoch`` (same schedule)."""
        return penalty_at(
            self.feature_weight, self.schedule, epoch, 0.0, self.start_epoch, self.stop_epoch, self.warmup_epochs
        )

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.loss is not None and not hasattr(getattr(pl_module, "adapter", None), "split"):
            raise MisconfigurationException(
                f"Expected {type(pl_module).__name__} to have an `adapter` attribute (a HeadAdapter that reads its raw "
                "head output) but it has none. HINT: set `self.adapter = YOLOv3Adapter(...)` (or your own "
                "HeadAdapter) in the module's __init__, or distil features only (`loss=None`)."
            )
        if self.teacher_source != "self" and not Path(self.teacher_source).is_file():
            raise MisconfigurationException(
                f"Expected argument `teacher` to be 'self' or an existing checkpoint but got {self.teacher_source!r}."
            )
        self._imitation.attach(pl_module)
        self._wrap(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.teacher is None:
            self.teacher = self._build_teacher(pl_module)
        classes, teacher_classes = getattr(pl_module, "num_classes", None), getattr(self.teacher, "num_classes", None)
        if classes is not None and teacher_classes is not None and classes != teacher_classes:
            raise MisconfigurationException(
                f"Expected argument `teacher` to be a model of the student's {classes} classes but got one of "
                f"{teacher_classes} ({self.teacher_source}). HINT: distil from a teacher trained on the same classes."
            )
        self._freeze(pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.teacher_source == "self" and not len(pruning_history(pl_module)):
            self.teacher = self._copy(pl_module)  # the latest unpruned weights: pruning may come next epoch
            self._freeze(pl_module)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._imitation.zero_grad(trainer, idx)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._imitation.step(trainer, optimizer)

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
        self._imitation.detach()

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "teacher": self.teacher_source,
            "teacher_class": self.teacher_class,
            "teacher_file": self.teacher_file,
        }
        adapters = self._imitation.state_dict()
        if adapters is not None:
            state["adapters"] = adapters
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.teacher_file = state_dict.get("teacher_file")
        self._imitation.load_state_dict(state_dict.get("adapters"))

    # ------------------------------------------------------------------ the wrapped step
    def _wrap(self, pl_module: pl.LightningModule) -> None:
        if self._original_step is not None:
            return
        original = pl_module.training_step

        def training_step(*args: Any, **kwargs: Any) -> Any:
            weight = self.weight_at(pl_module.current_epoch) if self.loss is not None else 0.0
            feature_weight = self.feature_weight_at(pl_module.current_epoch) if self.features else 0.0
            if (weight == 0 and feature_weight == 0) or self.teacher is None:
                return original(*args, **kwargs)
            self._captured, self._capturing = None, True
            try:
                with self._imitation.capturing(pl_module, trace=bool(feature_weight)):
                    out = original(*args, **kwargs)
            finally:
                self._capturing = False
            if self._captured is None:
                return out
            (inputs, raw), self._captured = self._captured, None
            with torch.no_grad():
                teacher_raw = self.teacher(*inputs[0], **inputs[1])
            added: Any = 0.0
            batch_size = _batch_size(inputs)
            if weight:
                kd = self._kd_loss(pl_module, raw, teacher_raw)
                pl_module.log("train/kd_loss", kd.detach(), prog_bar=True, batch_size=batch_size)
                added = added + weight * kd
            if feature_weight:
                feature = self._imitation.loss(pl_module, args, kwargs)
                pl_module.log("train/kd_feature_loss", feature.detach(), prog_bar=True, batch_size=batch_size)
                added = added + feature_weight * feature
            self._imitation.clear()
            if isinstance(out, dict):
                return {**out, "loss": out["loss"] + added}
            return out + added

        def capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if self._capturing and self._captured is None:
                self._captured = ((args, kwargs), output)

        self._original_step = original
        pl_module.training_step = training_step  # type: ignore[method-assign]
        self._hook = pl_module.register_forward_hook(capture, with_kwargs=True)

    def _kd_loss(self, pl_module: pl.LightningModule, raw: Any, teacher_raw: Any) -> torch.Tensor:
        adapter = pl_module.adapter
        student = adapter.split([r.float() for r in raw])
        teacher = getattr(self.teacher, "adapter", adapter).split([r.float() for r in teacher_raw])
        if self.loss == "fm_nms":
            return fm_nms_loss(student, teacher)[0]
        if self.loss == "hinton":
            return hinton_detection_loss(student, teacher, self.temperature)
        result = self.loss(student, teacher)  # type: ignore[misc, operator]
        return result[0] if isinstance(result, tuple) else result

    # ------------------------------------------------------------------ the teacher
    def _build_teacher(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.teacher_source != "self":
            cls = import_class(self.teacher_class, "teacher_class") if self.teacher_class else type(pl_module)
            teacher = cls.load_from_checkpoint(self.teacher_source, map_location="cpu", weights_only=True)
            rank_zero_info(f"Distillation: teacher {cls.__name__} from {self.teacher_source}")
            return teacher
        if not len(pruning_history(pl_module)):
            return self._copy(pl_module)
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

    def _copy(self, pl_module: pl.LightningModule) -> pl.LightningModule:
        return copy_module(pl_module, hook_ids=self._imitation.hook_ids)

    def _freeze(self, pl_module: pl.LightningModule) -> None:
        assert self.teacher is not None
        self.teacher.to(pl_module.device).eval().requires_grad_(False)
        self._imitation.attach_teacher(self.teacher)


def _batch_size(inputs: tuple[tuple[Any, ...], dict[str, Any]]) -> int | None:
    args, _ = inputs
    return int(args[0].shape[0]) if args and isinstance(args[0], torch.Tensor) and args[0].dim() else None
