"""Hinton distillation loss: softmax and sigmoid forms against explicit formulas, the detection variant, errors."""

from __future__ import annotations

import math
import re

import pytest
import torch

from lightning_prune.adapters.base import HeadLevel
from lightning_prune.losses import HintonLoss, hinton_detection_loss, hinton_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def reference_softmax(student, teacher, temperature):
    """KL(softmax(t/T) ‖ softmax(s/T)) over the last dim of 2-D lists, mean over rows, times T²."""
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        s_norm = sum(math.exp(v / temperature) for v in s_row)
        t_norm = sum(math.exp(v / temperature) for v in t_row)
        for s, t in zip(s_row, t_row):
            p, q = math.exp(t / temperature) / t_norm, math.exp(s / temperature) / s_norm
            total += p * math.log(p / q)
    return total / len(student) * temperature**2


def reference_sigmoid(student, teacher, temperature):
    """Bernoulli KL per element of flat lists, mean, times T²."""
    total, values = 0.0, list(zip(student.flatten().tolist(), teacher.flatten().tolist()))
    for s, t in values:
        p, q = 1 / (1 + math.exp(-t / temperature)), 1 / (1 + math.exp(-s / temperature))
        total += p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    return total / len(values) * temperature**2


def level(generator, anchors=3, size=3, classes=2, obj=True):
    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    return HeadLevel(
        box=randn(2, anchors, size, size, 4),
        obj=randn(2, anchors, size, size) if obj else None,
        cls=randn(2, anchors, size, size, classes),
        stride=8,
    )


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_softmax_matches_reference(temperature):
    g = torch.Generator().manual_seed(0)
    student, teacher = 3 * torch.randn(4, 5, generator=g), 3 * torch.randn(4, 5, generator=g)
    expected = reference_softmax(student, teacher, temperature)
    assert hinton_loss(student, teacher, temperature).item() == pytest.approx(expected, rel=1e-5)
    # the class dimension can be any dimension
    transposed = hinton_loss(student.T, teacher.T, temperature, dim=0)
    assert transposed.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_sigmoid_matches_reference(temperature):
    g = torch.Generator().manual_seed(1)
    student, teacher = 3 * torch.randn(2, 3, 4, generator=g), 3 * torch.randn(2, 3, 4, generator=g)
    expected = reference_sigmoid(student, teacher, temperature)
    actual = hinton_loss(student, teacher, temperature, activation="sigmoid")
    assert actual.item() == pytest.approx(expected, rel=1e-5)
    module = HintonLoss(temperature, activation="sigmoid")
    assert module(student, teacher).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_zero_loss_and_gradient_when_student_equals_teacher(activation):
    teacher = torch.randn(3, 6, generator=torch.Generator().manual_seed(2))
    student = teacher.clone().requires_grad_(True)
    loss = hinton_loss(student, teacher, temperature=2.0, activation=activation)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(student.grad, torch.zeros_like(student), atol=1e-7, rtol=0)


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_temperature_squared_scaling(activation):
    """With the logits scaled by T, the softened distributions are those of T = 1: the loss is T² times larger."""
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    base = hinton_loss(student, teacher, temperature=1.0, activation=activation)
    scaled = hinton_loss(3 * student, 3 * teacher, temperature=3.0, activation=activation)
    torch.testing.assert_close(scaled, 9 * base)


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_gradients_reach_the_student_only(activation):
    g = torch.Generator().manual_seed(4)
    student = torch.randn(3, 4, generator=g).requires_grad_(True)
    teacher = torch.randn(3, 4, generator=g).requires_grad_(True)
    hinton_loss(student, teacher, activation=activation).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_detection_loss_is_one_mean_over_all_scores():
    g = torch.Generator().manual_seed(5)
    # two levels of different sizes (the second weighs more), the first with objectness, the second without
    students = [level(g, size=2), level(g, anchors=1, size=4, obj=False)]
    teachers = [level(g, size=2), level(g, anchors=1, size=4, obj=False)]
    for lvl in students:
        lvl.cls.requires_grad_(True)
    for lvl in teachers:
        lvl.cls.requires_grad_(True)
    scores = [(s.cls, t.cls) for s, t in zip(students, teachers)] + [(students[0].obj, teachers[0].obj)]
    flat_s = torch.cat([s.detach().flatten() for s, _ in scores])
    flat_t = torch.cat([t.detach().flatten() for _, t in scores])
    loss = hinton_detection_loss(students, teachers, temperature=2.0)
    assert loss.item() == pytest.approx(reference_sigmoid(flat_s, flat_t, 2.0), rel=1e-5)
    loss.backward()
    assert all(s.cls.grad is not None for s in students)
    assert all(t.cls.grad is None for t in teachers)


def test_detection_loss_is_zero_for_identical_heads():
    lvl = level(torch.Generator().manual_seed(6))
    torch.testing.assert_close(hinton_detection_loss([lvl], [lvl]), torch.tensor(0.0), atol=1e-6, rtol=0)


@pytest.mark.parametrize("temperature", [0, -1.0, "4"])
def test_temperature_must_be_positive(temperature):
    match = re.escape(f"Expected argument `temperature` to be a float > 0 but got {temperature!r}.")
    with pytest.raises(ValueError, match=match):
        hinton_loss(torch.zeros(2), torch.zeros(2), temperature=temperature)
    with pytest.raises(ValueError, match=match):
        HintonLoss(temperature=temperature)
    lvl = level(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=match):
        hinton_detection_loss([lvl], [lvl], temperature=temperature)


def test_unknown_activation():
    match = r"Expected argument `activation` to be one of \['softmax', 'sigmoid'\] but got 'relu'."
    with pytest.raises(ValueError, match=match):
        hinton_loss(torch.zeros(2), torch.zeros(2), activation="relu")
    with pytest.raises(ValueError, match=match):
        HintonLoss(activation="relu")


def test_shapes_must_match():
    match = r"Expected `student_logits` and `teacher_logits` to have the same shape but got \(2, 3\) and \(2, 4\)."
    with pytest.raises(ValueError, match=match):
        hinton_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_detection_levels_must_match():
    g = torch.Generator().manual_seed(7)
    a, b = level(g), level(g, classes=3)
    match = "Expected `student_levels` and `teacher_levels` to have the same number of levels but got 2 and 1."
    with pytest.raises(ValueError, match=match):
        hinton_detection_loss([a, a], [a])
    with pytest.raises(ValueError, match=r"Expected argument `student_levels` to hold at least one level but got 0\."):
        hinton_detection_loss([], [])
    match = r"Expected student and teacher `cls` of level 1 to have the same shape but got \(2, 3, 3, 3, 2\) and "
    with pytest.raises(ValueError, match=match + r"\(2, 3, 3, 3, 3\)."):
        hinton_detection_loss([a, a], [a, b])
    no_obj = level(g, obj=False)
    match = r"Expected student and teacher `obj` of level 0 to have the same shape but got \(2, 3, 3, 3\) and None."
    with pytest.raises(ValueError, match=match):
        hinton_detection_loss([a], [no_obj])
