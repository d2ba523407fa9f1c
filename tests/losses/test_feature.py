"""Feature imitation: fine-grained masks, imitation and CWD losses against loop references (and their plausible bugs),
hand-built masks, the 1×1 adapter and its rebuild, errors."""

from __future__ import annotations

import math
import re

import pytest
import torch

from lightning_prune.losses import CWDLoss, FeatureAdapter, ImitationLoss, cwd_loss, fine_grained_mask, imitation_loss
from lightning_prune.losses.feature import box_iou

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---------------------------------------------------------------------------------------------- references
def iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def reference_mask(boxes, size, stride, anchors, psi=0.5, offset=0.5, strict=True, per_box=True):
    """The paper's rule location by location; ``offset``/``strict``/``per_box`` switch on plausible bugs."""
    h, w = size
    out = torch.zeros(len(boxes), h, w, dtype=torch.bool)
    for i, image_boxes in enumerate(boxes):
        ious = []  # per box: {(y, x): [IoU per anchor]}
        for box in image_boxes.tolist():
            per_location = {}
            for y in range(h):
                for x in range(w):
                    cx, cy = (x + offset) * stride, (y + offset) * stride
                    per_location[y, x] = [
                        iou(box, [cx - aw / 2, cy - ah / 2, cx + aw / 2, cy + ah / 2]) for aw, ah in anchors.tolist()
                    ]
            ious.append(per_location)
        overall = max((max(v) for per_location in ious for v in per_location.values()), default=0.0)
        for per_location in ious:
            best = max(max(v) for v in per_location.values()) if per_box else overall
            for (y, x), values in per_location.items():
                if any((v > psi * best) if strict else (v >= psi * best) for v in values):
                    out[i, y, x] = True
    return out


def reference_imitation(student, teacher, mask, factor=2.0):
    total, count = 0.0, 0
    b, c, h, w = student.shape
    for n in range(b):
        for y in range(h):
            for x in range(w):
                if mask[n, y, x]:
                    count += 1
                    total += sum((student[n, k, y, x].item() - teacher[n, k, y, x].item()) ** 2 for k in range(c))
    return total / (factor * count) if count else 0.0


def reference_cwd(student, teacher, tau, reverse=False, over_channels=False, squared_tau=True):
    """Σ over images and channels of KL(softmax_HW(t/τ) ‖ softmax_HW(s/τ)), × τ², / (B · C); bugs switchable."""
    b, c, h, w = student.shape
    total = 0.0
    groups = (
        [[(n, k, y, x) for k in range(c)] for n in range(b) for y in range(h) for x in range(w)]
        if over_channels
        else [[(n, k, y, x) for y in range(h) for x in range(w)] for n in range(b) for k in range(c)]
    )
    for group in groups:
        t = [teacher[i].item() / tau for i in group]
        s = [student[i].item() / tau for i in group]
        zt, zs = sum(math.exp(v) for v in t), sum(math.exp(v) for v in s)
        p, q = [math.exp(v) / zt for v in t], [math.exp(v) / zs for v in s]
        if reverse:
            p, q = q, p
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    return total * (tau**2 if squared_tau else 1.0) / (b * c)


def random_boxes(g, n, extent=64.0):
    xy = torch.rand(n, 2, generator=g) * extent * 0.8
    wh = 2 + torch.rand(n, 2, generator=g) * extent * 0.5
    return torch.cat([xy, xy + wh], 1)


# ---------------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("anchor_free", [False, True])
def test_fine_grained_mask_matches_the_loop_reference(anchor_free):
    g = torch.Generator().manual_seed(0)
    anchors = None if anchor_free else torch.tensor([[6.0, 8.0], [14.0, 10.0], [30.0, 26.0]])
    reference_anchors = torch.tensor([[8.0 * 8, 8.0 * 8]]) if anchor_free else anchors
    boxes = [random_boxes(g, 3), random_boxes(g, 1), torch.zeros(0, 4)]
    mask = fine_grained_mask(boxes, size=(8, 8), stride=8, anchors=anchors)
    expected = reference_mask(boxes, (8, 8), 8, reference_anchors)
    assert mask.dtype == torch.bool and mask.shape == (3, 8, 8)
    assert torch.equal(mask, expected)
    assert mask[:2].any() and not mask[2].any()  # images with boxes have a mask, the empty one none
    # the inputs tell the rule apart from plausible bugs: cell corners instead of centres, one max for all boxes
    assert not torch.equal(mask, reference_mask(boxes, (8, 8), 8, reference_anchors, offset=0.0))
    assert not torch.equal(mask, reference_mask(boxes, (8, 8), 8, reference_anchors, per_box=False))
    if not anchor_free:  # ... or the first anchor only instead of the union over anchors
        assert not torch.equal(mask, reference_mask(boxes, (8, 8), 8, reference_anchors[:1]))


