"""Detection metrics (no Trainer imports)."""

from lightning_prune.metrics.coco import build_map_metric

__all__ = ["build_map_metric"]
