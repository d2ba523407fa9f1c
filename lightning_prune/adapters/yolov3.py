"""Reads the raw head output of YOLOv3-style anchor-based detectors.

Raw output layout
-----------------
``model(images)`` returns a list of ``L`` tensors (``L = 3`` for :class:`~lightning_prune.models.yolov3.YOLOv3`),
one per feature level, ordered from the finest stride (8) to the coarsest (32). Level ``i`` has shape::

    (B, A · (5 + C), H_i, W_i)          H_i = image height / stride_i, W_i = image width / stride_i

with B images, A anchors per cell (3) and C classes. The channels are grouped by anchor: anchor ``a`` owns
channels ``a · (5 + C) + k`` for ``k`` in ``0 .. 5 + C − 1``:

===========  ==============================================================================
``k``        meaning
===========  ==============================================================================
0, 1         ``tx, ty``: centre ``(2·σ(t) − 0.5 + cell) · stride`` (input pixels)
2, 3         ``tw, th``: size ``(2·σ(t))² · anchor`` (input pixels)
4            objectness logit
5 .. 5+C−1   class logits (independent sigmoids; score = σ(obj) · σ(cls))
===========  ==============================================================================

so ``raw.view(B, A, 5 + C, H, W)`` separates anchors from fields. The same layout is used by Darknet,
ultralytics/yolov3 and YOLOv5 (whose ``Detect`` head output, before its inference-time decoding, is
exactly this). The last convolution of each level (a 1×1 conv with bias, A · (5 + C) output channels)
must keep its width when pruning: its channels encode anchors × fields, not features.

Example:
    >>> import torch
    >>> adapter = YOLOv3Adapter(num_classes=2)
    >>> raw = [torch.zeros(1, 21, 8, 8), torch.zeros(1, 21, 4, 4), torch.zeros(1, 21, 2, 2)]
    >>> level = adapter.split(raw)[0]
    >>> tuple(level.box.shape), tuple(level.obj.shape), tuple(level.cls.shape), level.stride
    ((1, 3, 8, 8, 4), (1, 3, 8, 8), (1, 3, 8, 8, 2), 8)
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from lightning_prune.adapters.base import HeadAdapter, HeadLevel


class YOLOv3Adapter(HeadAdapter):
    """Adapter for anchor-based YOLOv3 / YOLOv5-style heads (layout in the module docstring).

    Args:
        num_classes: number of classes C.
        num_anchors: anchors per cell A.
        strides: stride of each level, in the order of the raw output list.
        pred_pattern: regular expression matched (``re.search``) against the qualified module names of
            the model to find the prediction convolutions; the default finds those of
            :class:`~lightning_prune.models.yolov3.YOLOv3` (``head.preds.0`` ..), also inside a wrapper.

    Raises:
        ValueError: ``num_classes``, ``num_anchors`` not positive ints, or ``strides`` empty.
    """

    def __init__(
        self,
        num_classes: int,
        num_anchors: int = 3,
        strides: Sequence[int] = (8, 16, 32),
        pred_pattern: str = r"(^|\.)head\.preds\.\d+$",
    ) -> None:
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"Expected argument `num_classes` to be a positive int but got {num_classes!r}.")
        if not isinstance(num_anchors, int) or num_anchors < 1:
            raise ValueError(f"Expected argument `num_anchors` to be a positive int but got {num_anchors!r}.")
        if len(strides) == 0:
            raise ValueError(f"Expected argument `strides` to name at least one level but got {strides!r}.")
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        self.strides = [int(s) for s in strides]
        self.pred_pattern = re.compile(pred_pattern)

    @property
    def channels_per_level(self) -> int:
        return self.num_anchors * (5 + self.num_classes)

    def output_layers(self, model: nn.Module) -> list[str]:
        """Qualified names of the per-level prediction convs, in ``named_modules`` order.

        Raises:
            ValueError: the pattern does not find one conv with ``A · (5 + C)`` outputs per level.
        """
        names = [
            name
            for name, module in model.named_modules()
            if self.pred_pattern.search(name) and isinstance(module, nn.Conv2d)
        ]
        widths = [model.get_submodule(n).out_channels for n in names]
        if len(names) != len(self.strides) or any(w != self.channels_per_level for w in widths):
            raise ValueError(
                f"Expected {len(self.strides)} prediction convs with {self.channels_per_level} = A · (5 + C) output "
                f"channels matching `pred_pattern` {self.pred_pattern.pattern!r} but got {dict(zip(names, widths))}. "
                "HINT: pass `pred_pattern` matching your model's last 1×1 convs."
            )
        return names

    def split(self, raw: Sequence[torch.Tensor]) -> list[HeadLevel]:
        """Split raw output into per level ``box`` (B, A, H, W, 4), ``obj`` (B, A, H, W), ``cls`` (B, A, H, W, C).

        The tensors are views of ``raw`` (no copy), so gradients flow back to the model.

        Raises:
            ValueError: the number of levels or the channel count does not match the adapter.
        """
        if len(raw) != len(self.strides):
            raise ValueError(f"Expected {len(self.strides)} raw output levels but got {len(raw)}.")
        levels = []
        for r, stride in zip(raw, self.strides):
            if r.ndim != 4 or r.shape[1] != self.channels_per_level:
                raise ValueError(
                    f"Expected raw level of shape (B, {self.channels_per_level}, H, W) = (B, A · (5 + C), H, W) "
                    f"but got {tuple(r.shape)}."
                )
            b, _, h, w = r.shape
            p = r.view(b, self.num_anchors, 5 + self.num_classes, h, w).permute(0, 1, 3, 4, 2)  # (B, A, H, W, 5 + C)
            levels.append(HeadLevel(box=p[..., :4], obj=p[..., 4], cls=p[..., 5:], stride=stride))
        return levels


__all__ = ["YOLOv3Adapter"]
