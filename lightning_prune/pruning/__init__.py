"""Structured pruning without the Trainer: criteria, calibration, the pruning step, residual block removal,
latency-aware, sensitivity and NetAdapt allocation, schedules, a replayable history, optimizer patching, sparsity
regularization, bias folding; fine-grained magnitude masks and their storage size."""

from lightning_prune.pruning.allocation import SensitivityAllocation, load_sensitivity
from lightning_prune.pruning.blocks import (
    BLOCK_IMPORTANCES,
    block_scores,
    find_residual_blocks,
    remove_blocks,
    resolve_block_importance,
    select_blocks,
)
from lightning_prune.pruning.calibration import Calibration
from lightning_prune.pruning.channels import check_traceable, output_layers, prune_channels
from lightning_prune.pruning.folding import InputMeans, fold_removed_inputs
from lightning_prune.pruning.history import PruningHistory, apply_records, group_records, resize_to_state_dict
from lightning_prune.pruning.importance import IMPORTANCES, ActivationImportance, resolve_importance
from lightning_prune.pruning.latency import LatencyAllocation, LatencyTable
from lightning_prune.pruning.masks import (
    add_mask_buffers,
    apply_masks,
    magnitude_masks,
    make_permanent,
    masked_parameters,
    storage_report,
)
from lightning_prune.pruning.netadapt import NetAdapt, NetAdaptRound, layer_macs
from lightning_prune.pruning.optim import PruningTracker, track_pruning
from lightning_prune.pruning.schedules import (
    SCHEDULES,
    build_schedule,
    cubic,
    geometric,
    linear,
    one_shot,
    relative_ratios,
    resolve_schedule,
    to_torch_pruning_scheduler,
)
from lightning_prune.pruning.sensitivity import SensitivityAnalysis, SensitivityResult, load_layer_ratios, merge_results
from lightning_prune.pruning.sparsity import add_l1_subgradient, bn_groups

__all__ = [
    "BLOCK_IMPORTANCES",
    "IMPORTANCES",
    "SCHEDULES",
    "ActivationImportance",
    "Calibration",
    "InputMeans",
    "LatencyAllocation",
    "LatencyTable",
    "NetAdapt",
    "NetAdaptRound",
    "PruningHistory",
    "PruningTracker",
    "SensitivityAllocation",
    "SensitivityAnalysis",
    "SensitivityResult",
    "add_l1_subgradient",
    "add_mask_buffers",
    "apply_masks",
    "apply_records",
    "block_scores",
    "bn_groups",
    "build_schedule",
    "check_traceable",
    "cubic",
    "find_residual_blocks",
    "fold_removed_inputs",
    "geometric",
    "group_records",
    "layer_macs",
    "linear",
    "load_layer_ratios",
    "load_sensitivity",
    "magnitude_masks",
    "make_permanent",
    "masked_parameters",
    "merge_results",
    "one_shot",
    "output_layers",
    "prune_channels",
    "relative_ratios",
    "remove_blocks",
    "resize_to_state_dict",
    "resolve_block_importance",
    "resolve_importance",
    "resolve_schedule",
    "select_blocks",
    "storage_report",
    "to_torch_pruning_scheduler",
    "track_pruning",
]
