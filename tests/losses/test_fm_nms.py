"""FM-NMS distillation: feature-map NMS on hand-built and random grids, the loss against a loop reference, errors."""

from __future__ import annotations

import math
import re

import pytest
import torch

from lightning_prune.adapters.base import HeadLevel
from lightning_prune.losses import FMNMSLoss, feature_map_nms, fm_nms_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---------------------------------------------------------------------------------------------- references
def reference_nms(objectness, class_probs):
    """Naive FM-NMS: a candidate is suppressed by any same-class candidate within one cell with higher objectness."""
    obj, probs = objectness.tolist(), class_probs.tolist()
    batch, anchors, height, width = objectness.shape
    labels = [
        [[[max(range(len(c)), key=c.__getitem__) for c in row] for row in anchor] for anchor in image]
        for image in probs
    ]
    keep = torch.ones(objectness.shape, dtype=torch.bool)
    for b in range(batch):
        for a in range(anchors):
            for y in range(height):
                for x in range(width):
                    for a2 in range(anchors):
                        for y2 in range(max(y - 1, 0), min(y + 2, height)):
                            for x2 in range(max(x - 1, 0), min(x + 2, width)):
                                same = labels[b][a2][y2][x2] == labels[b][a][y][x]
                                if same and obj[b][a2][y2][x2] > obj[b][a][y][x]:
                                    keep[b, a, y, x] = False
    return keep


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def bce(logit, target):
    return -(target * math.log(sigmoid(logit)) + (1 - target) * math.log(1 - sigmoid(logit)))


def softmax(values):
    norm = sum(math.exp(v) for v in values)
    return [math.exp(v) / norm for v in values]


def reference_loss(students, teachers, lambda_d):
    """The FM-NMS loss candidate by candidate, with Python floats."""
    obj_sum = cls_sum = box_sum = 0.0
    count = 0
    for s, t in zip(students, teachers):
        t_probs = torch.sigmoid(t.cls)
        t_obj = torch.sigmoid(t.obj) if t.obj is not None else t_probs.amax(-1)
        keep = reference_nms(t_obj, t_probs)
        batch, anchors, height, width, k = s.box.shape
        for b in range(batch):
            for a in range(anchors):
                for y in range(height):
                    for x in range(width):
                        count += 1
                        o = t_obj[b, a, y, x].item()
                        if s.obj is not None:
                            obj_sum += bce(s.obj[b, a, y, x].item(), sigmoid(t.obj[b, a, y, x].item()))
                        s_cls, t_cls = s.cls[b, a, y, x].tolist(), t.cls[b, a, y, x].tolist()
                        kept = bool(keep[b, a, y, x])
                        cls_sum += o * sum(bce(sc, sigmoid(tc) if kept else 0.0) for sc, tc in zip(s_cls, t_cls))
                        s_box, t_box = s.box[b, a, y, x].tolist(), t.box[b, a, y, x].tolist()
                        if k == 4:
                            d = sum((sigmoid(sb) - sigmoid(tb)) ** 2 for sb, tb in zip(s_box, t_box))
                        else:
                            bins, d = k // 4, 0.0
                            for side in range(4):
                                p = softmax(t_box[side * bins : (side + 1) * bins])
                                q = softmax(s_box[side * bins : (side + 1) * bins])
                                d += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
                        box_sum += o * d
    parts = {"obj": obj_sum / count, "cls": cls_sum / count, "box": box_sum / count}
    return lambda_d * sum(parts.values()), parts


# ---------------------------------------------------------------------------------------------- inputs
def grid(entries, size=(4, 4), anchors=1, classes=3):
    """A (1, A, H, W) objectness and one-hot class scores; unlisted candidates have objectness 0, class C - 1."""
    objectness = torch.zeros(1, anchors, *size)
    class_probs = torch.zeros(1, anchors, *size, classes)
    class_probs[..., classes - 1] = 1.0
    for (a, y, x), (obj, cls) in entries.items():
        objectness[0, a, y, x] = obj
        class_probs[0, a, y, x] = 0.0
        class_probs[0, a, y, x, cls] = 1.0
    return objectness, class_probs


def kept(entries, **kwargs):
    keep = feature_map_nms(*grid(entries, **kwargs))
    return [bool(keep[0, a, y, x]) for a, y, x in entries]


