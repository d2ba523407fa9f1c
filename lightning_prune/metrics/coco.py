"""COCO mAP through ``torchmetrics.detection.MeanAveragePrecision`` (pycocotools protocol)."""

from __future__ import annotations

import importlib.util
from typing import Literal

import numpy as np
from torchmetrics.detection import MeanAveragePrecision

MapBackend = Literal["pycocotools", "faster_coco_eval"]
_BACKEND_PACKAGES = {"pycocotools": "pycocotools", "faster_coco_eval": "faster_coco_eval"}
# exactly the values of pycocotools.cocoeval.Params.setDetParams
COCO_IOU_THRESHOLDS: list[float] = np.linspace(0.5, 0.95, 10).tolist()
COCO_RECALL_THRESHOLDS: list[float] = np.linspace(0.0, 1.00, 101).tolist()


def build_map_metric(backend: MapBackend = "pycocotools", sync: bool = True) -> MeanAveragePrecision:
    """A box mAP metric with the COCO protocol (IoU 0.50:0.95, area ranges, 100 detections per image).

    Args:
        backend: ``"pycocotools"`` (the reference) or ``"faster_coco_eval"`` (same numbers, faster; an
            optional package).
        sync: gather the detections of every rank at ``compute()`` when a process group exists (validation under
            DDP); ``False`` for a metric that one rank computes alone (it would otherwise wait for the others).

    Raises:
        ValueError: ``backend`` is not one of the two names.
        ModuleNotFoundError: the backend's package is not installed.
    """
    if backend not in _BACKEND_PACKAGES:
        raise ValueError(f"Expected argument `map_backend` to be one of {list(_BACKEND_PACKAGES)} but got {backend!r}.")
    package = _BACKEND_PACKAGES[backend]
    if importlib.util.find_spec(package) is None:
        raise ModuleNotFoundError(
            f"`map_backend={backend!r}` needs the package `{package}`: `pip install {package.replace('_', '-')}`."
        )
    return MeanAveragePrecision(
        box_format="xyxy",
        iou_type="bbox",
        backend=backend,
        # pycocotools' own float64 thresholds: torchmetrics' defaults come from a float32 linspace, and a recall
        # of exactly 0.3 then falls on the other side of the 0.30000001 threshold (mAP off by ~5e-4)
        iou_thresholds=COCO_IOU_THRESHOLDS,
        rec_thresholds=COCO_RECALL_THRESHOLDS,
        sync_on_compute=sync,
    )
