import pytest
import torch
import torch_pruning as tp
from torch import nn

from lightning_prune.adapters.base import HeadAdapter
from lightning_prune.adapters.yolov8 import YOLOv8Adapter
from lightning_prune.models.base import count_parameters
from lightning_prune.models.yolov8 import YOLOv8, dfl_expectation

S = 64


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def model() -> YOLOv8:
    torch.manual_seed(0)
    return YOLOv8("n", num_classes=3, img_size=S, reg_max=8)


def test_model_exposes_adapter(model):
    adapter = model.adapter
    assert isinstance(adapter, YOLOv8Adapter) and isinstance(adapter, HeadAdapter)
    assert adapter.reg_max == 8


def test_reg_max_validation():
    with pytest.raises(ValueError, match=r"Expected argument `reg_max` to be an int >= 2 but got 0\."):
        YOLOv8Adapter(reg_max=0)


def test_output_layers_are_the_prediction_convs(model):
    names = model.adapter.output_layers(model)
    assert names == [f"head.{branch}.{i}.2" for i in range(3) for branch in ("box", "cls")]
    widths = [model.get_submodule(name).out_channels for name in names]
    assert widths == [4 * 8, 3] * 3
    assert all(isinstance(model.get_submodule(name), nn.Conv2d) for name in names)


def test_output_layers_of_a_wrapped_model(model):
    wrapper = nn.Sequential(model)
    assert model.adapter.output_layers(wrapper)[0] == "0.head.box.0.2"
    with pytest.raises(ValueError, match=r"Expected a model containing a YOLOv8 `DetectHead` but got Linear\."):
        model.adapter.output_layers(nn.Linear(2, 2))


def test_split_layout(model):
    model.eval()
    with torch.no_grad():
        raw = model(torch.rand(2, 3, S, S))
    levels = model.adapter.split(raw)
    assert [lvl.stride for lvl in levels] == [8, 16, 32]
    for lvl, r in zip(levels, raw):
        h, w = r.shape[2:]
        assert lvl.obj is None
        assert lvl.box.shape == (2, 1, h, w, 32) and lvl.cls.shape == (2, 1, h, w, 3)
        torch.testing.assert_close(lvl.box[:, 0, 1, 0], r[:, :32, 1, 0])
        torch.testing.assert_close(lvl.cls[:, 0, 1, 0], r[:, 32:, 1, 0])

    # the documented decoding reproduces the model's own decode
    boxes, scores = model.decode(raw)
    lvl = levels[1]  # stride 16: anchors 64.. of the flattened output; cell (y=1, x=0)
    ltrb = dfl_expectation(lvl.box[:, 0, 1, 0]) * lvl.stride
    centre = torch.tensor([0.5, 1.5]) * lvl.stride
    expected = torch.cat([centre - ltrb[:, :2], centre + ltrb[:, 2:]], -1)
    index = (S // 8) ** 2 + 1 * (S // 16) + 0
    torch.testing.assert_close(boxes[:, index], expected)
    torch.testing.assert_close(scores[:, index], lvl.cls[:, 0, 1, 0].sigmoid())


def test_split_validation(model):
    with pytest.raises(ValueError, match=r"Expected argument `raw` to be a list of \(B, 32 \+ C, H, W\) tensors"):
        model.adapter.split(torch.zeros(1, 35, 8, 8))
    with pytest.raises(ValueError, match=r"but got \[\(1, 32, 8, 8\)\]"):
        model.adapter.split([torch.zeros(1, 32, 8, 8)])


def test_torch_pruning_traces_and_prunes(model):
    example = torch.randn(1, 3, S, S)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    c2f_in = model.backbone.stage3[1].cv0.conv
    group = graph.get_pruning_group(c2f_in, tp.prune_conv_out_channels, idxs=[0, 1])
    assert len(group) > 1  # the two-conv C2f is traced: its concat reaches cv2's input channels

    ignored = [model.get_submodule(name) for name in model.adapter.output_layers(model)]
    before = count_parameters(model)
    pruner = tp.pruner.BasePruner(
        model, example, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.3, ignored_layers=ignored
    )
    pruner.step()
    assert count_parameters(model) < 0.7 * before
    assert model.backbone.stage3[1].cv0.conv.out_channels < 32

    model.train()  # building the graph left the model in eval mode
    images = torch.rand(2, 3, S, S)
    raw = model(images)
    assert [tuple(r.shape) for r in raw] == [(2, 35, S // s, S // s) for s in (8, 16, 32)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 30.0]]), "labels": torch.tensor([2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]
    loss, _ = model.compute_loss(raw, targets)
    loss.backward()
    assert torch.isfinite(loss)
