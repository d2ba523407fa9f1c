"""A tiny CNN with every kind of channel coupling (residual add, concat, linear head), shared by the pruning tests."""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(c_in: int, c_out: int, bias: bool = False, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=bias), nn.BatchNorm2d(c_out), nn.ReLU()
    )


class ResCatNet(nn.Module):
    """stem → residual block (add) → concat with a branch → fuse → linear head: every coupling kind matters."""

    def __init__(self, width: int = 8, num_classes: int = 5, bias: bool = False, kernel: int = 3) -> None:
        super().__init__()
        self.stem = conv_bn(3, width, bias, kernel)
        self.a = conv_bn(width, width, bias, kernel)
        self.b = conv_bn(width, width, bias, kernel)
        self.c = conv_bn(width, width, bias, kernel)
        self.fuse = conv_bn(2 * width, 2 * width, bias, kernel)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = x + self.b(self.a(x))
        z = self.fuse(torch.cat([y, self.c(y)], dim=1))
        return self.head(z.mean(dim=(2, 3)))
