"""Feature imitation for :class:`~lightning_prune.callbacks.Distillation`: the student's and the teacher's feature maps
captured with forward hooks, and the 1×1 adapters between them, trained by an optimizer of their own."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_prune.losses import FeatureAdapter, cwd_loss, fine_grained_mask, imitation_loss
from lightning_prune.pruning.checkpoint import pruning_history, pruning_root

FEATURE_LOSSES = ("cwd", "fine_grained", "mse")


class FeatureImitation:
    """The feature term of :class:`~lightning_prune.callbacks.Distillation` (its docstring says what it computes).

    The callback calls :meth:`attach` at ``setup``, :meth:`attach_teacher` whenever its teacher changes,
    :meth:`capturing` around the module's training step, :meth:`loss` after the teacher's forward and then
    :meth:`clear`, :meth:`zero_grad` and :meth:`step` from its batch and optimizer hooks, :meth:`detach` at
    ``teardown``, and :meth:`state_dict` / :meth:`load_state_dict` for its own state.

    The adapters are not the module's, on purpose: registered on the module, they would be traced and pruned by
    StructuredPruning, counted in its MACs/params, saved in (and required by a strict load of) the student's
    checkpoint and exported; as a parameter group of the module's optimizer, they would escape its LR schedulers (one
    base LR per group, set before the group exists) and would have to be re-added before Lightning restores the
    optimizer on resume and after any optimizer rebuild.

    Args:
        features: ``{student layer: teacher layer}``, as :func:`resolve_features` gives it.
        loss: one of :data:`FEATURE_LOSSES`.
        temperature: CWD's temperature τ, > 0.
    """

    def __init__(self, features: dict[str, str], loss: str, temperature: float) -> None:
        self.features, self.loss_name, self.temperature = features, loss, temperature
        #: the 1×1 adapter of each student layer of ``features`` (built at the first step with feature imitation)
        self.adapters: dict[str, FeatureAdapter] = {}
        self.optimizer: torch.optim.Optimizer | None = None  # the adapters'
        self._teacher: nn.Module | None = None
        self._student_hooks: list[Any] = []
        self._teacher_hooks: list[Any] = []
        self._capturing = False
        self._student_feats: dict[str, Any] = {}
        self._teacher_feats: dict[str, Any] = {}
        self._adapted_steps = 0  # pruning steps of the student that the adapters' input widths follow
        self._producers: dict[str, str | None] | None = None  # per feature layer, its last conv (for pruned channels)
        self._convs_run: dict[str, list[tuple[str, int]]] = {}
        self._saved: dict[str, Any] | None = None  # loaded from a checkpoint, applied at the first step

    @property
    def hook_ids(self) -> list[int]:
        """The ids of the hooks on the student's layers (for a copy of the student without them)."""
        return [hook.id for hook in self._student_hooks]

    # ------------------------------------------------------------------ hooks on the models
    def attach(self, pl_module: pl.LightningModule) -> None:
        """Check that the student has the layers of ``features`` and hook them (once)."""
        layers = _layers(pl_module, list(self.features), "student")
        if not self._student_hooks:
            self._student_hooks = [m.register_forward_hook(self._hook(n, student=True)) for n, m in layers.items()]

    def attach_teacher(self, teacher: nn.Module) -> None:
        """Hook the teacher's layers of ``features`` (instead of the previous teacher's)."""
        for hook in self._teacher_hooks:
            hook.remove()
        self._teacher = teacher
        layers = _layers(teacher, list(dict.fromkeys(self.features.values())), "teacher")
        self._teacher_hooks = [m.register_forward_hook(self._hook(n, student=False)) for n, m in layers.items()]

    def detach(self) -> None:
        """Remove the hooks from the student and the teacher."""
        for hook in self._student_hooks + self._teacher_hooks:
            hook.remove()
        self._student_hooks, self._teacher_hooks = [], []

    @contextmanager
    def capturing(self, pl_module: pl.LightningModule, trace: bool) -> Iterator[None]:
        """Record the student's feature maps in the step run inside; ``trace``: the step has a feature term."""
        self._student_feats, self._teacher_feats, self._capturing = {}, {}, True
        tracing = self._tracing_convs(pl_module) if trace and self._producers is None else nullcontext()
        try:
            with tracing:
                yield
        finally:
            self._capturing = False

    def clear(self) -> None:
        """Drop the step's feature maps: not held (with their graphs) until the next step."""
        self._student_feats, self._teacher_feats = {}, {}

    def _hook(self, name: str, student: bool) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            feats = self._student_feats if student else self._teacher_feats
            if (self._capturing or not student) and name not in feats:  # the first call in the step
                feats[name] = output

        return hook

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

    # ------------------------------------------------------------------ the loss
    def loss(self, pl_module: pl.LightningModule, args: Any, kwargs: Any) -> torch.Tensor:
        """The feature terms, summed over the layers; ``args``/``kwargs`` are the step's (the batch first)."""
        pairs = {
            s: (
                _check_feature(s, "student", self._student_feats),
                _check_feature(t, "teacher", self._teacher_feats),
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
        height, boxes = _ground_truth(args, kwargs) if self.loss_name == "fine_grained" else (0, [])
        total = None
        for name, (s, t) in pairs.items():
            with torch.autocast(s.device.type, enabled=False):  # the adapter and the loss in float32
                student, teacher = self.adapters[name](s.float()), t.detach().float()
                if self.loss_name == "cwd":
                    term = cwd_loss(student, teacher, self.temperature)
                elif self.loss_name == "mse":
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

    def _anchors(self, stride: float) -> torch.Tensor | None:
        """The teacher's anchors (A, 2) at ``stride`` (its ``anchors`` row of that entry of ``strides``), or None."""
        model = self._teacher
        anchors = getattr(model, "anchors", None)
        strides = getattr(model, "strides", None) or getattr(getattr(model, "adapter", None), "strides", None)
        if not isinstance(anchors, torch.Tensor) or anchors.ndim != 3 or not strides:
            return None
        matches = [i for i, s in enumerate(strides) if abs(float(s) - stride) < 1e-6]
        return anchors[matches[0]] if matches and matches[0] < anchors.shape[0] else None

    # ------------------------------------------------------------------ the adapters
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
                _swap_parameter(self.optimizer, old, adapter.conv.weight, kept)
                rank_zero_info(
                    f"Distillation: adapter of `{name}` rebuilt for the pruned student, inputs {before} → {c_s} "
                    f"({'surviving columns kept' if kept is not None else 'new weights'})"
                )
        self._adapted_steps = len(history)

    def _build_adapters(self, pl_module: pl.LightningModule, widths: dict[str, tuple[int, int]]) -> None:
        """New adapters for the layers' widths, or the saved ones (whose inputs then follow the prunes since)."""
        saved = self._saved or {}
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
        self.optimizer = _adapter_optimizer(pl_module.trainer, params)
        if fits:
            self.optimizer.load_state_dict(saved["optimizer"])
            self._adapted_steps = int(saved.get("pruning_steps", 0))
        else:
            if saved:
                rank_zero_info("Distillation: the saved feature adapters do not fit the layers; starting new ones")
            self._adapted_steps = len(pruning_history(pl_module))
        self._saved = None

    def zero_grad(self, trainer: pl.Trainer, batch_idx: int) -> None:
        """At the first batch of each accumulation, as Lightning does for the module (drops calibration grads)."""
        if self.optimizer is not None and batch_idx % trainer.accumulate_grad_batches == 0:
            self.optimizer.zero_grad(set_to_none=True)

    def step(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
        """Step the adapters with the module's first ``optimizer``: its learning rate, unscaled and averaged grads."""
        if self.optimizer is None or not trainer.optimizers or optimizer is not trainer.optimizers[0]:
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
        for group in self.optimizer.param_groups:
            group["lr"] = optimizer.param_groups[0]["lr"]
        self.optimizer.step()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any] | None:
        """The adapters' weights, their optimizer's state and the pruning steps they follow; None before any."""
        if self.adapters and self.optimizer is not None:
            return {
                "weights": {
                    name: {k: v.detach().cpu() for k, v in a.state_dict().items()} for name, a in self.adapters.items()
                },
                "optimizer": self.optimizer.state_dict(),
                "pruning_steps": self._adapted_steps,
            }
        return self._saved  # resumed, not yet used: kept for the next resume

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """What :meth:`state_dict` gave, applied at the first step with a feature term."""
        self._saved = state


def resolve_features(features: Any) -> dict[str, str]:
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


def _check_feature(name: str, side: str, feats: Mapping[str, Any]) -> torch.Tensor:
    value = feats.get(name)
    if not isinstance(value, torch.Tensor) or value.ndim != 4:
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise MisconfigurationException(
            f"Expected {side} layer `{name}` to output a (B, C, H, W) tensor in the forward but got {got}. "
            "HINT: choose layers that output one feature map, e.g. a neck level."
        )
    return value


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
    signature = inspect.signature(type(main).__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.values()):
        defaults = dict(main.defaults)
    else:  # `defaults` may hold more than the constructor takes (AdamW's `decoupled_weight_decay`, torch >= 2.6)
        defaults = {k: v for k, v in main.defaults.items() if k in signature}
    try:
        return type(main)(params, **defaults)
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
