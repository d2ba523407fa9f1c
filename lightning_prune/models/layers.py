"""Small building blocks shared by the reference detectors.

Every convolution is ``Conv2d(bias=False) → BatchNorm2d → activation``: the BatchNorm γ is what
network slimming regularizes, and torch-pruning's dependency graph follows these triples.
"""

from __future__ import annotations

import torch
from torch import nn


def make_divisible(channels: float, divisor: int = 8) -> int:
    """Round ``channels`` to the nearest multiple of ``divisor`` (never below ``divisor``)."""
    return max(divisor, int(channels + divisor / 2) // divisor * divisor)


class ConvBNAct(nn.Module):
    """``Conv2d → BatchNorm2d → activation`` with 'same' padding."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        act: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False
        )
        # eps as Ultralytics; momentum left at PyTorch's 0.1 (Ultralytics' 0.03 makes running statistics trail
        # the weights for hundreds of steps, so short CPU runs evaluate far worse than they train)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3)
        self.act = nn.SiLU(inplace=True) if act is None else act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))
