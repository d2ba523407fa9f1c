"""The Lightning layer: callbacks that prune, and the module mixin that restores pruned checkpoints."""

from lightning_prune.callbacks.pruning import StructuredPruning
from lightning_prune.pruning.checkpoint import PrunableMixin, pruning_history

__all__ = ["PrunableMixin", "StructuredPruning", "pruning_history"]
