"""Distillation losses for detectors: Hinton's softened targets, YOLO feature-map NMS, and feature imitation."""

from lightning_prune.losses.feature import (
    CWDLoss,
    FeatureAdapter,
    ImitationLoss,
    cwd_loss,
    fine_grained_mask,
    imitation_loss,
)
from lightning_prune.losses.fm_nms import FMNMSLoss, feature_map_nms, fm_nms_loss
from lightning_prune.losses.hinton import HintonLoss, hinton_detection_loss, hinton_loss

__all__ = [
    "CWDLoss",
    "FMNMSLoss",
    "FeatureAdapter",
    "HintonLoss",
    "ImitationLoss",
    "cwd_loss",
    "feature_map_nms",
    "fine_grained_mask",
    "fm_nms_loss",
    "hinton_detection_loss",
    "hinton_loss",
    "imitation_loss",
]
