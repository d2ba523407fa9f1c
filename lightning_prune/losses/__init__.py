"""Distillation losses for detectors: Hinton's softened-target loss and YOLO feature-map-NMS distillation."""

from lightning_prune.losses.fm_nms import FMNMSLoss, feature_map_nms, fm_nms_loss
from lightning_prune.losses.hinton import HintonLoss, hinton_detection_loss, hinton_loss

__all__ = ["FMNMSLoss", "HintonLoss", "feature_map_nms", "fm_nms_loss", "hinton_detection_loss", "hinton_loss"]
