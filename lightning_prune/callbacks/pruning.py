"""Structured (channel) pruning of any LightningModule during ``fit``, on a schedule of epochs."""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any

import pytorch_lightning as pl
import torch
import torch_pruning as tp
from lightning_fabric.utilities.apply_func import move_data_to_device
from pytorch_lightning.core.optimizer import _init_optimizers_and_lr_schedulers
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn
from torch_pruning.pruner.importance import Importance
from typing_extensions import override

from lightning_prune.adapters.c2f import refuse_chunked_c2f
from lightning_prune.callbacks._modules import (
    adapter_output_layers,
    check_epochs,
    check_patterns_match,
    compile_pattern,
    example_from_shape,
    is_int,
    resolve_example,
    resolve_target,
)
from lightning_prune.pruning.allocation import (
    SensitivityAllocation,
    bracket_search,
    check_sensitivity_model,
    load_sensitivity,
)
from lightning_prune.pruning.blocks import (
    BlockImportance,
    block_scores,
    find_residual_blocks,
    remove_blocks,
    resolve_block_importance,
    select_blocks,
)
from lightning_prune.pruning.calibration import Calibration
from lightning_prune.pruning.channels import check_traceable, layer_widths, output_layers, prune_channels
from lightning_prune.pruning.checkpoint import pruning_history, save_pruning_state, set_pruning_root
from lightning_prune.pruning.folding import InputMeans, fold_removed_inputs
from lightning_prune.pruning.history import apply_records
from lightning_prune.pruning.importance import needs_calibration, resolve_importance
from lightning_prune.pruning.latency import Cost, LatencyAllocation, LatencyTable, width_ratios
from lightning_prune.pruning.netadapt import NetAdapt, NetAdaptRound
from lightning_prune.pruning.optim import track_pruning
from lightning_prune.pruning.schedules import build_schedule, relative_ratios
from lightning_prune.pruning.tracing import copy_with_grads, restored, traceable
from lightning_prune.report.summary import model_stats


