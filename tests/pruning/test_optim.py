import copy

import _nets
import pytest
import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.pruner.function import BasePruningFunc

from lightning_prune.pruning import PruningHistory, track_pruning


class ResCatNet(_nets.ResCatNet):
    def __init__(self, width: int = 8, num_classes: int = 5) -> None:
        super().__init__(width, num_classes, bias=True)  # conv biases: their optimizer state is pruned too


def train_step(model, optimizer, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 5, (4,), generator=g)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


OPTIMIZERS = {
    "sgd_nesterov": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05),
    "adam_amsgrad": lambda params: torch.optim.Adam(params, lr=1e-2, amsgrad=True),
}


def optimizer_params(optimizer):
    return [p for group in optimizer.param_groups for p in group["params"]]


def test_state_is_index_selected_by_hand():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Conv2d(6, 2, 1))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for seed in range(2):
        optimizer.zero_grad()
        net(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))).square().mean().backward()
        optimizer.step()
    before = {name: optimizer.state[p]["momentum_buffer"].clone() for name, p in net.named_parameters()}
    with track_pruning(net) as tracker:
        tp.prune_conv_out_channels(net[0], [1, 4])
        tp.prune_batchnorm_out_channels(net[1], [1, 4])
        tp.prune_conv_in_channels(net[2], [1, 4])
    assert len(tracker) == 5
    assert tracker.patch(optimizer) == 5
    keep = [0, 2, 3, 5]
    after = {name: optimizer.state[p]["momentum_buffer"] for name, p in net.named_parameters()}
    assert torch.equal(after["0.weight"], before["0.weight"][keep])
    assert torch.equal(after["0.bias"], before["0.bias"][keep])
    assert torch.equal(after["1.weight"], before["1.weight"][keep])
    assert torch.equal(after["1.bias"], before["1.bias"][keep])
    assert torch.equal(after["2.weight"], before["2.weight"][:, keep])
    assert torch.equal(after["2.bias"], before["2.bias"])  # untouched, still the same parameter
    assert optimizer_params(optimizer) == list(net.parameters())


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_patched_optimizer_continues_bit_exactly(name):
    torch.manual_seed(0)
    model = ResCatNet()
    optimizer = OPTIMIZERS[name](model.parameters())
    for seed in range(3):
        train_step(model, optimizer, seed)
    pre_model = copy.deepcopy(model)
    pre_state = {n: copy.deepcopy(optimizer.state[p]) for n, p in model.named_parameters()}

    pruner = tp.pruner.BasePruner(
        model,
        torch.randn(1, 3, 32, 32),
        tp.importance.MagnitudeImportance(),
        pruning_ratio=0.5,
        ignored_layers=[model.head],
    )
    history = PruningHistory()
    with track_pruning(model) as tracker:
        history.prune_step(pruner.step(interactive=True), model)
    tracker.patch(optimizer)
    model.train()  # building the dependency graph left the model in eval mode

    # every live parameter is optimized, no dead one remains, state only for live ones
    live = {id(p) for p in model.parameters()}
    assert [id(p) for p in optimizer_params(optimizer)] == [id(p) for p in model.parameters()]
    assert {id(p) for p in optimizer.state} <= live and len(optimizer.state) == len(live)

    # reference: prune copies of the model and of each state tensor (as if it were the weights) by replay
    reference = history.replay(copy.deepcopy(pre_model)).train()
    ref_optimizer = OPTIMIZERS[name](reference.parameters())
    state_keys = [k for k, v in next(iter(pre_state.values())).items() if isinstance(v, torch.Tensor) and v.ndim > 0]
    assert state_keys  # momentum_buffer, exp_avg, exp_avg_sq, max_exp_avg_sq
    carriers = {}
    for key in state_keys:
        carrier = copy.deepcopy(pre_model)
        with torch.no_grad():
            for n, p in carrier.named_parameters():
                p.copy_(pre_state[n][key])
        carriers[key] = dict(history.replay(carrier).named_parameters())
    for n, p in reference.named_parameters():
        ref_optimizer.state[p] = {
            k: carriers[k][n].detach().clone() if k in carriers else v for k, v in pre_state[n].items()
        }

    for n, p in model.named_parameters():  # the patched state is the reference state before the step
        for k in state_keys:
            assert torch.equal(optimizer.state[p][k], ref_optimizer.state[reference.get_parameter(n)][k]), (n, k)

    before_step = [p.detach().clone() for p in model.parameters()]
    train_step(model, optimizer, seed=10)
    train_step(reference, ref_optimizer, seed=10)
    for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(p, q), n
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before_step))  # the step moved every weight


