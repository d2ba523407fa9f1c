from __future__ import annotations

import math
from collections import Counter

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader
from torchvision.ops import box_iou

from lightning_prune.models.base import count_parameters
from lightning_prune.models.yolov3 import COCO_ANCHORS_416, YOLOv3


def _shapes(n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """``n`` dark images, each with one bright object: class 0 a red rectangle, class 1 a green disc."""
    g = torch.Generator().manual_seed(seed)
    images = torch.full((n, 3, size, size), 0.1)
    targets = []
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    for i in range(n):
        label = i % 2
        w, h = ((torch.rand(2, generator=g) * 0.25 + 0.25) * size).tolist()
        u, v = torch.rand(2, generator=g).tolist()
        cx, cy = u * (size - w) + w / 2, v * (size - h) + h / 2
        box = torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
        if label == 0:
            mask = (xs >= box[0]) & (xs <= box[2]) & (ys >= box[1]) & (ys <= box[3])
        else:
            mask = ((xs - cx) / (w / 2)) ** 2 + ((ys - cy) / (h / 2)) ** 2 <= 1
        images[i, label][mask] = 0.9
        targets.append({"boxes": box[None], "labels": torch.tensor([label])})
    return images, targets


def _collate(batch: list) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    images, targets = zip(*batch)
    return torch.stack(images), list(targets)


# ---------------------------------------------------------------------------------------------- construction
@pytest.mark.parametrize("scale", ["tiny", "n"])
def test_forward_shapes(scale: str) -> None:
    model = YOLOv3(scale, num_classes=3, img_size=64)
    raw = model(torch.rand(2, 3, 64, 64))
    assert [tuple(r.shape) for r in raw] == [(2, 24, 8, 8), (2, 24, 4, 4), (2, 24, 2, 2)]


def test_param_counts_grow_with_scale() -> None:
    counts = [count_parameters(YOLOv3(s, num_classes=80, img_size=64)) for s in ("tiny", "n", "s", "m")]
    assert counts == sorted(counts) and len(set(counts)) == 4
    assert counts[0] < 1_000_000  # small enough to train on a CPU


def test_hyperparameters_saved() -> None:
    model = YOLOv3("tiny", num_classes=5, img_size=96, anchor_t=3.0)
    assert model.hparams.scale == "tiny" and model.hparams.num_classes == 5 and model.hparams.anchor_t == 3.0


def test_default_anchors_scale_with_img_size() -> None:
    model = YOLOv3("tiny", num_classes=1, img_size=832)
    torch.testing.assert_close(model.anchors, torch.tensor(COCO_ANCHORS_416) * 2)


def test_custom_anchors() -> None:
    anchors = [[[4.0, 5.0], [8.0, 8.0]], [[16.0, 20.0], [20.0, 16.0]], [[40.0, 40.0], [60.0, 50.0]]]
    model = YOLOv3("tiny", num_classes=2, img_size=64, anchors=anchors)
    assert model.num_anchors == 2
    assert model(torch.rand(1, 3, 64, 64))[0].shape[1] == 2 * 7


def test_invalid_scale() -> None:
    with pytest.raises(ValueError, match=r"Expected argument `scale` to be one of \['tiny', .*\] but got 'xl'"):
        YOLOv3("xl")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "anchors",
    [
        [[[10, 13], [16, 30]], [[30, 61], [62, 45]]],  # two levels
        [[[10, 13, 1]], [[30, 61, 1]], [[116, 90, 1]]],  # not (w, h)
        [[[10, 13], [16, 30]], [[30, 61]], [[116, 90]]],  # ragged
        [[[10, -13]], [[30, 61]], [[116, 90]]],  # negative
    ],
)
def test_invalid_anchors(anchors: list) -> None:
    with pytest.raises(ValueError, match=r"Expected argument `anchors` to be 3 levels"):
        YOLOv3("tiny", num_classes=1, img_size=64, anchors=anchors)


def test_invalid_act() -> None:
    with pytest.raises(
        ValueError, match=r"Expected argument `act` to be one of \['leaky_relu', 'silu'\] but got 'relu'"
    ):
        YOLOv3("tiny", act="relu")  # type: ignore[arg-type]


def test_prediction_bias_priors() -> None:
    model = YOLOv3("tiny", num_classes=4, img_size=256)
    bias = model.head.preds[0].bias.view(3, 9)
    # initial objectness ≈ 8 objects spread over the 32 × 32 stride-8 cells
    assert torch.allclose(bias[:, 4].sigmoid(), torch.full((3,), 8 / 32**2), rtol=0.2)
    assert bias[:, 5:].mean() < -1


# ---------------------------------------------------------------------------------------------- decode
def test_decode_gives_valid_boxes_and_scores() -> None:
    model = YOLOv3("tiny", num_classes=3, img_size=64).eval()
    boxes, scores = model.decode(model(torch.rand(2, 3, 64, 64)))
    n = 3 * (8 * 8 + 4 * 4 + 2 * 2)
    assert boxes.shape == (2, n, 4) and scores.shape == (2, n, 3)
    assert (boxes[..., 2:] > boxes[..., :2]).all()
    assert ((scores >= 0) & (scores <= 1)).all()


