"""Fine-grained (unstructured) pruning masks: magnitude masks kept as boolean buffers, and their storage size.

A pruned parameter ``p`` of a layer gets a boolean buffer ``<p>_mask`` beside it (``True`` = kept), and ``p`` itself
holds exact zeros where the mask is ``False``. The parameter stays the same ``nn.Parameter`` under the same name, so
optimizers, parameter groups built by name (weight decay on ``*.weight``), DDP, torch-pruning and exporters all see a
plain layer; the state dict gains one bool entry per pruned parameter (1 byte per weight).

Why not ``torch.nn.utils.prune``: it renames the parameter to ``weight_orig`` and recomputes ``weight = weight_orig *
weight_mask`` in a forward pre-hook. Parameter groups built by name then differ between a run (built before pruning)
and its resume (built after the masks are restored), and the optimizer state no longer loads; ``module.weight`` is
a stale non-parameter between an optimizer step and the next forward; structural pruning and export need the
reparametrization removed first; and its mask is stored in fp32, 4 bytes per weight.

The price is that keeping the zeros is the training loop's job (this module knows no Trainer): mask the gradients
before each optimizer step (:func:`mask_gradients`) and zero the optimizer state at pruned entries when a mask is made
(:func:`mask_optimizer_state`) — SGD (momentum, Nesterov, weight decay) and Adam(W) then leave the zeros exactly
zero — and :func:`reapply_masks` after each step for any other optimizer. A state dict with masks needs the buffers
before a strict load: :func:`add_mask_buffers` creates them from its keys
(:class:`~lightning_prune.pruning.checkpoint.PrunableMixin` does it in ``load_state_dict``).

Masks are a pure function of the weights (ties broken by position), so ranks holding identical weights, as under DDP,
compute identical masks without communicating.

Paper: Han et al., "Learning both Weights and Connections for Efficient Neural Networks" (NeurIPS 2015),
https://arxiv.org/abs/1506.02626

Example:
    >>> layer = nn.Linear(4, 2, bias=False)
    >>> _ = layer.weight.data.copy_(torch.tensor([[0.1, -4.0, 0.3, 2.0], [-0.2, 1.0, 0.05, -3.0]]))
    >>> apply_masks(layer, magnitude_masks({"weight": layer.weight}, 0.5))
    >>> layer.weight.data
    tensor([[ 0., -4.,  0.,  2.],
            [ 0.,  1.,  0., -3.]])
    >>> storage_report(layer)["sparsity"], make_permanent(layer), hasattr(layer, "weight_mask")
    (0.5, 1, False)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

MASK_SUFFIX = "_mask"
LAYERS = (nn.modules.conv._ConvNd, nn.Linear)  # the layers pruned (and reported) by default


def prunable_parameters(
    module: nn.Module, parameter_names: Iterable[str] = ("weight",), skip: Iterable[str] = ()
) -> dict[str, nn.Parameter]:
    """The trainable parameters named ``parameter_names`` of every conv and linear layer of ``module``.

    Args:
        module: the model.
        parameter_names: which parameters of each layer, e.g. ``("weight", "bias")``.
        skip: names of modules whose layers (themselves, or the layers inside them) are left out.

    Returns:
        ``{qualified parameter name: parameter}`` in module order. Frozen parameters are left out (a fixed DFL
        projection must keep its values).
    """
    skipped = tuple(skip)
    found: dict[str, nn.Parameter] = {}
    for name, layer in module.named_modules():
        if not isinstance(layer, LAYERS) or any(name == s or name.startswith(f"{s}.") for s in skipped):
            continue
        for attr in parameter_names:
            param = layer._parameters.get(attr)
            if param is not None and param.requires_grad:
                found[f"{name}.{attr}" if name else attr] = param
    return found


@torch.no_grad()
def magnitude_masks(
    tensors: Mapping[str, torch.Tensor],
    sparsity: float,
    global_pruning: bool = True,
    masks: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Boolean keep-masks that zero the smallest ``|w|``: ``round(sparsity · n)`` of the ``n`` entries of all
    ``tensors`` together (``global_pruning``, one threshold) or of each tensor.

    Entries already ``False`` in ``masks`` stay pruned and count first (more of them than the target: no new ones).
    Ties at the threshold are broken by position (tensors in order, flattened), so the result is a pure function of
    the values.

    Raises:
        ValueError: ``sparsity`` is not in [0, 1), or a mask's shape differs from its tensor's.

    Example:
        >>> w = torch.tensor([3.0, -1.0, 0.5, 2.0])
        >>> magnitude_masks({"a": w, "b": -w}, 0.5)  # one threshold: the two 0.5s and the two 1s
        {'a': tensor([ True, False, False,  True]), 'b': tensor([ True, False, False,  True])}
        >>> magnitude_masks({"a": w}, 0.25, masks={"a": torch.tensor([False, True, True, True])})["a"]
        tensor([False,  True,  True,  True])
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"Expected argument `sparsity` to be a float in [0, 1) but got {sparsity!r}.")
    scores = {}
    for name, tensor in tensors.items():
        score = tensor.detach().abs().float().flatten()
        old = (masks or {}).get(name)
        if old is not None:
            _check_shape(name, tensor, old)
            score = torch.where(old.flatten().to(score.device, torch.bool), score, -1.0)  # pruned: below any |w|
        scores[name] = score
    if global_pruning and scores:
        keep = _keep(torch.cat(list(scores.values())), sparsity).split([s.numel() for s in scores.values()])
    else:
        keep = tuple(_keep(s, sparsity) for s in scores.values())
    return {name: k.view(tensors[name].shape) for name, k in zip(scores, keep, strict=True)}


def _keep(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """(n,) bool: ``False`` at the ``round(sparsity · n)`` smallest scores (or the negative ones, if more)."""
    n = scores.numel()
    k = max(round(sparsity * n), int((scores < 0).sum()))
    keep = torch.ones(n, dtype=torch.bool, device=scores.device)
    if k == 0:
        return keep
    threshold = scores.kthvalue(k).values  # O(n), unlike a sort
    below = scores < threshold
    keep[below] = False
    keep[(scores == threshold).nonzero().flatten()[: k - int(below.sum())]] = False
    return keep


@torch.no_grad()
def apply_masks(module: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Store ``masks`` (``{qualified parameter name: bool mask}``) as ``<param>_mask`` buffers and zero the pruned
    entries in place. A mask already there is combined with the new one (a pruned weight stays pruned).

    Raises:
        ValueError: a name is not a parameter of ``module`` or a mask's shape differs from the parameter's.
    """
    for name, mask in masks.items():
        layer, attr = _owner(module, name)
        param = layer._parameters.get(attr)
        if param is None:
            raise ValueError(f"Expected `{name}` to be a parameter of {type(module).__name__} but it is not.")
        _check_shape(name, param, mask)
        mask = mask.to(device=param.device, dtype=torch.bool)
        old = layer._buffers.get(attr + MASK_SUFFIX)
        if old is not None:
            _check_shape(name, param, old)
            mask = mask & old
        layer.register_buffer(attr + MASK_SUFFIX, mask)
        param.masked_fill_(~mask, 0.0)  # not `mul_`: -w · 0 would leave -0.0


