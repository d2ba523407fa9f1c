"""How to read a detector's raw head output.

Pruning must keep the width of the layers whose channels *encode* something (anchors × (5 + C), DFL
bins, class logits); distillation must know which channels of the raw output are boxes, objectness
and class scores. A :class:`HeadAdapter` tells both, for one detector family. Write one for your own
detector by implementing the two methods below.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class HeadLevel:
    """The raw prediction of one feature level, split by meaning.

    Shapes use B = batch, A = predictions per cell (anchors; 1 when anchor-free), H×W = grid:

    - ``box``: (B, A, H, W, K) box regression: K = 4 (anchor offsets) or 4 × reg_max (DFL logits);
    - ``obj``: (B, A, H, W) objectness logits, or ``None`` for heads without objectness;
    - ``cls``: (B, A, H, W, C) class logits;
    - ``stride``: input pixels per grid cell.
    """

    box: torch.Tensor
    obj: torch.Tensor | None
    cls: torch.Tensor
    stride: int


class HeadAdapter(ABC):
    """Reads one detector family's raw head output."""

    @abstractmethod
    def output_layers(self, model: nn.Module) -> list[str]:
        """Qualified names (``model.named_modules()``) of the layers whose output width must not change."""

    @abstractmethod
    def split(self, raw: Any) -> list[HeadLevel]:
        """Split the raw output of ``model(images)`` into one :class:`HeadLevel` per feature level."""
