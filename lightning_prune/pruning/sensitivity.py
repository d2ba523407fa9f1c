"""Per-group pruning sensitivity: prune each dependency group alone at a few ratios, measure mAP, restore (no Trainer).

Which layers can lose channels, and how many, is the question every per-layer pruning ratio answers. The classic
answer (Li et al., "Pruning Filters for Efficient ConvNets", https://arxiv.org/abs/1608.08710, Sec. 3.2) measures
it: prune one layer at a time at increasing ratios, evaluate, and keep for each layer the largest ratio that costs
little accuracy. :class:`SensitivityAnalysis` does that for torch-pruning's dependency groups (the channels that
must go together: a conv, its BatchNorm, the inputs of its readers, layers tied by residual adds), each named by the
first layer, in ``named_modules`` order, whose output channels it prunes (for layers tied by residual adds, the
block's first conv; any layer of a group selects the whole group in ``layer_ratios``). The detector's output layers
(its adapter's, else those :func:`~lightning_prune.pruning.channels.output_layers` finds on the traced graph) and
``ignored_layers`` are not analysed.

Each trial prunes a deep copy of the model exactly as :class:`~lightning_prune.callbacks.StructuredPruning` prunes a
layer named in its ``layer_ratios`` (:func:`~lightning_prune.pruning.channels.prune_channels`, same importance, same
rounding), counts its MACs and calls ``evaluate`` on it; the model itself is never modified. A
:class:`SensitivityResult` holds the rows; :meth:`SensitivityResult.layer_ratios` turns them into the ``{regex:
ratio}`` dict that ``StructuredPruning(layer_ratios=...)`` takes, :func:`load_layer_ratios` reads it back checked
against a model. ``run(rank, world_size)`` evaluates every ``world_size``-th group; :func:`merge_results` joins the
ranks' results.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
    ...                     nn.Conv2d(8, 2, 1))
    >>> def evaluate(pruned):  # any score in [0, 1], higher is better: here, the share of layer 0's channels kept
    ...     return pruned[0].out_channels / 8
    >>> analysis = SensitivityAnalysis(net, torch.zeros(1, 3, 16, 16), evaluate, ratios=[0.25, 0.5])
    >>> analysis.groups  # output layer "5" excluded
    ['0', '3']
    >>> result = analysis.run()
    >>> [(row.group, row.ratio, row.mAP, row.channels) for row in result.rows]
    [('0', 0.25, 0.75, 6), ('0', 0.5, 0.5, 4), ('3', 0.25, 1.0, 6), ('3', 0.5, 1.0, 4)]
    >>> result.ranking()
    ['0', '3']
    >>> result.layer_ratios(max_drop=30.0)  # mAP points: 100 x (baseline - mAP)
    {'0': 0.25, '3': 0.5}
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
import yaml
from torch import nn
from torch_pruning import ops
from torch_pruning.pruner.importance import Importance

from lightning_prune.pruning.channels import check_traceable, layer_widths, output_layers, prune_channels
from lightning_prune.pruning.importance import needs_calibration, resolve_importance
from lightning_prune.pruning.tracing import copy_with_grads, restored

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# torch-pruning's BasePruner roots groups at these (prune_channels builds one with its defaults)
_ROOT_TYPES = [ops.TORCH_CONV, ops.TORCH_LINEAR, ops.TORCH_LSTM]
_EPS = 1e-9  # drops compare in mAP points: 10.000000000000002 is 10


@dataclass(frozen=True)
class SensitivityRow:
    """One trial: group ``group`` (its first layer's name) pruned alone by ``ratio``.

    ``mAP`` is what ``evaluate`` returned, ``delta`` its difference to the unpruned model's (negative: a drop; both
    in ``evaluate``'s units, [0, 1] for mAP), ``macs_saved`` the fraction of the model's MACs removed, ``channels``
    that layer's output channels kept (of :attr:`SensitivityResult.groups`' count; rounding can keep them all, then
    ``evaluate`` is skipped and the row repeats the baseline).
    """

    group: str
    ratio: float
    mAP: float
    delta: float
    macs_saved: float
    channels: int


@dataclass
class SensitivityResult:
    """Rows of a sensitivity analysis (one rank's share, or all of them merged) and their summaries.

    Attributes:
        baseline: ``evaluate`` on the unpruned model.
        macs: MACs of the unpruned model on the example input.
        ratios: the ratios tried, increasing.
        groups: ``{group name: output channels}`` of every analysed group, in ``named_modules`` order (all ranks').
        rows: the trials, by group then ratio.
        layers: ``{group name: the convs / linears whose output channels it prunes}`` (the name first).
    """

    baseline: float
    macs: float
    ratios: list[float]
    groups: dict[str, int]
    rows: list[SensitivityRow] = field(default_factory=list)
    layers: dict[str, list[str]] = field(default_factory=dict)

    def curves(self) -> dict[str, list[tuple[float, float]]]:
        """``{group: [(ratio, mAP), ...]}`` of the groups with rows, in module order."""
        out: dict[str, list[tuple[float, float]]] = {}
        for row in self.rows:
            out.setdefault(row.group, []).append((row.ratio, row.mAP))
        return {g: out[g] for g in self.groups if g in out}

    def sensitivity(self) -> dict[str, float]:
        """``{group: mean mAP drop over the ratios}`` (points; the area under the drop curve, per ratio)."""
        return {g: 100.0 * sum(self.baseline - m for _, m in c) / len(c) for g, c in self.curves().items()}

    def ranking(self) -> list[str]:
        """Groups from the most to the least sensitive (mean drop; ties in module order)."""
        scores = self.sensitivity()
        return sorted(scores, key=lambda g: -scores[g])

    def layer_ratios(self, max_drop: float = 1.0) -> dict[str, float]:
        """``{re.escape(group): ratio}`` for ``StructuredPruning(layer_ratios=...)``, in module order.

        A group's ratio is the largest ratio ``r`` such that pruning it alone by ``r`` *and by every smaller ratio
        tried* cost at most ``max_drop`` mAP points (100 x (baseline - mAP)): on a small validation subset mAP is
        noisy, and a curve that dips and recovers says the dip's ratio is already too much. Groups whose smallest
        ratio costs more are left out (add them to ``ignored_layers`` to keep them whole).

        Args:
            max_drop: the mAP points a group may cost, >= 0.

        Raises:
            ValueError: ``max_drop`` is negative or not a number.
        """
        _check_max_drop(max_drop)
        out: dict[str, float] = {}
        for group, curve in self.curves().items():
            allowed = None
            for ratio, value in sorted(curve):
                if 100.0 * (self.baseline - value) > max_drop + _EPS:
                    break
                allowed = ratio
            if allowed is not None:
                out[re.escape(group)] = allowed
        return out

    def sensitive_groups(self, max_drop: float = 1.0) -> list[str]:
        """The groups :meth:`layer_ratios` leaves out, as ``re.escape``'d regexes (for ``ignored_layers``)."""
        kept = self.layer_ratios(max_drop)
        return [re.escape(g) for g in self.curves() if re.escape(g) not in kept]

    def to_yaml(self, max_drop: float = 1.0) -> str:
        """:meth:`layer_ratios` as YAML (a comment lists the groups left out), for :func:`load_layer_ratios`."""
        ratios = self.layer_ratios(max_drop)
        left_out = self.sensitive_groups(max_drop)
        header = [
            f"# StructuredPruning(layer_ratios=...): per group, the largest ratio costing <= {max_drop:g} mAP points",
            f"# alone (baseline {100 * self.baseline:.2f}). Layers not named here follow `pruning_ratio`.",
        ]
        if left_out:
            header.append(f"# Left out (the smallest ratio already costs more), for `ignored_layers`: {left_out}")
        body = yaml.safe_dump(ratios, sort_keys=False) if ratios else "{}\n"
        return "\n".join(header) + "\n" + body

    def to_markdown(self, max_drop: float | None = None, limit: int | None = None) -> str:
        """A table of the mAP change (points) of every group at every ratio, the most sensitive group first.

        Args:
            max_drop: also show each group's ratio from :meth:`layer_ratios` and the MACs it saves.
            limit: show only the ``limit`` most sensitive groups.
        """
        if max_drop is not None:
            _check_max_drop(max_drop)
        by_group: dict[str, dict[float, SensitivityRow]] = {}
        for row in self.rows:
            by_group.setdefault(row.group, {})[row.ratio] = row
        chosen = self.layer_ratios(max_drop) if max_drop is not None else {}
        head = ["#", "group", "channels", *(f"Δ@{r:g}" for r in self.ratios), "mean Δ"]
        if max_drop is not None:
            head += [f"ratio (≤ {max_drop:g} pts)", "MACs saved"]
        scores = self.sensitivity()
        lines = [
            f"Sensitivity of mAP to pruning one group alone: baseline mAP {100 * self.baseline:.2f}, "
            f"{len(self.rows)} trials of {len(by_group)} groups; Δ in mAP points (100 × mAP); `+n`: n more layers "
            "tied to the group's channels (residual adds).",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "|".join("---" if i == 1 else "---:" for i in range(len(head))) + "|",
        ]
        for rank, group in enumerate(self.ranking()[:limit], 1):
            rows = by_group[group]
            coupled = len(self.layers.get(group, [group])) - 1
            cells = [str(rank), f"`{group}`" + (f" +{coupled}" if coupled else ""), str(self.groups[group])]
            cells += [f"{100 * rows[r].delta:+.2f}" if r in rows else "" for r in self.ratios]
            cells.append(f"{0.0 - scores[group]:+.2f}")  # never "-0.00"
            if max_drop is not None:
                ratio = chosen.get(re.escape(group))
                cells += ["—", "—"] if ratio is None else [f"{ratio:g}", f"{rows[ratio].macs_saved:.1%}"]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def plot(self, path: str | Path, labelled: int = 10) -> Path:
        """PNG of the mAP-vs-ratio curve of every group, the ``labelled`` most sensitive in colour with a legend.

        Raises:
            ModuleNotFoundError: matplotlib is missing (the ``report`` extra).
        """
        from lightning_prune.report.plots import plot_sensitivity  # matplotlib only when plotting

        return plot_sensitivity(self.curves(), self.baseline, path, highlight=self.ranking()[:labelled])

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready); :meth:`from_dict` reads it back."""
        return {
            "baseline": self.baseline,
            "macs": self.macs,
            "ratios": list(self.ratios),
            "groups": dict(self.groups),
            "rows": [dataclasses.asdict(row) for row in self.rows],
            "layers": {g: list(names) for g, names in self.layers.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SensitivityResult:
        return cls(
            baseline=float(data["baseline"]),
            macs=float(data["macs"]),
            ratios=[float(r) for r in data["ratios"]],
            groups={str(k): int(v) for k, v in data["groups"].items()},
            rows=[SensitivityRow(**row) for row in data["rows"]],
            layers={str(g): [str(n) for n in names] for g, names in data.get("layers", {}).items()},
        )


class SensitivityAnalysis:
    """Prune each torch-pruning dependency group of ``model`` alone at each ratio and evaluate it, on deep copies.

    Paper: Li et al., "Pruning Filters for Efficient ConvNets" (ICLR 2017), https://arxiv.org/abs/1608.08710 (the
    per-layer sensitivity analysis); groups as in Fang et al., "DepGraph" (CVPR 2023), https://arxiv.org/abs/2301.12900

    The groups are found when the analysis is built (one trace): :attr:`groups` lists them and bad arguments fail
    before any evaluation. :meth:`run` costs one ``evaluate`` for the baseline plus one per group and ratio.

    Args:
        model: the model to analyse (never modified; a LightningModule's Trainer is not copied).
        example_input: what the groups are traced and the MACs counted on (a tensor or a tuple of inputs).
        evaluate: the score of a pruned copy, higher is better: mAP in [0, 1] (drops are reported in points, 100 ×).
            It receives the copy in ``model``'s train/eval modes.
        ratios: fractions of a group's channels to remove, each in (0, 1); sorted, duplicates dropped.
        importance: which channels go: a criterion name (data-free ones: ``"l1"``, ``"l2"``, ``"bn_scale"``,
            ``"lamp"``, ``"fpgm"``, ``"random"``) or an ``Importance`` instance (calibrated beforehand if it needs
            data); use the one StructuredPruning will use.
        ignored_layers: regexes fully matching module names never pruned, added to the output layers.
        groups: regexes; analyse only the groups whose name fully matches one (default all): analysis costs
            one evaluation per group and ratio.
        round_to: keep channel counts multiples of this (rounded up), as StructuredPruning's ``round_to``.

    Raises:
        ValueError: an argument is out of range or of the wrong type, a pattern of ``ignored_layers`` matches no
            module or one of ``groups`` no group, the model contains a chunked C2f block or cannot be traced (the
            module that failed is named).
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: Any,
        evaluate: Callable[[nn.Module], float],
        ratios: Sequence[float] = DEFAULT_RATIOS,
        importance: str | Importance = "l2",
        ignored_layers: Sequence[str] | None = None,
        groups: Sequence[str] | None = None,
        round_to: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Expected argument `model` to be an nn.Module but got {type(model).__name__}.")
        if not callable(evaluate):
            raise TypeError(f"Expected argument `evaluate` to be a callable (module -> float) but got {evaluate!r}.")
        self.ratios = check_ratios(ratios)
        if isinstance(importance, str) and needs_calibration(resolve_importance(importance)):
            raise ValueError(
                f"Expected argument `importance` to be a data-free criterion name or an Importance instance but got "
                f"{importance!r}, which needs calibration data. HINT: calibrate an instance first "
                "(`lightning_prune.pruning.Calibration`) and pass it."
            )
        self.importance = resolve_importance(importance)
        if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
            raise ValueError(f"Expected argument `round_to` to be None or an int >= 1 but got {round_to!r}.")
        self.round_to = round_to
        self.model, self.example_input, self.evaluate = model, example_input, evaluate
        names = [n for n, _ in model.named_modules()]
        ignored = [n for p in _patterns(ignored_layers, "ignored_layers", names) for n in names if p.fullmatch(n)]
        from lightning_prune.adapters.c2f import (
            refuse_chunked_c2f,  # here: adapters import models, which import pruning
        )

        refuse_chunked_c2f(model)
        traced = _copy(model)  # tracing clears gradients (a calibrated Taylor criterion reads them on the copies)
        graph = check_traceable(traced, example_input)
        adapter = getattr(model, "adapter", None)
        outputs = list(adapter.output_layers(model)) if hasattr(adapter, "output_layers") else None
        if outputs is None:
            outputs = output_layers(traced, graph)
        #: names of the layers whose output channels stay: the output layers and ``ignored_layers``' matches
        self.ignored_layers = list(dict.fromkeys([*outputs, *ignored]))
        found = _find_groups(traced, graph, self.ignored_layers)
        del graph, traced  # the graph pins traced activations
        selected = _patterns(groups, "groups", list(found), what="group name")
        #: ``{group name: the convs / linears whose output channels it prunes}``, the analysed groups in module order
        self.layers = {g: ls for g, ls in found.items() if not selected or any(p.fullmatch(g) for p in selected)}
        widths = layer_widths(model)
        #: ``{group name: output channels}`` of the analysed groups
        self.channels = {g: widths[g] for g in self.layers}

    @property
    def groups(self) -> list[str]:
        """Names of the analysed groups (their first layer's), in ``named_modules`` order."""
        return list(self.channels)

    def run(
        self,
        rank: int = 0,
        world_size: int = 1,
        on_trial: Callable[[SensitivityRow], None] | None = None,
    ) -> SensitivityResult:
        """Evaluate the baseline and this rank's groups (the ``i``-th group where ``i % world_size == rank``).

        Args:
            rank: this process's index among ``world_size`` (each evaluates the baseline; :func:`merge_results`
                keeps rank 0's). Ranks run different numbers of evaluations on different models: ``evaluate`` must
                not synchronize across processes (torchmetrics does at ``compute()`` while a process group exists,
                unless built with ``sync_on_compute=False``).
            world_size: how many processes share the groups.
            on_trial: called with each row as it is measured (progress).

        Raises:
            ValueError: ``rank`` / ``world_size`` are not ints with ``0 <= rank < world_size``.
        """
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (rank, world_size)) or not (
            0 <= rank < world_size
        ):
            raise ValueError(
                f"Expected arguments `rank` and `world_size` to be ints with 0 <= rank < world_size but got {rank!r} "
                f"and {world_size!r}."
            )
        macs = _macs(self.model, self.example_input)
        baseline = float(self.evaluate(_copy(self.model)))
        result = SensitivityResult(baseline, macs, list(self.ratios), dict(self.channels), layers=dict(self.layers))
        for i, group in enumerate(self.groups):
            if i % world_size != rank:
                continue
            for ratio in self.ratios:
                row = self._trial(group, ratio, result)
                result.rows.append(row)
                if on_trial is not None:
                    on_trial(row)
        return result

    def _trial(self, group: str, ratio: float, result: SensitivityResult) -> SensitivityRow:
        """Prune a copy's group ``group`` alone by ``ratio`` as StructuredPruning's ``layer_ratios`` would; its row."""
        trial = _copy(self.model)
        with restored(trial):
            prune_channels(
                trial,
                self.example_input,
                self.importance,
                0.0,  # every other group keeps its channels
                ignored_layers=[trial.get_submodule(n) for n in self.ignored_layers],
                layer_ratios={trial.get_submodule(group): ratio},
                round_to=self.round_to,
            )
        kept = layer_widths(trial.get_submodule(group))[""]
        if kept == result.groups[group]:  # rounding kept every channel: the model is the baseline
            return SensitivityRow(group, ratio, result.baseline, 0.0, 0.0, kept)
        value = float(self.evaluate(trial))
        saved = 1.0 - _macs(trial, self.example_input) / max(result.macs, 1.0)
        return SensitivityRow(group, ratio, value, value - result.baseline, saved, kept)