def random_levels(seed, anchor_free, requires_grad=False):
    """Two levels of random logits: anchor-based (A = 3, K = 4, objectness) or anchor-free (A = 1, K = 4·4, none)."""
    g = torch.Generator().manual_seed(seed)
    anchors, k = (1, 16) if anchor_free else (3, 4)
    levels = []
    for size in (4, 2):
        shape = (2, anchors, size, size)
        fields = {
            "box": 2 * torch.randn(*shape, k, generator=g),
            "obj": None if anchor_free else 2 * torch.randn(*shape, generator=g),
            "cls": 2 * torch.randn(*shape, 3, generator=g),
        }
        for value in fields.values():
            if value is not None:
                value.requires_grad_(requires_grad)
        levels.append(HeadLevel(stride=32 // size, **fields))
    return levels


# ---------------------------------------------------------------------------------------------- feature-map NMS
def test_adjacent_candidates_of_one_class_keep_the_highest():
    assert kept({(0, 1, 1): (0.9, 0), (0, 1, 2): (0.5, 0)}) == [True, False]
    assert kept({(0, 1, 1): (0.4, 0), (0, 2, 2): (0.6, 0)}) == [False, True]  # diagonal neighbours


def test_candidates_two_cells_apart_are_both_kept():
    assert kept({(0, 1, 0): (0.9, 0), (0, 1, 2): (0.5, 0)}) == [True, True]
    assert kept({(0, 0, 0): (0.9, 1), (0, 2, 2): (0.5, 1)}) == [True, True]
    # suppression does not chain: the middle one goes, the far one stays
    assert kept({(0, 1, 0): (0.9, 0), (0, 1, 1): (0.5, 0), (0, 1, 2): (0.8, 0)}) == [True, False, True]


def test_adjacent_candidates_of_different_classes_are_both_kept():
    assert kept({(0, 1, 1): (0.9, 0), (0, 1, 2): (0.5, 1)}) == [True, True]


def test_anchors_of_one_cell_compete_within_a_class():
    entries = {(0, 1, 1): (0.3, 0), (1, 1, 1): (0.8, 0), (2, 1, 1): (0.2, 1)}
    assert kept(entries, anchors=3) == [False, True, True]
    # and with the anchors of neighbouring cells
    assert kept({(0, 1, 1): (0.8, 0), (2, 2, 1): (0.7, 0)}, anchors=3) == [True, False]


def test_the_grid_border_clips_the_neighbourhood():
    entries = {(0, 0, 0): (0.5, 0), (0, 1, 1): (0.9, 0), (0, 0, 3): (0.3, 0), (0, 3, 3): (0.2, 1)}
    # the corner loses to its diagonal neighbour; the other edge is not a neighbour (no wrap-around)
    assert kept(entries) == [False, True, True, True]
    assert kept({(0, 0, 0): (0.5, 0), (0, 0, 3): (0.9, 0), (0, 3, 0): (0.9, 0)}) == [True, True, True]


def test_ties_are_all_kept():
    assert kept({(0, 1, 1): (0.7, 0), (0, 1, 2): (0.7, 0), (0, 2, 2): (0.5, 0)}) == [True, True, False]


@pytest.mark.parametrize("seed", range(4))
def test_nms_matches_the_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    objectness = torch.rand(2, 3, 5, 5, generator=g)
    if seed % 2:
        objectness = torch.randint(0, 4, (2, 3, 5, 5), generator=g) / 4  # many ties
    class_probs = torch.rand(2, 3, 5, 5, 3, generator=g)
    keep = feature_map_nms(objectness, class_probs)
    assert keep.dtype == torch.bool
    assert torch.equal(keep, reference_nms(objectness, class_probs))
    assert 0 < keep.sum() < keep.numel()


# ---------------------------------------------------------------------------------------------- loss
@pytest.mark.parametrize("anchor_free", [False, True])
def test_loss_matches_the_loop_reference(anchor_free):
    students, teachers = random_levels(0, anchor_free), random_levels(1, anchor_free)
    total, parts = fm_nms_loss(students, teachers, lambda_d=0.5)
    expected_total, expected_parts = reference_loss(students, teachers, lambda_d=0.5)
    assert total.item() == pytest.approx(expected_total, rel=1e-5)
    assert {name: value.item() for name, value in parts.items()} == pytest.approx(expected_parts, rel=1e-5)
    if anchor_free:
        assert parts["obj"] == 0
    module_total, _ = FMNMSLoss(lambda_d=0.5)(students, teachers)
    torch.testing.assert_close(module_total, total)


@pytest.mark.parametrize("anchor_free", [False, True])
def test_gradients_reach_the_student_only(anchor_free):
    students = random_levels(2, anchor_free, requires_grad=True)
    teachers = random_levels(3, anchor_free, requires_grad=True)
    total, parts = fm_nms_loss(students, teachers)
    assert total.requires_grad and not any(value.requires_grad for value in parts.values())
    total.backward()
    for student, teacher in zip(students, teachers):
        for field in ("box", "obj", "cls"):
            s, t = getattr(student, field), getattr(teacher, field)
            if s is not None:
                assert s.grad is not None and s.grad.abs().sum() > 0
                assert t.grad is None


@pytest.mark.parametrize("anchor_free", [False, True])
def test_obj_and_box_gradients_vanish_when_student_equals_teacher(anchor_free):
    teachers = random_levels(4, anchor_free)
    students = [
        HeadLevel(
            box=t.box.clone().requires_grad_(True),
            obj=None if t.obj is None else t.obj.clone().requires_grad_(True),
            cls=t.cls.clone().requires_grad_(True),
            stride=t.stride,
        )
        for t in teachers
    ]
    total, parts = fm_nms_loss(students, teachers)
    total.backward()
    assert parts["box"] == pytest.approx(0.0, abs=1e-6)
    for student in students:
        torch.testing.assert_close(student.box.grad, torch.zeros_like(student.box), atol=1e-7, rtol=0)
        if student.obj is not None:
            torch.testing.assert_close(student.obj.grad, torch.zeros_like(student.obj), atol=1e-7, rtol=0)
    # the class targets of suppressed candidates are 0, so the class term still pulls the student there
    assert students[0].cls.grad.abs().sum() > 0


def test_lambda_d_scales_the_total_only():
    students, teachers = random_levels(5, False), random_levels(6, False)
    total, parts = fm_nms_loss(students, teachers, lambda_d=2.0)
    unit, unit_parts = fm_nms_loss(students, teachers, lambda_d=1.0)
    torch.testing.assert_close(total, 2 * unit)
    torch.testing.assert_close(parts, unit_parts)
    zero, _ = fm_nms_loss(students, teachers, lambda_d=0)
    assert zero.item() == 0


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("lambda_d", [-0.5, float("nan"), "1"])
def test_lambda_d_must_be_non_negative(lambda_d):
    match = re.escape(f"Expected argument `lambda_d` to be a float >= 0 but got {lambda_d!r}.")
    levels = random_levels(0, False)
    with pytest.raises(ValueError, match=match):
        fm_nms_loss(levels, levels, lambda_d=lambda_d)
    with pytest.raises(ValueError, match=match):
        FMNMSLoss(lambda_d=lambda_d)


def test_levels_must_match():
    based, free = random_levels(0, False), random_levels(0, True)
    match = "Expected `student_levels` and `teacher_levels` to have the same number of levels but got 2 and 1."
    with pytest.raises(ValueError, match=match):
        fm_nms_loss(based, based[:1])
    match = r"Expected student and teacher `box` of level 0 to have the same shape but got \(2, 3, 4, 4, 4\) and "
    with pytest.raises(ValueError, match=match + r"\(2, 1, 4, 4, 16\)."):
        fm_nms_loss(based, free)


def test_box_width_must_be_four_or_a_multiple_of_four():
    levels = random_levels(0, True)
    odd = [HeadLevel(box=lvl.box[..., :6], obj=lvl.obj, cls=lvl.cls, stride=lvl.stride) for lvl in levels]
    match = r"Expected the box width K of level 0 to be 4 or a multiple of 4 \(4 sides × R DFL bins\) but got 6."
    with pytest.raises(ValueError, match=match):
        fm_nms_loss(odd, odd)
    # anchor-free with K = 4 is allowed: squared error of the sigmoids
    four = [HeadLevel(box=lvl.box[..., :4], obj=None, cls=lvl.cls, stride=lvl.stride) for lvl in levels]
    assert fm_nms_loss(four, four)[1]["box"].item() == 0


def test_nms_shapes():
    match = r"Expected argument `objectness` to be of shape \(B, A, H, W\) but got \(3, 4\)."
    with pytest.raises(ValueError, match=match):
        feature_map_nms(torch.zeros(3, 4), torch.zeros(3, 4, 2))
    match = (
        r"Expected argument `class_probs` to be of shape \(B, A, H, W, C\) with \(B, A, H, W\) = \(1, 1, 2, 2\) "
        r"but got \(1, 1, 2, 3, 2\)."
    )
    with pytest.raises(ValueError, match=match):
        feature_map_nms(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 3, 2))
