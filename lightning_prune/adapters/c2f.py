"""Convert third-party YOLOv8-style C2f blocks (one conv, then ``chunk``/``split``) to a two-conv form that prunes.

Ultralytics' C2f computes ``y = list(cv1(x).chunk(2, 1)); y.extend(m(y[-1]) for m in self.m); cv2(cat(y, 1))``.
Torch-pruning's dependency graph cannot follow the ``chunk``/``split`` of ``cv1``'s output on current torch, so, as
torch-pruning's own YOLOv8 example does, :func:`convert_c2f` replaces each such block with :class:`C2fTwoConv`, whose
``cv0``/``cv1`` are the two halves of the original ``cv1`` (conv weights and BatchNorm parameters and buffers split
exactly). Both forms compute the same function. Our :class:`lightning_prune.models.yolov8.C2f` is built this way.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn


class C2fTwoConv(nn.Module):
    """C2f whose first convolution is two convolutions: ``cv2(cat[cv0(x), cv1(x), m1, ..., mn])``, ``m_i`` chained.

    Args:
        cv0: block producing the first half of the original ``cv1`` output (the bypass half).
        cv1: block producing the second half (the input of the first bottleneck).
        m: the bottlenecks.
        cv2: the output block.
    """

    def __init__(self, cv0: nn.Module, cv1: nn.Module, m: nn.ModuleList, cv2: nn.Module) -> None:
        super().__init__()
        self.cv0, self.cv1, self.m, self.cv2 = cv0, cv1, m, cv2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ys = [self.cv0(x), self.cv1(x)]
        for m in self.m:
            ys.append(m(ys[-1]))
        return self.cv2(torch.cat(ys, 1))


def refuse_chunked_c2f(model: nn.Module, error: type[Exception] = ValueError) -> None:
    """Raise ``error`` naming the first chunked C2f of ``model``: torch-pruning 1.6 cannot trace one (convert first)."""
    for name, module in model.named_modules():
        if is_chunked_c2f(module):
            raise error(
                f"Expected a model torch-pruning can trace but `{name}` ({type(module).__name__}) splits a conv's "
                "output with chunk/split, which torch-pruning 1.6 cannot follow. HINT: convert it first with "
                "`lightning_prune.adapters.convert_c2f(model)` (outputs unchanged)."
            )


def is_chunked_c2f(module: nn.Module) -> bool:
    """Whether ``module`` has the Ultralytics C2f layout: ``cv1.conv`` (c1 → 2c), ``cv2.conv`` ((2 + n)c → c2), ``m``.

    ``m`` must be an ``nn.ModuleList`` of ``n`` blocks; a module that already has ``cv0`` (two-conv form) never
    matches.
    """
    conv1 = getattr(getattr(module, "cv1", None), "conv", None)
    conv2 = getattr(getattr(module, "cv2", None), "conv", None)
    m = getattr(module, "m", None)
    if hasattr(module, "cv0") or not isinstance(m, nn.ModuleList):
        return False
    if not (isinstance(conv1, nn.Conv2d) and isinstance(conv2, nn.Conv2d)) or conv1.groups != 1:
        return False
    c, odd = divmod(conv1.out_channels, 2)
    return not odd and conv2.in_channels == (2 + len(m)) * c


def convert_c2f(model: nn.Module, is_c2f: Callable[[nn.Module], bool] | None = None) -> int:
    """Replace, in place, every chunk-based C2f block below ``model`` by an equivalent :class:`C2fTwoConv`.

    Call it before pruning (and before building the optimizer: the new blocks hold new parameters). Plain public
    attributes of a block (e.g. Ultralytics' ``f``, ``i``, ``type``, ``np``, ``c``) are copied to its replacement.
    ``model`` itself is never replaced, only its descendants.

    Args:
        model: the network holding the blocks.
        is_c2f: predicate choosing the blocks to convert; default :func:`is_chunked_c2f` (structure only). A chosen
            block must have ``cv1.conv`` (``nn.Conv2d``, optionally followed by ``cv1.bn``), ``m`` and ``cv2``.

    Returns:
        The number of blocks converted.

    Raises:
        ValueError: a chosen block lacks ``cv1.conv`` (an ``nn.Conv2d`` with an even number of output channels),
            an ``nn.ModuleList`` ``m`` or ``cv2``.

    Example:
        >>> from ultralytics import YOLO  # doctest: +SKIP
        >>> net = YOLO("yolov8n.yaml").model  # doctest: +SKIP
        >>> convert_c2f(net)  # doctest: +SKIP
        8
    """
    predicate = is_chunked_c2f if is_c2f is None else is_c2f
    converted = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if predicate(child):
                setattr(parent, name, _two_conv(child))
                converted += 1
    return converted


def _two_conv(block: nn.Module) -> C2fTwoConv:
    cv1, m, cv2 = (getattr(block, name, None) for name in ("cv1", "m", "cv2"))
    conv = getattr(cv1, "conv", None)
    if (
        not (isinstance(cv1, nn.Module) and isinstance(m, nn.ModuleList) and isinstance(cv2, nn.Module))
        or not isinstance(conv, nn.Conv2d)
        or conv.out_channels % 2
    ):
        raise ValueError(
            f"Expected the block chosen by `is_c2f` to have `cv1.conv` (an nn.Conv2d with an even number of output "
            f"channels), an nn.ModuleList `m` and a module `cv2` but got a {type(block).__name__} with cv1.conv="
            f"{conv!r}, m={type(m).__name__}, cv2={type(cv2).__name__}."
        )
    c = conv.out_channels // 2
    new = C2fTwoConv(_half(cv1, slice(0, c)), _half(cv1, slice(c, 2 * c)), m, cv2)
    for key, value in vars(block).items():
        if not key.startswith("_") and key != "training":
            setattr(new, key, value)
    new.train(block.training)
    return new


def _half(cv1: nn.Module, channels: slice) -> nn.Module:
    """A copy of ``cv1`` producing only ``channels`` of its output (conv rows and BatchNorm entries sliced)."""
    half = copy.deepcopy(cv1)
    conv = half.conv
    with torch.no_grad():
        conv.weight = nn.Parameter(conv.weight[channels].clone(), conv.weight.requires_grad)
        if conv.bias is not None:
            conv.bias = nn.Parameter(conv.bias[channels].clone(), conv.bias.requires_grad)
        conv.out_channels = conv.weight.shape[0]
        bn = getattr(half, "bn", None)
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            for pname in ("weight", "bias"):
                p = getattr(bn, pname)
                if p is not None:
                    setattr(bn, pname, nn.Parameter(p[channels].clone(), p.requires_grad))
            for bname in ("running_mean", "running_var"):
                buf = getattr(bn, bname)
                if buf is not None:
                    setattr(bn, bname, buf[channels].clone())
            bn.num_features = conv.out_channels
    return half


__all__ = ["C2fTwoConv", "convert_c2f", "is_chunked_c2f"]
