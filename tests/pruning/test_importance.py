import pytest
import torch
import torch_pruning as tp
from torch import nn

from lightning_prune.pruning.importance import IMPORTANCES, needs_gradients, resolve_importance

EXPECTED = {
    "bn_scale": tp.importance.BNScaleImportance,
    "fpgm": tp.importance.FPGMImportance,
    "l1": tp.importance.GroupMagnitudeImportance,
    "l2": tp.importance.GroupMagnitudeImportance,
    "lamp": tp.importance.LAMPImportance,
    "random": tp.importance.RandomImportance,
    "taylor": tp.importance.GroupTaylorImportance,
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_name_resolves_and_scores_a_group(name):
    assert sorted(IMPORTANCES) == sorted(EXPECTED)
    importance = resolve_importance(name)
    assert type(importance) is EXPECTED[name]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Conv2d(6, 2, 1))
    net(torch.randn(2, 3, 8, 8)).square().mean().backward()  # gradients for taylor
    dg = tp.DependencyGraph().build_dependency(net, example_inputs=torch.randn(1, 3, 8, 8))
    group = dg.get_pruning_group(net[0], tp.prune_conv_out_channels, idxs=list(range(6)))
    scores = importance(group)
    assert scores.shape == (6,) and torch.isfinite(scores).all()
    assert needs_gradients(importance) == (name == "taylor")


def test_magnitude_norms():
    assert resolve_importance("l1").p == 1
    assert resolve_importance("l2").p == 2


def test_instance_passes_through():
    importance = tp.importance.GroupHessianImportance()
    assert resolve_importance(importance) is importance
    assert needs_gradients(importance)


@pytest.mark.parametrize("bad", ["l3", None, 2])
def test_unknown_importance_errors(bad):
    with pytest.raises(
        ValueError,
        match=r"Expected argument `importance` to be one of \['bn_scale', 'fpgm', 'l1'.*"
        rf"or a torch_pruning Importance but got {bad!r}\.",
    ):
        resolve_importance(bad)
