from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_prune.adapters.base import HeadAdapter
from lightning_prune.adapters.yolov3 import YOLOv3Adapter
from lightning_prune.models.yolov3 import YOLOv3


@pytest.fixture(scope="module")
def model() -> YOLOv3:
    return YOLOv3("tiny", num_classes=2, img_size=64)


def test_model_exposes_adapter(model: YOLOv3) -> None:
    adapter = model.adapter
    assert isinstance(adapter, YOLOv3Adapter) and isinstance(adapter, HeadAdapter)
    assert (adapter.num_classes, adapter.num_anchors, adapter.strides) == (2, 3, [8, 16, 32])


def test_output_layers_are_the_prediction_convs(model: YOLOv3) -> None:
    names = model.adapter.output_layers(model)
    assert names == ["head.preds.0", "head.preds.1", "head.preds.2"]
    assert all(model.get_submodule(n).out_channels == 3 * 7 for n in names)


def test_output_layers_inside_a_wrapper(model: YOLOv3) -> None:
    wrapper = nn.ModuleDict({"detector": model})
    assert model.adapter.output_layers(wrapper) == [f"detector.head.preds.{i}" for i in range(3)]


def test_output_layers_wrong_pattern(model: YOLOv3) -> None:
    adapter = YOLOv3Adapter(num_classes=2, pred_pattern=r"neck\.")
    with pytest.raises(ValueError, match=r"Expected 3 prediction convs with 21 = A · \(5 \+ C\) output channels"):
        adapter.output_layers(model)


def test_output_layers_wrong_num_classes(model: YOLOv3) -> None:
    with pytest.raises(ValueError, match=r"with 24 = A · \(5 \+ C\) output channels .* but got \{'head.preds.0': 21"):
        YOLOv3Adapter(num_classes=3).output_layers(model)


def test_split_shapes_and_layout() -> None:
    adapter = YOLOv3Adapter(num_classes=2)
    raw = [torch.randn(2, 21, 8, 8), torch.randn(2, 21, 4, 4), torch.randn(2, 21, 2, 2)]
    levels = adapter.split(raw)
    assert [lv.stride for lv in levels] == [8, 16, 32]
    for lv, r in zip(levels, raw):
        b, _, h, w = r.shape
        assert lv.box.shape == (b, 3, h, w, 4) and lv.obj.shape == (b, 3, h, w) and lv.cls.shape == (b, 3, h, w, 2)
    # anchor a owns channels a·7 .. a·7 + 6: tx ty tw th obj cls0 cls1
    r, lv = raw[1], levels[1]
    assert torch.equal(lv.box[:, 2, ..., 3], r[:, 2 * 7 + 3])
    assert torch.equal(lv.obj[:, 1], r[:, 1 * 7 + 4])
    assert torch.equal(lv.cls[:, 0, ..., 1], r[:, 0 * 7 + 6])


def test_split_agrees_with_model_decode(model: YOLOv3) -> None:
    raw = model.eval()(torch.rand(1, 3, 64, 64))
    _, scores = model.decode(raw)
    from_adapter = torch.cat(
        [(lv.obj.sigmoid()[..., None] * lv.cls.sigmoid()).flatten(1, 3) for lv in model.adapter.split(raw)], 1
    )
    torch.testing.assert_close(from_adapter, scores)


def test_split_keeps_gradients(model: YOLOv3) -> None:
    raw = model.train()(torch.rand(1, 3, 64, 64))
    model.zero_grad()
    model.adapter.split(raw)[2].obj.sum().backward()
    assert model.head.preds[2].bias.grad.abs().sum() > 0
    assert model.head.preds[0].bias.grad is None or model.head.preds[0].bias.grad.abs().sum() == 0


def test_split_wrong_levels_or_channels() -> None:
    adapter = YOLOv3Adapter(num_classes=2)
    with pytest.raises(ValueError, match=r"Expected 3 raw output levels but got 2"):
        adapter.split([torch.zeros(1, 21, 8, 8)] * 2)
    with pytest.raises(ValueError, match=r"Expected raw level of shape \(B, 21, H, W\) .* but got \(1, 24, 8, 8\)"):
        adapter.split([torch.zeros(1, 24, 8, 8)] * 3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 0}, r"Expected argument `num_classes` to be a positive int but got 0"),
        ({"num_classes": 2, "num_anchors": 0}, r"Expected argument `num_anchors` to be a positive int but got 0"),
        ({"num_classes": 2, "strides": ()}, r"Expected argument `strides` to name at least one level but got \(\)"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        YOLOv3Adapter(**kwargs)
