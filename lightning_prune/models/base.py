"""The LightningModule shared by the reference detectors.

A family subclass builds the network and implements three methods:

- ``forward(images) -> raw``: the raw head output, identical in train and eval mode (its layout is
  described by the family's adapter in :mod:`lightning_prune.adapters`);
- ``compute_loss(raw, targets) -> (loss, parts)``: the scalar training loss and its named components;
- ``decode(raw) -> (boxes, scores)``: ``boxes`` (B, N, 4) xyxy in input pixels and ``scores`` (B, N, C)
  class confidences, before NMS.

Everything Lightning needs (steps, NMS, mAP, optimizers with warmup + cosine) lives here once.

Batches are ``(images, targets)``: ``images`` (B, 3, S, S) float in [0, 1]; ``targets`` a list of B dicts
with ``boxes`` (N, 4) xyxy in input pixels and ``labels`` (N,) int64, plus, from our data module,
``orig_size`` (2,) = (h, w) of the original image and ``letterbox`` (3,) = (scale, pad_x, pad_y).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics.detection import MeanAveragePrecision
from torchvision.ops import batched_nms

from lightning_prune.metrics.coco import build_map_metric
from lightning_prune.pruning.checkpoint import PrunableMixin

Batch = tuple[torch.Tensor, list[dict[str, torch.Tensor]]]


def letterbox_to_original(boxes: torch.Tensor, target: dict[str, torch.Tensor]) -> torch.Tensor:
    """Map xyxy boxes from letterboxed input pixels back to original image pixels (clipped)."""
    if "letterbox" not in target:
        return boxes
    scale, pad_x, pad_y = (float(v) for v in target["letterbox"])
    pad = boxes.new_tensor([pad_x, pad_y, pad_x, pad_y])
    out = (boxes - pad) / scale
    if "orig_size" in target:
        h, w = (float(v) for v in target["orig_size"])
        out[:, 0::2] = out[:, 0::2].clamp(0, w)
        out[:, 1::2] = out[:, 1::2].clamp(0, h)
    return out


class DetectorModule(PrunableMixin, pl.LightningModule):
    """Base class of the reference YOLO detectors.

    Pruned checkpoints load as they are (``fit(ckpt_path=...)``, ``load_from_checkpoint``): the
    :class:`~lightning_prune.pruning.checkpoint.PrunableMixin` replays the stored pruning history first.

    Args:
        num_classes: number of object classes; checked against the data module at ``setup``.
        img_size: square input size in pixels (a multiple of 32).
        optimizer: ``"sgd"`` (Nesterov momentum) or ``"adamw"``.
        lr: peak learning rate after warmup.
        momentum: SGD momentum, or AdamW β1.
        weight_decay: applied to conv/linear weights only (never to BatchNorm or biases).
        warmup_epochs: linear warmup length in epochs (fractions allowed).
        final_lr_ratio: the cosine schedule ends at ``lr * final_lr_ratio``.
        conf_threshold: minimum class confidence kept before NMS.
        iou_threshold: NMS IoU threshold.
        max_det: detections kept per image after NMS.
        map_backend: ``"pycocotools"`` or ``"faster_coco_eval"`` (needs that package).
    """

    def __init__(
        self,
        num_classes: int = 80,
        img_size: int = 640,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.01,
        momentum: float = 0.937,
        weight_decay: float = 5e-4,
        warmup_epochs: float = 1.0,
        final_lr_ratio: float = 0.01,
        conf_threshold: float = 0.001,
        iou_threshold: float = 0.6,
        max_det: int = 100,
        map_backend: Literal["pycocotools", "faster_coco_eval"] = "pycocotools",
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"Expected argument `num_classes` to be a positive int but got {num_classes!r}.")
        if not isinstance(img_size, int) or img_size < 32 or img_size % 32:
            raise ValueError(f"Expected argument `img_size` to be a positive multiple of 32 but got {img_size!r}.")
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"Expected argument `optimizer` to be one of ['sgd', 'adamw'] but got {optimizer!r}.")
        if not lr > 0:
            raise ValueError(f"Expected argument `lr` to be > 0 but got {lr!r}.")
        self.num_classes = num_classes
        self.img_size = img_size
        self.optimizer_name = optimizer
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.warmup_epochs = warmup_epochs
        self.final_lr_ratio = final_lr_ratio
        self.conf_threshold = conf_threshold
        self.iou_threshold = iou_threshold
        self.max_det = max_det
        self.val_map: MeanAveragePrecision = build_map_metric(map_backend)
        self.example_input_array = torch.zeros(1, 3, img_size, img_size)

    # ------------------------------------------------------------------ family interface
    def compute_loss(
        self, raw: Any, targets: list[dict[str, torch.Tensor]]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The scalar training loss and its named components (logged as ``train/<name>``)."""
        raise NotImplementedError

    def decode(self, raw: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``boxes`` (B, N, 4) xyxy in input pixels and ``scores`` (B, N, C) in [0, 1], before NMS."""
        raise NotImplementedError

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def postprocess(self, raw: Any) -> list[dict[str, torch.Tensor]]:
        """Decode ``raw`` and run class-aware NMS: per image ``boxes`` (K, 4), ``scores`` (K,), ``labels`` (K,)."""
        boxes, scores = self.decode(raw)  # (B, N, 4), (B, N, C)
        boxes, scores = boxes.float(), scores.float()
        out = []
        for b in range(boxes.shape[0]):
            # multi-label: a box may be kept once per class whose score passes the threshold
            idx, cls = (scores[b] > self.conf_threshold).nonzero(as_tuple=True)
            box, score = boxes[b, idx], scores[b, idx, cls]
            if score.numel() > 30 * self.max_det:  # cap the NMS input, as Ultralytics does
                score, top = score.topk(30 * self.max_det)
                box, cls = box[top], cls[top]
            keep = batched_nms(box, score, cls, self.iou_threshold)[: self.max_det]
            out.append({"boxes": box[keep], "scores": score[keep], "labels": cls[keep]})
        return out

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str) -> None:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes is not None and data_classes != self.num_classes:
            raise ValueError(
                f"Expected argument `num_classes` to match the data ({data_classes} classes) but got "
                f"{self.num_classes}. HINT: set `model.num_classes: {data_classes}` in the config."
            )

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        loss, parts = self.compute_loss(self(images), targets)
        bs = images.shape[0]
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
        self.log_dict({f"train/{k}": v.detach() for k, v in parts.items()}, batch_size=bs)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        images, targets = batch
        raw = self(images)
        loss, _ = self.compute_loss(raw, targets)
        self.log("val/loss", loss, batch_size=images.shape[0], sync_dist=True)
        preds = self.postprocess(raw)
        self.val_map.update(
            [{**p, "boxes": letterbox_to_original(p["boxes"], t)} for p, t in zip(preds, targets)],
            [{"boxes": letterbox_to_original(t["boxes"], t), "labels": t["labels"]} for t in targets],
        )

    def on_validation_epoch_end(self) -> None:
        result = self.val_map.compute()
        self.val_map.reset()
        self.log_dict(
            {"val/mAP": result["map"], "val/mAP50": result["map_50"], "val/mAP75": result["map_75"]},
            prog_bar=True,
            sync_dist=True,  # already synchronized by torchmetrics; silences Lightning's DDP warning
        )

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, torch.Tensor]]:
        """Detections per image in original image pixels: ``boxes`` xyxy, ``scores``, ``labels``."""
        images, targets = batch
        preds = self.postprocess(self(images))
        return [{**p, "boxes": letterbox_to_original(p["boxes"], t)} for p, t in zip(preds, targets)]

    # ------------------------------------------------------------------ optimization
    def configure_optimizers(self) -> Any:
        decay, no_decay = [], []
        for module in self.modules():
            for name, param in module.named_parameters(recurse=False):
                if not param.requires_grad:
                    continue
                is_weight = name == "weight" and not isinstance(module, nn.modules.batchnorm._NormBase)
                (decay if is_weight else no_decay).append(param)
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if self.optimizer_name == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(
                groups, lr=self.lr, momentum=self.momentum, nesterov=True
            )
        else:
            optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=(self.momentum, 0.999))
        total = float(self.trainer.estimated_stepping_batches) if self._trainer is not None else math.inf
        max_epochs = self.trainer.max_epochs if self._trainer is not None else None
        per_epoch = total / max_epochs if math.isfinite(total) and max_epochs and max_epochs > 0 else 100.0
        schedule = WarmupCosine(max(1.0, self.warmup_epochs * per_epoch), total, self.final_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@dataclass
class WarmupCosine:
    """LR factor: linear warmup over ``warmup`` steps, then cosine decay to ``final_ratio`` at ``total`` steps.

    A plain object (not a closure) so that ``LambdaLR.state_dict`` saves it and resume restores it.
    """

    warmup: float
    total: float
    final_ratio: float

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if not math.isfinite(self.total) or self.total <= self.warmup:
            return 1.0
        progress = min(1.0, (step - self.warmup) / (self.total - self.warmup))
        return self.final_ratio + (1 - self.final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["Batch", "DetectorModule", "WarmupCosine", "count_parameters", "letterbox_to_original"]
