import math

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.ops import box_iou

from lightning_prune.models.base import count_parameters
from lightning_prune.models.yolov8 import (
    C2f,
    YOLOv8,
    distribution_focal_loss,
    make_anchors,
    task_aligned_assign,
)

S = 64  # input size of the small tests: grids 8×8, 4×4, 2×2


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _scene(boxes: list[tuple[int, int, int, int, int]], size: int = S) -> tuple[torch.Tensor, dict]:
    """A dark image with one bright rectangle per box, coloured by class (class c lights channel c)."""
    image = torch.full((3, size, size), 0.1)
    for x1, y1, x2, y2, c in boxes:
        image[:, y1:y2, x1:x2] = 0.2
        image[c, y1:y2, x1:x2] = 1.0
    target = {
        "boxes": torch.tensor([b[:4] for b in boxes], dtype=torch.float32).view(-1, 4),
        "labels": torch.tensor([b[4] for b in boxes], dtype=torch.long),
    }
    return image, target


def _collate(batch: list) -> tuple[torch.Tensor, list[dict]]:
    images, targets = zip(*batch)
    return torch.stack(images), list(targets)


SCENES = [
    [(8, 10, 36, 40, 0)],
    [(20, 24, 56, 52, 1), (4, 4, 18, 18, 0)],
    [(30, 6, 60, 30, 2)],
    [],
]


@torch.no_grad()
def _precise_bn(model: nn.Module, images: torch.Tensor, repeat: int = 8) -> None:
    """Set BatchNorm running statistics to the exact statistics of ``images`` (PreciseBN).

    Repeating the batch leaves mean and biased variance unchanged but makes the unbiased correction
    ``n / (n - 1)`` negligible on the 2×2 stride-32 maps of a 64-pixel input.
    """
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one pass gives the batch statistics
    model.train()
    model(images.repeat(repeat, 1, 1, 1))


def test_scale_validation():
    with pytest.raises(ValueError, match=r"Expected argument `scale` to be one of \['n', 's', 'm'\] but got 'x'\."):
        YOLOv8("x")
    with pytest.raises(ValueError, match=r"Expected argument `reg_max` to be an int >= 2 but got 1\."):
        YOLOv8("n", reg_max=1)


