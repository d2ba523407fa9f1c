import copy
import json
import re

import pytest
import torch
import torch_pruning as tp
from _nets import ResCatNet
from torch import nn

from lightning_prune.pruning import PruningHistory, apply_records, group_records, resize_to_state_dict


def randomize_bn(model):
    for m in model.modules():  # non-trivial BN statistics so that pruning them wrongly would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.1, 1)
    return model


def prune_with_history(model, steps=3, ratio=0.5):
    pruner = tp.pruner.BasePruner(
        model,
        torch.randn(1, 3, 32, 32),
        tp.importance.MagnitudeImportance(),
        pruning_ratio=ratio,
        iterative_steps=steps,
        ignored_layers=[model.head],
    )
    history = PruningHistory()
    for _ in range(steps):
        history.prune_step(pruner.step(interactive=True), model)
    return history


@pytest.fixture
def pruned():
    torch.manual_seed(0)
    model = randomize_bn(ResCatNet())
    history = prune_with_history(model)
    return model.eval(), history


def test_round_trip_through_weights_only_checkpoint(pruned, tmp_path):
    model, history = pruned
    assert len(history) == 3
    assert model.stem[0].out_channels == 4 and model.fuse[0].in_channels == 8 and model.head.in_features == 8
    path = tmp_path / "pruned.ckpt"
    torch.save({"history": history.to_state(), "state_dict": model.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    json.dumps(ckpt["history"])  # plain data

    fresh = PruningHistory.from_state(ckpt["history"]).replay(ResCatNet())
    fresh.load_state_dict(ckpt["state_dict"], strict=True)
    fresh.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert [p.shape for p in fresh.parameters()] == [p.shape for p in model.parameters()]


def test_records_follow_the_couplings(pruned):
    _, history = pruned
    step = history.steps[0]
    out = {r["module"]: r for r in step if r["kind"] == "out"}
    # the residual add ties stem and b: one group, same channels, and their consumers lose the same inputs
    assert out["stem.0"]["idxs"] == out["b.0"]["idxs"] == out["stem.1"]["idxs"]
    ins = {r["module"]: r for r in step if r["kind"] == "in"}
    assert ins["a.0"]["idxs"] == ins["c.0"]["idxs"] == out["stem.0"]["idxs"]
    assert len(out["stem.0"]["idxs"]) == 8 - int(8 * (1 - 0.5 / 3))
    # the concat maps c's channels behind y's in fuse's inputs
    fuse_in = sorted(i for r in step if r["module"] == "fuse.0" and r["kind"] == "in" for i in r["idxs"])
    assert fuse_in == sorted(out["stem.0"]["idxs"] + [8 + i for i in out["c.0"]["idxs"]])
    assert {r["module"] for r in step if r["kind"] == "in"} >= {"head"}  # the linear head loses inputs
    assert all(r["size"] is not None for r in step)


def test_steps_can_be_applied_one_at_a_time(pruned):
    model, history = pruned
    fresh = ResCatNet()
    replayed = PruningHistory()
    for step in history.steps:  # e.g. broadcast from rank 0, step by step
        apply_records(fresh, step)
        replayed.append(step)
    assert replayed == history
    fresh.load_state_dict(model.state_dict())
    partial = history.replay(PruningHistory(history.steps[:1]).replay(ResCatNet()), start=1)
    partial.load_state_dict(model.state_dict())


def test_group_records_before_pruning_match_the_layers():
    model = ResCatNet()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 32, 32))
    group = dg.get_pruning_group(model.stem[0], tp.prune_conv_out_channels, idxs=[1, 5])
    records = group_records(group, model)
    assert {"module": "stem.0", "kind": "out", "idxs": [1, 5], "size": 8} in records
    assert {"module": "fuse.0", "kind": "in", "idxs": [1, 5], "size": 16} in records
    assert not any(r["module"] == "" for r in records)  # element-wise / concat bookkeeping is left out
    with pytest.raises(ValueError, match="is not a submodule of the given model"):
        group_records(group, nn.Sequential(model.a))


