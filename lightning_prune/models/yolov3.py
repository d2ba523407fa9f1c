"""YOLOv3: a Darknet residual backbone, a top-down FPN neck and anchor-based heads at strides 8, 16, 32.

Paper: `YOLOv3: An Incremental Improvement <https://arxiv.org/abs/1804.02767>`_ (Redmon & Farhadi, 2018).
Training follows the YOLOv5 recipe, which trains YOLOv3 much better than the paper's: anchors matched by
w/h ratio at every level, two neighbouring cells as extra positives, a CIoU box loss and IoU-valued
objectness targets.

The raw output layout is documented in :mod:`lightning_prune.adapters.yolov3`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import complete_box_iou_loss

from lightning_prune.models.base import DetectorModule
from lightning_prune.models.layers import ConvBNAct, make_divisible

if TYPE_CHECKING:
    from lightning_prune.adapters.yolov3 import YOLOv3Adapter

Scale = Literal["tiny", "n", "s", "m", "l"]


class ScaleConfig(NamedTuple):
    depth: float  # multiplies the residual blocks per stage (1-2-8-8-4) and the conv set pairs (2)
    width: float  # multiplies the channels (32-64-128-256-512-1024)
    light_stem: bool = False  # one stride-2 stem conv instead of stem + stride-2 conv (see `Darknet`)


# "l" is the paper's Darknet-53 YOLOv3 (61.9M params at 80 classes)
SCALES: dict[str, ScaleConfig] = {
    "tiny": ScaleConfig(0.33, 0.125, light_stem=True),
    "n": ScaleConfig(0.33, 0.25),
    "s": ScaleConfig(0.33, 0.5),
    "m": ScaleConfig(0.67, 0.75),
    "l": ScaleConfig(1.0, 1.0),
}
STRIDES = (8, 16, 32)
# COCO anchors (w, h) of the paper, in pixels of a 416 × 416 input; one row per level, stride 8 first
COCO_ANCHORS_416 = (
    ((10.0, 13.0), (16.0, 30.0), (33.0, 23.0)),
    ((30.0, 61.0), (62.0, 45.0), (59.0, 119.0)),
    ((116.0, 90.0), (156.0, 198.0), (373.0, 326.0)),
)
_STAGE_CHANNELS = (64, 128, 256, 512, 1024)  # Darknet-53, strides 2..32 (stem: 32)
_STAGE_DEPTHS = (1, 2, 8, 8, 4)
_OBJ_BALANCE = (4.0, 1.0, 0.4)  # objectness weight per level: the many stride-8 cells need more pull


def _make_act(act: str) -> nn.Module:
    return nn.LeakyReLU(0.1, inplace=True) if act == "leaky_relu" else nn.SiLU(inplace=True)


class DarknetBlock(nn.Module):
    """Residual block: 1×1 reduce to half width, 3×3 expand back, identity add."""

    def __init__(self, channels: int, act: str) -> None:
        super().__init__()
        hidden = max(1, channels // 2)
        self.cv1 = ConvBNAct(channels, hidden, 1, act=_make_act(act))
        self.cv2 = ConvBNAct(hidden, channels, 3, act=_make_act(act))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cv2(self.cv1(x))


class Darknet(nn.Module):
    """Darknet-53 style backbone; returns the stride 8, 16, 32 feature maps.

    Each stage is a stride-2 3×3 conv followed by residual blocks. With ``light_stem`` the full-resolution
    3×3 stem conv and the first stage's stride-2 conv become a single stride-2 3×3 conv: on a CPU that
    full-resolution conv costs about a third of a training step at 256².
    """

    def __init__(self, depth: float, width: float, act: str, light_stem: bool = False) -> None:
        super().__init__()
        self.channels = [make_divisible(c * width) for c in _STAGE_CHANNELS]
        c_in = self.channels[0] if light_stem else make_divisible(32 * width)
        self.stem = ConvBNAct(3, c_in, 3, stride=2 if light_stem else 1, act=_make_act(act))
        stages = []
        for i, (c_out, n) in enumerate(zip(self.channels, _STAGE_DEPTHS)):
            blocks = [DarknetBlock(c_out, act) for _ in range(max(1, round(n * depth)))]
            down = [] if light_stem and i == 0 else [ConvBNAct(c_in, c_out, 3, stride=2, act=_make_act(act))]
            stages.append(nn.Sequential(*down, *blocks))
            c_in = c_out
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats[2:]


def _conv_set(c_in: int, c_out: int, pairs: int, act: str) -> nn.Sequential:
    """The paper's conv set: 1×1 to ``c_out``, then ``pairs`` × (3×3 to 2·c_out, 1×1 back to ``c_out``)."""
    layers = [ConvBNAct(c_in, c_out, 1, act=_make_act(act))]
    for _ in range(pairs):
        layers.append(ConvBNAct(c_out, 2 * c_out, 3, act=_make_act(act)))
        layers.append(ConvBNAct(2 * c_out, c_out, 1, act=_make_act(act)))
    return nn.Sequential(*layers)