def masked_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter, torch.Tensor]]:
    """``(qualified parameter name, parameter, mask)`` of every masked parameter of ``module``, in module order.

    Raises:
        ValueError: a mask no longer has its parameter's shape (the layer was pruned structurally after masking).
    """
    found = []
    for prefix, layer in module.named_modules():
        for key, mask in layer._buffers.items():
            param = layer._parameters.get(key[: -len(MASK_SUFFIX)]) if key.endswith(MASK_SUFFIX) else None
            if param is None or mask is None or mask.dtype != torch.bool:
                continue
            name = f"{prefix}.{key[: -len(MASK_SUFFIX)]}" if prefix else key[: -len(MASK_SUFFIX)]
            _check_shape(name, param, mask)
            found.append((name, param, mask))
    return found


@torch.no_grad()
def reapply_masks(module: nn.Module) -> None:
    """Zero the pruned entries of every masked parameter again (after an optimizer step)."""
    for _, param, mask in masked_parameters(module):
        param.masked_fill_(~mask, 0.0)


@torch.no_grad()
def mask_gradients(module: nn.Module) -> None:
    """Zero the gradients of pruned entries, so that the optimizer state stays zero there (before a step)."""
    for _, param, mask in masked_parameters(module):
        if param.grad is not None:
            param.grad.masked_fill_(~mask, 0.0)


