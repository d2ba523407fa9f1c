"""Distillation of YOLO detectors with feature-map NMS (FM-NMS).

Mehta & Ozturk, "Object detection at 200 Frames Per Second" (2018), https://arxiv.org/abs/1805.06361: a dense
detector's teacher predicts many candidates for one object (neighbouring cells, several anchors), so distilling
every class score teaches the student to fire everywhere. Two remedies:

1. **Feature-map NMS** (:func:`feature_map_nms`): each candidate's class is its teacher's argmax class; among the
   candidates of one class in a 3×3 neighbourhood of cells (all anchors of those cells), only those with the highest
   teacher objectness keep their class targets; the class targets of the others are set to 0.
2. **Objectness-scaled distillation**: the class and box terms of a candidate are weighted by the teacher's
   objectness ``ô_T``, so that the student learns boxes and classes from the teacher only where it sees an object.
   The objectness itself is distilled unscaled.

Per level, with the teacher detached: ``ô_T = σ(t.obj)`` (anchor-based heads) or ``max_c σ(t.cls_c)``
(anchor-free heads, no objectness); ``p_T = σ(t.cls)`` with the rows of FM-NMS-suppressed candidates set to 0.
With ``N`` the number of candidates (``Σ B·A·H·W`` over levels) and ``BCE`` the binary cross-entropy with logits::

    obj = Σ BCE(s.obj, σ(t.obj)) / N                               (levels with objectness only)
    cls = Σ_candidates ô_T · Σ_c BCE(s.cls_c, p_T,c) / N
    box = Σ_candidates ô_T · d / N
    total = λ_d · (obj + cls + box)

where ``d = Σ_4 (σ(s.box) − σ(t.box))²`` for ``K = 4`` box fields (YOLOv3/v5 offsets, all through a sigmoid),
and ``d = Σ_sides KL(softmax(t bins) ‖ softmax(s bins))`` for ``K = 4·R`` DFL logits (YOLOv8, ``R`` > 1).
The paper adds this term (``λ_d`` its weight) to the detector's own loss on the ground truth.

Example:
    >>> objectness = torch.tensor([0.9, 0.5, 0.8]).view(1, 1, 1, 3)
    >>> class_probs = torch.ones(1, 1, 1, 3, 1)
    >>> feature_map_nms(objectness, class_probs)
    tensor([[[[ True, False,  True]]]])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lightning_prune.adapters.base import HeadLevel
from lightning_prune.losses.hinton import _check_levels


def feature_map_nms(objectness: torch.Tensor, class_probs: torch.Tensor) -> torch.Tensor:
    """Which candidates survive feature-map NMS.

    A candidate's class is the argmax of its class scores. It is kept iff no candidate of the same class in its
    3×3 neighbourhood of cells (its own cell included, all anchors, the grid border clipping the neighbourhood) has
    a strictly higher objectness: candidates tied for the highest objectness are all kept.

    Args:
        objectness: (B, A, H, W) objectness in [0, 1].
        class_probs: (B, A, H, W, C) class scores (only their argmax matters).

    Returns:
        A (B, A, H, W) bool tensor, True where the candidate is kept.

    Raises:
        ValueError: if ``objectness`` is not 4-D or ``class_probs`` is not of shape (*objectness.shape, C).
    """
    if objectness.dim() != 4:
        raise ValueError(
            f"Expected argument `objectness` to be of shape (B, A, H, W) but got {tuple(objectness.shape)}."
        )
    if class_probs.dim() != 5 or class_probs.shape[:-1] != objectness.shape:
        raise ValueError(
            "Expected argument `class_probs` to be of shape (B, A, H, W, C) with (B, A, H, W) = "
            f"{tuple(objectness.shape)} but got {tuple(class_probs.shape)}."
        )
    labels = class_probs.contiguous().argmax(-1)  # (B, A, H, W); argmax over a strided last dim is ~10x slower
    classes = torch.arange(class_probs.shape[-1], device=labels.device).view(1, -1, 1, 1, 1)
    # (B, C, A, H, W): a candidate's objectness under its class, -inf under the others
    per_class = torch.where(labels.unsqueeze(1) == classes, objectness.unsqueeze(1), float("-inf"))
    best = F.max_pool2d(per_class.amax(2), kernel_size=3, stride=1, padding=1)  # (B, C, H, W), -inf padding
    return objectness >= best.gather(1, labels)


def fm_nms_loss(
    student_levels: Sequence[HeadLevel], teacher_levels: Sequence[HeadLevel], lambda_d: float = 1.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """FM-NMS distillation loss of a YOLO head (formulas in the module docstring).

    Args:
        student_levels: the student's head output, one :class:`~lightning_prune.adapters.base.HeadLevel` per level.
        teacher_levels: the teacher's, same number of levels and shapes (detached: no gradient reaches the teacher).
        lambda_d: weight ``λ_d`` >= 0 of the distillation loss.

    Returns:
        ``(total, parts)``: the scalar loss ``λ_d · (obj + cls + box)``, and the detached unweighted terms
        ``{"obj": ..., "cls": ..., "box": ...}`` (``obj`` is 0 when no level has objectness).

    Raises:
        ValueError: if ``lambda_d`` < 0, the levels differ in number or shapes, or a level's box width K is neither
            4 nor a multiple of 4.

    Example:
        >>> zeros = torch.zeros(1, 3, 2, 2, 6)
        >>> level = HeadLevel(box=zeros[..., :4], obj=zeros[..., 4], cls=zeros[..., 4:], stride=8)
        >>> total, parts = fm_nms_loss([level], [level])
        >>> {name: round(value.item(), 4) for name, value in parts.items()}
        {'obj': 0.6931, 'cls': 0.6931, 'box': 0.0}
    """
    _check_lambda(lambda_d)
    _check_levels(student_levels, teacher_levels)
    zero = student_levels[0].cls.new_zeros(())
    obj, cls, box, count = zero, zero, zero, 0
    for i, (student, teacher) in enumerate(zip(student_levels, teacher_levels)):
        k = student.box.shape[-1]
        if k == 0 or k % 4:
            raise ValueError(
                f"Expected the box width K of level {i} to be 4 or a multiple of 4 (4 sides × R DFL bins) but got {k}."
            )
        t_cls = torch.sigmoid(teacher.cls.detach())  # (B, A, H, W, C)
        if student.obj is not None and teacher.obj is not None:
            t_obj = torch.sigmoid(teacher.obj.detach())  # (B, A, H, W)
            obj = obj + F.binary_cross_entropy_with_logits(student.obj, t_obj, reduction="sum")
        else:
            t_obj = t_cls.amax(-1)
        targets = t_cls * feature_map_nms(t_obj, t_cls).unsqueeze(-1)
        cls = cls + (t_obj * F.binary_cross_entropy_with_logits(student.cls, targets, reduction="none").sum(-1)).sum()
        box = box + (t_obj * _box_distance(student.box, teacher.box.detach())).sum()
        count += t_obj.numel()
    obj, cls, box = obj / count, cls / count, box / count
    return lambda_d * (obj + cls + box), {"obj": obj.detach(), "cls": cls.detach(), "box": box.detach()}


class FMNMSLoss(nn.Module):
    """:func:`fm_nms_loss` with a fixed weight ``λ_d``.

    Args:
        lambda_d: weight ``λ_d`` >= 0 of the distillation loss.

    Raises:
        ValueError: if ``lambda_d`` < 0.
    """

    def __init__(self, lambda_d: float = 1.0) -> None:
        super().__init__()
        _check_lambda(lambda_d)
        self.lambda_d = lambda_d

    def forward(
        self, student_levels: Sequence[HeadLevel], teacher_levels: Sequence[HeadLevel]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return fm_nms_loss(student_levels, teacher_levels, self.lambda_d)

    def extra_repr(self) -> str:
        return f"lambda_d={self.lambda_d}"


def _box_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """(B, A, H, W, K) box outputs → (B, A, H, W) distance: squared error of the sigmoids (K = 4) or DFL KL."""
    if student.shape[-1] == 4:
        return (torch.sigmoid(student) - torch.sigmoid(teacher)).square().sum(-1)
    bins = student.shape[-1] // 4
    log_q = F.log_softmax(student.unflatten(-1, (4, bins)), dim=-1)  # (B, A, H, W, 4, R)
    log_p = F.log_softmax(teacher.unflatten(-1, (4, bins)), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum((-2, -1))


def _check_lambda(lambda_d: float) -> None:
    if isinstance(lambda_d, bool) or not isinstance(lambda_d, (int, float)) or not lambda_d >= 0:
        raise ValueError(f"Expected argument `lambda_d` to be a float >= 0 but got {lambda_d!r}.")
