"""fuse_batchnorm: conv-fed BatchNorms folded, outputs unchanged, the original untouched, other BNs left alone."""

from __future__ import annotations

import doctest

import pytest
import torch
from torch import nn

import lightning_prune.report.fuse as fuse_module
from lightning_prune.models.yolov3 import YOLOv3
from lightning_prune.models.yolov8 import YOLOv8
from lightning_prune.report.fuse import fuse_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, or the fusion would be close to the identity anyway."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.2)
    return model


def count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize(
    "make", [lambda: YOLOv8("n", num_classes=2, img_size=64), lambda: YOLOv3("tiny", num_classes=2, img_size=64)]
)
def test_detectors_fuse_every_bn_with_equal_outputs(make):
    torch.manual_seed(0)
    model = randomize_bn(make()).train()
    x = torch.randn(2, 3, 64, 64)
    fused = fuse_batchnorm(model, x)

    assert count(model, nn.BatchNorm2d) > 0
    assert count(fused, nn.BatchNorm2d) == 0  # every BN of these detectors follows a conv
    assert not fused.training
    model.eval()
    with torch.no_grad():
        for a, b in zip(model(x), fused(x), strict=True):
            torch.testing.assert_close(b, a, atol=1e-4 * max(1.0, a.abs().max().item()), rtol=0)


def test_original_is_untouched():
    model = randomize_bn(YOLOv8("n", num_classes=2, img_size=64)).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [type(m) for m in model.modules()]
    fuse_batchnorm(model, torch.randn(1, 3, 64, 64))
    assert model.training and all(m.training for m in model.modules())
    assert [type(m) for m in model.modules()] == modules
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_bn_not_fed_by_a_conv_is_left_alone():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.pre = nn.BatchNorm2d(3)  # fed by the input
            self.post = nn.BatchNorm2d(4)  # fed by a ReLU
            self.shared = nn.Conv2d(4, 4, 1)  # its output feeds a BN and is also returned
            self.shared_bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = self.post(torch.relu(self.bn(self.conv(self.pre(x)))))
            z = self.shared(y)
            return self.shared_bn(z), z

    net = randomize_bn(Net())
    with pytest.raises(ValueError, match="'shared_bn' into 'shared'"):
        fuse_batchnorm(net, torch.randn(1, 3, 8, 8))
    net.shared_bn = nn.Identity()
    fused = fuse_batchnorm(net, torch.randn(1, 3, 8, 8))
    assert isinstance(fused.bn, nn.Identity)
    assert isinstance(fused.pre, nn.BatchNorm2d) and isinstance(fused.post, nn.BatchNorm2d)


def test_conv_changed_in_place_before_bn_is_not_fused():
    net = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.BatchNorm2d(4)))
    fused = fuse_batchnorm(net, torch.randn(1, 3, 8, 8))
    assert isinstance(fused[2], nn.BatchNorm2d)


def test_doctests():
    assert doctest.testmod(fuse_module, verbose=False).failed == 0