@torch.no_grad()
def mask_optimizer_state(optimizer: torch.optim.Optimizer, module: nn.Module) -> None:
    """Zero the per-entry state (momentum, Adam moments) of ``optimizer`` at the pruned entries of ``module``."""
    for _, param, mask in masked_parameters(module):
        for value in optimizer.state.get(param, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                value.masked_fill_(~mask, 0.0)


@torch.no_grad()
def make_permanent(module: nn.Module) -> int:
    """Remove every mask of ``module``: the parameters keep their zeros and the layers are plain again.

    Returns:
        The number of masks removed.
    """
    masked = masked_parameters(module)
    for name, param, mask in masked:
        param.masked_fill_(~mask, 0.0)
        layer, attr = _owner(module, name)
        del layer._buffers[attr + MASK_SUFFIX]
    return len(masked)


def add_mask_buffers(module: nn.Module, state_dict: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Create the mask buffers a state dict holds (bool ``<param>_mask`` entries) but ``module`` lacks, so that it
    loads strictly; the values come with the load. The buffers take the state dict's shapes, which a structural
    pruning history replayed in the same load gives the parameters.

    Args:
        module: the model about to load ``state_dict``.
        state_dict: what it loads.
        prefix: the prefix of ``module``'s keys in ``state_dict`` (as in a load-state-dict pre-hook).

    Returns:
        The keys whose buffers were created.
    """
    created = []
    for key, value in state_dict.items():
        if not (key.startswith(prefix) and key.endswith(MASK_SUFFIX) and isinstance(value, torch.Tensor)):
            continue
        if value.dtype != torch.bool:  # not ours (torch.nn.utils.prune stores float masks)
            continue
        path, _, attr = key[len(prefix) :].rpartition(".")
        try:
            layer = module.get_submodule(path)
        except AttributeError:
            continue  # reported by the strict load
        param = layer._parameters.get(attr[: -len(MASK_SUFFIX)])
        if param is not None and attr not in layer._buffers:
            layer.register_buffer(attr, torch.ones(value.shape, dtype=torch.bool, device=param.device))
            created.append(key)
    return created


@torch.no_grad()
def storage_report(module: nn.Module, names: Iterable[str] | None = None) -> dict[str, Any]:
    """What the parameters of ``module`` take to store, dense and in two sparse encodings, and their sparsity.

    Each reported tensor is counted as a matrix ``(shape[0], numel / shape[0])`` (a conv's output channels by its
    inputs × kernel) with ``n`` entries of which ``nnz`` are nonzero, in bytes:

    - dense fp32: ``4 n``;
    - CSR, fp32 values and int32 column indices and row pointers: ``8 nnz + 4 (rows + 1)``; smaller than dense only
      past 50% sparsity;
    - bitmask (one bit per entry) and fp32 nonzeros: ``⌈n / 8⌉ + 4 nnz``; smaller past 3.1%.

    Every other parameter (BatchNorm, biases, ...) is counted dense fp32 in the model totals; buffers (BatchNorm
    statistics, the masks themselves) are not counted. Sizes are in MB (1e6 bytes). None of this makes dense kernels
    faster.

    Args:
        module: the model.
        names: the qualified parameter names to report; default every conv/linear weight and every masked parameter.

    Returns:
        ``layers``: per reported tensor ``numel``, ``nonzeros``, ``sparsity``, ``dense_mb``, ``csr_mb``,
        ``bitmask_mb``; and for the model: ``numel``, ``nonzeros``, ``sparsity`` (of the reported tensors),
        ``params``, ``model_sparsity`` (zeros among all parameters), ``dense_mb``, ``csr_mb``, ``bitmask_mb`` and
        ``best_mb`` (each reported tensor in its smallest encoding), each with the other parameters dense.

    Raises:
        ValueError: a name is not a parameter of ``module``.

    Example:
        >>> layer = nn.Linear(100, 10, bias=False)
        >>> _ = layer.weight.data[:, 20:].zero_()  # 80% zeros: 200 nonzeros
        >>> report = storage_report(layer)
        >>> report["sparsity"], report["dense_mb"], report["csr_mb"], report["bitmask_mb"]
        (0.8, 0.004, 0.001644, 0.000925)
    """
    params = dict(module.named_parameters())
    if names is None:
        selected = {f"{n}.weight" if n else "weight" for n, m in module.named_modules() if isinstance(m, LAYERS)}
        selected |= {name for name, _, _ in masked_parameters(module)}
        names = [n for n in params if n in selected]
    layers = {}
    for name in names:
        if name not in params:
            raise ValueError(
                f"Expected argument `names` to hold parameters of {type(module).__name__} but got {name!r}."
            )
        layers[name] = _encodings(params[name])
    other = sum(p.numel() for n, p in params.items() if n not in layers)
    numel = sum(r["numel"] for r in layers.values())
    nonzeros = sum(r["nonzeros"] for r in layers.values())
    all_params = numel + other
    zeros = sum(int((p == 0).sum()) for p in params.values())
    rest_mb = 4 * other / 1e6
    return {
        "layers": layers,
        "numel": numel,
        "nonzeros": nonzeros,
        "sparsity": 1.0 - nonzeros / numel if numel else 0.0,
        "params": all_params,
        "model_sparsity": zeros / all_params if all_params else 0.0,
        **{key: rest_mb + sum(r[key] for r in layers.values()) for key in ("dense_mb", "csr_mb", "bitmask_mb")},
        "best_mb": rest_mb + sum(min(r["dense_mb"], r["csr_mb"], r["bitmask_mb"]) for r in layers.values()),
    }


def format_storage(report: Mapping[str, Any]) -> str:
    """One line of :func:`storage_report`: sparsity, and the model's size dense and in each encoding.

    Example:
        >>> layer = nn.Linear(1000, 500)
        >>> _ = layer.weight.data[:, 200:].zero_()
        >>> format_storage(storage_report(layer))
        '0.50M weights (1 tensors) 80.0% zero (model 79.9%): fp32 dense 2.00 MB, CSR 0.80 MB, bitmask 0.46 MB'
    """
    return (
        f"{report['numel'] / 1e6:.2f}M weights ({len(report['layers'])} tensors) {100 * report['sparsity']:.1f}% zero "
        f"(model {100 * report['model_sparsity']:.1f}%): fp32 dense {report['dense_mb']:.2f} MB, CSR "
        f"{report['csr_mb']:.2f} MB, bitmask {report['bitmask_mb']:.2f} MB"
    )


def _encodings(tensor: torch.Tensor) -> dict[str, Any]:
    numel = tensor.numel()
    nonzeros = int(torch.count_nonzero(tensor))
    rows = tensor.shape[0] if tensor.dim() else 1
    return {
        "numel": numel,
        "nonzeros": nonzeros,
        "sparsity": 1.0 - nonzeros / numel if numel else 0.0,
        "dense_mb": 4 * numel / 1e6,
        "csr_mb": (8 * nonzeros + 4 * (rows + 1)) / 1e6,
        "bitmask_mb": (math.ceil(numel / 8) + 4 * nonzeros) / 1e6,
    }


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    try:
        return module.get_submodule(path), attr
    except AttributeError:
        raise ValueError(f"Expected `{name}` to be a parameter of {type(module).__name__} but it is not.") from None


def _check_shape(name: str, param: torch.Tensor, mask: torch.Tensor) -> None:
    if mask.shape != param.shape:
        raise ValueError(
            f"Expected the mask of `{name}` to have the parameter's shape {tuple(param.shape)} but it has "
            f"{tuple(mask.shape)}. HINT: prune channels (StructuredPruning) before making fine-grained masks, or "
            "make the masks permanent first."
        )
