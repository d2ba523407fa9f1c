"""Fold BatchNorm into the convolution that feeds it, as a deployed model runs (for latency measurements).

Conv → BN pairs are found by watching one forward pass, not by module names, so any model works: a
``BatchNorm2d`` is folded into a ``Conv2d`` when, on every call, its input is the very tensor that conv produced
(same object, not modified in place since). The fused copy is checked against the original on the example input.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

#: tolerance of the fused outputs, relative to the largest magnitude of each output (at least 1)
TOLERANCE = 1e-4


@torch.no_grad()
def fuse_batchnorm(model: nn.Module, example_input: Any) -> nn.Module:
    """An eval-mode deep copy of ``model`` with every conv-fed ``BatchNorm2d`` folded into its conv.

    The conv gets the BN's scale and shift (a bias is added if it had none) and the BN becomes ``nn.Identity()``.
    A BN whose input is not a conv's output (or whose conv output was changed in place first, or that is shared
    inconsistently between calls), or that keeps no running statistics, is left as it is. ``model`` is not
    modified. Resolution does not matter for the fusion itself: a small ``example_input`` is enough and faster
    (the traced activations are held during the probe).

    Args:
        model: the module to fuse.
        example_input: a tensor (or tuple of positional arguments) ``model`` accepts.

    Raises:
        ValueError: the fused copy's outputs differ from the original's (beyond ``1e-4`` relative to their
            magnitude); the message names the first conv/BN pair whose fusion changes them.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.BatchNorm2d(8))
        >>> fused = fuse_batchnorm(net, torch.randn(1, 3, 16, 16))
        >>> [type(m).__name__ for m in fused]  # the second BN is fed by a ReLU: kept
        ['Conv2d', 'Identity', 'ReLU', 'BatchNorm2d']
        >>> type(net[1]).__name__  # the original is untouched
        'BatchNorm2d'
    """
    fused = copy.deepcopy(model).eval()
    reference = _run(model, example_input, eval_mode=True)
    pairs = _find_pairs(fused, example_input)
    for conv_name, bn_name in pairs:
        _fuse_pair(fused, conv_name, bn_name)
    if not _close(reference, _run(fused, example_input)):
        # find the culprit: fuse the pairs one at a time into a fresh copy
        probe = copy.deepcopy(model).eval()
        for conv_name, bn_name in pairs:
            _fuse_pair(probe, conv_name, bn_name)
            if not _close(reference, _run(probe, example_input)):
                raise ValueError(
                    f"Expected the BatchNorm-fused model to compute the same outputs as the original but fusing "
                    f"{bn_name!r} into {conv_name!r} changes them (is the conv's output used elsewhere as well?)."
                )
        raise ValueError(
            "Expected the BatchNorm-fused model to compute the same outputs as the original but they differ."
        )
    return fused


def _find_pairs(model: nn.Module, example_input: Any) -> list[tuple[str, str]]:
    """``(conv name, BN name)`` for every BN fed on each call by the output of one same conv."""
    produced: dict[int, tuple[str, torch.Tensor, int]] = {}  # id(output) -> (conv, output, version); refs kept
    fed_by: dict[str, list[str | None]] = {}  # BN name -> the conv feeding it, per call (None: not a conv)
    conv_calls: dict[str, int] = {}

    def on_conv(name: str) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            conv_calls[name] = conv_calls.get(name, 0) + 1
            if isinstance(output, torch.Tensor):
                produced[id(output)] = (name, output, output._version)

        return hook

    def on_bn(name: str) -> Any:
        def hook(_module: nn.Module, inputs: Any) -> None:
            x = inputs[0] if inputs else None
            entry = produced.get(id(x)) if isinstance(x, torch.Tensor) else None
            ok = entry is not None and entry[1] is x and entry[2] == x._version  # not changed in place since
            fed_by.setdefault(name, []).append(entry[0] if ok and entry is not None else None)

        return hook

    hooks = []
    for name, m in model.named_modules():
        if type(m) is nn.Conv2d:  # not subclasses with their own forward, nor quantized/transposed convs
            hooks.append(m.register_forward_hook(on_conv(name)))
        elif type(m) is nn.BatchNorm2d:
            hooks.append(m.register_forward_pre_hook(on_bn(name)))
    try:
        _run(model, example_input)
    finally:
        for h in hooks:
            h.remove()
    modules = dict(model.named_modules())
    pairs, used = [], set()
    for bn_name, convs in fed_by.items():
        conv_name = convs[0]
        bn = modules[bn_name]
        if (
            conv_name is None
            or any(c != conv_name for c in convs)
            or conv_calls.get(conv_name) != len(convs)  # the conv also runs without this BN after it
            or conv_name in used
            or bn.running_mean is None
            or bn.running_var is None
            or modules[conv_name].out_channels != bn.num_features
        ):
            continue
        used.add(conv_name)
        pairs.append((conv_name, bn_name))
    return pairs


def _fuse_pair(model: nn.Module, conv_name: str, bn_name: str) -> None:
    conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
    _set(model, conv_name, fuse_conv_bn_eval(conv.eval(), bn.eval()))
    _set(model, bn_name, nn.Identity())


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _run(model: nn.Module, example_input: Any, eval_mode: bool = False) -> Any:
    """One no-grad forward; with ``eval_mode`` the modes of ``model`` are restored afterwards."""
    modes = {m: m.training for m in model.modules()} if eval_mode else {}
    try:
        if eval_mode:
            model.eval()
        with torch.no_grad():
            return model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    finally:
        for m, training in modes.items():
            m.train(training)


def _close(a: Any, b: Any) -> bool:
    xs, ys = list(_tensors(a)), list(_tensors(b))
    if len(xs) != len(ys):
        return False
    for x, y in zip(xs, ys, strict=True):
        if x.shape != y.shape:
            return False
        if x.is_floating_point():
            scale = max(1.0, float(x.abs().max())) if x.numel() else 1.0
            if x.numel() and float((x - y).abs().max()) > TOLERANCE * scale:
                return False
        elif not torch.equal(x, y):
            return False
    return True


def _tensors(x: Any) -> Iterator[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)