def test_forward_shapes_and_param_counts():
    model = YOLOv8("n", num_classes=3, img_size=S)
    images = torch.rand(2, 3, S, S)
    raw_train = model(images)
    model.eval()
    raw_eval = model(images)
    expected = [(2, 4 * 16 + 3, S // s, S // s) for s in (8, 16, 32)]
    assert [tuple(r.shape) for r in raw_train] == expected
    assert [tuple(r.shape) for r in raw_eval] == expected

    # same parameter count as Ultralytics' yolov8n (3,157,200 incl. 16 frozen DFL weights) at 80 classes
    counts = [count_parameters(YOLOv8(scale, num_classes=80, img_size=S)) for scale in ("n", "s", "m")]
    assert counts[0] == 3_157_184
    assert counts[0] < counts[1] < counts[2]
    assert 10e6 < counts[1] < 12e6 and 24e6 < counts[2] < 27e6


def test_c2f_two_conv_form_equals_conv_and_chunk():
    """The two-conv C2f computes what a single 1×1 conv (stacked weights) followed by ``chunk(2)`` computes."""
    block = C2f(8, 8, n=1, shortcut=True).eval()
    x = torch.randn(1, 8, 6, 6)
    fused = nn.Conv2d(8, 8, 1, bias=False)
    fused.weight.data = torch.cat([block.cv0.conv.weight, block.cv1.conv.weight])
    bn = nn.BatchNorm2d(8, eps=1e-3).eval()
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(bn, name).data = torch.cat([getattr(block.cv0.bn, name), getattr(block.cv1.bn, name)])
    a, b = nn.functional.silu(bn(fused(x))).chunk(2, 1)
    reference = block.cv2(torch.cat([a, b, block.m[0](b)], 1))
    torch.testing.assert_close(block(x), reference)


def test_class_bias_prior():
    model = YOLOv8("n", num_classes=4, img_size=128)
    for cls, stride in zip(model.head.cls, (8, 16, 32)):
        torch.testing.assert_close(cls[-1].bias, torch.full((4,), math.log(5 / 4 / (128 / stride) ** 2)))
    assert torch.all(model.head.box[0][-1].bias == 1.0)


def test_decode_valid_boxes_and_scores():
    model = YOLOv8("n", num_classes=3, img_size=S).eval()
    with torch.no_grad():
        boxes, scores = model.decode(model(torch.rand(2, 3, S, S)))
    num_anchors = sum((S // s) ** 2 for s in (8, 16, 32))
    assert boxes.shape == (2, num_anchors, 4) and scores.shape == (2, num_anchors, 3)
    assert torch.all(boxes[..., 2:] >= boxes[..., :2])
    # a side is at most (reg_max - 1) · stride from the cell centre
    assert boxes.min() >= -15 * 32 and boxes.max() <= S + 15 * 32
    assert scores.min() >= 0 and scores.max() <= 1


def test_make_anchors():
    anchors, strides = make_anchors([(2, 3), (1, 2), (1, 1)], torch.device("cpu"))
    assert anchors.shape == (9, 2) and strides.shape == (9, 1)
    torch.testing.assert_close(anchors[:3], torch.tensor([[0.5, 0.5], [1.5, 0.5], [2.5, 0.5]]))
    assert strides.flatten().tolist() == [8] * 6 + [16] * 2 + [32]


def test_distribution_focal_loss_matches_cross_entropy():
    logits = torch.randn(5, 4, 16)
    integer = torch.randint(0, 15, (5, 4))
    reference = nn.functional.cross_entropy(logits.view(-1, 16), integer.view(-1), reduction="none").view(5, 4)
    torch.testing.assert_close(distribution_focal_loss(logits, integer.float()), reference.mean(-1))
    # halfway between two bins: the mean of both cross-entropies
    half = distribution_focal_loss(logits, integer.float() + 0.5)
    upper = nn.functional.cross_entropy(logits.view(-1, 16), (integer + 1).view(-1), reduction="none").view(5, 4)
    torch.testing.assert_close(half, ((reference + upper) / 2).mean(-1))


def test_assigner_positives_lie_inside_gt():
    anchors, _ = make_anchors([(8, 8), (4, 4), (2, 2)], torch.device("cpu"))
    strides = torch.tensor([8.0] * 64 + [16.0] * 16 + [32.0] * 4)[:, None]
    anchors = anchors * strides  # pixels
    num_anchors, num_classes = anchors.shape[0], 3
    gt_boxes = torch.tensor(
        [[[8.0, 8.0, 40.0, 32.0], [0.0, 0.0, 0.0, 0.0]], [[30.0, 30.0, 60.0, 60.0], [2, 2, 20, 20]]]
    )
    gt_labels = torch.tensor([[2, 0], [1, 0]])
    gt_mask = torch.tensor([[True, False], [True, True]])
    # predictions: a 16-pixel box around each anchor, uniform scores
    pred_boxes = torch.cat([anchors - 8, anchors + 8], -1).expand(2, -1, -1)
    pred_scores = torch.full((2, num_anchors, num_classes), 0.5)
    target_boxes, target_scores, fg = task_aligned_assign(
        pred_scores, pred_boxes, anchors, gt_labels, gt_boxes, gt_mask, topk=10
    )
    assert fg.shape == (2, num_anchors) and target_scores.shape == (2, num_anchors, num_classes)
    for b in range(2):
        assert 0 < fg[b].sum() <= 10 * gt_mask[b].sum()
        for a in fg[b].nonzero().flatten():
            x, y = anchors[a]
            x1, y1, x2, y2 = target_boxes[b, a]
            assert x1 < x < x2 and y1 < y < y2
    # soft targets only on the GT's class, in (0, 1], the best anchor of each GT gets its IoU
    assert torch.all(target_scores[0, :, [0, 1]] == 0) and target_scores[0, :, 2].max() <= 1
    assert torch.all(target_scores[0, fg[0], 2] > 0)
    assert torch.all(target_scores[~fg] == 0)
    # both GTs of image 1 got positives
    assigned = {tuple(box.tolist()) for box in target_boxes[1, fg[1]]}
    assert assigned == {(30.0, 30.0, 60.0, 60.0), (2.0, 2.0, 20.0, 20.0)}


def test_assigner_resolves_anchor_claimed_by_two_gts():
    anchors = torch.tensor([[20.0, 20.0]])
    pred_boxes = torch.tensor([[[10.0, 10.0, 30.0, 30.0]]])
    gt_boxes = torch.tensor([[[0.0, 0.0, 40.0, 40.0], [12.0, 12.0, 30.0, 30.0]]])
    target_boxes, _, fg = task_aligned_assign(
        torch.full((1, 1, 2), 0.5), pred_boxes, anchors, torch.tensor([[0, 1]]), gt_boxes, torch.ones(1, 2, dtype=bool)
    )
    assert fg.all()
    assert target_boxes[0, 0].tolist() == [12.0, 12.0, 30.0, 30.0]  # the GT it overlaps most


@pytest.mark.parametrize("counts", [(0, 0), (1, 0)])
def test_empty_targets_give_finite_loss(counts):
    model = YOLOv8("n", num_classes=3, img_size=S)
    images, targets = _collate([_scene(SCENES[0][:n]) for n in counts])
    loss, parts = model.compute_loss(model(images), targets)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in parts.values())
    assert set(parts) == {"box", "cls", "dfl"}
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    if sum(counts) == 0:
        assert parts["box"] == 0 and parts["dfl"] == 0 and parts["cls"] > 0


def test_overfit_tiny_batch():
    torch.manual_seed(0)
    images, targets = _collate([_scene(SCENES[0]), _scene(SCENES[1])])
    model = YOLOv8("n", num_classes=3, img_size=S)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(80):
        loss, _ = model.compute_loss(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert min(losses[-10:]) < losses[0] / 5, losses[::10]

    _precise_bn(model, images)
    model.eval()
    preds = model.postprocess(model(images))
    for pred, target in zip(preds, targets):
        top_box, top_label = pred["boxes"][:1], pred["labels"][0]
        ious = box_iou(top_box, target["boxes"])[0]
        best = int(ious.argmax())
        assert ious[best] > 0.5, (pred["boxes"][:3], target)
        assert top_label == target["labels"][best]


@pytest.fixture(scope="module")
def fitted() -> tuple[pl.Trainer, YOLOv8]:
    torch.manual_seed(0)
    data = [_scene(boxes) for boxes in SCENES]
    loader = DataLoader(data, batch_size=2, collate_fn=_collate)
    model = YOLOv8("n", num_classes=3, img_size=S, warmup_epochs=0.5)
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(model, loader, loader)
    return trainer, model


def test_trainer_fit_logs_map(fitted):
    trainer, _ = fitted
    metrics = trainer.callback_metrics
    assert trainer.global_step == 2
    for key in ("train/loss", "train/box", "train/cls", "train/dfl", "val/loss", "val/mAP", "val/mAP50"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert 0 <= metrics["val/mAP"] <= 1


def test_checkpoint_roundtrip(fitted, tmp_path):
    trainer, model = fitted
    path = tmp_path / "yolov8.ckpt"
    trainer.save_checkpoint(path)
    loaded = YOLOv8.load_from_checkpoint(path)
    assert loaded.hparams["scale"] == "n" and loaded.num_classes == 3 and loaded.iou_threshold == 0.7
    images = torch.rand(2, 3, S, S)
    model.eval()
    loaded.eval()
    with torch.no_grad():
        for a, b in zip(model(images), loaded(images)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