def test_fine_grained_mask_hand_built_cases():
    anchors = torch.tensor([[16.0, 16.0]])
    # a box on one cell's anchor: IoU 1 there, at most 1/3 next door → that cell only
    mask = fine_grained_mask([torch.tensor([[4.0, 4.0, 20.0, 20.0]])], (4, 4), 8, anchors)
    assert mask[0].nonzero().tolist() == [[1, 1]]
    # two boxes: the union of their masks; each keeps its own best cells although their IoUs differ
    two = torch.tensor([[4.0, 4.0, 20.0, 20.0], [16.0, 20.0, 24.0, 28.0]])
    union = fine_grained_mask([two], (4, 4), 8, anchors)[0]
    singles = [fine_grained_mask([b[None]], (4, 4), 8, anchors)[0] for b in two]
    assert torch.equal(union, singles[0] | singles[1]) and singles[1].sum() > 0
    # strictly greater: at ψ = 1/3 the neighbours (IoU exactly 1/3 · 1) stay out
    third = fine_grained_mask([torch.tensor([[4.0, 4.0, 20.0, 20.0]])], (4, 4), 8, anchors, psi=1 / 3)
    assert third[0].sum() == 1
    loose = fine_grained_mask([torch.tensor([[4.0, 4.0, 20.0, 20.0]])], (4, 4), 8, anchors, psi=0.3)
    assert loose[0].sum() == 5  # the cell and its 4 edge neighbours (IoU 1/3); diagonal ones have 1/7
    # a box outside the image overlaps no anchor: nothing, not everything
    assert not fine_grained_mask([torch.tensor([[500.0, 500.0, 510.0, 510.0]])], (4, 4), 8, anchors).any()
    # several anchors: a location counts if any of its anchors passes
    both = fine_grained_mask(
        [torch.tensor([[4.0, 4.0, 20.0, 20.0]])], (4, 4), 8, torch.tensor([[16.0, 16.0], [48.0, 48.0]])
    )
    assert both[0, 1, 1] and both[0].sum() == 1  # the large anchor's best IoU (1/9) is under 0.5 · 1


def test_virtual_anchor_covers_large_boxes_and_neighbourhoods_of_small_ones():
    # anchor-free, a box much larger than the anchor: kept are all locations whose anchor lies in the box, and
    # none whose centre lies outside it
    big = torch.tensor([[0.0, 0.0, 256.0, 256.0]])
    mask = fine_grained_mask([big], (40, 40), 8, anchor_scale=4.0)[0]  # 32 px anchors
    centres = (torch.arange(40) + 0.5) * 8
    anchor_inside = (centres >= 16) & (centres <= 240)
    centre_inside = centres < 256
    assert mask[anchor_inside[:, None] & anchor_inside[None, :]].all()
    assert not mask[~(centre_inside[:, None] & centre_inside[None, :])].any()
    assert not mask[0, 0] and mask[0, 5]  # a corner cell has a quarter of its anchor in, an edge cell half + 1/8
    # a box smaller than a cell still gets the cells around its centre
    small = fine_grained_mask([torch.tensor([[30.0, 30.0, 34.0, 34.0]])], (8, 8), 8)[0]
    assert small[3:5, 3:5].all() and small.sum() > 4


