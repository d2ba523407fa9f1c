"""How to read a detector's raw head output: which channels are boxes, objectness, classes; which layers keep width."""

from lightning_prune.adapters.base import HeadAdapter, HeadLevel
from lightning_prune.adapters.yolov3 import YOLOv3Adapter
from lightning_prune.adapters.yolov8 import YOLOv8Adapter

__all__ = ["HeadAdapter", "HeadLevel", "YOLOv3Adapter", "YOLOv8Adapter"]