def test_decode_hand_made_raw() -> None:
    model = YOLOv3("tiny", num_classes=2, img_size=64)
    raw = [torch.zeros(1, 21, 8, 8), torch.zeros(1, 21, 4, 4), torch.zeros(1, 21, 2, 2)]
    a, gy, gx = 2, 1, 3  # stride 16, third anchor, cell (row 1, column 3)
    raw[1][0, a * 7 + 0, gy, gx] = math.log(3)  # σ = 0.75: centre 1 cell past the corner → x = (3 + 1) · 16
    raw[1][0, a * 7 + 1, gy, gx] = math.log(1 / 3)  # σ = 0.25: y = (1 + 0) · 16
    raw[1][0, a * 7 + 3, gy, gx] = math.log(3)  # h = (2 · 0.75)² · anchor_h; tw = 0 → w = anchor_w
    raw[1][0, a * 7 + 4, gy, gx] = 10.0
    raw[1][0, a * 7 + 6, gy, gx] = 10.0
    boxes, scores = model.decode(raw)
    idx = 3 * 64 + (a * 4 + gy) * 4 + gx
    aw, ah = model.anchors[1, a].tolist()
    expected = torch.tensor([64 - aw / 2, 16 - 2.25 * ah / 2, 64 + aw / 2, 16 + 2.25 * ah / 2])
    torch.testing.assert_close(boxes[0, idx], expected)
    assert scores[0].amax(0)[1] == scores[0, idx, 1] > 0.99
    assert scores[0, idx, 0] == pytest.approx(0.5, abs=1e-3)


