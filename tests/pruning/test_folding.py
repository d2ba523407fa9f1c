"""Bias folding: removing channels whose BatchNorm γ is 0 leaves the outputs unchanged once their constant is folded."""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from _nets import ResCatNet
from torch import nn

from lightning_prune.pruning import InputMeans, fold_removed_inputs, prune_channels

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# BatchNorm → channels set to γ = 0 (stem and b are coupled by the residual add: zeroed together)
ZEROED = {"stem.1": [2], "b.1": [2], "a.1": [0, 3], "c.1": [1, 5], "fuse.1": [4, 7, 9]}
PRUNED_GROUP_CHANNELS = 1 + 2 + 2 + 3  # of 8 + 8 + 8 + 16 (stem/b, a, c, fuse)


def sparse_net(bias: bool, kernel: int) -> nn.Module:
    torch.manual_seed(0)
    net = ResCatNet(bias=bias, kernel=kernel)
    with torch.no_grad():
        for name, module in net.named_modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 1.0)  # relu(β) > 0 for about half the zeroed channels
                module.running_mean.normal_(0.0, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight[ZEROED.get(name, [])] = 0.0
    return net.eval()


def prune_zeroed(net: nn.Module, x: torch.Tensor, fold: bool) -> list[dict]:
    measured = None
    if fold:
        with InputMeans(net) as measured, torch.no_grad():
            net(x)
    return prune_channels(
        net,
        x[:1],
        tp.importance.BNScaleImportance(normalizer=None),
        PRUNED_GROUP_CHANNELS / 40,
        ignored_layers=[net.head],
        fold=measured,
    )


def widths(net: nn.Module) -> dict[str, int]:
    return {n: m.num_features for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)}


@pytest.mark.parametrize("bias", [False, True], ids=["into-next-batchnorm", "into-conv-bias"])
def test_pruning_zero_gamma_channels_with_folding_keeps_the_outputs(bias):
    net = sparse_net(bias=bias, kernel=1)
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        expected = net(x)
    prune_zeroed(net, x, fold=True)
    full = widths(sparse_net(bias=bias, kernel=1))
    assert {n: full[n] - w for n, w in widths(net).items()} == {n: len(i) for n, i in ZEROED.items()}
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected, atol=1e-5, rtol=0)


def test_without_folding_the_outputs_change():
    net = sparse_net(bias=False, kernel=1)
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        expected = net(x)
    prune_zeroed(net, x, fold=False)
    with torch.no_grad():
        assert (net(x) - expected).abs().max() > 1e-2


def test_a_padded_3x3_reader_is_exact_away_from_the_border():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8), nn.SiLU(), nn.Conv2d(8, 4, 3, padding=1)
    ).eval()
    with torch.no_grad():
        net[1].bias.normal_()
        net[1].weight[[0, 5, 6]] = 0.0
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad(), InputMeans(net) as measured:
        expected = net(x)
    records = prune_channels(
        net, x, tp.importance.BNScaleImportance(normalizer=None), 3 / 8, ignored_layers=[net[3]], fold=measured
    )
    assert net[3].in_channels == 5 and {"module": "3", "kind": "in", "idxs": [0, 5, 6], "size": 8} in records
    with torch.no_grad():
        out = net(x)
    torch.testing.assert_close(out[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], atol=1e-5, rtol=0)
    assert (out - expected).abs().max() > 1e-3  # the border reads fewer copies of the constant (documented)


def test_input_means_and_the_batchnorm_after_each_bias_free_conv():
    net = ResCatNet(kernel=1).eval()
    x = torch.randn(3, 3, 4, 4)
    with InputMeans(net) as measured, torch.no_grad():
        net(x)
    torch.testing.assert_close(measured.means["stem.0"], x.double().mean(dim=(0, 2, 3)))
    assert set(measured.means) == {"stem.0", "a.0", "b.0", "c.0", "fuse.0", "head"}
    assert measured.bn_after == {f"{n}.0": f"{n}.1" for n in ("stem", "a", "b", "c", "fuse")}
    assert not net.stem[0]._forward_pre_hooks and not net.stem[1]._forward_pre_hooks  # hooks removed


def test_a_layer_with_neither_bias_nor_batchnorm_after_is_left_alone():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1, bias=False))
    with InputMeans(net) as measured, torch.no_grad():
        net(torch.randn(1, 3, 2, 2))
    before = net[2].weight.clone()
    records = [{"module": "2", "kind": "in", "idxs": [1], "size": 4}]
    assert fold_removed_inputs(net, records, measured) == []
    assert torch.equal(net[2].weight, before)


def test_only_constant_channels_are_folded():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.SiLU(), nn.Conv2d(4, 2, 1)).eval()
    with torch.no_grad():
        net[1].bias.normal_()
        net[1].weight[0] = 0.0  # channel 0 constant; channel 1 varies
    with InputMeans(net) as measured, torch.no_grad():
        net(torch.randn(4, 3, 6, 6))
    bias = net[3].bias.detach().clone()
    expected = bias + net[3].weight.detach()[:, 0, 0, 0] * measured.means["3"][0].float()
    assert fold_removed_inputs(net, [{"module": "3", "kind": "in", "idxs": [0, 1], "size": 4}], measured) == ["3"]
    torch.testing.assert_close(net[3].bias.detach(), expected)  # channel 1's mean was not folded
    assert measured.means["3"].shape == measured.squares["3"].shape == (2,)  # the remaining inputs
    assert fold_removed_inputs(net, [{"module": "3", "kind": "in", "idxs": [1], "size": 2}], measured) == []