def check_ratios(ratios: Any, argument: str = "ratios") -> list[float]:
    """``ratios`` sorted without duplicates, or a ``ValueError``: a non-empty sequence of floats in (0, 1)."""
    ok = isinstance(ratios, (list, tuple)) and len(ratios) > 0
    ok = ok and all(not isinstance(r, bool) and isinstance(r, (int, float)) and 0.0 < r < 1.0 for r in ratios)
    if not ok:
        raise ValueError(
            f"Expected argument `{argument}` to be a non-empty list of floats in (0, 1) but got {ratios!r}."
        )
    return sorted({float(r) for r in ratios})


def merge_results(parts: Iterable[SensitivityResult]) -> SensitivityResult:
    """The ranks' results as one: rank 0's (the first's) baseline, every row, ordered by group then ratio.

    Raises:
        ValueError: no result, results of different analyses (groups or ratios differ), or a trial twice.
    """
    parts = list(parts)
    if not parts:
        raise ValueError("Expected argument `parts` to hold at least one SensitivityResult but got none.")
    first = parts[0]
    for i, part in enumerate(parts[1:], 1):
        if part.groups != first.groups or part.ratios != first.ratios:
            raise ValueError(
                f"Expected every result to come from the same analysis (groups and ratios) but result {i} has "
                f"{len(part.groups)} groups and ratios {part.ratios}, result 0 {len(first.groups)} and {first.ratios}."
            )
    order = {g: i for i, g in enumerate(first.groups)}
    rows: dict[tuple[str, float], SensitivityRow] = {}
    for part in parts:
        for row in part.rows:
            key = (row.group, row.ratio)
            if key in rows:
                raise ValueError(f"Expected each trial once across the results but got {key} twice.")
            rows[key] = dataclasses.replace(row, delta=row.mAP - first.baseline)
    ordered = sorted(rows.values(), key=lambda r: (order[r.group], r.ratio))
    return SensitivityResult(first.baseline, first.macs, list(first.ratios), dict(first.groups), ordered, first.layers)


