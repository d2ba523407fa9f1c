import pytest
import torch
from torchvision import tv_tensors

from lightning_prune.data.transforms import PAD_VALUE, Letterbox, Mosaic, detection_transforms

COLOURS = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=torch.uint8)


def _sample(h: int, w: int, boxes: list, labels: list | None = None):
    """A gray image with each box filled by the colour of its label (so labels can be checked after augmenting)."""
    labels = labels if labels is not None else [i % 3 for i in range(len(boxes))]
    image = torch.full((3, h, w), 60, dtype=torch.uint8)
    for (x0, y0, x1, y1), label in zip(boxes, labels):
        image[:, int(y0) : int(y1), int(x0) : int(x1)] = COLOURS[label][:, None, None]
    target = {
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), format="XYXY", canvas_size=(h, w)
        ),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "image_id": torch.tensor(1),
        "orig_size": torch.tensor([h, w]),
    }
    return tv_tensors.Image(image), target


def _check_aligned(image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, size: int) -> None:
    """Boxes inside the image, one label per box, and the pixel at each box centre has its label's colour."""
    assert boxes.shape == (len(labels), 4)
    assert (boxes >= 0).all() and (boxes <= size).all()
    assert (boxes[:, 2:] > boxes[:, :2]).all()
    pixels = image if image.dtype == torch.uint8 else (image * 255).round()
    for box, label in zip(boxes, labels):
        cx, cy = int((box[0] + box[2]) / 2), int((box[1] + box[3]) / 2)
        torch.testing.assert_close(pixels[:, cy, cx].float(), COLOURS[label].float(), atol=30, rtol=0)


@pytest.mark.parametrize(("h", "w"), [(100, 200), (300, 120), (64, 64), (20, 30), (257, 300)])
def test_letterbox_round_trip(h, w):
    boxes = [[0, 0, w, h], [w * 0.1, h * 0.2, w * 0.5, h * 0.9], [w - 3.5, h - 2.25, w, h]]
    image, target = _sample(h, w, boxes)
    out, lb_target = Letterbox(64)(image, target)
    assert out.shape == (3, 64, 64)
    scale, pad_x, pad_y = lb_target["letterbox"].tolist()
    assert lb_target["letterbox"].dtype == torch.float32
    assert round(max(h, w) * scale) == 64
    back = (lb_target["boxes"].as_subclass(torch.Tensor) - torch.tensor([pad_x, pad_y, pad_x, pad_y])) / scale
    torch.testing.assert_close(back, target["boxes"].as_subclass(torch.Tensor), atol=1e-4, rtol=0)
    if pad_x >= 1:  # centred gray padding
        assert (out[:, :, : int(pad_x)] == PAD_VALUE).all() and (out[:, :, -int(pad_x) :] == PAD_VALUE).all()
    if pad_y >= 1:
        assert (out[:, : int(pad_y)] == PAD_VALUE).all() and (out[:, -int(pad_y) :] == PAD_VALUE).all()


def test_validation_pipeline_is_deterministic_letterbox():
    image, target = _sample(48, 96, [[10, 10, 30, 40], [50, 5, 90, 20]])
    out, tgt = detection_transforms(64, train=False)(image, target)
    assert out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
    assert type(out) is torch.Tensor and type(tgt["boxes"]) is torch.Tensor
    torch.testing.assert_close(
        tgt["boxes"], torch.tensor([[6.67, 22.67, 20.0, 42.67], [33.33, 19.33, 60.0, 29.33]]), atol=0.01, rtol=0
    )
    assert tgt["letterbox"].tolist() == pytest.approx([2 / 3, 0, 16])
    again, tgt2 = detection_transforms(64, train=False)(image, target)
    assert torch.equal(out, again) and torch.equal(tgt["boxes"], tgt2["boxes"])


def test_train_augmentation_keeps_boxes_aligned():
    torch.manual_seed(0)
    transform = detection_transforms(96, train=True, hflip=0.5, scale=0.5, translate=0.2, color_jitter=0.0)
    image, target = _sample(80, 120, [[5, 5, 35, 30], [50, 40, 110, 75], [70, 2, 100, 25]], labels=[0, 1, 2])
    flipped = changed = 0
    for _ in range(20):
        out, tgt = transform(image, target)
        assert out.shape == (3, 96, 96) and out.dtype == torch.float32
        assert tgt["boxes"].dtype == torch.float32 and tgt["labels"].dtype == torch.int64
        _check_aligned(out, tgt["boxes"], tgt["labels"], 96)
        red = tgt["boxes"][tgt["labels"] == 0]
        flipped += int(len(red) > 0 and red[0, 0] > 48)  # the red box starts on the left before flipping
        changed += int(
            tgt["boxes"].shape[0] != 3
            or not torch.allclose(tgt["boxes"][0], torch.tensor([4.0, 20.0, 28.0, 40.0]), atol=1)
        )
    assert 0 < flipped < 20
    assert changed > 10


def test_color_jitter_changes_colours_only():
    torch.manual_seed(0)
    transform = detection_transforms(64, train=True, hflip=0.0, scale=0.0, translate=0.0, color_jitter=0.5)
    image, target = _sample(64, 64, [[10, 10, 30, 30]])
    out, tgt = transform(image, target)
    base, _ = detection_transforms(64)(image, target)
    assert not torch.allclose(out, base)
    torch.testing.assert_close(tgt["boxes"], torch.tensor([[10.0, 10.0, 30.0, 30.0]]))


def test_empty_targets_survive_augmentation():
    torch.manual_seed(0)
    transform = detection_transforms(64, train=True)
    image, target = _sample(40, 70, [])
    for _ in range(5):
        out, tgt = transform(image, target)
        assert out.shape == (3, 64, 64)
        assert tgt["boxes"].shape == (0, 4) and tgt["labels"].shape == (0,)
    mosaic_image, mosaic_target = Mosaic(64)([_sample(40, 70, []) for _ in range(4)])
    out, tgt = transform(mosaic_image, mosaic_target)
    assert out.shape == (3, 64, 64) and tgt["boxes"].shape == (0, 4)


def test_mosaic():
    torch.manual_seed(0)
    samples = [
        _sample(60, 90, [[10, 10, 40, 40], [50, 20, 80, 50]], labels=[0, 1]),
        _sample(90, 60, [[5, 5, 55, 85]], labels=[2]),
        _sample(50, 50, [[0, 0, 50, 50]], labels=[1]),
        _sample(70, 40, [[10, 30, 30, 60]], labels=[0]),
    ]
    seen_labels = set()
    for _ in range(10):
        image, target = Mosaic(128)(samples)
        assert image.shape == (3, 128, 128) and image.dtype == torch.uint8
        assert target["orig_size"].tolist() == [128, 128]
        assert target["image_id"].item() == 1
        boxes = target["boxes"].as_subclass(torch.Tensor)
        _check_aligned(image, boxes, target["labels"], 128)
        seen_labels |= set(target["labels"].tolist())
        _, tgt = detection_transforms(128, train=False)(image, target)
        assert tgt["letterbox"].tolist() == [1.0, 0.0, 0.0]
    assert seen_labels == {0, 1, 2}


def test_transform_errors():
    with pytest.raises(ValueError, match="Expected argument `size` to be a positive int but got 0"):
        Letterbox(0)
    with pytest.raises(ValueError, match="Expected argument `size` to be an int >= 2 but got 1"):
        Mosaic(1)
    with pytest.raises(ValueError, match="Expected 4 samples for a mosaic but got 2"):
        Mosaic(32)([_sample(10, 10, [])] * 2)
