"""convert_c2f: third-party (Ultralytics-layout) chunk-based C2f blocks → exact two-conv form that prunes."""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from torch import nn

from lightning_prune.adapters.c2f import C2fTwoConv, convert_c2f, is_chunked_c2f

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ------------------------------------------------------------------ an Ultralytics-style network written here
class Conv(nn.Module):
    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool = True) -> None:
        super().__init__()
        self.cv1 = Conv(c, c, 3)
        self.cv2 = Conv(c, c, 3)
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C2f(nn.Module):
    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False, split: bool = False) -> None:
        super().__init__()
        self.c = c2 // 2
        self.split = split
        self.cv1 = Conv(c1, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).split((self.c, self.c), 1) if self.split else self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class C3(nn.Module):
    """CSP block with cv1/cv2/cv3 and a Sequential ``m``: must not be mistaken for a C2f."""

    def __init__(self, c1: int, c2: int) -> None:
        super().__init__()
        self.cv1, self.cv2, self.cv3 = Conv(c1, c2 // 2), Conv(c1, c2 // 2), Conv(c2, c2)
        self.m = nn.Sequential(Bottleneck(c2 // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat([self.m(self.cv1(x)), self.cv2(x)], 1))


def tiny_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        Conv(3, 16, 3, 2),
        C2f(16, 16, n=2, shortcut=True),
        Conv(16, 32, 3, 2),
        C2f(32, 32, n=1, split=True),
        C3(32, 32),
        nn.Conv2d(32, 7, 1),  # prediction conv: keeps its width
    )
    net[1].f, net[1].i = -1, 1  # Ultralytics' routing attributes, read by its model's forward
    with torch.no_grad():  # non-trivial BatchNorm statistics and affine parameters
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


# ------------------------------------------------------------------ tests
def test_convert_is_exact_and_keeps_attributes():
    net = tiny_net()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = net(x)
    assert convert_c2f(net) == 2
    assert isinstance(net[1], C2fTwoConv) and isinstance(net[3], C2fTwoConv)
    assert isinstance(net[4], C3)  # different layout: left alone
    assert (net[1].f, net[1].i, net[1].c) == (-1, 1, 8)
    assert net[1].cv0.conv.out_channels == net[1].cv1.conv.out_channels == net[1].cv0.bn.num_features == 8
    with torch.no_grad():
        assert torch.allclose(net(x), expected, atol=1e-6)
    assert convert_c2f(net) == 0  # idempotent: converted blocks no longer match


def test_convert_is_exact_in_train_mode():
    net, ref = tiny_net().train(), tiny_net().train()
    convert_c2f(net)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(net(x), ref(x), atol=1e-5)  # batch statistics are per channel: splitting keeps them
    for a, b in zip(ref[1].cv1.bn.running_mean.chunk(2), (net[1].cv0.bn.running_mean, net[1].cv1.bn.running_mean)):
        assert torch.allclose(a, b, atol=1e-6)


def test_custom_predicate_and_error():
    net = tiny_net()
    assert convert_c2f(net, is_c2f=lambda m: m is net[3]) == 1
    assert isinstance(net[3], C2fTwoConv) and isinstance(net[1], C2f)
    assert not is_chunked_c2f(net[4]) and is_chunked_c2f(net[1])
    with pytest.raises(ValueError, match=r"Expected the block chosen by `is_c2f` to have `cv1.conv`.*got a Bottleneck"):
        convert_c2f(net, is_c2f=lambda m: isinstance(m, Bottleneck))


def test_converted_model_prunes():
    net = tiny_net()
    convert_c2f(net)
    example = torch.randn(1, 3, 32, 32)
    graph = tp.DependencyGraph().build_dependency(net, example_inputs=example)
    # cv0 and cv1 of a block feed one concat: pruning one half must not touch the other's output channels
    group = graph.get_pruning_group(net[1].cv0.conv, tp.prune_conv_out_channels, idxs=[0, 1])
    assert net[1].cv1.conv not in {dep.target.module for dep, _ in group}
    params = sum(p.numel() for p in net.parameters())
    pruner = tp.pruner.BasePruner(
        net, example, tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.3, ignored_layers=[net[5]]
    )
    pruner.step()
    assert sum(p.numel() for p in net.parameters()) < 0.8 * params
    assert net[1].cv0.conv.out_channels < 8 or net[1].cv1.conv.out_channels < 8
    net.train()(torch.randn(2, 3, 64, 64)).sum().backward()  # still trains
    assert net.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 7, 16, 16)


@pytest.mark.parametrize("split", [False, True])
def test_unconverted_c2f_does_not_prune(split):
    """Why the converter exists (torch-pruning 1.6.1): ``chunk`` breaks the pruner, ``split`` breaks the model."""
    torch.manual_seed(0)
    net = nn.Sequential(Conv(3, 16, 3, 2), C2f(16, 16, n=1, split=split), nn.Conv2d(16, 7, 1)).eval()
    example = torch.randn(1, 3, 32, 32)
    pruner = tp.pruner.BasePruner(
        net, example, tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.3, ignored_layers=[net[2]]
    )
    if not split:  # the chunk's channel index mapping points past the pruned layer
        with pytest.raises(IndexError, match="out of bounds"):
            pruner.step()
        return
    pruner.step()  # "succeeds", but cv1 is pruned alone, its consumers are not
    assert net[1].cv1.conv.out_channels != 2 * net[1].m[0].cv1.conv.in_channels
    with pytest.raises(RuntimeError, match="split_with_sizes"):
        net(example)
