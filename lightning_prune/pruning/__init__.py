"""Structured pruning without the Trainer: schedules, a replayable pruning history, optimizer patching."""

from lightning_prune.pruning.history import PruningHistory, apply_records, group_records, resize_to_state_dict
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

__all__ = [
    "SCHEDULES",
    "PruningHistory",
    "PruningTracker",
    "apply_records",
    "build_schedule",
    "cubic",
    "geometric",
    "group_records",
    "linear",
    "one_shot",
    "relative_ratios",
    "resize_to_state_dict",
    "resolve_schedule",
    "to_torch_pruning_scheduler",
    "track_pruning",
]
