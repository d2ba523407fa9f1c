"""Names → reference detector builders (``"yolov8n"`` → ``YOLOv8(scale="n", ...)``)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from lightning_prune.models.base import DetectorModule
from lightning_prune.models.yolov3 import YOLOv3
from lightning_prune.models.yolov8 import YOLOv8

MODELS: dict[str, Callable[..., DetectorModule]] = {
    **{f"yolov3{'-' if s == 'tiny' else ''}{s}": partial(YOLOv3, scale=s) for s in ("tiny", "n", "s", "m")},
    **{f"yolov8{s}": partial(YOLOv8, scale=s) for s in ("n", "s", "m")},
}


def build_detector(name: str, **kwargs: Any) -> DetectorModule:
    """Build a reference detector by name, e.g. ``build_detector("yolov8n", num_classes=4, img_size=256)``.

    Raises:
        ValueError: ``name`` is not one of :data:`MODELS`.
    """
    if name not in MODELS:
        raise ValueError(f"Expected argument `name` to be one of {sorted(MODELS)} but got {name!r}.")
    return MODELS[name](**kwargs)