def load_layer_ratios(path: str | Path, model: nn.Module) -> dict[str, float]:
    """A ``{regex: ratio}`` YAML (:meth:`SensitivityResult.to_yaml`'s), checked against ``model``.

    Every regex must fully match a module name of ``model``, as ``StructuredPruning(layer_ratios=...)`` resolves it
    (pass the module it prunes), and every ratio be in (0, 1).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a mapping of regex strings to ratios in (0, 1), or a regex matches no layer
            (the error names the first layers of ``model``).

    Example:
        >>> import tempfile
        >>> from torch import nn
        >>> path = Path(tempfile.mkdtemp()) / "layer_ratios.yaml"
        >>> _ = path.write_text("'0': 0.5\\n")
        >>> load_layer_ratios(path, nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 2, 1)))
        {'0': 0.5}
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Expected argument `path` to be an existing YAML file but got {str(path)!r}.")
    loaded = yaml.safe_load(path.read_text())
    loaded = {} if loaded is None else loaded
    if not isinstance(loaded, dict) or not all(isinstance(k, str) for k in loaded):
        raise ValueError(
            f"Expected {str(path)!r} to hold a mapping of layer-name regexes to ratios in (0, 1) but got "
            f"{type(loaded).__name__ if not isinstance(loaded, dict) else loaded!r}."
        )
    ratios: dict[str, float] = {}
    for pattern, ratio in loaded.items():
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
            raise ValueError(
                f"Expected {str(path)!r} to map each regex to a ratio in (0, 1) but got {pattern!r}: {ratio!r}."
            )
        ratios[pattern] = float(ratio)
    names = [n for n, _ in model.named_modules()]
    _patterns(list(ratios), f"layer ratios of {str(path)!r}", names, hint_names=list(layer_widths(model)))
    return ratios


# ---------------------------------------------------------------------------------------------- helpers
def _patterns(
    patterns: Sequence[str] | None,
    argument: str,
    names: list[str],
    what: str = "module name",
    hint_names: list[str] | None = None,
) -> list[re.Pattern[str]]:
    """Compiled regexes that each fully match one of ``names``, or a ``ValueError`` naming the first names."""
    if patterns is None:
        return []
    if isinstance(patterns, str) or not isinstance(patterns, (list, tuple)):
        raise ValueError(f"Expected argument `{argument}` to be a list of regex strings but got {patterns!r}.")
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except (re.error, TypeError) as err:
            raise ValueError(
                f"Expected argument `{argument}` to hold valid regexes but got {pattern!r}: {err}."
            ) from None
    shown = [n for n in (hint_names if hint_names is not None else names) if n][:5]
    for p in compiled:
        if not any(p.fullmatch(n) for n in names):
            raise ValueError(
                f"Expected every regex of `{argument}` to fully match a {what} of the model but {p.pattern!r} "
                f"matches none. HINT: the model has e.g. {shown}."
            )
    return compiled


def _find_groups(model: nn.Module, graph: tp.DependencyGraph, ignored: list[str]) -> dict[str, list[str]]:
    """``{group name: layers}`` of the groups prune_channels can prune: the convs / linears whose output channels
    each prunes, in ``named_modules`` order (the first names the group); groups in the order of their names."""
    skip = [m for n in ignored for m in model.get_submodule(n).modules()]  # as BasePruner expands ignored layers
    order = {id(m): (i, n) for i, (n, m) in enumerate(model.named_modules())}
    groups = []
    for group in graph.get_all_groups(ignored_layers=skip, root_module_types=_ROOT_TYPES):
        members = {
            order[id(dep.target.module)]
            for dep, _ in group
            if graph.is_out_channel_pruning_fn(dep.handler)
            and isinstance(dep.target.module, (nn.modules.conv._ConvNd, nn.Linear))
            and id(dep.target.module) in order
        }
        if members:
            groups.append(sorted(members))
    return {members[0][1]: [n for _, n in members] for members in sorted(groups)}


def _copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with its gradients (a calibrated Taylor criterion reads them); a LightningModule's
    Trainer is shared, not copied."""
    trainer = getattr(model, "_trainer", None)
    return copy_with_grads(model, {id(trainer): trainer} if trainer is not None else {})


def _macs(model: nn.Module, example_input: Any) -> float:
    """torch-pruning's MAC count (the one StructuredPruning's targets use), modes restored."""
    with restored(model, keep_grads=True), torch.no_grad():
        model.eval()
        macs, _ = tp.utils.count_ops_and_params(model, example_input)
    return float(macs)


def _check_max_drop(max_drop: Any) -> None:
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not max_drop >= 0:
        raise ValueError(f"Expected argument `max_drop` to be a float >= 0 (mAP points) but got {max_drop!r}.")
