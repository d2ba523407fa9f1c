"""Reads the raw head output of :class:`~lightning_prune.models.yolov8.YOLOv8`.

Raw output layout: ``model(images)`` returns a list of three tensors, one per feature level with strides
8, 16 and 32 (in that order), each of shape (B, 4·R + C, H, W) with ``H = W = img_size / stride``,
R = ``reg_max`` (DFL bins, 16 by default) and C = the number of classes. The layout is the same in train
and eval mode. Along the channel axis:

- channels ``[0, 4·R)``: box regression logits, four sides ordered (left, top, right, bottom), each side a
  block of R consecutive channels: channel ``side · R + k`` is the logit of bin ``k``. After a softmax over
  a side's R bins, the expected bin index times the stride is the distance in pixels from the cell centre
  ``((x + 0.5) · stride, (y + 0.5) · stride)`` to that side of the box;
- channels ``[4·R, 4·R + C)``: class logits (sigmoid → per-class confidence; there is no objectness).

The channels are produced by two 1×1 convs per level, concatenated: ``head.box.{i}.2`` (4·R outputs) and
``head.cls.{i}.2`` (C outputs). Their output widths encode bins and classes, so pruning must keep them.

Example:
    >>> import torch
    >>> from lightning_prune.models.yolov8 import YOLOv8
    >>> model = YOLOv8("n", num_classes=3, img_size=64)
    >>> levels = model.adapter.split(model(torch.zeros(1, 3, 64, 64)))
    >>> tuple(levels[0].box.shape), tuple(levels[0].cls.shape), levels[0].stride
    ((1, 1, 8, 8, 64), (1, 1, 8, 8, 3), 8)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_prune.adapters.base import HeadAdapter, HeadLevel
from lightning_prune.models.yolov8 import STRIDES, DetectHead


class YOLOv8Adapter(HeadAdapter):
    """Head adapter of the YOLOv8 family (anchor-free, DFL box logits, no objectness).

    Args:
        reg_max: DFL bins per box side, as the model was built with.

    Raises:
        ValueError: if ``reg_max`` < 2.
    """

    def __init__(self, reg_max: int = 16) -> None:
        if not isinstance(reg_max, int) or reg_max < 2:
            raise ValueError(f"Expected argument `reg_max` to be an int >= 2 but got {reg_max!r}.")
        self.reg_max = reg_max

    def output_layers(self, model: nn.Module) -> list[str]:
        """The final 1×1 box and class convs of every :class:`DetectHead` in ``model``.

        Raises:
            ValueError: if ``model`` contains no YOLOv8 detection head.
        """
        names = []
        for prefix, module in model.named_modules():
            if isinstance(module, DetectHead):
                base = f"{prefix}." if prefix else ""
                for i in range(len(module.box)):
                    names += [f"{base}box.{i}.{len(module.box[i]) - 1}", f"{base}cls.{i}.{len(module.cls[i]) - 1}"]
        if not names:
            raise ValueError(f"Expected a model containing a YOLOv8 `DetectHead` but got {type(model).__name__}.")
        return names

    def split(self, raw: Any) -> list[HeadLevel]:
        """(B, 4·R + C, H, W) per level → ``box`` (B, 1, H, W, 4·R), ``obj`` None, ``cls`` (B, 1, H, W, C).

        Raises:
            ValueError: if ``raw`` is not a list of 4-D tensors with more than 4·R channels.
        """
        n_box = 4 * self.reg_max
        items = raw if isinstance(raw, (list, tuple)) else [raw]
        if not isinstance(raw, (list, tuple)) or not all(
            isinstance(r, torch.Tensor) and r.ndim == 4 and r.shape[1] > n_box for r in items
        ):
            got = [tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__ for r in items]
            raise ValueError(f"Expected argument `raw` to be a list of (B, {n_box} + C, H, W) tensors but got {got}.")
        levels = []
        for r, stride in zip(raw, STRIDES):
            r = r.permute(0, 2, 3, 1).unsqueeze(1)  # (B, 1, H, W, 4R + C)
            levels.append(HeadLevel(box=r[..., :n_box], obj=None, cls=r[..., n_box:], stride=stride))
        return levels


__all__ = ["YOLOv8Adapter"]
