"""Model size facts: parameters, MACs and size, measured the same way everywhere (no Trainer imports)."""

from __future__ import annotations

from typing import Any

import torch
import torch_pruning as tp
from torch import nn


@torch.no_grad()
def model_stats(model: nn.Module, example_input: Any) -> dict[str, float]:
    """Parameters, multiply-accumulates of one forward on ``example_input``, and fp32 size in MB.

    MACs come from torch-pruning's counter (the one pruning targets are measured with). Every submodule's
    train/eval mode is restored afterwards (a model may hold frozen BatchNorms in eval mode while training).

    Example:
        >>> stats = model_stats(nn.Conv2d(3, 8, 3), torch.zeros(1, 3, 32, 32))
        >>> int(stats["params"]), int(stats["macs"])
        (224, 201600)
    """
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        macs, params = tp.utils.count_ops_and_params(model, example_input)
    finally:
        for m, training in modes.items():
            m.train(training)
    size_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return {"params": float(params), "macs": float(macs), "size_mb": size_bytes / 1e6}


def format_stats(stats: dict[str, float]) -> str:
    """``params 1.23M | MACs 0.45G | size 4.9 MB``."""
    return f"params {stats['params'] / 1e6:.2f}M | MACs {stats['macs'] / 1e9:.3f}G | size {stats['size_mb']:.2f} MB"
