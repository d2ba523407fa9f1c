"""NetAdapt: shrink the model one group per round, choosing each round the group that loses the least score.

Paper: Yang et al., "NetAdapt: Platform-Aware Neural Network Adaptation for Mobile Applications" (ECCV 2018),
https://arxiv.org/abs/1804.03230

Each round asks for a fixed reduction of the cost (``step`` of the original model's MACs or parameters). For every
prunable dependency group (as :class:`~lightning_prune.pruning.sensitivity.SensitivityAnalysis` finds them) it
proposes the smallest channel cut of that group alone that meets the round's cost, but never more than a quarter of
the group's channels (the cost is linear in one group's width: a probe of a single block gives the slope,
re-measured by every proposal for the next round), prunes a copy that way with the criterion choosing the channels,
and scores the copy (``evaluate``, e.g. mAP on a validation subset). The proposals that lose the least score per unit
of cost saved are then taken, cheapest first, until their savings reach the round's cost: the model of the next
round, optionally after a short finetune (``finetune``, the paper's short-term finetune). One drastic cut per round
(the paper's rule when a single layer can meet the round's cost) wrecks a detector; several mild ones keep it.
Rounds stop when the cost meets the goal; a group never drops below ``round_to`` channels or ``max_layer_ratio`` of
its width. The long finetune is the schedule's training after the step.

:meth:`NetAdapt.run` returns the pruning records of all rounds, in order (apply them with
:func:`~lightning_prune.pruning.history.apply_records` to get the chosen model, the same channels included), and
:attr:`NetAdapt.rounds` what each round chose. No Trainer; the model itself is never modified.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(), nn.Conv2d(16, 2, 1))
    >>> def evaluate(model):  # layer 0's channels matter ten times more than layer 2's
    ...     return 1.0 - 0.5 * (1 - model[0].out_channels / 16) - 0.05 * (1 - model[2].out_channels / 16)
    >>> adapt = NetAdapt(net, torch.zeros(1, 3, 16, 16), evaluate, step=0.2, round_to=4)
    >>> records = adapt.run(goal=0.6)
    >>> [r.widths for r in adapt.rounds]  # layer 2 first (cheapest), a quarter of a group at most per round
    [{'2': 12, '0': 12}, {'2': 8}]
    >>> adapt.rounds[-1].cost <= 0.6
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch_pruning.pruner.importance import Importance

from lightning_prune.pruning.channels import layer_widths, min_width, prune_channels
from lightning_prune.pruning.history import Record
from lightning_prune.pruning.latency import width_ratios
from lightning_prune.pruning.sensitivity import SensitivityAnalysis, _copy
from lightning_prune.pruning.tracing import restored

Cost = Callable[[nn.Module, Any], float]


@dataclass(frozen=True)
class NetAdaptRound:
    """One round: ``widths`` ``{group: channels}`` of the groups it shrank, in the order taken; ``cost`` and ``score``
    of the model after it (cost as a fraction of the original model's), ``candidates`` proposals scored."""

    widths: dict[str, int]
    cost: float
    score: float
    candidates: int


class NetAdapt:
    """Rounds of "shrink the group that loses the least score per cost saved" (see the module docstring).

    Args:
        model: the model to adapt (never modified).
        example_input: what the groups are traced and the cost counted on.
        evaluate: the score of a pruned copy, higher is better (e.g. mAP on a validation subset).
        importance: the criterion choosing the channels within a group (data-free, or calibrated beforehand).
        step: cost removed per round, a fraction of the original model's cost in (0, 1).
        cost: ``"macs"`` (of the convs and linears: :func:`layer_macs`), ``"params"`` or a callable
            ``(model, example_input) -> cost``.
        ignored_layers: regexes fully matching module names never pruned, added to the output layers.
        round_to: channel counts stay multiples of this.
        max_layer_ratio: no group loses more than this fraction of its channels, in (0, 1].
        on_round: called with each :class:`NetAdaptRound` as it is chosen (progress).
        finetune: trains the chosen copy in place after each round (NetAdapt's short-term finetune), before the next
            round's proposals are cut from it and scored; the chosen weights then differ from the model's, so take
            :attr:`chosen`'s state after applying the records.

    Raises:
        ValueError: an argument is out of range or of the wrong type, or the model cannot be traced.
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: Any,
        evaluate: Callable[[nn.Module], float],
        importance: str | Importance = "l2",
        step: float = 0.05,
        cost: str | Cost = "macs",
        ignored_layers: Sequence[str] | None = None,
        round_to: int | None = None,
        max_layer_ratio: float = 0.95,
        on_round: Callable[[NetAdaptRound], None] | None = None,
        finetune: Callable[[nn.Module], None] | None = None,
    ) -> None:
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0.0 < step < 1.0:
            raise ValueError(f"Expected argument `netadapt_step` to be a float in (0, 1) but got {step!r}.")
        if isinstance(max_layer_ratio, bool) or not (
            isinstance(max_layer_ratio, (int, float)) and 0 < max_layer_ratio <= 1
        ):
            raise ValueError(
                f"Expected argument `max_layer_ratio` to be a float in (0, 1] but got {max_layer_ratio!r}."
            )
        self.cost = _resolve_cost(cost)
        # the groups, the output layers kept, and the argument checks, as the sensitivity analysis finds them
        found = SensitivityAnalysis(
            model, example_input, evaluate, ratios=[0.5], importance=importance, ignored_layers=ignored_layers,
            round_to=round_to,
        )  # fmt: skip
        self.model, self.example_input, self.evaluate = model, example_input, evaluate
        self.importance, self.round_to, self.step = found.importance, round_to, float(step)
        self.ignored_layers = found.ignored_layers
        #: ``{group name: output channels}`` of the unpruned model, the groups that may shrink
        self.original = dict(found.channels)
        self.max_layer_ratio = float(max_layer_ratio)
        self.on_round, self.finetune = on_round, finetune
        #: a proposal removes at most this fraction of its group's current channels
        self.max_cut = 0.25
        #: what each round chose, in order
        self.rounds: list[NetAdaptRound] = []
        #: ``evaluate`` on the unpruned model
        self.baseline: float | None = None
        #: after :meth:`run`, the chosen copy (what its records give the model)
        self.chosen: nn.Module | None = None
        self._slopes: dict[str, float] = {}  # cost fraction saved per channel of a group, last measured

    def run(self, goal: float, tolerance: float = 0.0) -> list[Record]:
        """Rounds until the cost is at most ``goal · (1 + tolerance)`` (``goal``: a fraction of the model's cost; the
        last round aims at ``goal`` itself); all rounds' records.

        Raises:
            ValueError: ``goal`` is not in (0, 1), or every group is at its floor before the goal is met (the error
                says how far it got).
        """
        if isinstance(goal, bool) or not isinstance(goal, (int, float)) or not 0.0 < goal < 1.0:
            raise ValueError(f"Expected argument `goal` to be a float in (0, 1) but got {goal!r}.")
        current = _copy(self.model)
        original = max(self._cost(current), 1e-12)
        cost = self._cost(current) / original
        score = self.baseline = float(self.evaluate(_copy(current)))
        records: list[Record] = []
        while cost > goal * (1.0 + tolerance):
            aim = max(goal, cost - self.step)
            proposals: list[tuple[str, int, float, float]] = []  # (group, width, cost, score)
            for group in self.original:
                proposal = self._propose(current, group, cost, aim, original)
                if proposal is not None:
                    trial, width, trial_cost = proposal
                    proposals.append((group, width, trial_cost, float(self.evaluate(trial))))
                    del trial  # one copy at a time: the winner is cut again
            taken = _cheapest(proposals, cost, aim, score)
            if not taken:
                raise ValueError(
                    f"Expected argument `goal` ({goal:g} of the original cost) to be reachable but every group is at "
                    f"its floor (`round_to` {self.round_to}, `max_layer_ratio` {self.max_layer_ratio}) at "
                    f"{cost:.3f} after {len(self.rounds)} rounds."
                )
            for group, width, _, _ in taken:  # the winners' cuts together (each was measured alone)
                current, chosen = self._shrunk(current, group, width)
                records.extend(chosen)
            cost = self._cost(current) / original
            if self.finetune is not None and cost > goal:  # the last round's model is finetuned by the schedule
                self.finetune(current)
            if len(taken) > 1 or self.finetune is not None:
                score = float(self.evaluate(current))
            else:  # one proposal taken: its score was measured on this very model
                score = taken[0][3]
            round_ = NetAdaptRound({group: width for group, width, _, _ in taken}, cost, score, len(proposals))
            self.rounds.append(round_)
            if self.on_round is not None:
                self.on_round(round_)
        self.chosen = current
        return records

    def _propose(
        self, current: nn.Module, group: str, cost: float, aim: float, original: float
    ) -> tuple[nn.Module, int, float] | None:
        """The copy of ``current`` with ``group`` cut by the fewest channels reaching ``aim`` (or to its floor), that
        width and the copy's cost."""
        width = layer_widths(current)[group]
        unit = self.round_to or 1
        floor = min_width(self.original[group], self.max_layer_ratio, self.round_to)
        if width - unit < floor:
            return None
        per_channel = self._slopes.get(group)
        probe = None
        if per_channel is None:  # the cost is linear in one group's width: one block's cut gives the slope
            probe = self._shrunk(current, group, width - unit)
            per_channel = (cost - self._cost(probe[0]) / original) / unit
        if per_channel <= 0:
            return None  # nothing to gain from this group
        cut = math.ceil((cost - aim) / per_channel / unit - 1e-9) * unit
        mild = max(unit, int(width * self.max_cut) // unit * unit)  # several mild cuts make a round, not one drastic
        target = max(floor, width - max(min(cut, mild), unit))
        trial = probe[0] if probe is not None and target == width - unit else self._shrunk(current, group, target)[0]
        trial_cost = self._cost(trial) / original
        # the slope as measured now, for the next round (exact while the groups it reads keep their widths)
        self._slopes[group] = (cost - trial_cost) / (width - target)
        return trial, target, trial_cost

    def _shrunk(self, current: nn.Module, group: str, width: int) -> tuple[nn.Module, list[Record]]:
        """A copy of ``current`` with ``group`` pruned to ``width`` channels by the criterion; the records."""
        trial = _copy(current)
        with restored(trial):
            records = prune_channels(
                trial,
                self.example_input,
                self.importance,
                0.0,
                ignored_layers=[trial.get_submodule(n) for n in self.ignored_layers],
                layer_ratios=width_ratios(trial, {group: width}),
                global_pruning=False,
                max_layer_ratio=1.0,
            )
        return trial, records

    def _cost(self, model: nn.Module) -> float:
        return float(self.cost(model, self.example_input))


@torch.no_grad()
def layer_macs(model: nn.Module, example_input: Any) -> float:
    """MACs of the convs and linears of one eval-mode forward (modes given back), counted by forward hooks.

    Within 2% of torch-pruning's counter (which also counts BatchNorms, activations, pools) on the reference
    detectors, and several times faster: it copies nothing.

    Example:
        >>> layer_macs(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)), torch.zeros(1, 3, 4, 4))  # 16 · 8 · 3 · 9
        3456.0
    """
    total = 0

    def count(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.modules.conv._ConvNd):
            total += output.numel() * module.in_channels // module.groups * math.prod(module.kernel_size)
        else:
            total += output.numel() * module.in_features

    layers = [m for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    handles = [m.register_forward_hook(count) for m in layers]
    try:
        with restored(model):
            model.eval()
            model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    return float(total)


def _cheapest(
    proposals: list[tuple[str, int, float, float]], cost: float, aim: float, score: float
) -> list[tuple[str, int, float, float]]:
    """The proposals ``(group, width, cost, score)`` losing the least score per cost saved, taken in that order until
    their savings (as measured alone) reach the round's ``aim``."""
    ranked = sorted(proposals, key=lambda p: ((score - p[3]) / max(cost - p[2], 1e-12), -p[3]))
    taken: list[tuple[str, int, float, float]] = []
    saved = 0.0
    for proposal in ranked:
        if saved >= cost - aim - 1e-9:
            break
        taken.append(proposal)
        saved += cost - proposal[2]
    return taken


def _resolve_cost(cost: str | Cost) -> Cost:
    if cost == "macs":
        return layer_macs
    if cost == "params":
        return lambda model, _: float(sum(p.numel() for p in model.parameters()))
    if callable(cost):
        return cost
    raise ValueError(f"Expected argument `cost` to be 'macs', 'params' or a callable but got {cost!r}.")
