import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn

from lightning_prune.pruning.calibration import Calibration
from lightning_prune.pruning.importance import (
    IMPORTANCES,
    ActivationImportance,
    needs_calibration,
    needs_gradients,
    resolve_importance,
)

EXPECTED = {
    "activation": ActivationImportance,
    "apoz": ActivationImportance,
    "bn_scale": tp.importance.BNScaleImportance,
    "fpgm": tp.importance.FPGMImportance,
    "hessian": tp.importance.GroupHessianImportance,
    "l1": tp.importance.GroupMagnitudeImportance,
    "l2": tp.importance.GroupMagnitudeImportance,
    "lamp": tp.importance.LAMPImportance,
    "random": tp.importance.RandomImportance,
    "taylor": tp.importance.GroupTaylorImportance,
}
DATA_DEPENDENT = {"activation", "apoz", "hessian", "taylor"}

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def net_and_batches() -> tuple[nn.Sequential, list[torch.Tensor]]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 2, 1))
    return net, [torch.randn(2, 3, 8, 8) for _ in range(3)]


def loss(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net(x).square().mean()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_name_resolves_and_scores_a_group(name):
    assert sorted(IMPORTANCES) == sorted(EXPECTED)
    importance = resolve_importance(name)
    assert type(importance) is EXPECTED[name]
    assert needs_gradients(importance) == (name in {"hessian", "taylor"})
    assert needs_calibration(importance) == (name in DATA_DEPENDENT)
    net, batches = net_and_batches()
    with Calibration(importance, net) as calibration:
        for x in batches:
            calibration.step(loss(net, x))
    dg = tp.DependencyGraph().build_dependency(net, example_inputs=torch.randn(1, 3, 8, 8))
    group = dg.get_pruning_group(net[0], tp.prune_conv_out_channels, idxs=list(range(6)))
    scores = importance(group)
    assert scores.shape == (6,) and torch.isfinite(scores).all()


def test_magnitude_norms():
    assert resolve_importance("l1").p == 1
    assert resolve_importance("l2").p == 2


def test_instance_passes_through():
    importance = tp.importance.GroupHessianImportance()
    assert resolve_importance(importance) is importance
    assert needs_gradients(importance) and needs_calibration(importance)


@pytest.mark.parametrize("bad", ["l3", None, 2])
def test_unknown_importance_errors(bad):
    with pytest.raises(
        ValueError,
        match=r"Expected argument `importance` to be one of \['activation', 'apoz', 'bn_scale'.*"
        rf"or a torch_pruning Importance but got {bad!r}\.",
    ):
        resolve_importance(bad)


def test_activation_statistic_is_validated():
    with pytest.raises(
        ValueError, match=r"Expected argument `statistic` to be one of \['mean', 'apoz'\] but got 'max'"
    ):
        ActivationImportance("max")


# ---------------------------------------------------------------------------------------------- against references
@pytest.mark.parametrize("statistic", ["mean", "apoz"])
def test_activation_scores_equal_a_direct_computation(statistic):
    net, batches = net_and_batches()
    importance = ActivationImportance(statistic, normalizer=None)
    with Calibration(importance, net) as calibration:
        for x in batches:
            calibration.step(loss(net, x))
    net.train()
    reads = [net[:3](x) for x in batches]  # what the last conv reads, in the same (train) mode
    per_batch = [r.abs().mean((0, 2, 3)) if statistic == "mean" else (r > 0).float().mean((0, 2, 3)) for r in reads]
    expected = torch.stack(per_batch).mean(0)
    torch.testing.assert_close(importance.scores["3"], expected)

    dg = tp.DependencyGraph().build_dependency(net, example_inputs=torch.randn(1, 3, 8, 8))
    group = dg.get_pruning_group(net[0], tp.prune_conv_out_channels, idxs=list(range(6)))
    torch.testing.assert_close(importance(group), expected)  # the only reader of the group is conv "3"

    twin = copy.deepcopy(net)  # a dry run's copy: statistics found by layer name
    importance.bind(twin)
    dg = tp.DependencyGraph().build_dependency(twin, example_inputs=torch.randn(1, 3, 8, 8))
    group = dg.get_pruning_group(twin[0], tp.prune_conv_out_channels, idxs=list(range(6)))
    torch.testing.assert_close(importance(group), expected)


def test_activation_without_statistics_scores_nothing():
    net, _ = net_and_batches()
    dg = tp.DependencyGraph().build_dependency(net, example_inputs=torch.randn(1, 3, 8, 8))
    group = dg.get_pruning_group(net[0], tp.prune_conv_out_channels, idxs=list(range(6)))
    assert ActivationImportance()(group) is None


def test_hessian_calibration_is_the_mean_squared_batch_gradient():
    net, batches = net_and_batches()
    reference = copy.deepcopy(net)
    squares = []
    for x in batches:
        reference.zero_grad()
        loss(reference, x).backward()
        squares.append(reference[0].weight.grad.square())
    with Calibration(tp.importance.GroupHessianImportance(), net) as calibration:
        for x in batches:
            calibration.step(loss(net, x))
    torch.testing.assert_close(net[0].weight.grad, torch.stack(squares).mean(0))
    assert calibration.batches == 3


def test_taylor_calibration_sums_the_batch_gradients_and_restores_buffers():
    net, batches = net_and_batches()
    reference = copy.deepcopy(net)
    for x in batches:
        loss(reference, x).backward()
    stats = {k: v.clone() for k, v in net.state_dict().items()}
    with Calibration(tp.importance.GroupTaylorImportance(), net) as calibration:
        for x in batches:
            calibration.step(loss(net, x))
    torch.testing.assert_close(net[0].weight.grad, reference[0].weight.grad)
    for key, value in net.state_dict().items():  # running statistics and the batch counter are put back
        assert torch.equal(value, stats[key]), key
    assert [t.shape for t in calibration.tensors()] == [p.shape for _, p in sorted(net.named_parameters())]


def test_magnitude_criteria_need_no_backward():
    net, batches = net_and_batches()
    with Calibration(tp.importance.GroupMagnitudeImportance(), net) as calibration:
        calibration.step(loss(net, batches[0]))
    assert all(p.grad is None for p in net.parameters()) and calibration.tensors() == []


def test_nan_scores_count_as_zero_in_the_global_ranking():
    # torch-pruning's mean normalizer turns a group of all-zero scores (Taylor, no gradient) into NaN: without the
    # guard the global threshold is NaN and nothing at all is pruned
    import torch_pruning as tp
    from torch import nn

    from lightning_prune.pruning.channels import prune_channels

    class NanForFirst(tp.importance.GroupMagnitudeImportance):
        def __call__(self, group):
            imp = super().__call__(group)
            return torch.full_like(imp, float("nan")) if group[0][0].target.module is net[0] else imp

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 2, 1))
    prune_channels(net, torch.zeros(1, 3, 16, 16), NanForFirst(), 0.5, ignored_layers=[net[4]])
    assert net[0].out_channels + net[2].out_channels == 8
    assert net[0].out_channels < 8  # the NaN group's channels rank lowest (0)
