"""Structured (channel) pruning of any LightningModule during ``fit``, on a schedule of epochs."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
import torch_pruning as tp
from lightning_fabric.utilities.apply_func import move_data_to_device
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn
from torch_pruning.pruner.importance import Importance
from typing_extensions import override

from lightning_prune.pruning.checkpoint import pruning_history, save_pruning_state, set_pruning_root
from lightning_prune.pruning.history import apply_records, group_records
from lightning_prune.pruning.importance import needs_gradients, resolve_importance
from lightning_prune.pruning.optim import track_pruning
from lightning_prune.pruning.schedules import build_schedule, relative_ratios
from lightning_prune.report.summary import model_stats


class StructuredPruning(pl.Callback):
    """Remove whole channels with torch-pruning's dependency graph at the start of scheduled epochs.

    The pruned model is a smaller dense model. After each step every optimizer is patched in place (surviving
    channels keep their momentum / Adam state, LR schedulers keep their position) and, under DDP, the model is
    re-wrapped. Rank 0 decides and broadcasts each step, so all ranks prune identically. Each step is recorded in a
    :class:`~lightning_prune.pruning.PruningHistory` written into checkpoints; give the module
    :class:`~lightning_prune.pruning.checkpoint.PrunableMixin` to resume or ``load_from_checkpoint`` them.

    Paper: Fang et al., "DepGraph: Towards Any Structural Pruning" (CVPR 2023), https://arxiv.org/abs/2301.12900

    Args:
        pruning_ratio: fraction of the channels of the original model removed after the last step, in (0, 1).
        importance: channel criterion name (see :mod:`lightning_prune.pruning.importance`) or an ``Importance``.
        schedule: ``"one_shot"``, ``"linear"``, ``"cubic"``, ``"geometric"``: cumulative ratio after each step.
        epochs: epochs at whose start a step happens, strictly increasing; default ``[0]`` (one-shot only).
        global_pruning: rank channels across all layers (``True``) or prune every layer by the same ratio.
        round_to: keep channel counts multiples of this.
        max_layer_ratio: no layer loses more than this fraction of its original channels, in (0, 1] (with
            ``global_pruning``; with local pruning every layer loses the schedule's ratio).
        ignored_layers: regexes fully matching qualified module names (of the pruned module) never pruned; added to
            the module's adapter output layers, or else the convs/linears that directly produce its outputs.
        calibration_batches: training batches whose loss gradients feed gradient-based criteria (``"taylor"``).
        lr_scale: multiply every learning rate by this after each step (e.g. 0.1 to finetune).
        submodule: dotted name of the submodule to prune; default the whole module.

    Raises:
        ValueError: an argument is out of range or of the wrong type.
        MisconfigurationException: at ``setup``, an ``ignored_layers`` pattern matches no module, ``submodule`` names
            none, or the module has no ``example_input_array``; at a step, the module lacks the restored steps.

    Example:
        >>> callback = StructuredPruning(pruning_ratio=0.3, importance="l1", schedule="cubic", epochs=[1, 3])
        >>> callback.ratios
        [0.2625, 0.3]
    """

    def __init__(
        self,
        pruning_ratio: float = 0.5,
        importance: str | Importance = "l2",
        schedule: str = "one_shot",
        epochs: list[int] | None = None,
        global_pruning: bool = True,
        round_to: int | None = None,
        max_layer_ratio: float = 0.95,
        ignored_layers: list[str] | None = None,
        calibration_batches: int = 8,
        lr_scale: float | None = None,
        submodule: str | None = None,
    ) -> None:
        super().__init__()
        if epochs is None:
            if schedule != "one_shot":
                raise ValueError(f"Expected argument `epochs` to be a list of epochs for schedule {schedule!r}.")
            epochs = [0]
        if not (isinstance(epochs, (list, tuple)) and epochs and all(_is_int(e) and e >= 0 for e in epochs)) or any(
            a >= b for a, b in itertools.pairwise(epochs)
        ):
            raise ValueError(f"Expected argument `epochs` to be strictly increasing ints >= 0 but got {epochs!r}.")
        self.ratios = build_schedule(schedule, pruning_ratio, len(epochs))  # checks ratio and schedule
        self.importance = resolve_importance(importance)
        if round_to is not None and not (_is_int(round_to) and round_to >= 1):
            raise ValueError(f"Expected argument `round_to` to be None or an int >= 1 but got {round_to!r}.")
        if not (isinstance(max_layer_ratio, (int, float)) and 0 < max_layer_ratio <= 1):
            raise ValueError(
                f"Expected argument `max_layer_ratio` to be a float in (0, 1] but got {max_layer_ratio!r}."
            )
        if not (_is_int(calibration_batches) and calibration_batches >= 1):
            raise ValueError(
                f"Expected argument `calibration_batches` to be an int >= 1 but got {calibration_batches!r}."
            )
        if lr_scale is not None and not (isinstance(lr_scale, (int, float)) and lr_scale > 0):
            raise ValueError(f"Expected argument `lr_scale` to be None or a float > 0 but got {lr_scale!r}.")
        self.patterns = [_compile(p) for p in ignored_layers or []]
        self.epochs = list(epochs)
        self.global_pruning = bool(global_pruning)
        self.round_to = round_to
        self.max_layer_ratio = float(max_layer_ratio)
        self.calibration_batches = calibration_batches
        self.lr_scale = lr_scale
        self.submodule = submodule
        self.steps_done = 0

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        target = self._target(pl_module)
        self._example_input(pl_module, target)
        names = [name for name, _ in target.named_modules()]
        for pattern in self.patterns:
            if not any(pattern.fullmatch(n) for n in names):
                raise MisconfigurationException(
                    f"Expected every pattern of `ignored_layers` to match a module name but {pattern.pattern!r} "
                    f"matches none. HINT: names are as in `model.named_modules()`, e.g. {names[1:4]}."
                )

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        done = len(pruning_history(pl_module))
        if done < self.steps_done:
            raise MisconfigurationException(
                f"Expected the module to hold {self.steps_done} pruning steps (the schedule's position) but it holds "
                f"{done}. HINT: give the module `PrunableMixin` so that it restores its pruned structure on resume."
            )
        while self.steps_done < len(self.epochs) and trainer.current_epoch >= self.epochs[self.steps_done]:
            self.prune_step(trainer, pl_module)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        save_pruning_state(pl_module, checkpoint)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps_done = int(state_dict.get("steps_done", 0))

    # ------------------------------------------------------------------ pruning
    def prune_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run the next step of the schedule on every rank, then patch optimizers and re-wrap DDP."""
        target = self._target(pl_module)
        example = move_data_to_device(self._example_input(pl_module, target), pl_module.device)
        before = model_stats(target, example)
        ratio = relative_ratios(self.ratios)[self.steps_done]  # of the model as it is now
        history = pruning_history(pl_module)
        with track_pruning(target) as tracker:
            records = None
            if trainer.is_global_zero:  # decide once, apply everywhere
                records = self._decide_and_prune(trainer, pl_module, target, example, ratio)
            if trainer.world_size > 1:
                records = trainer.strategy.broadcast(records, src=0)
                if not trainer.is_global_zero:
                    apply_records(target, records, step=self.steps_done)
        history.append(records or [])
        set_pruning_root(pl_module, self.submodule)
        for optimizer in trainer.optimizers:
            tracker.patch(optimizer)
            if self.lr_scale is not None:
                _scale_lr(trainer, optimizer, self.lr_scale)
        if isinstance(trainer.strategy, DDPStrategy):
            trainer.strategy.model = trainer.strategy.lightning_module
            trainer.strategy.configure_ddp()
        self.steps_done += 1
        after = model_stats(target, example)
        self._log(trainer, before, after)

    def _decide_and_prune(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        target: nn.Module,
        example: Any,
        ratio: float,
    ) -> list[dict[str, Any]]:
        ignored = self._ignored_layers(pl_module, target, example)
        modes = {m: m.training for m in target.modules()}
        frozen = [p for p in target.parameters() if not p.requires_grad]
        widths = _original_widths(target, pruning_history(pl_module))
        importance = _CappedImportance(self.importance, widths, self.max_layer_ratio)
        try:
            if needs_gradients(self.importance):
                self._calibrate(trainer, pl_module)
            for p in frozen:  # the graph skips frozen layers
                p.requires_grad_(True)
            with torch.enable_grad():
                pruner = tp.pruner.BasePruner(
                    target,
                    example,
                    importance,
                    global_pruning=self.global_pruning,
                    pruning_ratio=ratio,
                    max_pruning_ratio=self.max_layer_ratio,
                    ignored_layers=ignored,
                    round_to=self.round_to,
                )
            for p in frozen:
                p.requires_grad_(False)
            if self.global_pruning:  # ask for no more than the capped layers can give, or the threshold hits +inf
                pruner.per_step_pruning_ratio = [
                    0.0,
                    min(ratio, _available_ratio(pruner, widths, self.max_layer_ratio)),
                ]
            records: list[dict[str, Any]] = []
            for group in pruner.step(interactive=True):
                records.extend(group_records(group, target))
                group.prune()
            del pruner  # the graph pins traced activations
        finally:
            for p in frozen:
                p.requires_grad_(False)
            for m, training in modes.items():  # building the graph called `eval()`
                m.train(training)
            for p in target.parameters():
                p.grad = None
        return records

    def _calibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Accumulate training-loss gradients over a few batches, with logging silenced (Taylor criteria)."""
        loader = trainer.train_dataloader
        if loader is None:
            raise MisconfigurationException("Expected a training dataloader to calibrate the gradient-based criterion.")
        pl_module.zero_grad(set_to_none=True)
        with _silenced(pl_module), torch.enable_grad():
            for i, batch in enumerate(loader):
                if i >= self.calibration_batches:
                    break
                out = pl_module.training_step(trainer.strategy.batch_to_device(batch), i)
                loss = out["loss"] if isinstance(out, dict) else out
                loss.backward()

    def _target(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.submodule is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.submodule)
        except AttributeError:
            raise MisconfigurationException(
                f"Expected argument `submodule` to name a submodule of {type(pl_module).__name__} but got "
                f"{self.submodule!r}."
            ) from None

    def _example_input(self, pl_module: pl.LightningModule, target: nn.Module) -> Any:
        example = getattr(target, "example_input_array", None)
        if example is None:
            example = getattr(pl_module, "example_input_array", None)
        if example is None:
            raise MisconfigurationException(
                f"Expected `{type(pl_module).__name__}.example_input_array` to be set to trace the model for pruning "
                "but it is None. HINT: set `self.example_input_array = torch.zeros(1, 3, H, W)` in `__init__`."
            )
        return example

    def _ignored_layers(self, pl_module: pl.LightningModule, target: nn.Module, example: Any) -> list[nn.Module]:
        names = [n for n, _ in target.named_modules() if any(p.fullmatch(n) for p in self.patterns)]
        adapter = getattr(pl_module, "adapter", None) if target is pl_module else None
        names += adapter.output_layers(target) if adapter is not None else _output_layers(target, example)
        return [target.get_submodule(n) for n in dict.fromkeys(names)]

    def _log(self, trainer: pl.Trainer, before: dict[str, float], after: dict[str, float]) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {
            "prune/params": after["params"],
            "prune/macs": after["macs"],
            "prune/params_ratio": after["params"] / before["params"],
            "prune/macs_ratio": after["macs"] / max(before["macs"], 1.0),
        }
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
        rank_zero_info(
            f"StructuredPruning step {self.steps_done}/{len(self.epochs)} at epoch {trainer.current_epoch}: "
            f"params {before['params'] / 1e6:.3f}M → {after['params'] / 1e6:.3f}M, "
            f"MACs {before['macs'] / 1e9:.4f}G → {after['macs'] / 1e9:.4f}G"
        )


class _CappedImportance:
    """Wraps a criterion so that a layer keeps at least ``1 - max_layer_ratio`` of its *original* channels.

    Torch-pruning's ``max_pruning_ratio`` is relative to the model the pruner was built on (each step here), so the
    channels a layer must keep get an infinite score instead: no threshold selects them.
    """

    def __init__(self, importance: Importance, widths: dict[int, int], max_ratio: float) -> None:
        self.importance, self.widths, self.max_ratio = importance, widths, max_ratio

    def __call__(self, group: tp.Group, **kwargs: Any) -> torch.Tensor | None:
        imp = self.importance(group, **kwargs)
        if imp is None:
            return None
        keep = _keep(self.widths.get(id(group[0][0].target.module), len(imp)), len(imp), self.max_ratio)
        imp = imp.clone()
        imp[torch.topk(imp, keep).indices] = float("inf")
        return imp


def _keep(original: int, current: int, max_ratio: float) -> int:
    return min(current, max(1, math.ceil(original * (1.0 - max_ratio) - 1e-9)))


def _available_ratio(pruner: tp.pruner.BasePruner, widths: dict[int, int], max_ratio: float) -> float:
    """The largest global ratio that the capped layers allow (torch-pruning prunes at most ``ratio · total + 1``)."""
    total = available = 0
    for group in pruner.DG.get_all_groups(
        ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
    ):
        root = group[0][0].target.module
        n = pruner.DG.get_out_channels(root)
        total += n
        available += n - _keep(widths.get(id(root), n), n, max_ratio)
    return max(0.0, (available - 1) / max(total, 1))


def _original_widths(target: nn.Module, history: Any) -> dict[int, int]:
    """Output widths of the layers before the first step: the ``size`` of their first ``"out"`` record."""
    widths: dict[int, int] = {}
    for step in history.steps:
        for record in step:
            if record["kind"] == "out" and record.get("size") is not None:
                widths.setdefault(id(target.get_submodule(record["module"])), record["size"])
    return widths


def _output_layers(model: nn.Module, example: Any) -> list[str]:
    """Convs/linears whose output tensor is one of the model's outputs (their width encodes the outputs)."""
    produced: dict[int, tuple[str, Any]] = {}  # holding the output keeps its id from being reused

    def record(name: str) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:  # returning a value would replace the output
            produced.setdefault(id(output), (name, output))

        return hook

    hooks = [
        m.register_forward_hook(record(name))
        for name, m in model.named_modules()
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
    ]
    modes = {m: m.training for m in model.modules()}
    try:
        with torch.no_grad():
            outputs = model(*example) if isinstance(example, tuple) else model(example)
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes.items():
            m.train(training)
    return [produced[id(t)][0] for t in _tensors(outputs) if id(t) in produced]


def _tensors(x: Any) -> Iterator[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)


def _scale_lr(trainer: pl.Trainer, optimizer: torch.optim.Optimizer, scale: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] *= scale
        if "initial_lr" in group:
            group["initial_lr"] *= scale
    for config in trainer.lr_scheduler_configs:
        if config.scheduler.optimizer is optimizer and hasattr(config.scheduler, "base_lrs"):
            config.scheduler.base_lrs = [lr * scale for lr in config.scheduler.base_lrs]


@contextmanager
def _silenced(pl_module: pl.LightningModule) -> Iterator[None]:
    """Calibration batches run ``training_step``: keep their ``self.log`` calls out of the epoch's metrics."""
    pl_module.log, pl_module.log_dict = (lambda *a, **k: None), (lambda *a, **k: None)  # type: ignore[method-assign]
    try:
        yield
    finally:
        del pl_module.log, pl_module.log_dict


def _compile(pattern: Any) -> re.Pattern[str]:
    if not isinstance(pattern, str):
        raise ValueError(f"Expected argument `ignored_layers` to be a list of regex strings but got {pattern!r}.")
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(
            f"Expected argument `ignored_layers` to hold valid regexes but got {pattern!r}: {err}."
        ) from None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