class StructuredPruning(pl.Callback):
    """Remove whole channels with torch-pruning's dependency graph at the start of scheduled epochs.

    The pruned model is a smaller dense model. After each step every optimizer is patched in place (surviving
    channels keep their momentum / Adam state, LR schedulers keep their position) and, under DDP, the model is
    re-wrapped. Rank 0 decides and broadcasts each step, so all ranks prune identically. Each step is recorded in a
    :class:`~lightning_prune.pruning.PruningHistory` written into checkpoints; give the module
    :class:`~lightning_prune.pruning.checkpoint.PrunableMixin` to resume or ``load_from_checkpoint`` them.

    Paper: Fang et al., "DepGraph: Towards Any Structural Pruning" (CVPR 2023), https://arxiv.org/abs/2301.12900

    Instead of a channel ratio, a step can aim at a size: with ``target_macs_ratio`` (or ``target_params_ratio``)
    the schedule applies to the reduction ``1 - target`` of the *original* model's MACs (or parameters), and rank 0
    finds each step's channel ratio by a bracketed search (false position) on dry runs (pruning deep copies of the
    module and counting them with :func:`~lightning_prune.report.summary.model_stats`), then prunes the real module
    with it. The achieved ratio is within ±3% (relative) of each step's target and is logged as
    ``prune/macs_of_original`` and ``prune/params_of_original`` (``prune/macs_ratio`` and ``prune/params_ratio``
    compare a step with the one before).

    With ``allocation="latency"`` the widths follow latency measured on the device rather than a global ranking
    (HALP, simplified; :mod:`lightning_prune.pruning.latency`): rank 0 times every conv / linear alone (and the
    activations / pools that run on its outputs) at the widths its greedy asks about (a lookup table, at the example
    input's resolution and ``latency_batch_size``), removes
    blocks of ``round_to`` channels (default 8; a group may drop one or two blocks at once) from the groups that cost
    the least importance per millisecond saved until the step's MACs target is met (checked on dry runs), or its
    ``target_latency_ratio`` of the original model's latency as the table sums it (convs / linears alone), then
    prunes each group to its width. The estimate is logged as ``prune/latency_estimate_ms`` and
    ``prune/latency_of_original``. Set ``example_input`` to the deployed resolution: latency depends on it. On
    YOLOv8s at 320 px and 2 CPU threads a step measures 0.4-2k table entries and takes 5-15 s. The greedy drains
    the groups whose channels save the most time first, so widths end up uneven (some layers at their last block):
    bound them with ``max_layer_ratio`` where accuracy matters.

    Paper: Shen et al., "Structural Pruning via Latency-Saliency Knapsack" (NeurIPS 2022),
    https://arxiv.org/abs/2110.10811

    With ``allocation="sensitivity"`` the widths come from a sensitivity table (``lightning-prune sensitivity``:
    each group pruned alone at several ratios, the mAP measured): rank 0 spends the step's MACs (or params) budget
    on the groups that lose the least measured mAP per MAC saved, at equal marginal loss across groups
    (:class:`~lightning_prune.pruning.allocation.SensitivityAllocation`), the point along that allocation found by
    the same search on dry runs as the targets; channels within a group go by ``importance``. Groups the table
    lacks keep their width.

    With ``target_latency_ms`` the step aims at a measured latency instead: rank 0 times the module's forward (eval
    mode, BatchNorm fused, on its device, at ``latency_batch_size``), then the same search as the MACs target runs
    on dry runs each timed side by side with the module (:attr:`latency_probe`, medians of interleaved runs, so that
    the machine's drifts hit both); the achieved latency, timed the same way, is logged as ``prune/latency_ms``.
    Timing is wall clock: measure on a quiet machine.

    With ``allocation="netadapt"`` rank 0 shrinks copies of the module round by round (NetAdapt, Yang et al., ECCV
    2018, https://arxiv.org/abs/1804.03230; :class:`~lightning_prune.pruning.netadapt.NetAdapt`): each round every
    group proposes the smallest cut that removes ``netadapt_step`` of the original MACs (or params), each proposal is
    scored by :meth:`netadapt_score` (the module's mAP with its ``postprocess`` on the first ``netadapt_batches``
    validation batches), and the one losing the least score per MAC saved is kept, until the step's target is met;
    the chosen copy's channels are then removed from the module. A round costs one dry run and one evaluation per
    group (YOLOv8n: 59 groups); the paper's finetune between rounds is the schedule's training between steps.

    Args:
        pruning_ratio: fraction of the channels of the original model removed after the last step, in (0, 1);
            default 0.5; 0 with ``layer_ratios`` to prune only those layers (or with ``remove_blocks``: only blocks).
            Cannot be combined with a target.
        target_macs_ratio: fraction of the original model's MACs left after the last step, in (0, 1).
        target_params_ratio: fraction of the original model's parameters left after the last step, in (0, 1).
        importance: channel criterion name (see :mod:`lightning_prune.pruning.importance`) or an ``Importance``.
        schedule: ``"one_shot"``, ``"linear"``, ``"cubic"``, ``"geometric"``: cumulative ratio after each step.
        epochs: epochs at whose start a step happens, strictly increasing; default ``[0]`` (one-shot only).
        global_pruning: rank channels across all layers (``True``) or prune every layer by the same ratio.
        round_to: keep channel counts multiples of this.
        max_layer_ratio: no layer loses more than this fraction of its original channels, in (0, 1] (with
            ``global_pruning``; with local pruning every layer loses the schedule's ratio).
        layer_ratios: per-layer channel ratios, ``{regex: ratio}``: the layers whose qualified names fully match a
            regex (or, for a container, the layers inside it) lose that fraction of their original channels after the
            last step, on the same schedule, ranked among themselves; the first matching regex wins. Other layers
            follow ``pruning_ratio`` (or the target). Ratios in (0, 1).
        ignored_layers: regexes fully matching qualified module names (of the pruned module) never pruned; added to
            the module's adapter output layers, or else the convs/linears whose channels reach the model's outputs
            through no other conv/linear (reshapes, concats and activations between are followed on the traced graph).
        calibration_batches: training batches that data-dependent criteria (``"taylor"``, ``"hessian"``,
            ``"activation"``, ``"apoz"``) read; every rank reads its own and the statistics are averaged.
        fold_bias: fold what the removed channels contributed (their mean, over the ``calibration_batches``, at the
            input of each conv/linear that reads them) into that layer's bias or the BatchNorm after it; exact for
            channels with BatchNorm γ = 0 read by 1×1 convs or linear layers (see
            :mod:`lightning_prune.pruning.folding`). Costs the forwards of the calibration batches.
        lr_scale: multiply every learning rate by this after each step (e.g. 0.1 to finetune).
        submodule: dotted name of the submodule to prune; default the whole module.
        example_input: what the pruned module is traced (and its MACs counted) on: a tensor (or tuple of inputs), or
            a shape such as ``[1, 3, 320, 320]`` for a zero tensor (handy in YAML); default its (or the
            LightningModule's) ``example_input_array``. A fully convolutional detector can be traced at a smaller
            size than it trains at (MACs ratios do not depend on it) to make each step cheaper.
        allocation: ``"importance"`` (rank channels by the criterion, globally or per layer), ``"latency"``
            (latency-aware widths, see above; needs ``target_macs_ratio`` or ``target_latency_ratio``) or
            ``"sensitivity"`` (widths from ``sensitivity``, see above; needs ``target_macs_ratio`` or
            ``target_params_ratio``) or ``"netadapt"`` (rounds scored on validation batches, see above; needs
            ``target_macs_ratio`` or ``target_params_ratio``). Only ``"importance"`` takes ``layer_ratios``.
        target_latency_ratio: with ``allocation="latency"``, fraction of the original model's latency (as the
            latency table sums it) left after the last step, in (0, 1); instead of the other targets.
        latency_batch_size: the batch size the latency table times layers at (deployment's), an int >= 1.
        target_latency_ms: the latency (ms) of the pruned module's whole forward to reach, as deployed (eval mode,
            BatchNorm fused) at the example input's resolution and ``latency_batch_size``, on the device it trains
            on; one-shot only, with the importance or sensitivity allocation (see above).
        remove_blocks: residual blocks (modules computing ``x + f(x)``, found on the autograd graph; none holding an
            ignored or output layer) removed at the first step, before its channels: those of lowest
            ``block_importance`` become identities (exact for the identity path: the function with their branches
            zeroed). The step's target counts them.
        block_importance: how blocks are ranked: ``"bn_scale"`` (mean |γ| of all their BatchNorm channels, the layer
            pruning of YOLOv3 slimming pipelines), ``"last_bn"`` (the last BatchNorm's, which scales the branch) or a
            callable ``(name, module) -> score`` (lowest removed first).
        netadapt_step: with ``allocation="netadapt"``, the fraction of the original MACs (or params) each round
            removes, in (0, 1).
        netadapt_batches: with ``allocation="netadapt"``, validation batches each proposal is scored on, >= 1.
        netadapt_finetune_batches: with ``allocation="netadapt"``, training batches of a short finetune of each round's
            winner (its own ``training_step`` and ``configure_optimizers``) before the next round; 0: none. The module
            then takes the finetuned winner's weights. Needs ``submodule=None``.
        sensitivity: with ``allocation="sensitivity"``, the sensitivity table of the unpruned module: the path of
            ``lightning-prune sensitivity``'s ``sensitivity.json``, its dict, or a
            :class:`~lightning_prune.pruning.SensitivityResult`.

    Raises:
        ValueError: an argument is out of range or of the wrong type, ``pruning_ratio`` and a target (or two
            targets) are given, or ``allocation="latency"`` lacks a MACs / latency target (or a latency target comes
            without it).
        MisconfigurationException: at ``setup``, an ``ignored_layers`` pattern matches no module, ``submodule`` names
            none, the module has no ``example_input_array`` or cannot be traced (the error names the module that
            failed); at ``fit`` start, the strategy shards the model or an optimizer's state cannot follow pruned
            parameters; at a step, the module lacks the restored steps, or a
            target cannot be met under ``max_layer_ratio``.

    Example:
        >>> callback = StructuredPruning(pruning_ratio=0.3, importance="l1", schedule="cubic", epochs=[1, 3])
        >>> callback.ratios
        [0.2625, 0.3]
        >>> callback = StructuredPruning(target_macs_ratio=0.5, schedule="linear", epochs=[1, 3])
        >>> callback.ratios  # cumulative MACs reductions; steps leave 75% then 50% of the original MACs
        [0.25, 0.5]
    """

    #: relative tolerance of an achieved MACs/params ratio around the step's target
    tolerance = 0.03
    #: at most this many dry runs per step after the bracket's (false position, usually 2-4)
    search_iterations = 10
    #: with ``target_latency_ms``, untimed and timed rounds of each measurement (medians, models interleaved)
    latency_warmup = 3
    latency_repeats = 15
    #: with ``allocation="latency"``, a group may lose up to this many blocks of ``round_to`` channels in one move
    latency_lookahead = 2

    def __init__(
        self,
        pruning_ratio: float | None = None,
        target_macs_ratio: float | None = None,
        target_params_ratio: float | None = None,
        importance: str | Importance = "l2",
        schedule: str = "one_shot",
        epochs: list[int] | None = None,
        global_pruning: bool = True,
        round_to: int | None = None,
        max_layer_ratio: float = 0.95,
        layer_ratios: dict[str, float] | None = None,
        ignored_layers: list[str] | None = None,
        calibration_batches: int = 8,
        fold_bias: bool = False,
        lr_scale: float | None = None,
        submodule: str | None = None,
        example_input: Any = None,
        allocation: str = "importance",
        target_latency_ratio: float | None = None,
        latency_batch_size: int = 1,
        sensitivity: Any = None,
        target_latency_ms: float | None = None,
        remove_blocks: int = 0,
        block_importance: str | BlockImportance = "bn_scale",
        netadapt_step: float = 0.05,
        netadapt_batches: int = 4,
        netadapt_finetune_batches: int = 0,
    ) -> None:
        super().__init__()
        if epochs is None:
            if schedule != "one_shot":
                raise ValueError(f"Expected argument `epochs` to be a list of epochs for schedule {schedule!r}.")
            epochs = [0]
        epochs = check_epochs(epochs)
        targets = {"macs": target_macs_ratio, "params": target_params_ratio, "latency": target_latency_ratio}
        self.metric, self.target_ratio = _resolve_target(pruning_ratio, targets)
        #: the whole forward's measured latency to reach (ms), one-shot; the step finds its ratio on measured dry runs
        self.target_latency_ms = _resolve_latency_ms(target_latency_ms, self.metric, pruning_ratio, len(epochs))
        if self.target_latency_ms is not None:
            self.metric = "latency_ms"
        self.allocation = _resolve_allocation(allocation, self.metric, pruning_ratio, layer_ratios)
        if (self.allocation == "sensitivity") != (sensitivity is not None):
            raise ValueError(
                f"Expected argument `sensitivity` (a sensitivity table) exactly with allocation='sensitivity' but got "
                f"allocation={self.allocation!r} and sensitivity={sensitivity!r:.80}. HINT: run `lightning-prune "
                "sensitivity` and pass `allocation='sensitivity', sensitivity='<out>/sensitivity.json'`."
            )
        #: with ``allocation="sensitivity"``, the table (checked against the module at ``setup``)
        self.sensitivity = None if sensitivity is None else load_sensitivity(sensitivity)
        if self.sensitivity is not None:
            SensitivityAllocation(self.sensitivity)  # a table without trials fails now, not at the first step
        if isinstance(latency_batch_size, bool) or not (is_int(latency_batch_size) and latency_batch_size >= 1):
            raise ValueError(
                f"Expected argument `latency_batch_size` to be an int >= 1 but got {latency_batch_size!r}."
            )
        self.latency_batch_size = int(latency_batch_size)
        #: with ``allocation="latency"``, rank 0's latency table: a :class:`~lightning_prune.pruning.latency.
        #: LatencyTable` built at the first step, kept for the next; any ``(layer, c_in, c_out) -> ms`` may replace it
        self.latency_table: Cost | None = None
        self._latency: tuple[float, float] | None = None  # the table's estimate before / after this step (rank 0)
        #: with ``target_latency_ms``, ``(models, input) -> ms of each``: BatchNorm-fused eager forwards timed
        #: interleaved (median of ``latency_repeats``) on the input's device; any such callable may replace it
        self.latency_probe: Callable[[list[nn.Module], Any], list[float]] = _default_probe
        reduction = 1.0 - self.target_ratio if self.target_ratio is not None else pruning_ratio
        if self.metric == "latency_ms":
            reduction = 0.5  # unknown until the original latency is measured; the step's goal comes from `_goal`
        if isinstance(remove_blocks, bool) or not (is_int(remove_blocks) and remove_blocks >= 0):
            raise ValueError(f"Expected argument `remove_blocks` to be an int >= 0 but got {remove_blocks!r}.")
        self.remove_blocks = int(remove_blocks)
        if isinstance(netadapt_step, bool) or not (isinstance(netadapt_step, (int, float)) and 0 < netadapt_step < 1):
            raise ValueError(f"Expected argument `netadapt_step` to be a float in (0, 1) but got {netadapt_step!r}.")
        if isinstance(netadapt_batches, bool) or not (is_int(netadapt_batches) and netadapt_batches >= 1):
            raise ValueError(f"Expected argument `netadapt_batches` to be an int >= 1 but got {netadapt_batches!r}.")
        self.netadapt_step, self.netadapt_batches = float(netadapt_step), int(netadapt_batches)
        if isinstance(netadapt_finetune_batches, bool) or not (
            is_int(netadapt_finetune_batches) and netadapt_finetune_batches >= 0
        ):
            raise ValueError(
                "Expected argument `netadapt_finetune_batches` to be an int >= 0 but got "
                f"{netadapt_finetune_batches!r}."
            )
        if netadapt_finetune_batches and submodule is not None:
            raise ValueError(
                f"Expected argument `submodule` to be None with `netadapt_finetune_batches` but got {submodule!r}. "
                "HINT: the short finetune runs the LightningModule's own `training_step` on copies of the whole module."
            )
        self.netadapt_finetune_batches = int(netadapt_finetune_batches)
        self._netadapt_state: dict[str, torch.Tensor] | None = None  # the finetuned winner's weights (rank 0)
        self.block_importance = resolve_block_importance(block_importance)
        #: how the log names the block criterion: its name, or the callable's
        self._block_criterion = (
            block_importance
            if isinstance(block_importance, str)
            else getattr(block_importance, "__qualname__", type(block_importance).__name__)
        )
        self.layer_ratios = _layer_schedules(layer_ratios, schedule, len(epochs))
        if reduction == 0 and not isinstance(reduction, bool) and (self.layer_ratios or self.remove_blocks):
            # only the layers of `layer_ratios` (e.g. a sensitivity YAML) shrink, or only blocks go
            self.ratios = [0.0] * len(epochs)
        else:
            self.ratios = build_schedule(schedule, 0.5 if reduction is None else reduction, len(epochs))
        self.importance = resolve_importance(importance)
        if round_to is not None and not (is_int(round_to) and round_to >= 1):
            raise ValueError(f"Expected argument `round_to` to be None or an int >= 1 but got {round_to!r}.")
        if not (isinstance(max_layer_ratio, (int, float)) and 0 < max_layer_ratio <= 1):
            raise ValueError(
                f"Expected argument `max_layer_ratio` to be a float in (0, 1] but got {max_layer_ratio!r}."
            )
        if not (is_int(calibration_batches) and calibration_batches >= 1):
            raise ValueError(
                f"Expected argument `calibration_batches` to be an int >= 1 but got {calibration_batches!r}."
            )
        if lr_scale is not None and not (isinstance(lr_scale, (int, float)) and lr_scale > 0):
            raise ValueError(f"Expected argument `lr_scale` to be None or a float > 0 but got {lr_scale!r}.")
        self.patterns = [compile_pattern(p, "ignored_layers") for p in ignored_layers or []]
        self.epochs = list(epochs)
        self.global_pruning = bool(global_pruning)
        self.round_to = round_to
        self.max_layer_ratio = float(max_layer_ratio)
        self.calibration_batches = calibration_batches
        self.fold_bias = bool(fold_bias)
        self.lr_scale = lr_scale
        self.submodule = submodule
        self.example_input = example_from_shape(example_input)
        self.steps_done = 0
        #: per step, ``{layer name: (output channels before, after)}`` of the layers the step narrowed
        self.layer_widths: list[dict[str, tuple[int, int]]] = []
        self._graph_outputs: list[str] | None = None  # output layers of a module without adapter
        self._stats: dict[str, float] | None = None  # the model's stats after the last step (reused as "before")
        self._original: dict[str, float] | None = None  # the unpruned model's stats (targets are relative to them)

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        target = self._target(pl_module)
        self._example_input(pl_module, target)
        check_patterns_match(target, "ignored_layers", self.patterns)
        check_patterns_match(target, "layer_ratios", list(self.layer_ratios))
        if self.sensitivity is not None:
            try:
                check_sensitivity_model(self.sensitivity, target, len(pruning_history(pl_module)))
            except ValueError as err:
                raise MisconfigurationException(str(err)) from None
        if stage == "fit" and self.steps_done < len(self.epochs):
            refuse_chunked_c2f(target, MisconfigurationException)
            try:
                graph = check_traceable(target, self._example_input(pl_module, target))
            except ValueError as err:
                raise MisconfigurationException(str(err)) from err.__cause__
            if adapter_output_layers(target) is None:
                self._graph_outputs = output_layers(target, graph)
            del graph  # it pins traced activations
            if self.remove_blocks and self.steps_done == 0:
                found = self._residual_blocks(pl_module, target, self._example_input(pl_module, target))
                if self.remove_blocks > len(found):
                    raise MisconfigurationException(
                        f"Expected argument `remove_blocks` to be at most the {len(found)} residual blocks (modules "
                        f"computing x + f(x), none holding an ignored or output layer) of the pruned module but got "
                        f"{self.remove_blocks}. Found: {found[:8]}{' ...' if len(found) > 8 else ''}."
                    )
            if self._stats is None:  # the first step's "before" (structural: valid until the structure changes)
                self._stats = model_stats(target, self._example_input(pl_module, target))

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.steps_done >= len(self.epochs):
            return
        strategy = trainer.strategy
        if not isinstance(strategy, DDPStrategy) and type(strategy).__name__ not in _SINGLE_DEVICE:
            raise MisconfigurationException(
                f"Expected a single-device or DDP strategy to prune (every rank holds the whole model) but got "
                f"{type(strategy).__name__}. HINT: use `strategy='ddp'`; sharded models cannot change shape."
            )
        for i, optimizer in enumerate(trainer.optimizers):
            _check_optimizer(i, optimizer)

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
        if self.metric is None or self._original is None:
            return {"steps_done": self.steps_done}
        return {"steps_done": self.steps_done, "original": dict(self._original)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps_done = int(state_dict.get("steps_done", 0))
        original = state_dict.get("original")
        self._original = None if original is None else {k: float(v) for k, v in original.items()}

    # ------------------------------------------------------------------ pruning
    def prune_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run the next step of the schedule on every rank, then patch optimizers and re-wrap DDP."""
        target = self._target(pl_module)
        example = move_data_to_device(self._example_input(pl_module, target), pl_module.device)
        cached = self._stats
        reuse = cached is not None and cached["params"] == sum(p.numel() for p in target.parameters())
        before = cached if reuse and cached is not None else model_stats(target, example)
        history = pruning_history(pl_module)
        reference = None  # latency_ms: the model before the step, timed against the pruned one (rank 0)
        if self.metric == "latency_ms" and trainer.is_global_zero:
            before = {**before, "latency_ms": self._measure(target, example)}
            reference = copy.deepcopy(target)
        blocks = self._drop_blocks(trainer, pl_module, target, example) if self.steps_done == 0 else []
        current = before  # the model's stats now, what the search starts from
        if blocks:
            current = model_stats(target, example)
            if reference is not None:
                current = {**current, "latency_ms": self._paired_ms(reference, target, example)[1]}
        if self.metric is not None and self._original is None:
            if len(history):
                raise MisconfigurationException(
                    f"Expected the callback state to hold the original model's {self.metric} (targets are relative to "
                    f"them) but the module is already pruned ({len(history)} steps) and the state has none. HINT: "
                    "resume from a checkpoint written by a run with the same target."
                )
            self._original = dict(before)
        ratio = self.step_ratio(pl_module, target, example)  # of the model as it is now
        keep: dict[str, int] | None = None  # latency allocation: {group root: channels kept}
        planned: list[dict[str, Any]] | None = None  # NetAdapt: the records of its rounds
        self._latency = None
        widths = layer_widths(target)
        prunes = self.metric is not None or ratio > 0 or bool(self.layer_ratios)
        calibrated = needs_calibration(self.importance) and prunes
        fold = InputMeans(target) if self.fold_bias and prunes else None
        if calibrated or fold is not None:  # every rank, on its own batches; the statistics are averaged across ranks
            self._calibrate(trainer, pl_module, target, self.importance if calibrated else None, fold, example)
        records = error = None
        if trainer.is_global_zero and self.metric is not None:  # dry runs, outside the tracker of the real pruning
            try:
                if self.allocation == "latency":
                    keep = self._allocate(pl_module, target, example, current)
                elif self.allocation == "sensitivity":
                    keep = self._allocate_sensitivity(pl_module, target, example, current)
                elif self.allocation == "netadapt":
                    planned = self._netadapt(trainer, pl_module, target, example, current)
                else:
                    ratio = self._search_ratio(pl_module, target, example, current)
            except _UnreachableTarget as err:  # every rank raises it, none waits in the broadcast
                error = str(err)
        with track_pruning(target) as tracker:
            if trainer.is_global_zero and error is None:  # decide once, apply everywhere
                records = self._decide_and_prune(trainer, pl_module, target, example, ratio, fold, keep, planned)
            if trainer.world_size > 1:
                records, error = trainer.strategy.broadcast((records, error), src=0)
                if not trainer.is_global_zero and error is None:  # rank 0's records (the DDP re-wrap syncs anyway)
                    self._apply(target, records, fold)
            if error is not None:
                raise MisconfigurationException(error)
        history.append(blocks + (records or []))
        set_pruning_root(pl_module, self.submodule)
        if calibrated:
            target.zero_grad(set_to_none=True)
        for optimizer in trainer.optimizers:
            tracker.patch(optimizer)
            if self.lr_scale is not None:
                _scale_lr(trainer, optimizer, self.lr_scale)
        if isinstance(trainer.strategy, DDPStrategy):
            trainer.strategy.model = trainer.strategy.lightning_module
            trainer.strategy.configure_ddp()
        self.steps_done += 1
        after = self._stats = model_stats(target, example)
        if reference is not None:  # the achieved latency, measured side by side with the model before the step
            self._latency = self._paired_ms(reference, target, example)
            after = {**after, "latency_ms": self._latency[1]}
        self._log(trainer, before, after, widths, layer_widths(target))

    def step_ratio(self, pl_module: pl.LightningModule, target: nn.Module, example: Any) -> float:
        """The channel ratio of the next step, relative to the model as it is now (the schedule's, by default).

        Equal on every rank (rank 0 then decides which channels). Subclasses derive it from the model.
        """
        return relative_ratios(self.ratios)[self.steps_done]

    def _decide_and_prune(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        target: nn.Module,
        example: Any,
        ratio: float,
        fold: InputMeans | None,
        keep: dict[str, int] | None = None,
        planned: list[dict[str, Any]] | None = None,
    ) -> list[dict[str, Any]]:
        if planned is not None:  # NetAdapt's rounds, chosen on copies: the same records, the same channels
            self._apply(target, planned, fold)
            if self._netadapt_state is not None:  # and its finetuned weights (the DDP re-wrap gives them to all ranks)
                with torch.no_grad():
                    for name, tensor in itertools.chain(target.named_parameters(), target.named_buffers()):
                        tensor.copy_(self._netadapt_state[name])
                self._netadapt_state = None
            return planned
        ignored = self._ignored_layers(pl_module, target, example)
        if (keep is None and ratio <= 0 and not self.layer_ratios) or keep == {}:
            return []
        with restored(target, keep_grads=True):
            return self._prune(target, example, ratio, ignored, pruning_history(pl_module), fold, keep)

    def _apply(self, target: nn.Module, records: list[dict[str, Any]], fold: InputMeans | None) -> None:
        """Replay records decided elsewhere on ``target``, in their order, folding as ``_prune`` does."""
        for record in records:
            if fold is not None:
                fold_removed_inputs(target, [record], fold)
            apply_records(target, [record], step=self.steps_done)

    def _prune(
        self,
        target: nn.Module,
        example: Any,
        ratio: float,
        ignored: list[str],
        history: Any,
        fold: InputMeans | None = None,
        keep: dict[str, int] | None = None,
    ) -> list[dict[str, Any]]:
        """Prune ``target`` (the real module or a dry run's copy) by the channel ratio ``ratio``, or each group to its
        ``keep`` width (``{group root: channels}``, a latency allocation's); the records."""
        if keep is not None:
            return prune_channels(
                target,
                example,
                self.importance,
                0.0,
                ignored_layers=[target.get_submodule(n) for n in ignored],
                layer_ratios=width_ratios(target, keep),
                history=history,
                global_pruning=False,
                max_layer_ratio=self.max_layer_ratio,
                fold=fold,
            )
        return prune_channels(
            target,
            example,
            self.importance,
            ratio,
            ignored_layers=[target.get_submodule(n) for n in ignored],
            layer_ratios=self._layer_ratio_dict(target, ignored),
            history=history,
            global_pruning=self.global_pruning,
            max_layer_ratio=self.max_layer_ratio,
            round_to=self.round_to,
            fold=fold,
        )

    def _search_ratio(
        self, pl_module: pl.LightningModule, target: nn.Module, example: Any, before: dict[str, float]
    ) -> float:
        """Search the channel ratio whose dry run leaves the step's fraction of the original MACs/params.

        Each dry run prunes a deep copy of ``target`` (with the gradients or statistics of a data-dependent criterion,
        which stay for the real step); ``target`` itself keeps its parameters, modes and ``requires_grad`` flags.
        """
        assert self.metric is not None and self._original is not None
        ignored = self._ignored_layers(pl_module, target, example)
        history = pruning_history(pl_module)
        goal = self._goal()
        original = max(self._original[self.metric], 1.0)

        def achieved(ratio: float) -> float:
            if ratio == 0.0 and not self.layer_ratios:
                return before[self.metric] / original
            return self._dry_run(target, example, ratio, ignored, history)[self.metric] / original

        reach = f"pruning every layer up to `max_layer_ratio` ({self.max_layer_ratio})"
        found = self._search(achieved, achieved(0.0), min(self.max_layer_ratio, 0.99), goal, reach, "`max_layer_ratio`")
        return 0.0 if found is None else found

    def _search(
        self, achieved: Callable[[float], float], start: float, end: float, goal: float, reach: str, raise_: str
    ) -> float | None:
        """The point of ``[0, end]`` whose dry run (``achieved``, decreasing) meets ``goal`` (a bracketed search);
        None if ``start`` (the model as it is) already does. Unreachable at ``end`` (what ``reach`` describes): the
        error, with the hint to raise ``raise_``."""
        if start <= goal * (1.0 + self.tolerance):
            return None  # already small enough
        reachable = achieved(end)
        if reachable > goal * (1.0 + self.tolerance):
            name, given = self._target_argument()
            raise _UnreachableTarget(
                f"Expected argument `{name}` ({given}) to be reachable but step {self.steps_done + 1} needs "
                f"{goal:.3f} of the original {self.metric} and {reach} leaves {reachable:.3f}. HINT: raise {raise_} "
                f"or `{name}`."
            )
        return bracket_search(achieved, goal, 0.0, end, (start, reachable), self.tolerance, self.search_iterations)[0]

    def _dry_run(
        self,
        target: nn.Module,
        example: Any,
        ratio: float,
        ignored: list[str],
        history: Any,
        keep: dict[str, int] | None = None,
    ) -> dict[str, float]:
        """The stats of a deep copy of ``target`` pruned as this step would (``target`` itself untouched)."""
        trial = copy_with_grads(target)  # parameters, grads, flags and history names as in `target`
        with restored(trial, keep_grads=True):
            self._prune(trial, example, ratio, ignored, history, keep=keep)
        stats = model_stats(trial, example)
        if self.metric == "latency_ms":  # timed side by side with `target` (drifts of the machine hit both)
            stats["latency_ms"] = self._paired_ms(target, trial, example)[1]
        return stats

    def _residual_blocks(self, pl_module: pl.LightningModule, target: nn.Module, example: Any) -> list[str]:
        """The residual blocks ``remove_blocks`` chooses from: none holding an ignored or output layer."""
        ignored = self._ignored_layers(pl_module, target, example)
        with restored(target):
            return find_residual_blocks(target, example, ignored_layers=ignored)

    def _drop_blocks(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, target: nn.Module, example: Any
    ) -> list[dict[str, Any]]:
        """Remove the ``remove_blocks`` residual blocks of lowest ``block_importance`` (rank 0 decides, every rank
        applies), with the optimizers following; the records."""
        if not self.remove_blocks:
            return []
        records: list[dict[str, Any]] = []
        with track_pruning(target) as tracker:
            if trainer.is_global_zero:
                found = self._residual_blocks(pl_module, target, example)
                chosen = select_blocks(block_scores(target, found, self.block_importance), self.remove_blocks)
                records = remove_blocks(target, chosen)
            if trainer.world_size > 1:
                records = trainer.strategy.broadcast(records, src=0)
                if not trainer.is_global_zero:
                    self._apply(target, records, None)
        for optimizer in trainer.optimizers:
            tracker.patch(optimizer)
        rank_zero_info(
            f"StructuredPruning removed {len(records)} residual blocks (lowest {self._block_criterion}): "
            + ", ".join(r["module"] for r in records)
        )
        return records

    def _goal(self) -> float:
        """This step's target as a fraction of the original model's metric."""
        if self.metric == "latency_ms":
            assert self._original is not None and self.target_latency_ms is not None
            return self.target_latency_ms / max(self._original["latency_ms"], 1e-9)
        return 1.0 - self.ratios[self.steps_done]

    def _target_argument(self) -> tuple[str, float | None]:
        if self.metric == "latency_ms":
            return "target_latency_ms", self.target_latency_ms
        return f"target_{self.metric}_ratio", self.target_ratio

    def _timing_input(self, example: Any) -> Any:
        if isinstance(example, torch.Tensor):
            return example[:1].expand(self.latency_batch_size, *example.shape[1:]).contiguous()
        return example

    def _measure(self, model: nn.Module, example: Any) -> float:
        """Milliseconds of ``model``'s forward (``latency_probe``) at ``latency_batch_size``."""
        return self.latency_probe([model], self._timing_input(example))[0]

    def _paired_ms(self, reference: nn.Module, model: nn.Module, example: Any) -> tuple[float, float]:
        """Milliseconds of ``reference`` and ``model``, timed side by side (interleaved)."""
        ref, new = self.latency_probe([reference, model], self._timing_input(example))
        return ref, new

    def _allocate(
        self, pl_module: pl.LightningModule, target: nn.Module, example: Any, before: dict[str, float]
    ) -> dict[str, int]:
        """Rank 0: this step's latency-aware widths ``{group root: channels}``, meeting its MACs or latency target.

        The MACs of a prefix of the greedy's moves are estimated from the convs / linears, then checked on dry runs
        (deep copies pruned to those widths and counted as usual), the budget corrected by what they show.
        """
        assert self.metric is not None and self._original is not None
        ignored = self._ignored_layers(pl_module, target, example)
        history = pruning_history(pl_module)
        if self.latency_table is None:
            self.latency_table = LatencyTable()
        allocation = LatencyAllocation(
            target,
            example,
            self.importance,
            self.latency_table,
            ignored_layers=[target.get_submodule(n) for n in ignored],
            history=history,
            max_layer_ratio=self.max_layer_ratio,
            block=self.round_to or 8,
            lookahead=self.latency_lookahead,
            batch_size=self.latency_batch_size,
        )
        if "latency" not in self._original:
            if len(history) and self.metric == "latency":
                raise _UnreachableTarget(
                    f"Expected the callback state to hold the original model's latency (the target is relative to it) "
                    f"but the module is already pruned ({len(history)} steps) and the state has none. HINT: resume "
                    "from a checkpoint written by a run with the same target."
                )
            if not len(history):
                self._original["latency"] = allocation.latency[0]
        goal = self._goal()
        name, given = self._target_argument()
        if self.metric == "latency":
            allocation.extend(latency=goal * self._original["latency"])
            moves, reached = len(allocation.moves), allocation.latency[-1] / self._original["latency"]
        else:
            moves, reached = self._search_moves(allocation, target, example, ignored, history, before, goal)
        if reached > goal * (1.0 + self.tolerance):
            raise _UnreachableTarget(
                f"Expected argument `{name}` ({given}) to be reachable but step {self.steps_done + 1} "
                f"needs {goal:.3f} of the original {self.metric} and the latency allocation, every group down to "
                f"`max_layer_ratio` ({self.max_layer_ratio}) or to its last block, leaves {reached:.3f}. HINT: raise "
                f"`max_layer_ratio` or `{name}`, or lower `round_to`."
            )
        self._latency = (allocation.latency[0], allocation.latency[moves])
        return allocation.widths(moves)

    def _allocate_sensitivity(
        self, pl_module: pl.LightningModule, target: nn.Module, example: Any, before: dict[str, float]
    ) -> dict[str, int]:
        """Rank 0: this step's widths ``{group: channels}`` from the sensitivity table, at the position along its
        equal-slope allocation whose dry run meets the step's target (:mod:`lightning_prune.pruning.allocation`)."""
        assert self.metric is not None and self._original is not None and self.sensitivity is not None
        ignored = self._ignored_layers(pl_module, target, example)
        history = pruning_history(pl_module)
        allocation = SensitivityAllocation(self.sensitivity, self.round_to, self.max_layer_ratio)
        current = layer_widths(target)
        skip = set(ignored)
        goal = self._goal()
        original = max(self._original[self.metric], 1.0)

        def keep(position: float) -> dict[str, int]:
            widths = allocation.widths(position)
            return {g: c for g, c in widths.items() if g not in skip and c < current[g]}

        def achieved(position: float) -> float:
            widths = keep(position)
            if not widths:
                return before[self.metric] / original
            return self._dry_run(target, example, 0.0, ignored, history, keep=widths)[self.metric] / original

        reach = (
            f"every group of the sensitivity table pruned to its largest ratio tried "
            f"({max(self.sensitivity.ratios):g}, within `max_layer_ratio` {self.max_layer_ratio})"
        )
        hint = "the table's ratios (analyse up to `--ratios ... 0.9`, or more groups)"
        position = self._search(achieved, before[self.metric] / original, float(len(allocation)), goal, reach, hint)
        return {} if position is None else keep(position)

    def netadapt_score(self, model: nn.Module, batches: list[Any]) -> float:
        """The score NetAdapt compares its proposals by (higher is better): COCO mAP50-95 of ``model`` (a pruned
        copy of the module, with the module's ``postprocess``) on ``batches``. Override it for other modules."""
        from lightning_prune.report.evaluate import evaluate_map  # report imports the models, which import callbacks

        device = next(model.parameters()).device
        with restored(model):
            model.eval()
            return evaluate_map(model, model.postprocess, batches, device=device)["mAP"]

    def _short_finetune(self, trainer: pl.Trainer, model: nn.Module) -> None:
        """NetAdapt's short-term finetune of a round's winner (a copy of the module): ``netadapt_finetune_batches``
        training batches through its own ``training_step`` and a fresh optimizer from its ``configure_optimizers``
        (learning-rate schedulers not stepped), logging silenced."""
        assert isinstance(model, pl.LightningModule)
        model.trainer = trainer  # a deep copy of a LightningModule drops its Trainer (its __getstate__)
        optimizers, _ = _init_optimizers_and_lr_schedulers(model)
        if trainer.train_dataloader is None:
            raise MisconfigurationException(
                "Expected a training dataloader for NetAdapt's short finetune (`netadapt_finetune_batches`)."
            )
        precision = getattr(trainer, "precision_plugin", None)
        with restored(model, keep_grads=True), _silenced(model), torch.enable_grad():
            model.train()
            for i, batch in enumerate(trainer.train_dataloader):
                if i >= self.netadapt_finetune_batches:
                    break
                with precision.train_step_context() if precision is not None else nullcontext():
                    out = model.training_step(trainer.strategy.batch_to_device(batch), i)
                loss = out["loss"] if isinstance(out, dict) else out
                for optimizer in optimizers:
                    optimizer.zero_grad(set_to_none=True)
                loss.backward()
                for optimizer in optimizers:
                    optimizer.step()
        model.zero_grad(set_to_none=True)

    def _netadapt(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, target: nn.Module, example: Any, now: dict
    ) -> list[dict[str, Any]] | None:
        """Rank 0: NetAdapt's rounds on copies of ``target`` down to the step's goal; their records."""
        assert self.metric is not None and self._original is not None
        to_now = self._original[self.metric] / max(now[self.metric], 1e-12)  # original fractions -> of the model now
        goal = self._goal() * to_now
        if goal >= 1.0 - self.tolerance:
            return None  # already small enough
        batches = _validation_batches(trainer, self.netadapt_batches)

        def report(round_: NetAdaptRound) -> None:
            rank_zero_info(
                f"StructuredPruning NetAdapt round {len(adapt.rounds)}: "
                + ", ".join(f"`{g}` → {w}" for g, w in round_.widths.items())
                + ", "
                f"{self.metric} {round_.cost:.3f} of the step's start, score {round_.score:.4f} "
                f"({round_.candidates} proposals)"
            )

        adapt = NetAdapt(
            target,
            example,
            lambda model: self.netadapt_score(model, batches),
            importance=self.importance,
            step=self.netadapt_step * to_now,
            cost=self.metric,
            ignored_layers=[re.escape(n) for n in self._ignored_layers(pl_module, target, example)],
            round_to=self.round_to,
            max_layer_ratio=self.max_layer_ratio,
            on_round=report,
            finetune=(lambda model: self._short_finetune(trainer, model)) if self.netadapt_finetune_batches else None,
        )
        try:
            records = adapt.run(goal, tolerance=self.tolerance / 3)
            if self.netadapt_finetune_batches and adapt.chosen is not None:
                state = itertools.chain(adapt.chosen.named_parameters(), adapt.chosen.named_buffers())
                self._netadapt_state = {name: tensor.detach() for name, tensor in state}
            return records
        except ValueError as err:
            name, given = self._target_argument()
            raise _UnreachableTarget(
                f"Expected argument `{name}` ({given}) to be reachable by NetAdapt but: {err} HINT: raise "
                f"`max_layer_ratio` or `{name}`, or lower `round_to`."
            ) from None

    def _search_moves(
        self,
        allocation: LatencyAllocation,
        target: nn.Module,
        example: Any,
        ignored: list[str],
        history: Any,
        before: dict[str, float],
        goal: float,
    ) -> tuple[int, float]:
        """``(moves, fraction of the original MACs their dry run leaves)`` closest to ``goal`` (within tolerance / 3
        if the estimates allow), correcting the estimated budget by each dry run."""
        assert self._original is not None
        original = max(self._original["macs"], 1.0)
        if before["macs"] / original <= goal * (1.0 + self.tolerance):
            return 0, before["macs"] / original  # already small enough
        scale = before["macs"] / max(allocation.macs[0], 1.0)  # the counter also counts BatchNorms, activations, ...
        budget = goal * original / scale  # in the allocation's units
        tried: dict[int, float] = {}
        for _ in range(self.search_iterations):
            allocation.extend(macs=budget)
            moves = next((i for i, m in enumerate(allocation.macs) if m <= budget), len(allocation.moves))
            if moves > 0 and abs(allocation.macs[moves - 1] - budget) < abs(allocation.macs[moves] - budget):
                moves -= 1
            if moves in tried:
                break
            stats = self._dry_run(target, example, 0.0, ignored, history, keep=allocation.widths(moves))
            tried[moves] = value = stats["macs"] / original
            if abs(value / goal - 1.0) < self.tolerance / 3:
                break
            budget *= goal / value
        moves = min(tried, key=lambda n: abs(tried[n] / goal - 1.0))
        return moves, tried[moves]

    def _calibrate(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        target: nn.Module,
        importance: Importance | None,
        fold: InputMeans | None,
        example: Any,
    ) -> None:
        """Run ``calibration_batches`` training steps for a data-dependent criterion and/or the input means of
        ``fold``, logging silenced, on every rank.

        The steps run under the trainer's precision context; BatchNorm statistics are restored afterwards, and under
        DDP the gathered statistics are averaged across ranks (with SyncBatchNorm every rank must run the forwards).
        Without a training dataloader, the input means are measured on ``example``.
        """
        loader = trainer.train_dataloader
        if loader is None and importance is not None:
            raise MisconfigurationException(
                f"Expected a training dataloader to calibrate the data-dependent criterion {type(importance).__name__}."
            )
        precision = getattr(trainer, "precision_plugin", None)
        with ExitStack() as stack:
            stack.enter_context(_silenced(pl_module))
            stack.enter_context(torch.enable_grad() if importance is not None else torch.no_grad())
            calibration = stack.enter_context(Calibration(importance, target))
            if fold is not None:
                stack.enter_context(fold)
            if loader is None:
                _forward(target, example)
            for i, batch in enumerate(loader or []):
                if i >= self.calibration_batches:
                    break
                with precision.train_step_context() if precision is not None else nullcontext():
                    out = pl_module.training_step(trainer.strategy.batch_to_device(batch), i)
                calibration.step(out["loss"] if isinstance(out, dict) else out)
        tensors = calibration.tensors() + (fold.tensors() if fold is not None else [])
        if trainer.world_size > 1 and tensors:
            flat = trainer.strategy.reduce(
                torch.cat([t.detach().flatten().double() for t in tensors]), reduce_op="mean"
            )
            offset = 0
            with torch.no_grad():
                for t in tensors:
                    t.copy_(flat[offset : offset + t.numel()].view_as(t))
                    offset += t.numel()

    def _layer_ratio_dict(self, target: nn.Module, ignored: list[str]) -> dict[nn.Module, float]:
        """This step's ratio of each module named in ``layer_ratios`` (first matching regex), relative to now."""
        ratios: dict[nn.Module, float] = {}
        skip = set(ignored)
        for name, module in target.named_modules():
            if name in skip:
                continue
            for pattern, steps in self.layer_ratios.items():
                if pattern.fullmatch(name):
                    if steps[self.steps_done] > 0:
                        ratios[module] = steps[self.steps_done]
                    break
        return ratios

    def _target(self, pl_module: pl.LightningModule) -> nn.Module:
        return resolve_target(pl_module, self.submodule)

    def _example_input(self, pl_module: pl.LightningModule, target: nn.Module) -> Any:
        return resolve_example(
            self.example_input, pl_module, target, "StructuredPruning", "trace the model for pruning"
        )

    def _ignored_layers(self, pl_module: pl.LightningModule, target: nn.Module, example: Any) -> list[str]:
        """``ignored_layers`` matches and the adapter's output layers (else those found on the traced graph)."""
        names = [n for n, _ in target.named_modules() if any(p.fullmatch(n) for p in self.patterns)]
        adapted = adapter_output_layers(target)
        if adapted is not None:
            names += adapted
        else:  # found on the traced graph at setup (names do not change with pruning), or now
            if self._graph_outputs is None:
                with restored(target), traceable(target):
                    self._graph_outputs = output_layers(target, tp.DependencyGraph().build_dependency(target, example))
            names += self._graph_outputs
        return list(dict.fromkeys(names))

    def _log(
        self,
        trainer: pl.Trainer,
        before: dict[str, float],
        after: dict[str, float],
        widths_before: dict[str, int],
        widths_after: dict[str, int],
    ) -> None:
        changed = {n: (w, widths_after[n]) for n, w in widths_before.items() if widths_after.get(n, w) != w}
        self.layer_widths.append(changed)
        if not trainer.is_global_zero:
            return
        metrics = {
            "prune/params": after["params"],
            "prune/macs": after["macs"],
            "prune/params_ratio": after["params"] / before["params"],
            "prune/macs_ratio": after["macs"] / max(before["macs"], 1.0),
        }
        goal = ""
        if self.metric is not None and self._original is not None:
            for key in ("params", "macs"):  # of the original model, as the target
                metrics[f"prune/{key}_of_original"] = after[key] / max(self._original[key], 1.0)
            measured = self.metric == "latency_ms"
            if self._latency is not None and measured:  # the whole forward, timed against the model before the step
                metrics["prune/latency_ms"] = self._latency[1]
                metrics["prune/latency_ms_of_original"] = self._latency[1] / max(self._original["latency_ms"], 1e-9)
            elif self._latency is not None:  # the latency table's estimate (convs / linears alone)
                metrics["prune/latency_estimate_ms"] = self._latency[1]
                if "latency" in self._original:
                    metrics["prune/latency_of_original"] = self._latency[1] / max(self._original["latency"], 1e-9)
            aim = self._goal() if measured else 1.0 - self.ratios[self.steps_done - 1]
            goal = (
                f", {self.metric} target {aim:.2f}, "
                f"achieved {metrics.get(f'prune/{self.metric}_of_original', float('nan')):.2f} of the original"
            )
            if self._latency is not None:
                goal += f", latency ({'measured' if measured else 'table'}) {self._latency[0]:.2f} → "
                goal += f"{self._latency[1]:.2f} ms"
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
        rank_zero_info(
            f"StructuredPruning step {self.steps_done}/{len(self.epochs)} at epoch {trainer.current_epoch}: "
            f"params {before['params'] / 1e6:.3f}M → {after['params'] / 1e6:.3f}M, "
            f"MACs {before['macs'] / 1e9:.4f}G → {after['macs'] / 1e9:.4f}G{goal}; output channels of "
            f"{len(changed)} layers:\n" + "\n".join(f"  {n}: {a} → {b}" for n, (a, b) in changed.items())
        )


def _validation_batches(trainer: pl.Trainer, count: int) -> list[Any]:
    """The first ``count`` batches of the Trainer's (first) validation dataloader, set up if it is not yet."""
    loaders = trainer.val_dataloaders
    if loaders is None and hasattr(trainer, "fit_loop"):
        trainer.fit_loop.epoch_loop.val_loop.setup_data()
        loaders = trainer.val_dataloaders
    loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
    batches = list(itertools.islice(loader, count)) if loader is not None else []
    if not batches:
        raise MisconfigurationException(
            "Expected validation data to score NetAdapt's proposals (allocation='netadapt') but the Trainer has none. "
            "HINT: give `fit` a `val_dataloaders` (or a datamodule with `val_dataloader`) and `limit_val_batches` > 0."
        )
    return batches


def _default_probe(models: list[nn.Module], example: Any) -> list[float]:
    from lightning_prune.report.latency import latency_ms  # report imports the models, which import callbacks

    return latency_ms(
        models, example, warmup=StructuredPruning.latency_warmup, repeats=StructuredPruning.latency_repeats
    )


def _resolve_latency_ms(value: Any, metric: str | None, pruning_ratio: Any, steps: int) -> float | None:
    """``target_latency_ms``, checked: a number of ms > 0, the only target, one-shot."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"Expected argument `target_latency_ms` to be a float > 0 (milliseconds) but got {value!r}.")
    if metric is not None or pruning_ratio is not None:
        other = f"target_{metric}_ratio" if metric is not None else "pruning_ratio"
        raise ValueError(
            f"Expected at most one of `target_latency_ms` and `{other}` but got target_latency_ms={value!r} and "
            f"{other}={pruning_ratio if metric is None else '...'}."
        )
    if steps != 1:
        raise ValueError(
            f"Expected the 'one_shot' schedule (one epoch) with `target_latency_ms` but got {steps} epochs. HINT: "
            "for an iterative schedule give `target_macs_ratio` (`target_latency_ratio` with the latency allocation)."
        )
    return float(value)


class _UnreachableTarget(Exception):
    """Rank 0 found a step's target out of reach (or what it is relative to missing); raised on every rank as a
    misconfiguration."""


def _resolve_target(pruning_ratio: float | None, targets: dict[str, float | None]) -> tuple[str | None, float | None]:
    """``(metric, target)`` from the mutually exclusive ways to say how much to prune; ``(None, None)`` for channels."""
    given = {f"target_{metric}_ratio": value for metric, value in targets.items() if value is not None}
    if len(given) > 1:
        names = [f"`target_{metric}_ratio`" for metric in targets]
        raise ValueError(
            f"Expected at most one of {', '.join(names[:-1])} and {names[-1]} but got "
            + " and ".join(f"{k}={v!r}" for k, v in given.items())
            + "."
        )
    if not given:
        return None, None
    ((name, value),) = given.items()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"Expected argument `{name}` to be a float in (0, 1) but got {value!r}.")
    if pruning_ratio is not None:
        raise ValueError(
            f"Expected argument `pruning_ratio` to be None with `{name}` but got {pruning_ratio!r}. HINT: the target "
            "replaces the channel ratio; drop `pruning_ratio`."
        )
    return name.split("_")[1], float(value)


_ALLOCATIONS = ("importance", "latency", "sensitivity", "netadapt")


_TARGET_ARGUMENTS = {
    "macs": "`target_macs_ratio`",
    "params": "`target_params_ratio`",
    "latency": "`target_latency_ratio`",
    "latency_ms": "`target_latency_ms`",
}
#: the targets each allocation can spend, and the hint when it gets another
_ALLOCATION_TARGETS = {
    "latency": (
        ("macs", "latency"),
        "the latency allocation removes channels until a MACs or latency budget is met, e.g. `target_macs_ratio=0.5`.",
    ),
    "netadapt": (("macs", "params"), "NetAdapt shrinks the model round by round until a MACs or params budget is met."),
    "sensitivity": (
        ("macs", "params", "latency_ms"),
        "the sensitivity allocation spends a budget, e.g. `target_macs_ratio=0.5`.",
    ),
}


def _given_target(metric: str | None, pruning_ratio: Any) -> str:
    """What the user gave instead of the target an allocation needs, for its error message."""
    if metric is not None:
        return _TARGET_ARGUMENTS[metric]
    return "neither" if pruning_ratio is None else f"`pruning_ratio={pruning_ratio!r}`"


def _resolve_allocation(allocation: Any, metric: str | None, pruning_ratio: Any, layer_ratios: Any) -> str:
    """``allocation``, checked against the target it needs (a latency target needs the latency allocation)."""
    if allocation not in _ALLOCATIONS:
        raise ValueError(f"Expected argument `allocation` to be one of {list(_ALLOCATIONS)} but got {allocation!r}.")
    if allocation == "latency" and metric == "latency_ms":
        raise ValueError(
            "Expected argument `allocation` to be 'importance' or 'sensitivity' with `target_latency_ms` but got "
            "'latency'. HINT: the latency allocation aims at its table's estimate: give `target_latency_ratio`, or "
            "keep `target_latency_ms` with another allocation (its ratio is searched on measured latencies)."
        )
    needs = _ALLOCATION_TARGETS.get(str(allocation))
    if needs is not None and metric not in needs[0]:
        names = [_TARGET_ARGUMENTS[m] for m in needs[0]]
        wanted = " or ".join([", ".join(names[:-1]), names[-1]])
        raise ValueError(
            f"Expected {wanted} with allocation={allocation!r} but got {_given_target(metric, pruning_ratio)}. "
            f"HINT: {needs[1]}"
        )
    if metric == "latency" and allocation != "latency":
        raise ValueError(
            f"Expected argument `allocation` to be 'latency' with `target_latency_ratio` but got {allocation!r}. "
            "HINT: latency is estimated by the latency allocation's table; pass `allocation='latency'`."
        )
    if allocation != "importance" and layer_ratios:
        raise ValueError(
            f"Expected argument `layer_ratios` to be None with allocation={allocation!r} but got {layer_ratios!r}. "
            "HINT: the allocation decides every layer's width; keep a layer as it is with `ignored_layers`."
        )
    return str(allocation)


_SINGLE_DEVICE = ("SingleDeviceStrategy", "SingleDeviceXLAStrategy")


def _layer_schedules(layer_ratios: Any, schedule: Any, steps: int) -> dict[re.Pattern[str], list[float]]:
    """``{compiled regex: relative ratio per step}`` from ``layer_ratios`` ``{regex: final ratio of the original}``."""
    if layer_ratios is None:
        return {}
    if not isinstance(layer_ratios, dict):
        raise ValueError(
            f"Expected argument `layer_ratios` to be a dict of regex -> ratio in (0, 1) but got {layer_ratios!r}."
        )
    schedules = {}
    for pattern, ratio in layer_ratios.items():
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
            raise ValueError(
                f"Expected argument `layer_ratios` to map each regex to a ratio in (0, 1) but got {pattern!r}: "
                f"{ratio!r}."
            )
        schedules[compile_pattern(pattern, "layer_ratios")] = relative_ratios(
            build_schedule(schedule, float(ratio), steps)
        )
    return schedules


def _check_optimizer(index: int, optimizer: torch.optim.Optimizer) -> None:
    """Refuse optimizers whose state cannot follow pruned parameters (per-parameter state is index-selected)."""
    name = type(optimizer).__name__
    inner = getattr(optimizer, "optimizer", None)  # Lightning's wrapper
    if isinstance(inner, torch.optim.Optimizer):
        name = type(inner).__name__
        optimizer = inner
    if isinstance(optimizer, torch.optim.LBFGS) or name == "ZeroRedundancyOptimizer":
        raise MisconfigurationException(
            f"Expected every optimizer to keep per-parameter state that can follow pruned channels but optimizer "
            f"{index} is {name}, whose state is {'one flat history' if name == 'LBFGS' else 'sharded across ranks'}. "
            "HINT: use SGD, Adam(W) or another per-parameter optimizer while pruning."
        )


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


def _forward(module: nn.Module, example: Any) -> Any:
    """``module`` called on an example input: a tensor, a tuple of positional inputs or a dict of keyword inputs."""
    if isinstance(example, dict):
        return module(**example)
    if isinstance(example, (tuple, list)):
        return module(*example)
    return module(example)