def test_replay_on_another_architecture_fails_clearly(pruned):
    _, history = pruned

    class Renamed(ResCatNet):
        def __init__(self):
            super().__init__()
            self.fuse2 = self.fuse
            del self.fuse

    with pytest.raises(ValueError, match=r"Cannot replay step 0: the model has no module `fuse.0`"):
        history.replay(Renamed())
    first = history.steps[0][0]  # the first record replayed is where a wider model fails
    assert first["kind"] == "out"
    msg = f"Cannot replay step 0: expected {first['size']} output channels of `{first['module']}` (Conv2d) but got"
    with pytest.raises(ValueError, match=re.escape(f"{msg} {2 * first['size']}.")):
        history.replay(ResCatNet(width=16))
    with pytest.raises(ValueError, match=r"Cannot replay step 1: expected \d+ output channels of `\w+\.0` \(Conv2d\)"):
        history.replay(ResCatNet(), start=1)  # not yet pruned by step 0


def test_from_state_validates():
    with pytest.raises(ValueError, match="Expected a pruning history state with a list of `steps`"):
        PruningHistory.from_state({"records": []})
    with pytest.raises(ValueError, match="Expected a pruning history state of version 1 but got 7"):
        PruningHistory.from_state({"version": 7, "steps": []})
    with pytest.raises(ValueError, match="Expected a pruning record"):
        PruningHistory.from_state({"steps": [[{"module": "a", "kind": "sideways", "idxs": [0], "size": 3}]]})


def test_unwrapped_parameter_is_recorded_and_replayed(tmp_path):
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.scale = nn.Parameter(torch.rand(1, 8, 1, 1))
            self.out = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.out(self.conv(x) * self.scale)

    torch.manual_seed(0)
    model = Scaled()
    pruner = tp.pruner.BasePruner(
        model,
        torch.randn(1, 3, 32, 32),
        tp.importance.MagnitudeImportance(),
        pruning_ratio=0.5,
        ignored_layers=[model.out],
        unwrapped_parameters=[(model.scale, 1)],
    )
    history = PruningHistory()
    step = history.prune_step(pruner.step(interactive=True), model)
    assert [r for r in step if r["kind"] == "param"] == [
        {
            "module": "scale",
            "kind": "param",
            "idxs": next(r["idxs"] for r in step if r["module"] == "conv"),
            "size": 8,
            "dim": 1,
        }
    ]
    fresh = history.replay(Scaled())
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(fresh(x), model(x))


def test_resize_to_state_dict(pruned):
    model, _ = pruned
    fresh = ResCatNet()
    resized = resize_to_state_dict(fresh, model.state_dict())
    assert set(resized) == {"stem.0", "stem.1", "a.0", "a.1", "b.0", "b.1", "c.0", "c.1", "fuse.0", "fuse.1", "head"}
    fresh.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))

    depthwise = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.LayerNorm(4))
    small = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.LayerNorm(4))
    assert resize_to_state_dict(depthwise, {"0.weight": small[0].weight, "0.bias": small[0].bias}) == ["0"]
    assert (depthwise[0].in_channels, depthwise[0].out_channels, depthwise[0].groups) == (4, 4, 4)
    with pytest.raises(ValueError, match=r"Cannot resize `1` \(LayerNorm\): only convolution, batch-norm and linear"):
        resize_to_state_dict(depthwise, {"1.weight": torch.ones(2)})


def test_copy_keeps_history_independent(pruned):
    _, history = pruned
    steps = history.steps
    steps[0][0]["idxs"].append(99)
    assert 99 not in history.steps[0][0]["idxs"]
    assert copy.deepcopy(history) == history


def test_block_records_replace_the_module_by_identity():
    torch.manual_seed(0)
    model = randomize_bn(ResCatNet()).eval()
    step0 = prune_with_history(model, steps=1).steps[0]
    step1 = [{"module": "b", "kind": "block", "idxs": [], "size": None}]  # y = x + a(x): the shapes still fit
    apply_records(model, step1)
    history = PruningHistory.from_state(json.loads(json.dumps(PruningHistory([step0, step1]).to_state())))
    assert history.steps[1] == step1
    fresh = history.replay(ResCatNet())
    assert isinstance(fresh.b, nn.Identity) and "b.0.weight" not in fresh.state_dict()
    fresh.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))
    with pytest.raises(ValueError, match=r"Cannot replay step 1: block `b` is already an `nn.Identity`"):
        history.replay(fresh, start=1)
    with pytest.raises(ValueError, match=r"Cannot replay: the root module cannot be removed as a block"):
        apply_records(ResCatNet(), [{**step1[0], "module": ""}])
    with pytest.raises(ValueError, match=r"'kind': 'out' \| 'in' \| 'param' \| 'block'"):
        apply_records(ResCatNet(), [{**step1[0], "idxs": [0]}])
