"""Letterbox, training augmentation and mosaic for detection samples, built on ``torchvision.transforms.v2``.

Every transform takes and returns ``(image, target)`` where ``image`` is a :class:`~torchvision.tv_tensors.Image`
and ``target["boxes"]`` a :class:`~torchvision.tv_tensors.BoundingBoxes` (xyxy), so they compose with the v2
transforms in a :class:`~torchvision.transforms.v2.Compose`. :func:`detection_transforms` builds the full pipeline;
its output image is float (3, S, S) in [0, 1] and the target gains ``letterbox`` = (scale, pad_x, pad_y).

Example:
    >>> import torch
    >>> from torchvision import tv_tensors
    >>> image = tv_tensors.Image(torch.zeros(3, 100, 200, dtype=torch.uint8))
    >>> boxes = tv_tensors.BoundingBoxes([[10.0, 20.0, 50.0, 60.0]], format="XYXY", canvas_size=(100, 200))
    >>> image, target = detection_transforms(64, train=False)(image, {"boxes": boxes, "labels": torch.tensor([0])})
    >>> image.shape, target["letterbox"].tolist()
    (torch.Size([3, 64, 64]), [0.3199999928474426, 0.0, 16.0])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = ["PAD_VALUE", "Letterbox", "Mosaic", "detection_transforms"]

#: Gray used for letterbox padding and empty canvas, as uint8 (114 / 255 as float).
PAD_VALUE = 114
Sample = tuple[tv_tensors.Image, dict[str, Any]]


class Letterbox(nn.Module):
    """Resize so that the long side is ``size`` (keeping the aspect ratio) and pad to ``size`` x ``size``, centred.

    Adds ``target["letterbox"]`` = float32 ``(scale, pad_x, pad_y)`` with ``original = (letterboxed - pad) / scale``.
    Boxes are mapped with that single ``scale`` (not with the rounded per-axis resize factors) so that this inverse
    is exact.

    Args:
        size: Output side length S.
        fill: Padding value (uint8 scale).
    """

    def __init__(self, size: int, fill: int = PAD_VALUE) -> None:
        super().__init__()
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"Expected argument `size` to be a positive int but got {size!r}.")
        self.size = size
        self.fill = fill

    def forward(self, image: tv_tensors.Image, target: dict[str, Any]) -> Sample:
        h, w = image.shape[-2:]
        scale = self.size / max(h, w)
        nh, nw = min(self.size, round(h * scale)), min(self.size, round(w * scale))
        if (nh, nw) != (h, w):
            image = F.resize(image, [nh, nw], antialias=True)
        left, top = (self.size - nw) // 2, (self.size - nh) // 2
        image = F.pad(image, [left, top, self.size - nw - left, self.size - nh - top], fill=self.fill)
        boxes = target["boxes"]
        shifted = boxes.as_subclass(Tensor) * scale + boxes.new_tensor([left, top, left, top])
        target = {
            **target,
            "boxes": tv_tensors.wrap(shifted, like=boxes, canvas_size=(self.size, self.size)),
            "letterbox": torch.tensor([scale, left, top], dtype=torch.float32),
        }
        return image, target


class Mosaic(nn.Module):
    """Combine four samples into one ``size`` x ``size`` image (YOLOv4's mosaic).

    A random centre is drawn in the middle half of the canvas; each image is scaled so that its long side is
    ``size`` (the letterbox scale, so objects keep the size they have without mosaic) and placed in one quadrant
    with its inner corner at the centre, cropped to the quadrant. Boxes are clipped to the visible part and dropped
    when less than ``min_visible`` of their area remains.

    The result has ``orig_size`` = (size, size) and the first sample's ``image_id``.

    Args:
        size: Output side length S.
        min_visible: Minimum visible fraction of a box's area to keep it.
        fill: Value of uncovered pixels (uint8 scale).
    """

    def __init__(self, size: int, min_visible: float = 0.2, fill: int = PAD_VALUE) -> None:
        super().__init__()
        if not isinstance(size, int) or size < 2:
            raise ValueError(f"Expected argument `size` to be an int >= 2 but got {size!r}.")
        self.size = size
        self.min_visible = min_visible
        self.fill = fill

    def forward(self, samples: Sequence[Sample]) -> Sample:
        if len(samples) != 4:
            raise ValueError(f"Expected 4 samples for a mosaic but got {len(samples)}.")
        s = self.size
        xc, yc = (int(v) for v in torch.randint(s // 4, 3 * s // 4 + 1, (2,)))
        canvas = torch.full((3, s, s), self.fill, dtype=torch.uint8)
        all_boxes, all_labels = [], []
        for k, (image, target) in enumerate(samples):
            h, w = image.shape[-2:]
            scale = s / max(h, w)
            nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
            image = F.resize(image, [nh, nw], antialias=True)
            right, bottom = k % 2 == 1, k >= 2  # quadrant: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right
            ox, oy = (xc if right else xc - nw), (yc if bottom else yc - nh)  # image origin on the canvas
            # visible region: the image's extent intersected with its quadrant
            x0, x1 = max(ox, xc if right else 0), min(ox + nw, s if right else xc)
            y0, y1 = max(oy, yc if bottom else 0), min(oy + nh, s if bottom else yc)
            if x1 <= x0 or y1 <= y0:
                continue
            canvas[:, y0:y1, x0:x1] = image[:, y0 - oy : y1 - oy, x0 - ox : x1 - ox]
            boxes = target["boxes"].as_subclass(Tensor).float() * scale + torch.tensor([ox, oy, ox, oy])  # (N, 4)
            area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            boxes[:, 0::2] = boxes[:, 0::2].clamp(x0, x1)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(y0, y1)
            wh = boxes[:, 2:] - boxes[:, :2]
            keep = (wh >= 1).all(dim=1) & (wh.prod(dim=1) >= self.min_visible * area)
            all_boxes.append(boxes[keep])
            all_labels.append(target["labels"][keep])
        first = samples[0][1]
        target = {
            **first,
            "boxes": tv_tensors.BoundingBoxes(
                torch.cat(all_boxes) if all_boxes else torch.zeros(0, 4), format="XYXY", canvas_size=(s, s)
            ),
            "labels": torch.cat(all_labels) if all_labels else torch.zeros(0, dtype=torch.int64),
            "orig_size": torch.tensor([s, s], dtype=torch.int64),
        }
        return tv_tensors.Image(canvas), target


class _ToBatchable(nn.Module):
    """Unwrap tv_tensors into plain tensors of the batch contract (float32 boxes, int64 labels)."""

    def forward(self, image: Tensor, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        target = {
            **target,
            "boxes": target["boxes"].as_subclass(Tensor).to(torch.float32).reshape(-1, 4),
            "labels": target["labels"].to(torch.int64),
        }
        return image.as_subclass(Tensor), target


def detection_transforms(
    size: int,
    train: bool = False,
    hflip: float = 0.5,
    scale: float = 0.5,
    translate: float = 0.1,
    color_jitter: float = 0.3,
) -> v2.Compose:
    """Build the sample pipeline: letterbox, then (for training) augmentation, then float conversion.

    Augmentations, each skipped when its magnitude is 0: horizontal flip with probability ``hflip``; random affine
    zoom in ``[1 - scale, 1 + scale]`` and shift up to ``translate`` of the side (gray fill), after which boxes are
    clamped and degenerate ones dropped with their labels; colour jitter of brightness, contrast and saturation by
    ``color_jitter`` and hue by ``color_jitter / 20`` (YOLOv5's HSV gains are of that order).

    Args:
        size: Output side length S.
        train: Whether to augment; validation pipelines only letterbox.
        hflip: Probability of a horizontal flip.
        scale: Zoom magnitude, in [0, 1).
        translate: Shift magnitude as a fraction of S, in [0, 1].
        color_jitter: Colour jitter magnitude, in [0, 1].

    Returns:
        A callable ``(image, target) -> (float image (3, S, S) in [0, 1], target)``.
    """
    steps: list[nn.Module] = [Letterbox(size)]
    if train:
        if hflip > 0:
            steps.append(v2.RandomHorizontalFlip(p=hflip))
        if scale > 0 or translate > 0:
            steps.append(
                v2.RandomAffine(
                    degrees=0.0,
                    translate=(translate, translate),
                    scale=(1 - scale, 1 + scale),
                    interpolation=v2.InterpolationMode.BILINEAR,
                    fill=PAD_VALUE,
                )
            )
        if color_jitter > 0:
            c = color_jitter
            steps.append(v2.ColorJitter(brightness=c, contrast=c, saturation=c, hue=min(0.5, c / 20)))
        steps += [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes()]
    steps += [v2.ToDtype(torch.float32, scale=True), _ToBatchable()]
    return v2.Compose(steps)
