"""Network-slimming regularization core: which BatchNorms, the L1 / group-lasso subgradients, the penalty schedule."""

from __future__ import annotations

import pytest
import torch
from _nets import ResCatNet

from lightning_prune.pruning.sparsity import add_l1_subgradient, bn_groups, gamma_stats, penalty_at

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
EXAMPLE = torch.zeros(1, 3, 8, 8)


def names(groups):
    return sorted(sorted(name for name, *_ in group) for group in groups)


def test_groups_follow_the_couplings_and_skip_ignored_layers():
    net = ResCatNet().train()
    # stem and b are added (one group); a, c, fuse are alone; the linear head has no BatchNorm
    assert names(bn_groups(net, EXAMPLE)) == [["a.1"], ["b.1", "stem.1"], ["c.1"], ["fuse.1"]]
    assert names(bn_groups(net, EXAMPLE, ignored_layers=[net.fuse])) == [["a.1"], ["b.1", "stem.1"], ["c.1"]]
    assert net.training and all(m.training for m in net.modules())  # tracing gave the modes back


def test_l1_subgradient_is_penalty_times_sign():
    torch.manual_seed(0)
    net = ResCatNet()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(-1, 1)
    groups = bn_groups(net, EXAMPLE, ignored_layers=[net.c])
    net.a[1].weight.grad = torch.ones(8)
    add_l1_subgradient(net, groups, penalty=0.01)
    torch.testing.assert_close(net.a[1].weight.grad, 1 + 0.01 * torch.sign(net.a[1].weight.detach()))
    torch.testing.assert_close(net.stem[1].weight.grad, 0.01 * torch.sign(net.stem[1].weight.detach()))
    assert net.c[1].weight.grad is None  # ignored: not regularized


def test_group_lasso_uses_the_norm_over_coupled_batchnorms():
    torch.manual_seed(0)
    net = ResCatNet()
    stem, b = net.stem[1].weight, net.b[1].weight
    stem.data.uniform_(-1, 1)
    b.data.uniform_(-1, 1)
    stem.data[3] = b.data[3] = 0.0  # a channel dead in the whole chain: subgradient 0
    groups = bn_groups(net, EXAMPLE)
    add_l1_subgradient(net, groups, penalty=0.1, group_lasso=True)
    norm = torch.sqrt(stem.detach() ** 2 + b.detach() ** 2)
    expected_stem = torch.where(norm > 0, 0.1 * stem.detach() / norm, 0.0)
    torch.testing.assert_close(stem.grad, expected_stem)
    torch.testing.assert_close(b.grad, torch.where(norm > 0, 0.1 * b.detach() / norm, 0.0))
    assert stem.grad[3] == 0 and b.grad[3] == 0
    alone = net.a[1].weight  # a group of one: group lasso of one value is L1
    torch.testing.assert_close(alone.grad, 0.1 * torch.sign(alone.detach()))


def test_gamma_stats():
    net = ResCatNet()
    net.a[1].weight.data[:4] = 1e-4
    net.a[1].weight.data[4:6] = 5e-3
    gammas, shares = gamma_stats(net, bn_groups(net, EXAMPLE))
    assert gammas.numel() == 8 * 4 + 16
    assert shares == {"gamma_below_1e-2": pytest.approx(6 / 48), "gamma_below_1e-3": pytest.approx(4 / 48)}


@pytest.mark.parametrize(
    ("schedule", "epoch", "expected"),
    [
        ("constant", 0, 1.0),
        ("constant", 9, 1.0),
        ("constant", 10, 0.0),  # stop_epoch
        ("constant", 1, 0.0),  # before start_epoch (2)
        ("warmup", 2, 0.0),
        ("warmup", 3, 0.5),
        ("warmup", 6, 1.0),
        ("linear", 2, 1.0),
        ("linear", 6, 0.5),
        ("cosine", 6, 0.5),
        ("cosine", 4, 0.5 * (1 + 2**-0.5)),
    ],
)
def test_penalty_schedule(schedule, epoch, expected):
    start = 0 if (schedule == "constant" and epoch != 1) else 2
    assert penalty_at(1.0, schedule, epoch, 0.0, start, 10, warmup_epochs=2) == pytest.approx(expected)


def test_decay_needs_a_stop_epoch():
    with pytest.raises(ValueError, match=r"Expected argument `stop_epoch` to be set for schedule 'linear'"):
        penalty_at(1.0, "linear", 3)
