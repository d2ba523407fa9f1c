"""Measurements of models before and after compression."""

from lightning_prune.report.latency import latency_ms
from lightning_prune.report.summary import format_stats, model_stats

__all__ = ["format_stats", "latency_ms", "model_stats"]