def _inverse_raw(model: YOLOv3, images: torch.Tensor, targets: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Raw output whose every positive (as assigned by the loss) predicts its ground truth exactly."""
    raw = [r.detach().zero_() for r in model(images)]
    levels = model._levels(raw)  # views of raw
    grids = [(p.shape[2], p.shape[3]) for p in levels]
    for p, pos in zip(levels, model.build_targets(targets, grids)):
        t_xy = torch.logit((pos["box"][:, :2] + 0.5) / 2)
        t_wh = torch.logit((pos["box"][:, 2:] / pos["anchor_wh"]).sqrt() / 2)
        p[pos["img"], pos["anchor"], pos["gy"], pos["gx"], :4] = torch.cat([t_xy, t_wh], 1)
        p[pos["img"], pos["anchor"], pos["gy"], pos["gx"], 4] = 1.0
    return raw


def test_decode_inverts_the_loss_parameterization() -> None:
    model = YOLOv3("tiny", num_classes=2, img_size=128)
    gt = torch.tensor([[37.0, 20.0, 81.0, 77.0]])
    targets = [{"boxes": gt, "labels": torch.tensor([1])}]
    raw = _inverse_raw(model, torch.zeros(1, 3, 128, 128), targets)
    _, parts = model.compute_loss(raw, targets)
    assert parts["box"] < 1e-4  # CIoU loss of a perfect prediction
    boxes, _ = model.decode(raw)
    positives = torch.cat([r.view(1, 3, 7, *r.shape[2:])[:, :, 4].flatten(1) for r in raw], 1)[0] == 1.0
    assert positives.sum() >= 3
    torch.testing.assert_close(boxes[0, positives], gt.expand(int(positives.sum()), 4), atol=1e-3, rtol=0)


# ---------------------------------------------------------------------------------------------- anchor matching
def _reference_assignment(model: YOLOv3, targets: list[dict[str, torch.Tensor]], grids: list) -> Counter:
    """Loop-per-box reference of the YOLOv5 rule: ratio match per anchor, own cell + two nearest neighbours."""
    out: Counter = Counter()
    for img, t in enumerate(targets):
        for box, label in zip(t["boxes"].tolist(), t["labels"].tolist()):
            cx, cy, w, h = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, box[2] - box[0], box[3] - box[1]
            for level, (stride, (gh, gw)) in enumerate(zip(model.strides, grids)):
                for a, (aw, ah) in enumerate(model.anchors[level].tolist()):
                    if max(w / aw, aw / w, h / ah, ah / h) >= model.anchor_t:
                        continue
                    x, y = cx / stride, cy / stride
                    cells = {(int(y), int(x))}
                    if x % 1 < 0.5 and x > 1:
                        cells.add((int(y), int(x) - 1))
                    if y % 1 < 0.5 and y > 1:
                        cells.add((int(y) - 1, int(x)))
                    if (gw - x) % 1 < 0.5 and gw - x > 1:
                        cells.add((int(y), int(x) + 1))
                    if (gh - y) % 1 < 0.5 and gh - y > 1:
                        cells.add((int(y) + 1, int(x)))
                    out.update((img, level, a, cy_, cx_, label) for cy_, cx_ in cells)
    return out


def test_anchor_matching_known_box() -> None:
    model = YOLOv3("tiny", num_classes=3, img_size=128)
    targets = [{"boxes": torch.tensor([[48.0, 9.5, 96.0, 70.5]]), "labels": torch.tensor([2])}]  # 48 × 61 at (72, 40)
    assigned = model.build_targets(targets, [(16, 16), (8, 8), (4, 4)])
    matched = {(lv, a) for lv, pos in enumerate(assigned) for a in pos["anchor"].tolist()}
    # anchors at 128 px: stride 8 ≤ 10 × 7 px (ratio > 4), stride 16 only 18 × 37, stride 32 all three
    assert matched == {(1, 2), (2, 0), (2, 1), (2, 2)}
    level2 = assigned[2]
    cells = {
        (gy, gx) for gy, gx, a in zip(level2["gy"].tolist(), level2["gx"].tolist(), level2["anchor"].tolist()) if a == 1
    }
    assert cells == {(1, 2), (1, 1), (0, 2)}  # centre (2.25, 1.25) cells: own, left, up
    own = (level2["gy"] == 1) & (level2["gx"] == 2) & (level2["anchor"] == 1)
    torch.testing.assert_close(level2["box"][own], torch.tensor([[0.25, 0.25, 1.5, 61 / 32]]))
    assert (level2["label"] == 2).all()


def test_anchor_matching_matches_reference() -> None:
    model = YOLOv3("tiny", num_classes=4, img_size=128)
    g = torch.Generator().manual_seed(0)
    targets = []
    for n in (5, 0, 7):
        xy = torch.rand(n, 2, generator=g) * 100
        wh = torch.rand(n, 2, generator=g) * 60 + 2
        targets.append(
            {"boxes": torch.cat([xy, (xy + wh).clamp(max=128)], 1), "labels": torch.randint(4, (n,), generator=g)}
        )
    grids = [(16, 16), (8, 8), (4, 4)]
    assigned = model.build_targets(targets, grids)
    got = Counter(
        (img, lv, a, gy, gx, label)
        for lv, pos in enumerate(assigned)
        for img, a, gy, gx, label in zip(*(pos[k].tolist() for k in ("img", "anchor", "gy", "gx", "label")))
    )
    assert got == _reference_assignment(model, targets, grids)
    assert got.total() > 50


@pytest.mark.parametrize("counts", [(0, 0), (0, 1)])
def test_empty_targets_give_finite_loss(counts: tuple[int, int]) -> None:
    model = YOLOv3("tiny", num_classes=3, img_size=64)
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 40.0, 50.0]])[:n], "labels": torch.tensor([1])[:n]} for n in counts]
    loss, parts = model.compute_loss(model(torch.rand(2, 3, 64, 64)), targets)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert set(parts) == {"box", "obj", "cls"}
    if sum(counts) == 0:
        assert parts["box"] == 0 and parts["cls"] == 0


# ---------------------------------------------------------------------------------------------- training
def test_overfit_tiny_batch() -> None:
    torch.manual_seed(0)
    images, targets = _shapes(4, 96, seed=1)
    model = YOLOv3("tiny", num_classes=2, img_size=96)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(150):
        loss, _ = model.compute_loss(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 / 5
    # BN running statistics lag a model that changed this fast: recompute them exactly on the batch
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        model(images)
    model.eval()
    preds = model.postprocess(model(images))
    for pred, target in zip(preds, targets):
        top = pred["scores"].argmax()
        assert box_iou(pred["boxes"][top, None], target["boxes"])[0, 0] > 0.5
        assert pred["labels"][top] == target["labels"][0]


def test_trainer_fit_and_checkpoint_roundtrip(tmp_path) -> None:
    images, targets = _shapes(6, 64, seed=2)
    data = list(zip(images, targets))
    loader = DataLoader(data, batch_size=3, collate_fn=_collate)
    model = YOLOv3("tiny", num_classes=2, img_size=64)
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    before = [p.detach().clone() for p in model.parameters()]
    trainer.fit(model, loader, loader)
    assert trainer.global_step == 2
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert "val/mAP" in trainer.callback_metrics and "val/loss" in trainer.callback_metrics

    path = tmp_path / "yolov3.ckpt"
    trainer.save_checkpoint(path)
    loaded = YOLOv3.load_from_checkpoint(path)
    assert loaded.hparams.scale == "tiny" and loaded.num_classes == 2
    model.eval()
    loaded.eval()
    with torch.no_grad():
        for a, b in zip(model(images), loaded(images)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_torch_pruning_dependency_graph() -> None:
    tp = pytest.importorskip("torch_pruning")
    model = YOLOv3("tiny", num_classes=3, img_size=64)
    example = torch.rand(1, 3, 64, 64)
    shapes = [r.shape for r in model(example)]
    ignored = [model.get_submodule(name) for name in model.adapter.output_layers(model)]
    pruner = tp.pruner.MetaPruner(
        model, example, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.3, ignored_layers=ignored
    )
    before = count_parameters(model)
    pruner.step()
    assert count_parameters(model) < 0.75 * before
    assert model.backbone.stages[2][0].conv.out_channels < 32
    assert [r.shape for r in model(example)] == shapes
    loss, _ = model.train().compute_loss(
        model(torch.rand(2, 3, 64, 64)), [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    )
    loss.backward()
    assert torch.isfinite(loss)
