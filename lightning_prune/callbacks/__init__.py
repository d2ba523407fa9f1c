"""The Lightning layer: callbacks that prune and regularize, and the mixin that restores pruned checkpoints."""

from lightning_prune.callbacks.pruning import StructuredPruning
from lightning_prune.callbacks.slimming import NetworkSlimming
from lightning_prune.callbacks.sparsity import SparsityRegularization
from lightning_prune.pruning.checkpoint import PrunableMixin, pruning_history

__all__ = ["NetworkSlimming", "PrunableMixin", "SparsityRegularization", "StructuredPruning", "pruning_history"]
