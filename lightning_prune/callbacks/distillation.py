"""Knowledge distillation into any detector's training, without touching its ``training_step``."""

from __future__ import annotations

import copy
import difflib
import importlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn
from typing_extensions import override

from lightning_prune.callbacks._modules import check_epoch_schedule
from lightning_prune.losses import (
    FeatureAdapter,
    cwd_loss,
    fine_grained_mask,
    fm_nms_loss,
    hinton_detection_loss,
    imitation_loss,
)
from lightning_prune.pruning.checkpoint import pruning_history, pruning_root
from lightning_prune.pruning.sparsity import penalty_at

LOSSES = ("fm_nms", "hinton")
FEATURE_LOSSES = ("cwd", "fine_grained", "mse")
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
    clipping does not see the adapters. The alternatives were worse: registered on the module, the adapters would be
    traced and pruned by StructuredPruning, counted in its MACs/params, saved in (and required by a strict load of)
    the student's checkpoint and exported; as a parameter group of the module's optimizer, they would escape its LR
    schedulers (one base LR per group, set before the group exists) and would have to be re-added before Lightning
    restores the optimizer on resume and after any optimizer rebuild.

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
        _check_number("weight", weight, ">= 0")
        _check_number("temperature", temperature, "> 0")
        check_epoch_schedule(schedule, start_epoch, stop_epoch, warmup_epochs)
        self.features = _resolve_features(features)
        if feature_loss not in FEATURE_LOSSES:
            raise ValueError(
                f"Expected argument `feature_loss` to be one of {list(FEATURE_LOSSES)} but got {feature_loss!r}."
            )
        if feature_weight is None:  # see the docstring
            feature_weight = 0.01 if feature_loss == "fine_grained" else 1.0
        _check_number("feature_weight", feature_weight, ">= 0")
        _check_number("feature_temperature", feature_temperature, "> 0")
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
        #: the 1×1 adapter of each student layer of ``features`` (built at the first step with feature imitation)
        self.adapters: dict[str, FeatureAdapter] = {}
        self._original_step: Any = None
        self._hooks: list[Any] = []  # on the student: its forward, its feature layers
        self._teacher_hooks: list[Any] = []
        self._captured: tuple[Any, Any] | None = None
        self._capturing = False
        self._student_feats: dict[str, Any] = {}
        self._teacher_feats: dict[str, Any] = {}
        self._optimizer: torch.optim.Optimizer | None = None  # the adapters'
        self._adapted_steps = 0  # pruning steps of the student that the adapters' input widths follow
        self._producers: dict[str, str | None] | None = None  # per feature layer, its last conv (for pruned channels)
        self._convs_run: dict[str, list[tuple[str, int]]] = {}
        self._saved_adapters: dict[str, Any] | None = None  # loaded from a checkpoint, applied at the first step

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
        _layers(pl_module, list(self.features), "student")
        self._wrap(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.teacher is None:
            self.teacher = self._build_teacher(pl_module)
        self._freeze(pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.teacher_source == "self" and not len(pruning_history(pl_module)):
            self.teacher = self._copy(pl_module)  # the latest unpruned weights: pruning may come next epoch
            self._freeze(pl_module)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if self._optimizer is not None and idx % trainer.accumulate_grad_batches == 0:
            self._optimizer.zero_grad(set_to_none=True)  # as Lightning does for the module (drops calibration grads)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._optimizer is None or not trainer.optimizers or optimizer is not trainer.optimizers[0]:
            return
        params = [p for adapter in self.adapters.values() for p in adapter.parameters()]
        if all(p.grad is None for p in params):
            return  # no feature term in this step (the same on every rank): momentum must not move the adapters
        if trainer.world_size > 1:  # every rank has built the same adapters at the same step
            grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
            flat = trainer.strategy.reduce(torch.cat([g.flatten() for g in grads]), reduce_op="mean")
            for p, g in zip(params, flat.split([p.numel() for p in params])):
                p.grad = g.view_as(p).clone()
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        if scaler is not None and scaler.is_enabled():  # float16: the module's grads are unscaled, ours not yet
            inverse = 1.0 / scaler.get_scale()
            grads = [p.grad for p in params if p.grad is not None]
            for g in grads:
                g.mul_(inverse)
            if not all(bool(torch.isfinite(g).all()) for g in grads):
                return  # the scaler skips this step of the module too
        for group in self._optimizer.param_groups:
            group["lr"] = optimizer.param_groups[0]["lr"]
        self._optimizer.step()

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
        for hook in self._hooks + self._teacher_hooks:
            hook.remove()
        self._hooks, self._teacher_hooks = [], []

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "teacher": self.teacher_source,
            "teacher_class": self.teacher_class,
            "teacher_file": self.teacher_file,
        }
        if self.adapters and self._optimizer is not None:
            state["adapters"] = {
                "weights": {
                    name: {k: v.detach().cpu() for k, v in a.state_dict().items()} for name, a in self.adapters.items()
                },
                "optimizer": self._optimizer.state_dict(),
                "pruning_steps": self._adapted_steps,
            }
        elif self._saved_adapters is not None:  # resumed, not yet used: keep them for the next resume
            state["adapters"] = self._saved_adapters
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.teacher_file = state_dict.get("teacher_file")
        self._saved_adapters = state_dict.get("adapters")

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
            self._captured, self._student_feats, self._capturing = None, {}, True
            tracing = self._tracing_convs(pl_module) if feature_weight and self._producers is None else nullcontext()
            try:
                with tracing:
                    out = original(*args, **kwargs)
            finally:
                self._capturing = False
            if self._captured is None:
                return out
            (inputs, raw), self._captured = self._captured, None
            self._teacher_feats = {}
            with torch.no_grad():
                teacher_raw = self.teacher(*inputs[0], **inputs[1])
            added: Any = 0.0
            batch_size = _batch_size(inputs)
            if weight:
                kd = self._kd_loss(pl_module, raw, teacher_raw)
                pl_module.log("train/kd_loss", kd.detach(), prog_bar=True, batch_size=batch_size)
                added = added + weight * kd
            if feature_weight:
                feature = self._feature_loss(pl_module, args, kwargs)
                pl_module.log("train/kd_feature_loss", feature.detach(), prog_bar=True, batch_size=batch_size)
                added = added + feature_weight * feature
            self._student_feats, self._teacher_feats = {}, {}  # not held (with their graphs) until the next step
            if isinstance(out, dict):
                return {**out, "loss": out["loss"] + added}
            return out + added

        def capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if self._capturing and self._captured is None:
                self._captured = ((args, kwargs), output)

        self._original_step = original
        pl_module.training_step = training_step  # type: ignore[method-assign]
        self._hooks = [pl_module.register_forward_hook(capture, with_kwargs=True)]
        for name, module in _layers(pl_module, list(self.features), "student").items():
            self._hooks.append(module.register_forward_hook(self._feature_hook(name, student=True)))

    def _feature_hook(self, name: str, student: bool) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            feats = self._student_feats if student else self._teacher_feats
            if (self._capturing or not student) and name not in feats:  # the first call in the step
                feats[name] = output

        return hook

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

    # ------------------------------------------------------------------ feature imitation
    def _feature_loss(self, pl_module: pl.LightningModule, args: Any, kwargs: Any) -> torch.Tensor:
        """The feature terms, summed over the layers; ``args``/``kwargs`` are the step's (the batch first)."""
        pairs = {
            s: (
                self._check_feature(s, "student", self._student_feats),
                self._check_feature(t, "teacher", self._teacher_feats),
            )
            for s, t in self.features.items()
        }
        for s_name, (s, t) in pairs.items():
            if s.shape[-2:] != t.shape[-2:]:
                raise MisconfigurationException(
                    f"Expected teacher layer `{self.features[s_name]}` to have the spatial size of student layer "
                    f"`{s_name}` {tuple(s.shape[-2:])} but got {tuple(t.shape[-2:])}. HINT: map each student layer "
                    "to the teacher's layer of the same stride."
                )
        if self._producers is None:
            self._producers = {n: _last_conv(self._convs_run.get(n, []), pairs[n][0].shape[1]) for n in pairs}
            self._convs_run = {}
        self._fit_adapters(pl_module, {n: (s.shape[1], t.shape[1]) for n, (s, t) in pairs.items()})
        height, boxes = _ground_truth(args, kwargs) if self.feature_loss == "fine_grained" else (0, [])
        total = None
        for name, (s, t) in pairs.items():
            with torch.autocast(s.device.type, enabled=False):  # the adapter and the loss in float32
                student, teacher = self.adapters[name](s.float()), t.detach().float()
                if self.feature_loss == "cwd":
                    term = cwd_loss(student, teacher, self.feature_temperature)
                elif self.feature_loss == "mse":
                    term = F.mse_loss(student, teacher)
                else:
                    stride = height / s.shape[-2]
                    boxes = [b.to(s.device) for b in boxes]
                    term = imitation_loss(
                        student, teacher, fine_grained_mask(boxes, tuple(s.shape[-2:]), stride, self._anchors(stride))
                    )
            total = term if total is None else total + term
        assert total is not None
        return total

    def _check_feature(self, name: str, side: str, feats: Mapping[str, Any]) -> torch.Tensor:
        value = feats.get(name)
        if not isinstance(value, torch.Tensor) or value.ndim != 4:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise MisconfigurationException(
                f"Expected {side} layer `{name}` to output a (B, C, H, W) tensor in the forward but got {got}. "
                "HINT: choose layers that output one feature map, e.g. a neck level."
            )
        return value

    def _fit_adapters(self, pl_module: pl.LightningModule, widths: dict[str, tuple[int, int]]) -> None:
        """Build (or load) the adapters at the first step; afterwards follow the student's pruned widths."""
        history = pruning_history(pl_module)
        if not self.adapters:
            self._build_adapters(pl_module, widths)
        changed = {n: c_s for n, (c_s, _) in widths.items() if self.adapters[n].student_channels != c_s}
        if changed:
            steps = history.steps[self._adapted_steps :]
            root = pruning_root(pl_module)
            for name, c_s in changed.items():
                adapter = self.adapters[name]
                before, old = adapter.student_channels, adapter.conv.weight
                kept = _kept_channels(
                    steps, _relative(self._producers.get(name) if self._producers else None, root), before
                )
                kept = kept if kept is not None and len(kept) == c_s else None
                adapter.rebuild(c_s, kept)
                _swap_parameter(self._optimizer, old, adapter.conv.weight, kept)
                rank_zero_info(
                    f"Distillation: adapter of `{name}` rebuilt for the pruned student, inputs {before} → {c_s} "
                    f"({'surviving columns kept' if kept is not None else 'new weights'})"
                )
        self._adapted_steps = len(history)

    def _build_adapters(self, pl_module: pl.LightningModule, widths: dict[str, tuple[int, int]]) -> None:
        """New adapters for the layers' widths, or the saved ones (whose inputs then follow the prunes since)."""
        saved = self._saved_adapters or {}
        states = saved.get("weights", {})
        fits = bool(saved) and all(
            name in states and states[name]["conv.weight"].shape[0] == c_t for name, (_, c_t) in widths.items()
        )
        self.adapters = {}
        for seed, (name, (c_s, c_t)) in enumerate(widths.items()):
            adapter = FeatureAdapter(int(states[name]["conv.weight"].shape[1]) if fits else c_s, c_t, seed=seed)
            if fits:
                adapter.load_state_dict(states[name])
            self.adapters[name] = adapter.to(pl_module.device)
        params = [p for adapter in self.adapters.values() for p in adapter.parameters()]
        self._optimizer = _adapter_optimizer(pl_module.trainer, params)
        if fits:
            self._optimizer.load_state_dict(saved["optimizer"])
            self._adapted_steps = int(saved.get("pruning_steps", 0))
        else:
            if saved:
                rank_zero_info("Distillation: the saved feature adapters do not fit the layers; starting new ones")
            self._adapted_steps = len(pruning_history(pl_module))
        self._saved_adapters = None

    @contextmanager
    def _tracing_convs(self, pl_module: pl.LightningModule) -> Iterator[None]:
        """Record the convolutions run inside each feature layer, in order (to find the one producing its output)."""
        self._convs_run = {name: [] for name in self.features}
        hooks = []
        for name, layer in _layers(pl_module, list(self.features), "student").items():
            for sub, module in layer.named_modules():
                if isinstance(module, nn.modules.conv._ConvNd):
                    full = f"{name}.{sub}" if sub else name

                    def hook(
                        m: nn.Module, a: Any, out: Any, full: str = full, runs: list = self._convs_run[name]
                    ) -> None:
                        if self._capturing and isinstance(out, torch.Tensor) and out.ndim > 1:
                            runs.append((full, int(out.shape[1])))

                    hooks.append(module.register_forward_hook(hook))
        try:
            yield
        finally:
            for h in hooks:
                h.remove()

    def _anchors(self, stride: float) -> torch.Tensor | None:
        """The teacher's anchors (A, 2) at ``stride`` (its ``anchors`` row of that entry of ``strides``), or None."""
        model = self.teacher
        anchors = getattr(model, "anchors", None)
        strides = getattr(model, "strides", None) or getattr(getattr(model, "adapter", None), "strides", None)
        if not isinstance(anchors, torch.Tensor) or anchors.ndim != 3 or not strides:
            return None
        matches = [i for i, s in enumerate(strides) if abs(float(s) - stride) < 1e-6]
        return anchors[matches[0]] if matches and matches[0] < anchors.shape[0] else None

    # ------------------------------------------------------------------ the teacher
    def _build_teacher(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.teacher_source != "self":
            cls = _import(self.teacher_class) if self.teacher_class else type(pl_module)
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
        return _copy_module(pl_module, [h.id for h in self._hooks])

    def _freeze(self, pl_module: pl.LightningModule) -> None:
        assert self.teacher is not None
        self.teacher.to(pl_module.device).eval().requires_grad_(False)
        for hook in self._teacher_hooks:
            hook.remove()
        layers = _layers(self.teacher, list(dict.fromkeys(self.features.values())), "teacher")
        self._teacher_hooks = [m.register_forward_hook(self._feature_hook(n, student=False)) for n, m in layers.items()]


def _resolve_features(features: Any) -> dict[str, str]:
    """``{student layer: teacher layer}`` from a list of names (the same on both sides) or a dict; ``{}`` for None."""
    if features is None:
        return {}
    pairs = dict.fromkeys(features, None) if isinstance(features, (list, tuple)) else features
    if (
        not isinstance(pairs, dict)
        or not pairs
        or not all(isinstance(k, str) and k and (v is None or (isinstance(v, str) and v)) for k, v in pairs.items())
    ):
        raise ValueError(
            "Expected argument `features` to be None, a list of layer names or a dict of student -> teacher layer "
            f"names but got {features!r}."
        )
    return {k: k if v is None else v for k, v in pairs.items()}


def _layers(model: nn.Module, names: Sequence[str], side: str) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules:
            close = difflib.get_close_matches(name, list(modules), n=3)
            hint = f"did you mean {close}? " if close else ""
            raise MisconfigurationException(
                f"Expected argument `features` to name layers of the {side} {type(model).__name__} but it has no "
                f"`{name}`. HINT: {hint}Names are as in `model.named_modules()`, e.g. {[n for n in modules if n][:4]}."
            )
    return {name: modules[name] for name in names}


def _last_conv(runs: Sequence[tuple[str, int]], width: int) -> str | None:
    """The last convolution run inside a layer with the layer's output width: its output channels are the layer's."""
    return next((name for name, channels in reversed(runs) if channels == width), None)


def _relative(name: str | None, root: str | None) -> str | None:
    """A module name relative to the pruning root (as the history records it); None outside the root."""
    if name is None or root is None:
        return name
    return name[len(root) + 1 :] if name.startswith(f"{root}.") else None


def _kept_channels(steps: Sequence[Sequence[Mapping[str, Any]]], layer: str | None, width: int) -> list[int] | None:
    """The channels of ``layer`` (``width`` of them before ``steps``) that survived the steps; None if unknown."""
    if layer is None:
        return None
    kept = list(range(width))
    for step in steps:
        record = next((r for r in step if r["module"] == layer and r["kind"] == "out"), None)
        if record is None:
            continue
        if record.get("size") not in (None, len(kept)):
            return None
        removed = set(record["idxs"])
        kept = [k for i, k in enumerate(kept) if i not in removed]
    return kept


def _swap_parameter(
    optimizer: torch.optim.Optimizer | None, old: nn.Parameter, new: nn.Parameter, kept: Sequence[int] | None
) -> None:
    """Put ``new`` in the place of ``old`` in ``optimizer``; its state follows the ``kept`` columns (or resets)."""
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p is old:
                group["params"][i] = new
    state = optimizer.state.pop(old, None)
    if state is not None and kept is not None:
        index = torch.as_tensor(list(kept), dtype=torch.long, device=old.device)
        optimizer.state[new] = {
            k: v.index_select(1, index) if isinstance(v, torch.Tensor) and v.shape == old.shape else v
            for k, v in state.items()
        }


def _adapter_optimizer(trainer: pl.Trainer | None, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """An optimizer of the class and defaults of the module's first one, for the adapters."""
    optimizers = getattr(trainer, "optimizers", None)
    if not optimizers:
        raise MisconfigurationException(
            "Expected the module to have an optimizer (the feature adapters train with one of its class) but it has "
            "none. HINT: return one from `configure_optimizers`."
        )
    main = getattr(optimizers[0], "optimizer", optimizers[0])
    try:
        return type(main)(params, **main.defaults)
    except (TypeError, ValueError) as err:
        raise MisconfigurationException(
            f"Expected the module's first optimizer ({type(main).__name__}) to be buildable from its `defaults` for "
            f"the feature adapters but it failed: {err}"
        ) from err


def _ground_truth(args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[int, list[torch.Tensor]]:
    """The input height and the per image (N_i, 4) xyxy boxes in input pixels of the step's batch."""
    batch = args[0] if args else kwargs.get("batch")
    try:
        images, boxes = batch[0], [t["boxes"] for t in batch[1]]
    except (TypeError, KeyError, IndexError, ValueError):
        images, boxes = None, None
    if (
        not isinstance(images, torch.Tensor)
        or images.ndim != 4
        or boxes is None
        or not all(isinstance(b, torch.Tensor) and b.ndim == 2 and b.shape[-1] == 4 for b in boxes)
    ):
        raise MisconfigurationException(
            "Expected the training batch to be (images, targets) with images (B, C, H, W) and targets[i]['boxes'] "
            f"(N, 4) x1, y1, x2, y2 in input pixels for feature_loss='fine_grained' but got {type(batch).__name__}. "
            "HINT: feature_loss='cwd' needs no ground truth."
        )
    return int(images.shape[-2]), boxes


def _check_number(name: str, value: Any, condition: str) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if not ok or not (value >= 0 if condition == ">= 0" else value > 0):
        raise ValueError(f"Expected argument `{name}` to be a float {condition} but got {value!r}.")


def _copy_module(pl_module: pl.LightningModule, hook_ids: Sequence[int] = ()) -> pl.LightningModule:
    """A deep copy of the module without its Trainer (and the callbacks' hooks on it, root and ``hook_ids``)."""
    memo = {id(getattr(pl_module, "_trainer", None)): None}
    teacher = copy.deepcopy(pl_module, memo)
    teacher._forward_hooks.clear()
    teacher._forward_hooks_with_kwargs.clear()
    for module in teacher.modules():
        for hook_id in hook_ids:
            module._forward_hooks.pop(hook_id, None)
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