# ---------------------------------------------------------------------------------------------- losses
def test_imitation_loss_matches_the_loop_reference_and_its_empty_mask_has_a_graph():
    g = torch.Generator().manual_seed(1)
    student = torch.randn(2, 3, 4, 5, generator=g, requires_grad=True)
    teacher = torch.randn(2, 3, 4, 5, generator=g, requires_grad=True)
    mask = torch.rand(2, 4, 5, generator=g) > 0.6
    loss = imitation_loss(student, teacher, mask)
    assert loss.item() == pytest.approx(reference_imitation(student, teacher, mask), rel=1e-6)
    assert loss.item() != pytest.approx(reference_imitation(student, teacher, mask, factor=1.0), rel=1e-3)
    assert ImitationLoss()(student, teacher, mask).item() == pytest.approx(loss.item())
    loss.backward()
    assert teacher.grad is None and student.grad is not None  # the teacher is a constant
    outside = ~mask.unsqueeze(1).expand_as(student)
    assert (student.grad[outside] == 0).all() and (student.grad[~outside] != 0).all()
    # empty mask: 0, and backward still works (zero gradient)
    empty = imitation_loss(student, teacher, torch.zeros(2, 4, 5, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad
    student.grad = None
    empty.backward()
    assert torch.count_nonzero(student.grad) == 0


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_cwd_loss_matches_the_loop_reference(tau):
    g = torch.Generator().manual_seed(2)
    student = 2 * torch.randn(2, 3, 3, 4, generator=g)
    teacher = (2 * torch.randn(2, 3, 3, 4, generator=g)).requires_grad_()
    loss = cwd_loss(student.requires_grad_(), teacher, tau)
    expected = reference_cwd(student, teacher, tau)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert CWDLoss(tau)(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    for bug in ({"reverse": True}, {"over_channels": True}, *([{"squared_tau": False}] if tau != 1 else [])):
        assert expected != pytest.approx(reference_cwd(student, teacher, tau, **bug), rel=1e-3), bug
    loss.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    assert cwd_loss(teacher.detach(), teacher.detach(), tau).item() == pytest.approx(0.0, abs=1e-6)


def test_box_iou():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    b = torch.tensor([[1.0, 0.0, 3.0, 2.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0]])
    expected = [[iou(x, y) for y in b.tolist()] for x in a.tolist()]
    assert torch.allclose(box_iou(a, b), torch.tensor(expected))


# ---------------------------------------------------------------------------------------------- adapter
def test_feature_adapter_initialisation_and_rebuild():
    square = FeatureAdapter(3, 3)
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(square(x), x)  # identity: a copy of the teacher starts at zero loss
    wide = FeatureAdapter(3, 5, seed=1)
    assert wide.conv.weight.abs().max() < 1e-3 and torch.equal(wide.conv.bias, torch.zeros(5))
    assert torch.equal(wide.conv.weight, FeatureAdapter(3, 5, seed=1).conv.weight)  # same on every rank
    assert not torch.equal(wide.conv.weight, FeatureAdapter(3, 5, seed=2).conv.weight)
    with torch.no_grad():
        wide.conv.weight.copy_(torch.arange(15.0).view(5, 3, 1, 1))
        wide.conv.bias.fill_(7.0)
    old = wide.conv.weight
    wide.rebuild(2, kept=[2, 0])
    assert wide.conv.weight is not old and wide.conv.weight.requires_grad
    assert wide.student_channels == 2 and wide.teacher_channels == 5
    assert torch.equal(wide.conv.weight[:, :, 0, 0], old.detach()[:, [2, 0], 0, 0])
    y = torch.randn(1, 3, 2, 2)
    y[:, 1] = 0  # the pruned channel: the rebuilt adapter maps the survivors as the old one did
    assert torch.allclose(wide(y[:, [2, 0]]), torch.nn.functional.conv2d(y, old.detach(), wide.conv.bias))
    wide.rebuild(4)  # unknown survivors: fresh small weights, the bias stays
    assert wide.conv.weight.shape == (5, 4, 1, 1) and wide.conv.weight.abs().max() < 1e-3
    assert (wide.conv.bias == 7.0).all() and wide(torch.randn(1, 4, 2, 2)).shape == (1, 5, 2, 2)


# ---------------------------------------------------------------------------------------------- errors
def test_errors():
    box = [torch.tensor([[0.0, 0.0, 8.0, 8.0]])]
    f = torch.zeros(1, 2, 3, 3)
    cases = [
        (
            lambda: fine_grained_mask(box, (2, 2), 8, psi=1.0),
            "Expected argument `psi` to be a float in (0, 1) but got 1.0.",
        ),
        (lambda: fine_grained_mask(box, (2, 2), 0), "Expected argument `stride` to be a number > 0 but got 0."),
        (
            lambda: fine_grained_mask(box, (2, 2), 8, anchor_scale=-1.0),
            "Expected argument `anchor_scale` to be a number > 0 but got -1.0.",
        ),
        (
            lambda: fine_grained_mask([torch.zeros(4)], (2, 2), 8),
            "Expected `boxes[0]` to be an (N, 4) tensor of x1, y1, x2, y2 but got (4,).",
        ),
        (
            lambda: fine_grained_mask(box, (2, 2), 8, anchors=torch.tensor([[1.0, 0.0]])),
            "Expected argument `anchors` to be (A, 2) positive (w, h) but got [[1.0, 0.0]].",
        ),
        (
            lambda: imitation_loss(f, torch.zeros(1, 3, 3, 3), torch.ones(1, 3, 3)),
            "Expected `student_feat` and `teacher_feat` to be (B, C, H, W) tensors of the same shape but got "
            "(1, 2, 3, 3) and (1, 3, 3, 3).",
        ),
        (
            lambda: imitation_loss(f, f, torch.ones(3, 3)),
            "Expected argument `mask` to be of shape (B, H, W) = (1, 3, 3) but got (3, 3).",
        ),
        (lambda: cwd_loss(f, f, 0.0), "Expected argument `temperature` to be a float > 0 but got 0.0."),
        (lambda: CWDLoss(-1), "Expected argument `temperature` to be a float > 0 but got -1."),
        (lambda: cwd_loss(f[0], f[0]), "Expected `student_feat` and `teacher_feat` to be (B, C, H, W) tensors"),
        (lambda: FeatureAdapter(0, 3), "Expected argument `student_channels` to be a positive int but got 0."),
        (lambda: FeatureAdapter(2, 2.0), "Expected argument `teacher_channels` to be a positive int but got 2.0."),
        (
            lambda: FeatureAdapter(3, 3).rebuild(2, kept=[0, 3]),
            "Expected argument `kept` to hold 2 indices in [0, 3) but got [0, 3].",
        ),
        (lambda: FeatureAdapter(3, 3).rebuild(2, kept=[0]), "Expected argument `kept` to hold 2 indices in [0, 3)"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            call()
