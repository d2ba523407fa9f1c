"""Fine-grained masks with plain PyTorch: exact magnitude sparsity, zeros kept by optimizers, loading, storage sizes."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from lightning_prune.pruning.checkpoint import PrunableMixin
from lightning_prune.pruning.masks import (
    add_mask_buffers,
    apply_masks,
    magnitude_masks,
    make_permanent,
    mask_gradients,
    mask_optimizer_state,
    masked_parameters,
    prunable_parameters,
    reapply_masks,
    storage_report,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    )


def reference_keep(tensors: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """The ``round(sparsity · n)`` smallest |w| of all tensors together, by a full stable sort."""
    flat = torch.cat([t.detach().abs().flatten() for t in tensors.values()])
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[torch.sort(flat, stable=True).indices[: round(sparsity * flat.numel())]] = False
    pieces = keep.split([t.numel() for t in tensors.values()])
    return {name: piece.view(t.shape) for (name, t), piece in zip(tensors.items(), pieces, strict=True)}


@pytest.mark.parametrize("sparsity", [0.3, 0.77, 0.95])
def test_global_and_per_layer_masks_match_a_direct_computation(sparsity):
    params = prunable_parameters(make_net())
    assert list(params) == ["0.weight", "3.weight", "6.weight"]
    n = sum(p.numel() for p in params.values())

    masks = magnitude_masks(params, sparsity, global_pruning=True)
    assert sum(int((~m).sum()) for m in masks.values()) == round(sparsity * n)
    expected = reference_keep(params, sparsity)
    assert all(torch.equal(masks[k], expected[k]) for k in params)

    masks = magnitude_masks(params, sparsity, global_pruning=False)
    for name, param in params.items():
        assert int((~masks[name]).sum()) == round(sparsity * param.numel())
        assert torch.equal(masks[name], reference_keep({name: param}, sparsity)[name])


def test_ties_are_broken_by_position_and_pruned_weights_stay_pruned():
    w = torch.tensor([1.0, 2.0, 1.0, 1.0, 3.0, 1.0])
    assert magnitude_masks({"w": w}, 0.5)["w"].tolist() == [False, True, False, False, True, True]
    assert magnitude_masks({"a": w[:3], "b": w[3:]}, 0.5)["b"].tolist() == [False, True, True]  # global order

    old = torch.tensor([True, True, True, True, False, True])  # the largest weight already pruned
    keep = magnitude_masks({"w": w}, 0.5, masks={"w": old})["w"]
    assert keep.tolist() == [False, True, False, True, False, True]  # it counts first: two 1s more
    assert not (keep & ~old).any()
    more_pruned = torch.tensor([False, False, False, False, True, True])
    assert torch.equal(magnitude_masks({"w": w}, 0.5, masks={"w": more_pruned})["w"], more_pruned)  # none revived


def test_apply_combines_masks_and_permanent_removal_leaves_plain_parameters():
    net = make_net()
    plain_keys = list(net.state_dict())
    params = prunable_parameters(net, skip=["6"])  # the linear head left alone
    apply_masks(net, magnitude_masks(params, 0.5))
    apply_masks(net, magnitude_masks(params, 0.75, masks={n: m for n, _, m in masked_parameters(net)}))
    assert [name for name, _, _ in masked_parameters(net)] == ["0.weight", "3.weight"]
    assert net[0].weight_mask.dtype == torch.bool and "3.weight_mask" in net.state_dict()
    zeros = {n: (p == 0).clone() for n, p in params.items()}
    assert sum(int(z.sum()) for z in zeros.values()) == round(0.75 * sum(p.numel() for p in params.values()))
    assert not any(torch.signbit(p[p == 0]).any() for p in params.values())  # +0.0, not -0.0

    assert make_permanent(net) == 2
    assert list(net.state_dict()) == plain_keys and not masked_parameters(net)
    for name, param in params.items():
        assert isinstance(net.get_parameter(name), nn.Parameter) and net.get_parameter(name) is param
        assert torch.equal(param == 0, zeros[name])
    assert make_permanent(net) == 0


OPTIMIZERS = {
    "sgd_nesterov": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.05),
    "adam_amsgrad": lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
}


def train(net: nn.Module, optimizer: torch.optim.Optimizer, steps: int, masked: bool) -> list[int]:
    """Steps on random data; the nonzeros at pruned entries right after each ``optimizer.step()``."""
    revived = []
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        if masked:
            mask_gradients(net)
        optimizer.step()
        revived.append(sum(int(torch.count_nonzero(p[~m])) for _, p, m in masked_parameters(net)))
    return revived


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizers_keep_pruned_weights_at_zero(name):
    net = make_net()
    optimizer = OPTIMIZERS[name](net.parameters())
    train(net, optimizer, 3, masked=False)  # momentum / Adam moments everywhere
    apply_masks(net, magnitude_masks(prunable_parameters(net), 0.6))
    mask_optimizer_state(optimizer, net)
    assert train(net, optimizer, 4, masked=True) == [0, 0, 0, 0]  # without `reapply_masks`
    for _, param, mask in masked_parameters(net):
        assert param.grad is not None and not param.grad[~mask].any()
        assert all(not v[~mask].any() for v in optimizer.state[param].values() if v.shape == param.shape)

    stale = make_net()  # the same without zeroing the state: the optimizer revives pruned weights
    optimizer = OPTIMIZERS[name](stale.parameters())
    train(stale, optimizer, 3, masked=False)
    apply_masks(stale, magnitude_masks(prunable_parameters(stale), 0.6))
    assert train(stale, optimizer, 1, masked=True)[0] > 0
    reapply_masks(stale)  # what the callback does after every batch, for any optimizer
    assert all(not p[~m].any() for _, p, m in masked_parameters(stale))


class Prunable(PrunableMixin, nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_net(seed=3)


def test_a_state_dict_with_masks_loads_strictly_into_a_fresh_module():
    pruned = Prunable()
    apply_masks(pruned, magnitude_masks(prunable_parameters(pruned), 0.7))
    buffer = io.BytesIO()
    torch.save(pruned.state_dict(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)

    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "0.weight_mask"'):
        make_net().load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
    fresh = Prunable()  # the mixin creates the buffers first
    fresh.load_state_dict(state)
    assert [(n, m.tolist()) for n, _, m in masked_parameters(fresh)] == [
        (n, m.tolist()) for n, _, m in masked_parameters(pruned)
    ]
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), state.values(), strict=True))

    plain = make_net()  # any module, by hand, with a prefix as a load-state-dict pre-hook sees it
    assert add_mask_buffers(plain, state, prefix="net.") == [
        "net.0.weight_mask",
        "net.3.weight_mask",
        "net.6.weight_mask",
    ]
    plain.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
    assert add_mask_buffers(plain, state, prefix="net.") == []  # already there
    float_mask = {"0.weight_mask": torch.ones(8, 3, 3, 3)}  # torch.nn.utils.prune's: not ours
    assert add_mask_buffers(make_net(), float_mask) == []


def test_storage_report_matches_a_hand_computation_and_torch_csr():
    conv = nn.Conv2d(4, 6, 3)  # weight (6, 4, 3, 3): 216 entries, bias 6
    with torch.no_grad():
        conv.weight.copy_(torch.arange(1.0, 217.0).view(6, 4, 3, 3))
        conv.weight[:, :3] = 0.0  # 3/4 of every row: 54 nonzeros
        conv.bias[:2] = 0.0
    report = storage_report(conv)
    row = report["layers"]["weight"]
    assert (row["numel"], row["nonzeros"], row["sparsity"]) == (216, 54, 0.75)
    assert row["dense_mb"] == pytest.approx(4 * 216 / 1e6)
    assert row["csr_mb"] == pytest.approx((4 * 54 + 4 * 54 + 4 * 7) / 1e6)  # values, column indices, row pointers
    assert row["bitmask_mb"] == pytest.approx((27 + 4 * 54) / 1e6)
    csr = conv.weight.detach().flatten(1).to_sparse_csr()  # torch's own CSR of the same matrix (int64 indices)
    elements = csr.values().numel() + csr.col_indices().numel() + csr.crow_indices().numel()
    assert row["csr_mb"] == pytest.approx(4 * elements / 1e6)
    assert report["params"] == 222 and report["sparsity"] == 0.75
    assert report["model_sparsity"] == pytest.approx((162 + 2) / 222)
    assert report["dense_mb"] == pytest.approx(4 * 222 / 1e6)  # the bias is counted dense
    assert report["csr_mb"] == pytest.approx(row["csr_mb"] + 24 / 1e6)
    assert report["best_mb"] == pytest.approx(row["bitmask_mb"] + 24 / 1e6)

    with torch.no_grad():
        conv.weight[:, 3, :2] = 0.0  # 3 nonzeros left per row
    row = storage_report(conv, ["weight"])["layers"]["weight"]
    assert row["nonzeros"] == 18 and row["bitmask_mb"] == pytest.approx(99 / 1e6)
    assert row["csr_mb"] == pytest.approx(172 / 1e6)
    linear = nn.Linear(1000, 100, bias=False)  # CSR beats the bitmask only under ~1/32 density
    with torch.no_grad():
        linear.weight[:, 1:] = 0.0
    row = storage_report(linear)["layers"]["weight"]
    assert row["csr_mb"] == pytest.approx((800 + 404) / 1e6) and row["bitmask_mb"] == pytest.approx(12900 / 1e6)
    dense = storage_report(nn.Linear(64, 32))  # no zeros: CSR doubles the size, the bitmask costs 1/32
    assert dense["csr_mb"] > 1.99 * dense["layers"]["weight"]["dense_mb"]
    assert dense["layers"]["weight"]["bitmask_mb"] == pytest.approx(4 * 2048 * (1 + 1 / 32) / 1e6)
    assert math.isclose(dense["best_mb"], dense["dense_mb"])


def test_bad_input():
    w = torch.ones(4)
    with pytest.raises(ValueError, match=r"Expected argument `sparsity` to be a float in \[0, 1\) but got 1.0."):
        magnitude_masks({"w": w}, 1.0)
    with pytest.raises(ValueError, match=r"Expected the mask of `w` to have the parameter's shape \(4,\) but it has"):
        magnitude_masks({"w": w}, 0.5, masks={"w": torch.ones(2, dtype=torch.bool)})
    net = make_net()
    with pytest.raises(ValueError, match=r"Expected `0.running_mean` to be a parameter of Sequential but it is not."):
        apply_masks(net, {"0.running_mean": torch.ones(8, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"Expected `9.weight` to be a parameter of Sequential but it is not."):
        apply_masks(net, {"9.weight": torch.ones(8, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"Expected argument `names` to hold parameters of Sequential but got 'x'."):
        storage_report(net, ["x"])
    apply_masks(net, magnitude_masks(prunable_parameters(net), 0.5))
    net[3].weight = nn.Parameter(net[3].weight[:4].detach())  # pruned structurally after masking
    with pytest.raises(ValueError, match=r"Expected the mask of `3.weight` .* HINT: prune channels"):
        reapply_masks(net)
