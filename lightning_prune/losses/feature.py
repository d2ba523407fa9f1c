"""Feature imitation for detectors: fine-grained masks, masked L2 imitation, channel-wise distillation, 1×1 adapters.

The student's feature map ``s`` (B, C_s, H, W) of a chosen layer is mapped to the teacher's width by a 1×1
:class:`FeatureAdapter` and compared with the teacher's ``t`` (B, C_t, H, W) of the layer at the same stride:

- **Fine-grained feature imitation** (Wang et al., "Distilling Object Detectors with Fine-grained Feature Imitation",
  CVPR 2019, https://arxiv.org/abs/1906.03609): only the locations near objects are imitated, where the detector's
  knowledge of objects lives. :func:`fine_grained_mask` marks, for each ground-truth box, the locations with an anchor
  whose IoU with the box exceeds ``ψ · max IoU`` of that box, and :func:`imitation_loss` is the squared error there,
  ``Σ_ijc I_ij (a(s)_cij − t_cij)² / (2 N_p)`` with ``N_p = Σ_ij I_ij`` (batch included, as the paper's code).
- **Channel-wise distillation** (Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021,
  https://arxiv.org/abs/2011.13256): each channel is a distribution over the H·W locations,
  ``softmax(t_c / τ)``; :func:`cwd_loss` is ``τ² · Σ_c KL(softmax(t_c / τ) ‖ softmax(a(s)_c / τ)) / (B · C)``, as in the
  paper's code: the student learns where each teacher channel fires most, not its raw values.

Both losses treat the teacher as a constant (its features are detached).

Example:
    >>> box = torch.tensor([[4.0, 4.0, 28.0, 20.0]])  # 24 × 16 px, centred between two cells of stride 8
    >>> mask = fine_grained_mask([box], size=(4, 4), stride=8, anchors=torch.tensor([[16.0, 16.0]]))
    >>> mask[0].int()  # IoU 2/3 at the two cells, 1/4 at their neighbours: under 0.5 · 2/3
    tensor([[0, 0, 0, 0],
            [0, 1, 1, 0],
            [0, 0, 0, 0],
            [0, 0, 0, 0]], dtype=torch.int32)
    >>> t = torch.randn(2, 8, 4, 4)
    >>> imitation_loss(t, t, mask.expand(2, 4, 4)).item(), cwd_loss(t, t).item()
    (0.0, 0.0)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: side of the virtual square anchor of an anchor-free head, in strides (ATSS's one 8S anchor per location)
VIRTUAL_ANCHOR_SCALE = 8.0


def fine_grained_mask(
    boxes: Sequence[torch.Tensor],
    size: tuple[int, int],
    stride: float,
    anchors: torch.Tensor | None = None,
    psi: float = 0.5,
    anchor_scale: float = VIRTUAL_ANCHOR_SCALE,
) -> torch.Tensor:
    """The fine-grained imitation mask of one feature level (Wang et al. 2019).

    The level has an ``H × W`` grid of ``stride`` input pixels; the anchors of location ``(y, x)`` are centred on
    ``((x + 0.5) · stride, (y + 0.5) · stride)``, as YOLO decodes a zero offset. For each ground-truth box, the IoU
    with every anchor of every location is computed; a location is kept if one of its anchors has an IoU strictly
    greater than ``psi`` times the box's largest IoU; the mask is the union over the boxes of an image (a box that
    overlaps no anchor keeps nothing).

    Anchor-free heads (YOLOv8, FCOS) have no anchors: ``anchors=None`` tiles one square *virtual* anchor of side
    ``anchor_scale · stride`` per location, as ATSS (Zhang et al. 2020, https://arxiv.org/abs/1912.02424) does to
    compare an anchor-free detector with an anchor-based one on equal terms (8 strides, the scale of its one anchor).
    The paper's rule then carries over unchanged: for a box much larger than the anchor, every anchor inside the box
    has the maximal IoU and a location is kept when more than half of its anchor lies in the box (about the locations
    whose centre is in it, the candidates of anchor-free assigners); a small box keeps the neighbourhood of its centre,
    where the IoU falls off with the distance (the plain "centre in the box" rule would keep nothing for a box that
    falls between cell centres).

    Args:
        boxes: per image, the (N_i, 4) ground-truth boxes ``x1, y1, x2, y2`` in input pixels (N_i may be 0).
        size: ``(H, W)`` of the feature map.
        stride: input pixels per feature cell, > 0.
        anchors: (A, 2) anchor ``(w, h)`` in input pixels of this level, or ``None`` for one virtual square anchor.
        psi: the threshold factor ψ in (0, 1) (0.5 in the paper; at 1 the strict comparison would keep nothing).
        anchor_scale: side of the virtual anchor in strides, > 0 (used only without ``anchors``).

    Returns:
        A (B, H, W) bool tensor on the device of ``anchors`` (else of the first non-empty ``boxes``), B = len(boxes).

    Raises:
        ValueError: ``psi``, ``stride``, ``anchor_scale`` out of range, ``anchors`` not (A, 2) positive sizes, or a
            ``boxes`` entry not of shape (N, 4).

    Example:
        >>> box = torch.tensor([[0.0, 0.0, 64.0, 64.0]])  # the whole 64 × 64 image, anchor-free level of stride 16
        >>> fine_grained_mask([box], size=(4, 4), stride=16, anchor_scale=1.0).all().item()
        True
    """
    if isinstance(psi, bool) or not isinstance(psi, (int, float)) or not 0 < psi < 1:
        raise ValueError(f"Expected argument `psi` to be a float in (0, 1) but got {psi!r}.")
    if isinstance(stride, bool) or not isinstance(stride, (int, float)) or not stride > 0:
        raise ValueError(f"Expected argument `stride` to be a number > 0 but got {stride!r}.")
    if isinstance(anchor_scale, bool) or not isinstance(anchor_scale, (int, float)) or not anchor_scale > 0:
        raise ValueError(f"Expected argument `anchor_scale` to be a number > 0 but got {anchor_scale!r}.")
    for i, b in enumerate(boxes):
        if not isinstance(b, torch.Tensor) or b.ndim != 2 or b.shape[1] != 4:
            got = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
            raise ValueError(f"Expected `boxes[{i}]` to be an (N, 4) tensor of x1, y1, x2, y2 but got {got}.")
    device = anchors.device if anchors is not None else next((b.device for b in boxes if b.numel()), None)
    if anchors is None:
        anchors = torch.full((1, 2), float(anchor_scale * stride), device=device)
    elif anchors.ndim != 2 or anchors.shape[1] != 2 or not bool((anchors > 0).all()):
        raise ValueError(f"Expected argument `anchors` to be (A, 2) positive (w, h) but got {anchors.tolist()}.")
    h, w = size
    grid = _anchor_boxes(h, w, float(stride), anchors.float())  # (H · W · A, 4)
    masks = torch.zeros(len(boxes), h, w, dtype=torch.bool, device=grid.device)
    for i, b in enumerate(boxes):
        if not b.numel():
            continue
        iou = box_iou(b.to(grid).float(), grid)  # (N, H · W · A)
        best = iou.amax(1, keepdim=True)
        keep = iou > psi * best  # strict: a box with best IoU 0 keeps nothing
        masks[i] = keep.view(b.shape[0], h, w, -1).any(-1).any(0)
    return masks


def imitation_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked feature imitation: ``Σ_bijc I_bij (s_bcij − t_bcij)² / (2 N_p)``, ``N_p = Σ_bij I_bij`` (Wang et al.).

    Args:
        student_feat: (B, C, H, W) the student's (adapted) features.
        teacher_feat: (B, C, H, W) the teacher's (detached: no gradient reaches the teacher).
        mask: (B, H, W) the imitation mask (bool or 0/1).

    Returns:
        A scalar; 0 (still a function of ``student_feat``, so backward works) when the mask is empty.

    Raises:
        ValueError: the features differ in shape, are not 4-D, or the mask is not (B, H, W).

    Example:
        >>> s, t = torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, 2)
        >>> imitation_loss(s, t, torch.tensor([[[True, False], [False, False]]]))  # 2 channels × 1² / (2 · 1)
        tensor(1.)
    """
    _check_features(student_feat, teacher_feat)
    b, _, h, w = student_feat.shape
    if tuple(mask.shape) != (b, h, w):
        raise ValueError(
            f"Expected argument `mask` to be of shape (B, H, W) = {(b, h, w)} but got {tuple(mask.shape)}."
        )
    weights = mask.to(student_feat.device, student_feat.dtype).unsqueeze(1)  # (B, 1, H, W)
    squared = (student_feat - teacher_feat.detach()).square()
    return (squared * weights).sum() / (2 * weights.sum()).clamp(min=1)


def cwd_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Channel-wise distillation: per channel, KL of the spatial softmaxes, ``× τ²``, mean over B and C (Shu et al.).

    Args:
        student_feat: (B, C, H, W) the student's (adapted) features.
        teacher_feat: (B, C, H, W) the teacher's (detached).
        temperature: τ > 0 of both softmaxes over the H·W locations of a channel.

    Returns:
        A scalar.

    Raises:
        ValueError: the features differ in shape or are not 4-D, or ``temperature`` is not > 0.

    Example:
        >>> t = torch.tensor([[[[0.0, 2.0]]]])
        >>> round(cwd_loss(torch.zeros(1, 1, 1, 2), t).item(), 4)  # KL([.12, .88] ‖ [.5, .5])
        0.3278
    """
    _check_features(student_feat, teacher_feat)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"Expected argument `temperature` to be a float > 0 but got {temperature!r}.")
    b, c = student_feat.shape[:2]
    log_q = F.log_softmax(student_feat.flatten(2) / temperature, dim=-1)  # (B, C, H · W)
    log_p = F.log_softmax(teacher_feat.detach().flatten(2) / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum() * temperature**2 / (b * c)


class FeatureAdapter(nn.Module):
    """A 1×1 convolution from the student's ``C_s`` channels to the teacher's ``C_t``, rebuilt when ``C_s`` changes.

    Initialisation: the identity when the widths are equal (so a student that is a copy of its teacher, the
    ``teacher="self"`` case, starts at zero loss), else weights drawn from N(0, 10⁻⁴) with zero bias, as the official
    code of Wang et al. does: the student is not pulled in random directions before the adapter has learned a mapping.
    The draws come from a generator seeded by ``seed``, so every DDP rank builds the same adapter.

    :meth:`rebuild` follows a pruned student: given the student channels that survived, the weight keeps their
    columns (the mapping learned so far holds for them); without them, the weight is drawn afresh. The bias (per
    teacher channel) stays.

    Args:
        student_channels: ``C_s`` >= 1.
        teacher_channels: ``C_t`` >= 1.
        seed: seed of the random initialisation.

    Raises:
        ValueError: a channel count that is not a positive int.

    Example:
        >>> adapter = FeatureAdapter(4, 4)
        >>> adapter.rebuild(2, kept=[0, 3])
        >>> adapter.conv.weight[:, :, 0, 0]
        tensor([[1., 0.],
                [0., 0.],
                [0., 0.],
                [0., 1.]], grad_fn=<SelectBackward0>)
    """

    def __init__(self, student_channels: int, teacher_channels: int, seed: int = 0) -> None:
        super().__init__()
        for name, value in (("student_channels", student_channels), ("teacher_channels", teacher_channels)):
            _check_channels(name, value)
        self.seed = seed
        self.conv = nn.Conv2d(student_channels, teacher_channels, 1)
        with torch.no_grad():
            self.conv.bias.zero_()
            self.conv.weight.copy_(self._initial_weight(student_channels))

    @property
    def student_channels(self) -> int:
        return self.conv.in_channels

    @property
    def teacher_channels(self) -> int:
        return self.conv.out_channels

    def forward(self, student_feat: torch.Tensor) -> torch.Tensor:
        return self.conv(student_feat)

    def rebuild(self, student_channels: int, kept: Sequence[int] | None = None) -> None:
        """Give the adapter ``student_channels`` inputs: the columns ``kept`` of the current weight, or fresh ones.

        The weight becomes a new ``nn.Parameter`` (an optimizer holding the old one must be updated).

        Args:
            student_channels: the new ``C_s`` >= 1.
            kept: for each new input channel, the index of the current input channel it was (``len(kept)`` =
                ``student_channels``, indices in ``[0, current C_s)``); ``None``: draw new weights.

        Raises:
            ValueError: ``student_channels`` is not a positive int, or ``kept`` does not fit it.
        """
        _check_channels("student_channels", student_channels)
        old = self.conv.weight
        if kept is not None:
            index = torch.as_tensor(list(kept), dtype=torch.long)
            in_range = bool(((index >= 0) & (index < old.shape[1])).all())
            if index.numel() != student_channels or not in_range:
                raise ValueError(
                    f"Expected argument `kept` to hold {student_channels} indices in [0, {old.shape[1]}) but got "
                    f"{index.tolist()}."
                )
            weight = old.detach().index_select(1, index.to(old.device))
        else:
            weight = self._initial_weight(student_channels).to(old)
        self.conv.weight = nn.Parameter(weight.clone(), requires_grad=old.requires_grad)
        self.conv.in_channels = student_channels

    def _initial_weight(self, student_channels: int) -> torch.Tensor:
        c_t = self.conv.out_channels
        if student_channels == c_t:
            return torch.eye(c_t).view(c_t, c_t, 1, 1)
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randn(c_t, student_channels, 1, 1, generator=generator) * 1e-4

    def extra_repr(self) -> str:
        return f"student_channels={self.student_channels}, teacher_channels={self.teacher_channels}"


class ImitationLoss(nn.Module):
    """:func:`imitation_loss` on features and a mask (see :func:`fine_grained_mask`).

    Example:
        >>> ImitationLoss()(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, dtype=torch.bool))
        tensor(0.)
    """

    def forward(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return imitation_loss(student_feat, teacher_feat, mask)


class CWDLoss(nn.Module):
    """:func:`cwd_loss` with a fixed temperature.

    Args:
        temperature: τ > 0.

    Raises:
        ValueError: if ``temperature`` is not > 0.

    Example:
        >>> CWDLoss(temperature=4.0)(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2))
        tensor(0.)
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"Expected argument `temperature` to be a float > 0 but got {temperature!r}.")
        self.temperature = temperature

    def forward(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
        return cwd_loss(student_feat, teacher_feat, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, 4) × (M, 4) xyxy boxes → (N, M) IoU (0 where the union is empty).

    Example:
        >>> box_iou(torch.tensor([[0.0, 0.0, 2.0, 2.0]]), torch.tensor([[1.0, 0.0, 3.0, 2.0]]))
        tensor([[0.3333]])
    """
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def _anchor_boxes(h: int, w: int, stride: float, anchors: torch.Tensor) -> torch.Tensor:
    """(H · W · A, 4) xyxy anchors, location-major (y, then x, then anchor), centred on the cell centres."""
    ys, xs = torch.meshgrid(
        torch.arange(h, device=anchors.device), torch.arange(w, device=anchors.device), indexing="ij"
    )
    centres = (torch.stack([xs, ys], -1).float() + 0.5) * stride  # (H, W, 2) as (x, y)
    half = anchors / 2  # (A, 2)
    c = centres.view(h, w, 1, 2)
    return torch.cat([c - half, c + half], -1).view(-1, 4)


def _check_features(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> None:
    if student_feat.ndim != 4 or student_feat.shape != teacher_feat.shape:
        raise ValueError(
            "Expected `student_feat` and `teacher_feat` to be (B, C, H, W) tensors of the same shape but got "
            f"{tuple(student_feat.shape)} and {tuple(teacher_feat.shape)}."
        )


def _check_channels(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected argument `{name}` to be a positive int but got {value!r}.")
