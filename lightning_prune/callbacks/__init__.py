"""The Lightning layer: callbacks that prune, regularize and distil, and the mixin that restores pruned checkpoints."""

from lightning_prune.callbacks.distillation import Distillation
from lightning_prune.callbacks.pruning import StructuredPruning
from lightning_prune.callbacks.report import CompressionReport
from lightning_prune.callbacks.slimming import NetworkSlimming
from lightning_prune.callbacks.sparsity import SparsityRegularization
from lightning_prune.callbacks.unstructured import UnstructuredPruning
from lightning_prune.pruning.checkpoint import PrunableMixin, pruning_history

__all__ = [
    "CompressionReport",
    "Distillation",
    "NetworkSlimming",
    "PrunableMixin",
    "SparsityRegularization",
    "StructuredPruning",
    "UnstructuredPruning",
    "pruning_history",
]