class YOLOv3Neck(nn.Module):
    """Top-down FPN: conv set at stride 32, then 1×1 + upsample + concat + conv set at strides 16 and 8.

    Returns the three conv set outputs, stride 8 first, of widths ``c3 / 2, c4 / 2, c5 / 2``.
    """

    def __init__(self, channels: list[int], depth: float, act: str) -> None:
        super().__init__()
        c3, c4, c5 = channels
        pairs = max(1, round(2 * depth))  # 2 pairs = the paper's five convs
        self.out_channels = [c3 // 2, c4 // 2, c5 // 2]
        self.set5 = _conv_set(c5, c5 // 2, pairs, act)
        self.lat5 = ConvBNAct(c5 // 2, c4 // 2, 1, act=_make_act(act))
        self.set4 = _conv_set(c4 // 2 + c4, c4 // 2, pairs, act)
        self.lat4 = ConvBNAct(c4 // 2, c3 // 2, 1, act=_make_act(act))
        self.set3 = _conv_set(c3 // 2 + c3, c3 // 2, pairs, act)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        x3, x4, x5 = feats
        p5 = self.set5(x5)
        p4 = self.set4(torch.cat([self.up(self.lat5(p5)), x4], 1))
        p3 = self.set3(torch.cat([self.up(self.lat4(p4)), x3], 1))
        return [p3, p4, p5]


class YOLOv3Head(nn.Module):
    """Per level a 3×3 ConvBNAct then a 1×1 prediction conv (with bias) to ``A · (5 + C)`` channels."""

    def __init__(self, channels: list[int], num_anchors: int, num_classes: int, act: str) -> None:
        super().__init__()
        self.convs = nn.ModuleList(ConvBNAct(c, 2 * c, 3, act=_make_act(act)) for c in channels)
        self.preds = nn.ModuleList(nn.Conv2d(2 * c, num_anchors * (5 + num_classes), 1) for c in channels)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [pred(conv(x)) for x, conv, pred in zip(feats, self.convs, self.preds)]


def decode_xywh(t: torch.Tensor, grid: torch.Tensor, anchors: torch.Tensor, stride: float) -> torch.Tensor:
    """The box parameterization shared by the loss and :meth:`YOLOv3.decode`.

    ``xy = (2·σ(t_xy) − 0.5 + grid) · stride``, ``wh = (2·σ(t_wh))² · anchors``: centres may reach half a
    cell beyond their own cell (so neighbouring cells can predict them), sizes lie in (0, 4) × anchor.

    Args:
        t: (..., 4) raw ``tx, ty, tw, th``.
        grid: (..., 2) cell indices ``(x, y)``, broadcastable to ``t[..., :2]``.
        anchors: (..., 2) anchor ``(w, h)`` in output units, broadcastable to ``t[..., 2:]``.
        stride: output units per cell.

    Returns:
        (..., 4) boxes ``cx, cy, w, h``.
    """
    s = t.sigmoid() * 2
    return torch.cat([(s[..., :2] - 0.5 + grid) * stride, s[..., 2:] ** 2 * anchors], -1)


def xywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    half = b[..., 2:] / 2
    return torch.cat([b[..., :2] - half, b[..., :2] + half], -1)


def _resolve_anchors(anchors: list[list[list[float]]] | None, img_size: int) -> torch.Tensor:
    if anchors is None:
        return torch.tensor(COCO_ANCHORS_416) * (img_size / 416)
    try:
        out = torch.tensor(anchors, dtype=torch.float32)
    except (TypeError, ValueError):
        out = None
    if out is None or out.ndim != 3 or out.shape[0] != len(STRIDES) or out.shape[2] != 2 or not bool((out > 0).all()):
        raise ValueError(
            "Expected argument `anchors` to be 3 levels (strides 8, 16, 32) × A anchors × (w, h) positive pixel "
            f"sizes, e.g. [[[10, 13], [16, 30], [33, 23]], ...], but got {anchors!r}."
        )
    return out


class YOLOv3(DetectorModule):
    """YOLOv3 with a depth/width-scaled Darknet backbone.

    ``forward(images)`` returns three raw tensors (B, A·(5 + C), H_i, W_i), stride 8 first; per anchor
    ``a`` channels ``a·(5 + C) + 0..3`` are ``tx, ty, tw, th``, ``+ 4`` the objectness logit and
    ``+ 5 .. 5 + C`` the class logits (see :mod:`lightning_prune.adapters.yolov3`).

    The loss is YOLOv5's: a ground-truth box is a positive for every anchor (at every level) whose w/h ratio
    to it is within ``anchor_t``, in its own cell and the two nearest neighbouring cells; CIoU box loss;
    objectness BCE against the detached CIoU with per-level balance (4.0, 1.0, 0.4); class BCE on positives.
    The gains are scaled as YOLOv5 does (``cls_gain · C / 80``, ``obj_gain · (img_size / 640)²``) and the
    total is multiplied by the batch size, which makes SGD with ``lr=0.01`` and batch 16 the tuned setting.

    Args:
        scale: ``"tiny"``, ``"n"``, ``"s"``, ``"m"`` (depth × width multipliers (0.33, 0.125), (0.33, 0.25),
            (0.33, 0.5), (0.67, 0.75); ``"tiny"`` also has a light stride-2 stem, see :class:`Darknet`) or ``"l"``
            (the paper's Darknet-53 YOLOv3, 61.9M parameters at 80 classes).
        num_classes: number of object classes.
        img_size: square input size (a multiple of 32).
        anchors: 3 levels × A anchors × (w, h) in input pixels, stride 8 first; default the paper's COCO
            anchors scaled by ``img_size / 416``.
        act: ``"leaky_relu"`` (Darknet, slope 0.1) or ``"silu"``.
        anchor_t: a ground truth matches an anchor if ``max(r, 1 / r) < anchor_t`` for both w and h ratios.
        box_gain: weight of the CIoU loss.
        obj_gain: weight of the objectness loss (before the ``(img_size / 640)²`` scaling).
        cls_gain: weight of the class loss (before the ``C / 80`` scaling).
        optimizer, lr, momentum, weight_decay, warmup_epochs, final_lr_ratio, conf_threshold, iou_threshold,
            max_det, map_backend: see :class:`~lightning_prune.models.base.DetectorModule`.

    Raises:
        ValueError: unknown ``scale`` or ``act``, or ``anchors`` of the wrong shape.

    Example:
        >>> model = YOLOv3("tiny", num_classes=3, img_size=128)
        >>> [tuple(r.shape) for r in model(torch.zeros(1, 3, 128, 128))]
        [(1, 24, 16, 16), (1, 24, 8, 8), (1, 24, 4, 4)]
    """

    def __init__(
        self,
        scale: Scale = "n",
        num_classes: int = 80,
        img_size: int = 640,
        anchors: list[list[list[float]]] | None = None,
        act: Literal["leaky_relu", "silu"] = "leaky_relu",
        anchor_t: float = 4.0,
        box_gain: float = 0.05,
        obj_gain: float = 1.0,
        cls_gain: float = 0.5,
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
        if scale not in SCALES:
            raise ValueError(f"Expected argument `scale` to be one of {list(SCALES)} but got {scale!r}.")
        if act not in ("leaky_relu", "silu"):
            raise ValueError(f"Expected argument `act` to be one of ['leaky_relu', 'silu'] but got {act!r}.")
        if not anchor_t > 1:
            raise ValueError(f"Expected argument `anchor_t` to be > 1 but got {anchor_t!r}.")
        self.save_hyperparameters()
        self.register_buffer("anchors", _resolve_anchors(anchors, img_size))  # (3, A, 2) input pixels
        self.num_anchors = self.anchors.shape[1]
        self.strides = STRIDES
        self.anchor_t = anchor_t
        self.box_gain = box_gain
        self.obj_gain = obj_gain * (img_size / 640) ** 2
        self.cls_gain = cls_gain * num_classes / 80

        depth, width, light_stem = SCALES[scale]
        self.backbone = Darknet(depth, width, act, light_stem)
        self.neck = YOLOv3Neck(self.backbone.channels[2:], depth, act)
        self.head = YOLOv3Head(self.neck.out_channels, self.num_anchors, num_classes, act)
        self._init_pred_biases()

    def _init_pred_biases(self) -> None:
        # priors from YOLOv5: ~8 objects per 640² image spread over each level's cells, class prob ≈ 0.6 / C
        for pred, stride in zip(self.head.preds, self.strides):
            b = pred.bias.detach().view(self.num_anchors, -1)
            b[:, 4] += math.log(8 / (self.img_size / stride) ** 2)
            b[:, 5:] += math.log(0.6 / (self.num_classes - 0.99))

    @property
    def adapter(self) -> YOLOv3Adapter:
        """The :class:`~lightning_prune.adapters.yolov3.YOLOv3Adapter` that reads this model's raw output."""
        # imported here: adapters sit above models in the package layering
        from lightning_prune.adapters.yolov3 import YOLOv3Adapter

        return YOLOv3Adapter(num_classes=self.num_classes, num_anchors=self.num_anchors, strides=self.strides)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.head(self.neck(self.backbone(images)))

    def _levels(self, raw: list[torch.Tensor]) -> list[torch.Tensor]:
        # (B, A·(5 + C), H, W) -> (B, A, H, W, 5 + C)
        return [r.view(r.shape[0], self.num_anchors, -1, *r.shape[2:]).permute(0, 1, 3, 4, 2) for r in raw]

    # ------------------------------------------------------------------ inference
    def decode(self, raw: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        boxes, scores = [], []
        for p, stride, anchors in zip(self._levels(raw), self.strides, self.anchors):
            b, a, h, w, _ = p.shape
            ys, xs = torch.meshgrid(torch.arange(h, device=p.device), torch.arange(w, device=p.device), indexing="ij")
            grid = torch.stack([xs, ys], -1).to(p.dtype)  # (H, W, 2)
            xywh = decode_xywh(p[..., :4], grid, anchors.to(p.dtype).view(a, 1, 1, 2), stride)
            boxes.append(xywh_to_xyxy(xywh).reshape(b, -1, 4))
            scores.append((p[..., 4:5].sigmoid() * p[..., 5:].sigmoid()).reshape(b, -1, self.num_classes))
        return torch.cat(boxes, 1), torch.cat(scores, 1)

    # ------------------------------------------------------------------ training
    def build_targets(
        self, targets: list[dict[str, torch.Tensor]], grid_sizes: list[tuple[int, int]]
    ) -> list[dict[str, torch.Tensor]]:
        """Assign ground truths to (image, anchor, cell) positives, per level.

        Args:
            targets: per image ``boxes`` (N, 4) xyxy input pixels and ``labels`` (N,).
            grid_sizes: ``(H, W)`` of each level, stride 8 first.

        Returns:
            Per level a dict of P positives: ``img``, ``anchor``, ``gy``, ``gx`` (P,) indices; ``box`` (P, 4)
            target ``cx, cy, w, h`` in grid units relative to the cell's corner; ``anchor_wh`` (P, 2) in grid
            units; ``label`` (P,).
        """
        device = self.anchors.device
        img = torch.cat([torch.full((len(t["labels"]),), i, device=device) for i, t in enumerate(targets)]).long()
        labels = torch.cat([t["labels"].to(device) for t in targets]).long()
        xyxy = torch.cat([t["boxes"].to(device).float().reshape(-1, 4) for t in targets])
        cxcy, wh = (xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]
        # neighbours: self, left, up, right, down; a centre in a cell's left half also uses the left cell, etc.
        offsets = torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], device=device, dtype=torch.float32) * 0.5
        out = []
        for anchors, stride, (h, w) in zip(self.anchors, self.strides, grid_sizes):
            anchor_wh = anchors.float() / stride  # (A, 2)
            gxy, gwh = cxcy / stride, wh / stride  # (T, 2)
            ratio = gwh[None] / anchor_wh[:, None]  # (A, T, 2)
            match = torch.max(ratio, 1 / ratio).amax(-1) < self.anchor_t  # (A, T)
            ai, ti = match.nonzero(as_tuple=True)  # (M,)
            g = gxy[ti]
            g_inv = g.new_tensor([w, h]) - g
            near_lo = (g % 1 < 0.5) & (g > 1)  # (M, 2): centre in the left / top half, not in the first cell
            near_hi = (g_inv % 1 < 0.5) & (g_inv > 1)
            use = torch.stack([torch.ones_like(near_lo[:, 0]), *near_lo.T, *near_hi.T])  # (5, M)
            g5 = g.expand(5, -1, -1)[use]  # (P, 2)
            cell = (g5 - offsets[:, None].expand(-1, len(g), -1)[use]).long()
            cell[:, 0].clamp_(0, w - 1)
            cell[:, 1].clamp_(0, h - 1)
            ti5, ai5 = ti.expand(5, -1)[use], ai.expand(5, -1)[use]
            out.append(
                {
                    "img": img[ti5],
                    "anchor": ai5,
                    "gy": cell[:, 1],
                    "gx": cell[:, 0],
                    "box": torch.cat([g5 - cell, gwh[ti5]], 1),
                    "anchor_wh": anchor_wh[ai5],
                    "label": labels[ti5],
                }
            )
        return out

    def compute_loss(
        self, raw: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """YOLOv5-style loss; returns ``(total, {"box", "obj", "cls"})`` with ``total = B · (box + obj + cls)``."""
        levels = [p.float() for p in self._levels(raw)]
        batch_size = levels[0].shape[0]
        assigned = self.build_targets(targets, [(p.shape[2], p.shape[3]) for p in levels])
        zero = levels[0].new_zeros(())
        lbox, lobj, lcls = zero, zero, zero
        for p, pos, balance in zip(levels, assigned, _OBJ_BALANCE):
            tobj = torch.zeros_like(p[..., 4])  # (B, A, H, W)
            if len(pos["img"]):
                ps = p[pos["img"], pos["anchor"], pos["gy"], pos["gx"]]  # (P, 5 + C)
                pbox = decode_xywh(ps[:, :4], ps.new_zeros(()), pos["anchor_wh"], 1.0)
                ciou_loss = complete_box_iou_loss(xywh_to_xyxy(pbox), xywh_to_xyxy(pos["box"]))  # (P,)
                lbox = lbox + ciou_loss.mean()
                # a cell matched twice keeps its best IoU (deterministic, unlike last-write-wins indexing)
                flat = ((pos["img"] * p.shape[1] + pos["anchor"]) * p.shape[2] + pos["gy"]) * p.shape[3] + pos["gx"]
                iou = (1 - ciou_loss).detach().clamp(min=0)
                tobj = tobj.flatten().scatter_reduce(0, flat, iou, reduce="amax").view_as(tobj)
                tcls = F.one_hot(pos["label"], self.num_classes).to(ps.dtype)
                lcls = lcls + F.binary_cross_entropy_with_logits(ps[:, 5:], tcls)
            lobj = lobj + balance * F.binary_cross_entropy_with_logits(p[..., 4], tobj)
        parts = {"box": lbox * self.box_gain, "obj": lobj * self.obj_gain, "cls": lcls * self.cls_gain}
        return (parts["box"] + parts["obj"] + parts["cls"]) * batch_size, parts


__all__ = ["COCO_ANCHORS_416", "SCALES", "YOLOv3", "decode_xywh"]
