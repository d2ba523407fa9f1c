"""Knowledge distillation with temperature-softened targets (Hinton loss).

Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015), https://arxiv.org/abs/1503.02531:
the student matches the teacher's output distribution softened by a temperature ``T``. With student logits ``s``
and teacher logits ``t`` (the teacher is a constant: its logits are detached):

- ``softmax`` (one distribution along ``dim``): ``p = softmax(t / T)``, ``q = softmax(s / T)``,
  ``L = T² · mean_other Σ_dim p · (log p − log q)``, i.e. KL(p ‖ q) summed along ``dim`` and averaged over the
  other elements;
- ``sigmoid`` (independent binary scores, as YOLO class scores): ``p = σ(t / T)``, ``q = σ(s / T)`` per element,
  ``L = T² · mean [p · log(p / q) + (1 − p) · log((1 − p) / (1 − q))]``, the KL between Bernoulli(p) and
  Bernoulli(q), averaged over all elements.

The gradient of the softened KL with respect to ``s`` is ``(q − p) / T``, so the factor ``T²`` keeps its magnitude
roughly independent of ``T`` (Hinton et al., section 2). :func:`hinton_detection_loss` applies the sigmoid form to
the class logits (and the objectness logits, when the head has them) of every feature level of a YOLO head.

Example:
    >>> t = torch.tensor([[2.0, 0.0, -1.0]])
    >>> hinton_loss(t, t)
    tensor(0.)
    >>> round(hinton_loss(torch.zeros(1, 3), t, temperature=1.0).item(), 4)
    0.5743
    >>> round(hinton_loss(torch.zeros(1, 3), t, temperature=1.0, activation="sigmoid").item(), 4)
    0.1463
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightning_prune.adapters.base import HeadLevel

ACTIVATIONS = ("softmax", "sigmoid")


def hinton_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 4.0,
    activation: Literal["softmax", "sigmoid"] = "softmax",
    dim: int = -1,
) -> torch.Tensor:
    """Hinton distillation loss between student and teacher logits (formulas in the module docstring).

    Args:
        student_logits: logits of the student, any shape.
        teacher_logits: logits of the teacher, same shape (detached: no gradient reaches the teacher).
        temperature: softening temperature ``T`` > 0.
        activation: ``"softmax"`` (one distribution along ``dim``) or ``"sigmoid"`` (independent binary scores).
        dim: the class dimension for ``"softmax"`` (ignored for ``"sigmoid"``).

    Returns:
        A scalar tensor.

    Raises:
        ValueError: if ``temperature`` is not > 0, ``activation`` is unknown or the shapes differ.
    """
    _check_temperature(temperature)
    if activation not in ACTIVATIONS:
        raise ValueError(f"Expected argument `activation` to be one of {list(ACTIVATIONS)} but got {activation!r}.")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "Expected `student_logits` and `teacher_logits` to have the same shape but got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}."
        )
    s, t = student_logits / temperature, teacher_logits.detach() / temperature
    if activation == "softmax":
        log_p, log_q = F.log_softmax(t, dim=dim), F.log_softmax(s, dim=dim)
        kl = (log_p.exp() * (log_p - log_q)).sum(dim)
    else:
        kl = _binary_kl(s, t)
    return kl.mean() * temperature**2


def hinton_detection_loss(
    student_levels: Sequence[HeadLevel], teacher_levels: Sequence[HeadLevel], temperature: float = 4.0
) -> torch.Tensor:
    """Sigmoid Hinton loss on the class (and objectness) logits of every feature level of a detector head.

    All class logits of all levels, and the objectness logits of the levels that have them, are pooled into one
    set of binary scores: the loss is ``T²`` times the mean binary KL over that set (a level counts in proportion
    to its number of scores). Box regression is not distilled.

    Args:
        student_levels: the student's head output, one :class:`~lightning_prune.adapters.base.HeadLevel` per level.
        teacher_levels: the teacher's, same number of levels and shapes (detached).
        temperature: softening temperature ``T`` > 0.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: if ``temperature`` is not > 0, or the levels differ in number or shapes.

    Example:
        >>> level = HeadLevel(box=torch.zeros(1, 1, 2, 2, 4), obj=None, cls=torch.zeros(1, 1, 2, 2, 3), stride=8)
        >>> hinton_detection_loss([level], [level])
        tensor(0.)
    """
    _check_temperature(temperature)
    _check_levels(student_levels, teacher_levels)
    total, count = student_levels[0].cls.new_zeros(()), 0
    for student, teacher in zip(student_levels, teacher_levels):
        pairs = [(student.cls, teacher.cls)]
        if student.obj is not None and teacher.obj is not None:
            pairs.append((student.obj, teacher.obj))
        for s, t in pairs:
            total = total + _binary_kl(s / temperature, t.detach() / temperature).sum()
            count += s.numel()
    return total / count * temperature**2


class HintonLoss(nn.Module):
    """:func:`hinton_loss` with a fixed temperature and activation.

    Args:
        temperature: softening temperature ``T`` > 0.
        activation: ``"softmax"`` or ``"sigmoid"``.
        dim: the class dimension for ``"softmax"``.

    Raises:
        ValueError: if ``temperature`` is not > 0 or ``activation`` is unknown.

    Example:
        >>> loss = HintonLoss(temperature=2.0, activation="sigmoid")
        >>> loss(torch.zeros(2, 3), torch.zeros(2, 3))
        tensor(0.)
    """

    def __init__(
        self, temperature: float = 4.0, activation: Literal["softmax", "sigmoid"] = "softmax", dim: int = -1
    ) -> None:
        super().__init__()
        _check_temperature(temperature)
        if activation not in ACTIVATIONS:
            raise ValueError(f"Expected argument `activation` to be one of {list(ACTIVATIONS)} but got {activation!r}.")
        self.temperature, self.activation, self.dim = temperature, activation, dim

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return hinton_loss(student_logits, teacher_logits, self.temperature, self.activation, self.dim)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, activation={self.activation!r}, dim={self.dim}"


def _binary_kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(Bernoulli(σ(t)) ‖ Bernoulli(σ(s))) as cross-entropy minus entropy.

    Both terms are stable for large logits, and the gradient ``σ(s) − σ(t)`` is exactly 0 where ``s == t``.
    """
    p = torch.sigmoid(t)
    return F.binary_cross_entropy_with_logits(s, p, reduction="none") - F.binary_cross_entropy_with_logits(
        t, p, reduction="none"
    )


def _check_temperature(temperature: float) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"Expected argument `temperature` to be a float > 0 but got {temperature!r}.")


def _check_levels(student_levels: Sequence[HeadLevel], teacher_levels: Sequence[HeadLevel]) -> None:
    """Student and teacher head outputs must have the same levels with the same shapes (shared by the losses)."""
    if len(student_levels) != len(teacher_levels):
        raise ValueError(
            "Expected `student_levels` and `teacher_levels` to have the same number of levels but got "
            f"{len(student_levels)} and {len(teacher_levels)}."
        )
    if not student_levels:
        raise ValueError("Expected argument `student_levels` to hold at least one level but got 0.")
    for i, (student, teacher) in enumerate(zip(student_levels, teacher_levels)):
        for field in ("box", "obj", "cls"):
            s, t = getattr(student, field), getattr(teacher, field)
            s_shape = None if s is None else tuple(s.shape)
            t_shape = None if t is None else tuple(t.shape)
            if s_shape != t_shape:
                raise ValueError(
                    f"Expected student and teacher `{field}` of level {i} to have the same shape but got "
                    f"{s_shape} and {t_shape}."
                )
