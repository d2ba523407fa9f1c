"""How to read a detector's raw head output: which channels are boxes, objectness, classes; which layers keep width."""

from lightning_prune.adapters.base import HeadAdapter, HeadLevel
from lightning_prune.adapters.c2f import C2fTwoConv, convert_c2f, is_chunked_c2f
from lightning_prune.adapters.yolov3 import YOLOv3Adapter
from lightning_prune.adapters.yolov8 import YOLOv8Adapter

__all__ = ["C2fTwoConv", "HeadAdapter", "HeadLevel", "YOLOv3Adapter", "YOLOv8Adapter", "convert_c2f", "is_chunked_c2f"]
