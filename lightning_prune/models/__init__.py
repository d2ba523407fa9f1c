"""Reference YOLO detectors (LightningModules) and the base class any detector can share."""

from lightning_prune.models.base import DetectorModule
from lightning_prune.models.registry import MODELS, build_detector
from lightning_prune.models.yolov3 import YOLOv3
from lightning_prune.models.yolov8 import YOLOv8

__all__ = ["MODELS", "DetectorModule", "YOLOv3", "YOLOv8", "build_detector"]