def test_without_patch_the_optimizer_holds_dead_parameters():
    model = ResCatNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tp.pruner.BasePruner(
        model, torch.randn(1, 3, 32, 32), tp.importance.MagnitudeImportance(), ignored_layers=[model.head]
    ).step()
    live = {id(p) for p in model.parameters()}
    assert any(id(p) not in live for p in optimizer_params(optimizer))


def test_frozen_parameters_stay_frozen():
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.Conv2d(6, 2, 1))
    net[0].weight.requires_grad_(False)
    tp.prune_conv_out_channels(net[0], [0])
    assert net[0].weight.requires_grad  # torch-pruning 1.6.1 unfreezes what it prunes
    net[0].weight.requires_grad_(False)
    with track_pruning(net):
        tp.prune_conv_out_channels(net[0], [0])
    assert not net[0].weight.requires_grad and net[0].bias.requires_grad


def test_wrapper_is_removed_after_the_block():
    original = BasePruningFunc._prune_parameter_and_grad
    with pytest.raises(KeyError), track_pruning():
        assert BasePruningFunc._prune_parameter_and_grad is not original
        raise KeyError
    assert BasePruningFunc._prune_parameter_and_grad is original


def test_replacement_outside_torch_pruning_is_refused():
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.Conv2d(6, 2, 1))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    with track_pruning(net) as tracker:
        net[1].weight = nn.Parameter(net[1].weight[:, :3].detach())
    with pytest.raises(RuntimeError, match=r"Parameter `1.weight` was replaced during pruning outside torch-pruning"):
        tracker.patch(optimizer)


def test_state_not_shaped_like_its_parameter_is_refused():
    net = nn.Sequential(nn.Conv2d(3, 6, 3))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    optimizer.state[net[0].weight]["factored_row"] = torch.zeros(6)
    with track_pruning(net) as tracker:
        tp.prune_conv_out_channels(net[0], [0])
    with pytest.raises(ValueError, match=r"Expected optimizer state `factored_row` to be shaped like its parameter"):
        tracker.patch(optimizer)


def test_parameters_that_left_the_model_leave_the_optimizer():
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(6, 2, 1))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(1, 3, 8, 8)).square().mean().backward()
    optimizer.step()
    gone = list(net[1].parameters())
    with track_pruning(net) as tracker:
        tp.prune_conv_out_channels(net[1], [0])  # pruned, then removed: its replacement left the model too
        net[1] = nn.Identity()  # a removed residual block
        tp.prune_conv_in_channels(net[2], [0])
        tp.prune_conv_out_channels(net[0], [0])
    assert tracker.patch(optimizer) == 3  # 0.weight, 0.bias, 2.weight; 1.weight and 1.bias are dropped
    assert [id(p) for p in optimizer_params(optimizer)] == [id(p) for p in net.parameters()]
    assert not any(p in optimizer.state for p in gone)
    assert all(optimizer.state[p]["momentum_buffer"].shape == p.shape for p in net.parameters())

    net(torch.randn(1, 3, 8, 8)).square().mean().backward()
    optimizer.step()


def test_a_renamed_parameter_is_neither_dead_nor_dropped():
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.Conv2d(6, 2, 1))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    with track_pruning(net) as tracker:
        net.add_module("renamed", net[1])
        del net[1]
    assert tracker.patch(optimizer) == 0
    assert [id(p) for p in optimizer_params(optimizer)] == [id(p) for p in net.parameters()]
