"""Measurements of models before and after compression, and what a user ships: ONNX / TorchScript files, INT8."""

from lightning_prune.report.compression import compression_report, format_report, write_report
from lightning_prune.report.evaluate import evaluate_map
from lightning_prune.report.export import (
    check_export,
    export_onnx,
    export_torchscript,
    file_size_mb,
    require_export_extra,
)
from lightning_prune.report.latency import latency_ms
from lightning_prune.report.onnx_runtime import OnnxModel, onnx_latency_ms
from lightning_prune.report.quantize import CALIBRATION_METHODS, load_calibration_images, quantize_onnx
from lightning_prune.report.summary import format_stats, model_stats

__all__ = [
    "CALIBRATION_METHODS",
    "OnnxModel",
    "check_export",
    "compression_report",
    "evaluate_map",
    "export_onnx",
    "export_torchscript",
    "file_size_mb",
    "format_report",
    "format_stats",
    "latency_ms",
    "load_calibration_images",
    "model_stats",
    "onnx_latency_ms",
    "quantize_onnx",
    "require_export_extra",
    "write_report",
]
