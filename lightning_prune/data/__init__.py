"""Detection data: the built-in shapes dataset, COCO / YOLO-txt readers, transforms and the data module."""

from lightning_prune.data.convert import coco_to_yolo
from lightning_prune.data.datamodule import DetectionDataModule, detection_collate
from lightning_prune.data.datasets import CocoDetection, DetectionDataset, YoloDetection, read_class_names
from lightning_prune.data.shapes import SHAPE_NAMES, default_cache_root, generate_shapes, shapes_root
from lightning_prune.data.transforms import PAD_VALUE, Letterbox, Mosaic, detection_transforms

__all__ = [
    "PAD_VALUE",
    "SHAPE_NAMES",
    "CocoDetection",
    "DetectionDataModule",
    "DetectionDataset",
    "Letterbox",
    "Mosaic",
    "YoloDetection",
    "coco_to_yolo",
    "default_cache_root",
    "detection_collate",
    "detection_transforms",
    "generate_shapes",
    "read_class_names",
    "shapes_root",
]
