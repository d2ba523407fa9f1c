import copy
import json

import pytest
import torch
import torch_pruning as tp
from torch import nn

from lightning_prune.models import YOLOv3, YOLOv8
from lightning_prune.models.yolov3 import DarknetBlock
from lightning_prune.models.yolov8 import Bottleneck
from lightning_prune.pruning import (
    PruningHistory,
    apply_records,
    block_scores,
    check_traceable,
    find_residual_blocks,
    output_layers,
    prune_channels,
    remove_blocks,
    select_blocks,
    track_pruning,
)
from lightning_prune.pruning.checkpoint import pruning_history

S = 64  # input size: the smallest multiple of 32 that keeps a 2×2 stride-32 grid

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class Residual(nn.Module):
    """``x + bn(conv(x))``: a residual block."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn(self.conv(x))


class PostAct(Residual):
    """ResNet's ``relu(x + f(x))``: removing it would drop the activation, so it is not a block."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


class Gate(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.conv(x))


class TwoBranch(nn.Module):
    """An addition of two branches, neither the input."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


class Double(nn.Module):
    """``x + x`` holds no parameter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + x


class Nested(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(Residual(c), Residual(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Net(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.first = Residual(3)  # reads the (leaf) input itself
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.wrapped = nn.Sequential(Residual(c))  # the wrapper's output is its block's addition
        self.post = PostAct(c)
        self.gate = Gate(c)
        self.two = TwoBranch(c)
        self.twice = Double()
        self.nested = Nested(c)
        self.shared = Residual(c)  # called twice
        self.head = nn.Conv2d(c, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.first(x))
        x = self.two(self.gate(self.post(self.wrapped(x))))
        x = self.shared(self.shared(self.nested(self.twice(x))))
        return self.head(x)


def randomize_bn(model: nn.Module) -> nn.Module:
    for m in model.modules():  # non-trivial BN statistics: a wrong removal or a stats update would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.1, 1)
            m.bias.data.uniform_(-0.5, 0.5)
    return model


def yolov3() -> YOLOv3:
    torch.manual_seed(0)
    return randomize_bn(YOLOv3("tiny", num_classes=2, img_size=S))


def yolov8() -> YOLOv8:
    torch.manual_seed(0)
    return randomize_bn(YOLOv8("n", num_classes=2, img_size=S))


def image(seed: int = 0) -> torch.Tensor:
    return torch.rand(2, 3, S, S, generator=torch.Generator().manual_seed(seed))


def outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return model.eval()(x)


def test_finds_the_hand_made_blocks_and_nothing_else():
    net = randomize_bn(Net()).train()
    net.head.weight.grad = torch.ones_like(net.head.weight)
    stats = {n: b.clone() for n, b in net.named_buffers()}
    assert find_residual_blocks(net, torch.zeros(1, 3, 8, 8)) == ["first", "wrapped.0", "nested", "shared"]
    # the model is given back as it was: modes, gradients, BatchNorm statistics (no update in eval mode)
    assert all(m.training for m in net.modules())
    assert torch.equal(net.head.weight.grad, torch.ones_like(net.head.weight))
    assert all(torch.equal(b, stats[n]) for n, b in net.named_buffers())
    for example in ((torch.zeros(1, 3, 8, 8),), {"x": torch.zeros(1, 3, 8, 8)}):  # model(*x), model(**x)
        assert find_residual_blocks(net, example) == ["first", "wrapped.0", "nested", "shared"]


def test_ignored_layers_keep_the_blocks_they_touch():
    net = Net()
    x = torch.zeros(1, 3, 8, 8)
    # is one, lies inside one, contains one: `nested` and `nested.body.0` contain the conv, `nested.body.1` does not
    ignored = ["first", "wrapped", "nested.body.0.conv"]
    assert find_residual_blocks(net, x, ignored_layers=ignored) == ["nested.body.1", "shared"]
    # an ignored block keeps the blocks inside it too
    assert find_residual_blocks(net, x, ignored_layers=["nested"]) == ["first", "wrapped.0", "shared"]
    with pytest.raises(ValueError, match=r"Expected `ignored_layers` to name modules of the model but got \['nope'\]"):
        find_residual_blocks(net, x, ignored_layers=["nope", "head"])


def test_finds_the_yolov3_darknet_blocks():
    model = yolov3()
    expected = [n for n, m in model.named_modules() if isinstance(m, DarknetBlock)]
    assert len(expected) == 9  # depths round(0.33 · (1, 2, 8, 8, 4)), at least one per stage
    assert find_residual_blocks(model, torch.zeros(1, 3, S, S)) == expected  # not the Sequential `stages.0` around one


def test_finds_the_yolov8_backbone_bottlenecks_not_the_necks():
    model = yolov8()
    found = find_residual_blocks(model, torch.zeros(1, 3, S, S), ignored_layers=["backbone.stage5"])
    expected = [n for n, m in model.named_modules() if isinstance(m, Bottleneck) and m.add]
    neck = [n for n, m in model.named_modules() if isinstance(m, Bottleneck) and n.startswith("neck.")]
    assert len(neck) == 4 and all(n.startswith("backbone.") for n in expected)  # the neck's C2f: shortcut=False
    assert found == [n for n in expected if not n.startswith("backbone.stage5.")]
    assert len(found) == 5


def test_scores_and_selection():
    model = yolov3()
    blocks = find_residual_blocks(model, torch.zeros(1, 3, S, S))
    first, second = (model.get_submodule(n) for n in blocks[:2])
    with torch.no_grad():
        for block, (g1, g2) in [(first, (1.0, -0.25)), (second, (0.1, 0.9))]:
            block.cv1.bn.weight.fill_(g1)  # C / 2 channels
            block.cv2.bn.weight.fill_(g2)  # C channels
    # |γ| averaged over all channels: (C/2 · 1 + C · 0.25) / (3C/2) = 0.5, not the mean of the means (0.625)
    scores = block_scores(model, blocks[:2], "bn_scale")
    assert list(scores) == blocks[:2]
    assert scores[blocks[0]] == pytest.approx(0.5) and scores[blocks[1]] == pytest.approx((0.1 + 2 * 0.9) / 3)
    assert block_scores(model, blocks[:2], "last_bn") == pytest.approx({blocks[0]: 0.25, blocks[1]: 0.9})
    assert select_blocks(scores, 1) == [blocks[0]]
    assert select_blocks(block_scores(model, blocks[:2], "last_bn"), 1) == [blocks[0]]

    by_width = block_scores(model, blocks, lambda name, m: m.cv2.conv.out_channels)
    assert by_width == {n: model.get_submodule(n).cv2.conv.out_channels for n in blocks}
    # lowest first, ties in module order
    assert select_blocks({"a": 1.0, "b": 0.5, "c": 0.5, "d": 2.0}, 3) == ["b", "c", "a"]
    assert select_blocks({"a": 1.0}, 0) == []


def test_scoring_errors():
    model = yolov3()
    with pytest.raises(
        ValueError,
        match=r"Expected argument `block_importance` to be one of \['bn_scale', 'last_bn'\] or a callable but got 'l1'",
    ):
        block_scores(model, ["backbone.stages.0.0"], "l1")
    with pytest.raises(
        ValueError, match=r"Expected block `head.preds.0` \(Conv2d\) to hold a BatchNorm with learnable"
    ):
        block_scores(model, ["head.preds.0"], "last_bn")
    with pytest.raises(ValueError, match=r"Expected block names of modules of the model but got `backbone\.nope`"):
        block_scores(model, ["backbone.nope"])
    expected = "Expected argument `remove_blocks` to be an int between 0 and the 2 residual blocks found but got"
    for n in (3, -1, 1.0, True):
        with pytest.raises(ValueError, match=rf"{expected} {n}\."):
            select_blocks({"a": 0.0, "b": 1.0}, n)


@pytest.mark.parametrize("family", ["yolov3", "yolov8"])
def test_removal_equals_the_zeroed_branch(family):
    model = yolov3() if family == "yolov3" else yolov8()
    name = find_residual_blocks(model, torch.zeros(1, 3, S, S))[1]
    zeroed = copy.deepcopy(model)
    with torch.no_grad():  # x + act(bn(conv(·))) with γ = β = 0: x + act(0) = x for LeakyReLU and SiLU
        zeroed.get_submodule(name).cv2.bn.weight.zero_()
        zeroed.get_submodule(name).cv2.bn.bias.zero_()
    x = image()
    before = outputs(model, x)
    records = remove_blocks(model, [name])
    assert records == [{"module": name, "kind": "block", "idxs": [], "size": None}]
    assert isinstance(model.get_submodule(name), nn.Identity)
    after = outputs(model, x)
    assert all(torch.equal(a, z) for a, z in zip(after, outputs(zeroed, x)))
    assert not all(torch.equal(a, b) for a, b in zip(after, before))  # the block did something


def test_remove_errors_change_nothing():
    net = Net()
    state = copy.deepcopy(net.state_dict())
    cases = {
        "": r"Expected the names of blocks to remove but got `''`: the root module cannot be removed",
        "nope": r"Expected the names of blocks to remove but got `nope`: not a module of the model",
        "shared": r"Expected distinct, non-nested blocks to remove but got `shared` twice or inside another",
        "nested.body.0": r"Expected distinct, non-nested blocks to remove but got `nested.body.0` twice or inside",
    }
    for name, match in cases.items():
        with pytest.raises(ValueError, match=match):
            remove_blocks(net, ["first", name, "nested" if name != "shared" else "shared"])
        assert net.state_dict().keys() == state.keys()  # checked before any removal
    remove_blocks(net, ["first"])
    with pytest.raises(ValueError, match=r"Expected the names of blocks to remove but got `first`: already an"):
        remove_blocks(net, ["first"])


def test_replay_and_its_errors(tmp_path):
    model = yolov3()
    names = select_blocks(block_scores(model, find_residual_blocks(model, torch.zeros(1, 3, S, S))), 3)
    history = pruning_history(model)  # the module's own: its state dict carries it
    history.append(remove_blocks(model, names))
    path = tmp_path / "history.pt"
    torch.save({"history": history.to_state(), "state_dict": model.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    assert json.loads(json.dumps(ckpt["history"])) == {"version": 1, "steps": [history.steps[0]]}

    fresh = PruningHistory.from_state(ckpt["history"]).replay(YOLOv3("tiny", num_classes=2, img_size=S))
    fresh.load_state_dict({k: v for k, v in ckpt["state_dict"].items() if k != "_extra_state"}, strict=True)
    x = image()
    assert all(torch.equal(a, b) for a, b in zip(outputs(fresh, x), outputs(model, x)))
    # the module replays its own history from the state dict's `_extra_state`
    module = YOLOv3("tiny", num_classes=2, img_size=S)
    module.load_state_dict(ckpt["state_dict"], strict=True)
    assert pruning_history(module) == history
    assert all(isinstance(module.get_submodule(n), nn.Identity) for n in names)

    with pytest.raises(ValueError, match=rf"Cannot replay step 0: block `{names[0]}` is already an `nn.Identity`"):
        history.replay(fresh)
    with pytest.raises(ValueError, match=rf"Cannot replay step 0: the model has no module `{names[0]}`"):
        history.replay(nn.Sequential())
    with pytest.raises(ValueError, match="Cannot replay: the root module cannot be removed as a block"):
        apply_records(nn.Sequential(), [{"module": "", "kind": "block", "idxs": [], "size": None}])
    with pytest.raises(
        ValueError, match=r"Expected a pruning record \{'module': str, 'kind': 'out' \| 'in' \| 'param' \|"
    ):
        PruningHistory([[{"module": "a", "kind": "block", "idxs": [0], "size": None}]])


def optimizer_params(optimizer):
    return [p for group in optimizer.param_groups for p in group["params"]]


def train_step(model, optimizer, seed=0):
    optimizer.zero_grad()
    sum(o.square().mean() for o in model.train()(image(seed))).backward()
    optimizer.step()


@pytest.mark.parametrize("make", [torch.optim.SGD, torch.optim.Adam])
def test_patch_drops_the_removed_blocks_parameters(make):
    torch.manual_seed(0)
    net = Net()
    x = torch.rand(2, 3, 8, 8)
    block = [p for n, p in net.named_parameters() if n.startswith("wrapped.")]
    rest = [p for n, p in net.named_parameters() if not n.startswith("wrapped.")]
    kwargs = {"lr": 0.01, "momentum": 0.9} if make is torch.optim.SGD else {"lr": 0.01}
    optimizer = make([{"params": rest}, {"params": block}], **kwargs)
    optimizer.zero_grad()
    net(x).square().mean().backward()
    optimizer.step()
    with track_pruning(net) as tracker:
        remove_blocks(net, ["wrapped.0", "shared"])
    assert tracker.patch(optimizer) == 0  # nothing swapped, only dropped
    assert [id(p) for p in optimizer_params(optimizer)] == [id(p) for p in net.parameters()]
    assert optimizer.param_groups[1]["params"] == []  # the group stays, for schedulers
    assert {id(p) for p in optimizer.state} == {id(p) for p in net.parameters()}
    before = [p.detach().clone() for p in net.parameters()]
    optimizer.zero_grad()
    net(x).square().mean().backward()
    optimizer.step()
    assert all(not torch.equal(p, b) for p, b in zip(net.parameters(), before))


def test_patch_after_channel_pruning_and_removal_in_one_go():
    model = yolov3()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    train_step(model, optimizer)
    x = torch.zeros(1, 3, S, S)
    keep = [model.get_submodule(n) for n in output_layers(model, check_traceable(model, x))]
    name = find_residual_blocks(model, x)[-1]
    with track_pruning(model) as tracker:
        prune_channels(model, x, tp.importance.GroupMagnitudeImportance(), 0.3, ignored_layers=keep)
        pruned_block_params = list(model.get_submodule(name).parameters())  # replaced by torch-pruning
        remove_blocks(model, [name])
    assert tracker.patch(optimizer) > 0
    live = {id(p) for p in model.parameters()}
    assert [id(p) for p in optimizer_params(optimizer)] == [id(p) for p in model.parameters()]
    assert not any(id(p) in live for p in pruned_block_params)
    assert all(optimizer.state[p]["momentum_buffer"].shape == p.shape for p in model.parameters())
    assert len(optimizer.state) == len(live)
    train_step(model, optimizer, seed=1)


def test_channel_pruning_after_removal_replays_on_a_fresh_yolov8():
    model = yolov8()
    x = image()
    example = torch.zeros(1, 3, S, S)
    shapes = [o.shape for o in outputs(model, x)]
    keep = [model.get_submodule(n) for n in output_layers(model, check_traceable(model, example))]
    history = pruning_history(model)
    importance = tp.importance.GroupMagnitudeImportance()

    history.append(prune_channels(model, example, importance, 0.2, ignored_layers=keep, history=history))
    # stage3's C2f: cat([cv0(x), cv1(x), m0(cv1(x)), m1(m0(cv1(x)))]); without m0 it reads cv1's output twice
    history.append(remove_blocks(model, ["backbone.stage3.1.m.0", "backbone.stage2.1.m.0"]))
    history.append(prune_channels(model, example, importance, 0.2, ignored_layers=keep, history=history))

    c2f = model.backbone.stage3[1]
    cv1 = c2f.cv1.conv.out_channels
    assert c2f.cv0.conv.out_channels + 2 * cv1 + c2f.m[1].cv2.conv.out_channels == c2f.cv2.conv.in_channels
    last = history.steps[-1]
    assert any(r["module"] == "backbone.stage3.1.cv1.conv" and r["kind"] == "out" for r in last)
    assert [o.shape for o in outputs(model, x)] == shapes

    state = model.state_dict()
    fresh = PruningHistory.from_state(history.to_state()).replay(YOLOv8("n", num_classes=2, img_size=S))
    fresh.load_state_dict({k: v for k, v in state.items() if k != "_extra_state"}, strict=True)
    module = YOLOv8("n", num_classes=2, img_size=S)
    module.load_state_dict(state, strict=True)  # replays the history it carries
    expected = outputs(model, x)
    for replayed in (fresh, module):
        assert all(torch.equal(a, b) for a, b in zip(outputs(replayed, x), expected))
