"""YOLOv8: anchor-free detector with C2f blocks, a PAN neck and a decoupled DFL head.

Paper-less design by Ultralytics (2023); the loss combines the task-aligned assigner of TOOD
(https://arxiv.org/abs/2108.07755), CIoU (https://arxiv.org/abs/1911.08287) and distribution focal loss
(https://arxiv.org/abs/2006.04388). Written from the published facts, in pure PyTorch, with one change
that matters for pruning: :class:`C2f` uses two 1×1 input convolutions instead of one convolution
followed by ``chunk``, so torch-pruning's dependency graph can trace it. The two forms compute the same
function (the single conv's weight is the two stacked).

The raw output layout is documented in :mod:`lightning_prune.adapters.yolov8`.

Example:
    >>> model = YOLOv8("n", num_classes=3, img_size=64)
    >>> [tuple(r.shape) for r in model(torch.zeros(1, 3, 64, 64))]
    [(1, 67, 8, 8), (1, 67, 4, 4), (1, 67, 2, 2)]
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import complete_box_iou, complete_box_iou_loss

from lightning_prune.models.base import DetectorModule
from lightning_prune.models.layers import ConvBNAct, make_divisible

if TYPE_CHECKING:
    from lightning_prune.adapters.yolov8 import YOLOv8Adapter

# scale -> (depth multiple, width multiple, max channels), as in Ultralytics' yolov8.yaml
SCALES: dict[str, tuple[float, float, int]] = {
    "n": (0.33, 0.25, 1024),
    "s": (0.33, 0.50, 1024),
    "m": (0.67, 0.75, 768),
}
STRIDES = (8, 16, 32)


# ---------------------------------------------------------------------------------------------- layers
class Bottleneck(nn.Module):
    """Two 3×3 convs with an optional residual connection."""

    def __init__(self, in_channels: int, out_channels: int, shortcut: bool = True) -> None:
        super().__init__()
        self.cv1 = ConvBNAct(in_channels, out_channels, 3)
        self.cv2 = ConvBNAct(out_channels, out_channels, 3)
        self.add = shortcut and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """CSP block with ``n`` bottlenecks whose every intermediate output is concatenated.

    Two-conv form: ``cv0`` and ``cv1`` replace Ultralytics' single ``cv1`` + ``chunk(2)`` (traceable by
    torch-pruning). Output: ``cv2(cat[cv0(x), cv1(x), m1, ..., mn])`` with ``m_i`` chained from ``cv1(x)``.
    """

    def __init__(self, in_channels: int, out_channels: int, n: int = 1, shortcut: bool = False) -> None:
        super().__init__()
        hidden = out_channels // 2
        self.cv0 = ConvBNAct(in_channels, hidden, 1)
        self.cv1 = ConvBNAct(in_channels, hidden, 1)
        self.m = nn.ModuleList(Bottleneck(hidden, hidden, shortcut) for _ in range(n))
        self.cv2 = ConvBNAct((2 + n) * hidden, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ys = [self.cv0(x), self.cv1(x)]
        for m in self.m:
            ys.append(m(ys[-1]))
        return self.cv2(torch.cat(ys, 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling (fast): three chained 5×5 max-pools ≡ pools of 5, 9 and 13."""

    def __init__(self, in_channels: int, out_channels: int, k: int = 5) -> None:
        super().__init__()
        hidden = in_channels // 2
        self.cv1 = ConvBNAct(in_channels, hidden, 1)
        self.pool = nn.MaxPool2d(k, 1, k // 2)
        self.cv2 = ConvBNAct(4 * hidden, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y0 = self.cv1(x)
        y1 = self.pool(y0)
        y2 = self.pool(y1)
        return self.cv2(torch.cat([y0, y1, y2, self.pool(y2)], 1))


class Backbone(nn.Module):
    """CSPDarknet with C2f blocks; returns the stride 8, 16 and 32 features."""

    def __init__(self, widths: list[int], depths: list[int]) -> None:
        super().__init__()
        c1, c2, c3, c4, c5 = widths
        self.stem = ConvBNAct(3, c1, 3, 2)
        self.stage2 = nn.Sequential(ConvBNAct(c1, c2, 3, 2), C2f(c2, c2, depths[0], shortcut=True))
        self.stage3 = nn.Sequential(ConvBNAct(c2, c3, 3, 2), C2f(c3, c3, depths[1], shortcut=True))
        self.stage4 = nn.Sequential(ConvBNAct(c3, c4, 3, 2), C2f(c4, c4, depths[2], shortcut=True))
        self.stage5 = nn.Sequential(ConvBNAct(c4, c5, 3, 2), C2f(c5, c5, depths[3], shortcut=True), SPPF(c5, c5))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        p3 = self.stage3(self.stage2(self.stem(x)))
        p4 = self.stage4(p3)
        return [p3, p4, self.stage5(p4)]


class PANNeck(nn.Module):
    """Top-down (upsample + concat) then bottom-up (stride-2 conv + concat) fusion, C2f after each concat."""

    def __init__(self, c3: int, c4: int, c5: int, n: int) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.td4 = C2f(c5 + c4, c4, n)
        self.td3 = C2f(c4 + c3, c3, n)
        self.down3 = ConvBNAct(c3, c3, 3, 2)
        self.bu4 = C2f(c3 + c4, c4, n)
        self.down4 = ConvBNAct(c4, c4, 3, 2)
        self.bu5 = C2f(c4 + c5, c5, n)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        p3, p4, p5 = feats
        t4 = self.td4(torch.cat([self.up(p5), p4], 1))
        n3 = self.td3(torch.cat([self.up(t4), p3], 1))
        n4 = self.bu4(torch.cat([self.down3(n3), t4], 1))
        n5 = self.bu5(torch.cat([self.down4(n4), p5], 1))
        return [n3, n4, n5]


class DetectHead(nn.Module):
    """Anchor-free decoupled head: per level a box branch (4·reg_max DFL logits) and a class branch (C logits).

    ``box[i][2]`` and ``cls[i][2]`` are the final 1×1 prediction convs whose widths must never be pruned.
    """

    def __init__(self, in_channels: list[int], num_classes: int, reg_max: int, img_size: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.reg_max = reg_max
        box_hidden = max(16, in_channels[0] // 4, 4 * reg_max)
        cls_hidden = max(in_channels[0], min(num_classes, 100))
        self.box = nn.ModuleList(
            nn.Sequential(
                ConvBNAct(c, box_hidden, 3), ConvBNAct(box_hidden, box_hidden, 3), nn.Conv2d(box_hidden, 4 * reg_max, 1)
            )
            for c in in_channels
        )
        self.cls = nn.ModuleList(
            nn.Sequential(
                ConvBNAct(c, cls_hidden, 3), ConvBNAct(cls_hidden, cls_hidden, 3), nn.Conv2d(cls_hidden, num_classes, 1)
            )
            for c in in_channels
        )
        self.reset_bias(img_size)

    @torch.no_grad()
    def reset_bias(self, img_size: int) -> None:
        """Ultralytics' prior: box logits 1.0; class prior ≈ 5 objects per image spread over the level's cells."""
        for box, cls, stride in zip(self.box, self.cls, STRIDES):
            box[-1].bias.fill_(1.0)
            cls[-1].bias.fill_(math.log(5 / self.num_classes / (img_size / stride) ** 2))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        # (B, 4·reg_max + C, H_i, W_i) per level
        return [torch.cat([box(x), cls(x)], 1) for x, box, cls in zip(feats, self.box, self.cls)]


# ---------------------------------------------------------------------------------------------- box math
def make_anchors(shapes: list[tuple[int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell centres in grid units (A, 2) as (x, y), and each anchor's stride (A, 1), levels concatenated."""
    points, strides = [], []
    for (h, w), stride in zip(shapes, STRIDES):
        ys, xs = torch.meshgrid(
            torch.arange(h, device=device, dtype=torch.float32) + 0.5,
            torch.arange(w, device=device, dtype=torch.float32) + 0.5,
            indexing="ij",
        )
        points.append(torch.stack([xs, ys], -1).view(-1, 2))
        strides.append(torch.full((h * w, 1), float(stride), device=device))
    return torch.cat(points), torch.cat(strides)


def dfl_expectation(dist: torch.Tensor) -> torch.Tensor:
    """(..., 4·R) DFL logits → (..., 4) expected ltrb distances in bins (softmax over R bins · [0, R))."""
    reg_max = dist.shape[-1] // 4
    prob = dist.unflatten(-1, (4, reg_max)).softmax(-1)
    return prob @ torch.arange(reg_max, device=dist.device, dtype=prob.dtype)


def ltrb_to_xyxy(anchors: torch.Tensor, ltrb: torch.Tensor) -> torch.Tensor:
    return torch.cat([anchors - ltrb[..., :2], anchors + ltrb[..., 2:]], -1)


def xyxy_to_ltrb(anchors: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    return torch.cat([anchors - boxes[..., :2], boxes[..., 2:] - anchors], -1)


def distribution_focal_loss(dist: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DFL (https://arxiv.org/abs/2006.04388): CE to the two bins around a continuous target, linearly weighted.

    Args:
        dist: (P, 4, R) logits.
        target: (P, 4) distances in bins, in ``[0, R - 1)``.

    Returns:
        (P,) loss averaged over the four sides.
    """
    left = target.long()
    w_right = target - left
    logp = dist.log_softmax(-1)
    nll_left = -logp.gather(-1, left.unsqueeze(-1)).squeeze(-1)
    nll_right = -logp.gather(-1, (left + 1).unsqueeze(-1)).squeeze(-1)
    return (nll_left * (1 - w_right) + nll_right * w_right).mean(-1)


@torch.no_grad()
def task_aligned_assign(
    pred_scores: torch.Tensor,
    pred_boxes: torch.Tensor,
    anchors: torch.Tensor,
    gt_labels: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_mask: torch.Tensor,
    topk: int = 10,
    alpha: float = 0.5,
    beta: float = 6.0,
    eps: float = 1e-9,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Task-aligned assignment (TOOD, https://arxiv.org/abs/2108.07755).

    Each GT takes the ``topk`` anchors, among those whose centre lies inside it, with the largest alignment
    ``t = s^alpha · u^beta`` (``s`` the predicted score of the GT's class, ``u`` the CIoU of the predicted
    box with the GT). An anchor claimed by several GTs keeps the one it overlaps most. The soft class target
    of a positive is ``t`` normalized per GT so that its best anchor gets that GT's best IoU.

    Args:
        pred_scores: (B, A, C) class probabilities.
        pred_boxes: (B, A, 4) xyxy in pixels.
        anchors: (A, 2) anchor centres in pixels.
        gt_labels: (B, M) int64.
        gt_boxes: (B, M, 4) xyxy in pixels.
        gt_mask: (B, M) bool, False for padding.

    Returns:
        ``target_boxes`` (B, A, 4) pixels, ``target_scores`` (B, A, C), ``fg_mask`` (B, A) bool.
    """
    b, a, c = pred_scores.shape
    m = gt_boxes.shape[1]
    if m == 0:
        return pred_boxes.new_zeros(b, a, 4), pred_scores.new_zeros(b, a, c), gt_mask.new_zeros(b, a)
    # (B, M, A): anchor centre strictly inside the GT box, GT is real
    ltrb = xyxy_to_ltrb(anchors[None, None], gt_boxes[:, :, None])
    candidates = (ltrb.amin(-1) > eps) & gt_mask[:, :, None]
    # padding and degenerate GT boxes give NaN (0 / 0 in the aspect term): select, never multiply
    overlaps = torch.where(candidates, complete_box_iou(gt_boxes, pred_boxes).clamp(min=0), 0.0)  # (B, M, A)
    scores = pred_scores.gather(2, gt_labels[:, None, :].expand(b, a, m)).transpose(1, 2)  # (B, M, A)
    align = scores.pow(alpha) * overlaps.pow(beta) * candidates

    # candidates first even at zero alignment (CIoU clamps to 0): topk would otherwise break ties arbitrarily
    top = align.masked_fill(~candidates, -1.0).topk(min(topk, a), dim=-1).indices  # (B, M, k)
    pos = torch.zeros_like(candidates).scatter_(-1, top, True) & candidates  # (B, M, A)

    multi = pos.sum(1, keepdim=True) > 1  # (B, 1, A)
    best = F.one_hot(overlaps.argmax(1), m).transpose(1, 2).bool()  # (B, M, A)
    pos = torch.where(multi, best, pos)
    fg_mask = pos.any(1)  # (B, A)
    gt_idx = pos.float().argmax(1)  # (B, A)

    target_boxes = gt_boxes.gather(1, gt_idx[..., None].expand(b, a, 4))
    target_labels = gt_labels.gather(1, gt_idx)
    target_scores = F.one_hot(target_labels, c).to(pred_scores.dtype) * fg_mask[..., None]

    align = align * pos
    norm = align * overlaps.mul(pos).amax(-1, keepdim=True) / (align.amax(-1, keepdim=True) + eps)
    target_scores = target_scores * norm.amax(1)[..., None]
    return target_boxes, target_scores, fg_mask


def _pad_targets(targets: list[dict[str, torch.Tensor]], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Targets → (B, M) labels, (B, M, 4) boxes and (B, M) mask, M the largest count in the batch."""
    m = max((len(t["labels"]) for t in targets), default=0)
    labels = torch.zeros(len(targets), m, dtype=torch.long, device=device)
    boxes = torch.zeros(len(targets), m, 4, device=device)
    mask = torch.zeros(len(targets), m, dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        n = len(t["labels"])
        labels[i, :n] = t["labels"]
        boxes[i, :n] = t["boxes"]
        mask[i, :n] = True
    return labels, boxes, mask


# ---------------------------------------------------------------------------------------------- model
def _resolve_scale(scale: str, num_classes: int) -> tuple[list[int], list[int], int]:
    """Channel widths of the five stages, C2f depths (4 backbone + neck) for ``scale``."""
    if scale not in SCALES:
        raise ValueError(f"Expected argument `scale` to be one of {list(SCALES)} but got {scale!r}.")
    depth, width, max_channels = SCALES[scale]
    widths = [make_divisible(min(c, max_channels) * width) for c in (64, 128, 256, 512, 1024)]
    depths = [max(1, round(n * depth)) for n in (3, 6, 6, 3, 3)]
    return widths, depths[:4], depths[4]


class YOLOv8(DetectorModule):
    """YOLOv8 detector (scales n / s / m) as a LightningModule.

    ``forward(images)`` returns the raw head output, a list of three tensors (B, 4·reg_max + C, H_i, W_i)
    for strides 8, 16, 32, identical in train and eval mode; see :mod:`lightning_prune.adapters.yolov8`.

    The loss is ``(7.5 · CIoU + 1.5 · DFL + 0.5 · BCE) · B``: each term normalized by the sum of the soft
    target scores, the total multiplied by the batch size as Ultralytics does, so that the SGD defaults
    (lr 0.01, momentum 0.937, weight decay 5e-4) carry over. ``compute_loss`` reports the three terms
    before the batch-size factor.

    Args:
        scale: model size, ``"n"``, ``"s"`` or ``"m"``.
        num_classes: number of object classes.
        img_size: square input size (a multiple of 32); sets the class bias prior.
        reg_max: DFL bins per box side; a side spans at most ``(reg_max - 1) · stride`` pixels.
        box_gain: weight of the CIoU loss.
        cls_gain: weight of the BCE class loss.
        dfl_gain: weight of the distribution focal loss.
        optimizer, lr, momentum, weight_decay, warmup_epochs, final_lr_ratio, conf_threshold, iou_threshold,
            max_det, map_backend: see :class:`~lightning_prune.models.base.DetectorModule`.

    Raises:
        ValueError: if ``scale`` is unknown or ``reg_max`` < 2.

    Example:
        >>> model = YOLOv8("n", num_classes=2, img_size=64).eval()
        >>> dets = model.postprocess(model(torch.rand(1, 3, 64, 64)))
        >>> sorted(dets[0])
        ['boxes', 'labels', 'scores']
    """

    def __init__(
        self,
        scale: Literal["n", "s", "m"] = "n",
        num_classes: int = 80,
        img_size: int = 640,
        reg_max: int = 16,
        box_gain: float = 7.5,
        cls_gain: float = 0.5,
        dfl_gain: float = 1.5,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.01,
        momentum: float = 0.937,
        weight_decay: float = 5e-4,
        warmup_epochs: float = 1.0,
        final_lr_ratio: float = 0.01,
        conf_threshold: float = 0.001,
        iou_threshold: float = 0.7,
        max_det: int = 100,
        map_backend: Literal["pycocotools", "faster_coco_eval"] = "pycocotools",
    ) -> None:
        super().__init__(
            num_classes=num_classes,
            img_size=img_size,
            optimizer=optimizer,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            warmup_epochs=warmup_epochs,
            final_lr_ratio=final_lr_ratio,
            conf_threshold=conf_threshold,
            iou_threshold=iou_threshold,
            max_det=max_det,
            map_backend=map_backend,
        )
        if not isinstance(reg_max, int) or reg_max < 2:
            raise ValueError(f"Expected argument `reg_max` to be an int >= 2 but got {reg_max!r}.")
        widths, depths, neck_depth = _resolve_scale(scale, num_classes)
        self.save_hyperparameters()
        self.scale = scale
        self.reg_max = reg_max
        self.gains = {"box": box_gain, "cls": cls_gain, "dfl": dfl_gain}
        self.backbone = Backbone(widths, depths)
        self.neck = PANNeck(widths[2], widths[3], widths[4], neck_depth)
        self.head = DetectHead(widths[2:], num_classes, reg_max, img_size)

    @property
    def adapter(self) -> YOLOv8Adapter:
        """The :class:`~lightning_prune.adapters.yolov8.YOLOv8Adapter` that reads this model's raw output."""
        from lightning_prune.adapters.yolov8 import YOLOv8Adapter  # adapters sit above models: import late

        return YOLOv8Adapter(self.reg_max)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.head(self.neck(self.backbone(images)))

    def _flatten(self, raw: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw levels → DFL logits (B, A, 4R), class logits (B, A, C), anchors (A, 2) grid units, strides (A, 1)."""
        flat = torch.cat([r.flatten(2) for r in raw], 2).transpose(1, 2).float()  # (B, A, 4R + C)
        anchors, strides = make_anchors([tuple(r.shape[2:]) for r in raw], flat.device)
        return flat[..., : 4 * self.reg_max], flat[..., 4 * self.reg_max :], anchors, strides

    def decode(self, raw: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        dist, logits, anchors, strides = self._flatten(raw)
        boxes = ltrb_to_xyxy(anchors, dfl_expectation(dist)) * strides  # (B, A, 4) pixels
        return boxes, logits.sigmoid()

    def compute_loss(
        self, raw: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        dist, logits, anchors, strides = self._flatten(raw)
        batch_size = dist.shape[0]
        pred_boxes = ltrb_to_xyxy(anchors, dfl_expectation(dist))  # (B, A, 4) grid units
        gt_labels, gt_boxes, gt_mask = _pad_targets(targets, dist.device)
        target_boxes, target_scores, fg = task_aligned_assign(
            logits.detach().sigmoid(), pred_boxes.detach() * strides, anchors * strides, gt_labels, gt_boxes, gt_mask
        )
        score_sum = target_scores.sum().clamp(min=1.0)
        loss_cls = F.binary_cross_entropy_with_logits(logits, target_scores, reduction="sum") / score_sum
        if fg.any():
            weight = target_scores.sum(-1)[fg]  # (P,)
            target_boxes = target_boxes / strides  # grid units
            loss_box = (complete_box_iou_loss(pred_boxes[fg], target_boxes[fg]) * weight).sum() / score_sum
            target_ltrb = xyxy_to_ltrb(anchors, target_boxes)[fg].clamp(0, self.reg_max - 1 - 0.01)
            pred_dist = dist[fg].unflatten(-1, (4, self.reg_max))  # (P, 4, R)
            loss_dfl = (distribution_focal_loss(pred_dist, target_ltrb) * weight).sum() / score_sum
        else:  # keep every parameter in the graph (DDP) with a zero contribution
            loss_box = loss_dfl = dist.sum() * 0.0
        parts = {
            "box": loss_box * self.gains["box"],
            "cls": loss_cls * self.gains["cls"],
            "dfl": loss_dfl * self.gains["dfl"],
        }
        return sum(parts.values()) * batch_size, parts  # type: ignore[return-value]


__all__ = [
    "SPPF",
    "Bottleneck",
    "C2f",
    "DetectHead",
    "YOLOv8",
    "distribution_focal_loss",
    "make_anchors",
    "task_aligned_assign",
]
