"""The compression report's figures as PNG files (matplotlib, the ``report`` extra; no Trainer imports).

- :func:`plot_channels`: output channels of every conv/linear layer before and after compression;
- :func:`plot_gamma_histogram`: the distribution of BatchNorm |γ| (what network slimming thresholds);
- :func:`plot_map_vs_macs`: validation mAP against MACs along a pruning schedule;
- :func:`plot_sensitivity`: mAP against the ratio each layer group is pruned by alone (a sensitivity analysis).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn


def require_matplotlib() -> None:
    """Raise the ``pip install`` that fixes a missing matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ModuleNotFoundError(
            "The compression report's plots need matplotlib: `pip install 'lightning_prune[report]'`."
        )


def _pyplot() -> Any:
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg", force=False)  # files only: never opens a window, works without a display
    import matplotlib.pyplot as plt

    return plt


def plot_channels(before: Mapping[str, int], after: Mapping[str, int], path: str | Path) -> Path:
    """Bars of each layer's output channels before (light) and after (dark), in the order of ``before``.

    Args:
        before: ``{layer name: channels}`` of the original model (e.g. :func:`~lightning_prune.pruning.channels.
            layer_widths`).
        after: the same for the compressed model; layers it lacks are drawn at 0.
        path: the PNG to write.

    Example:
        >>> import tempfile
        >>> out = plot_channels({"a": 64, "b": 128}, {"a": 32, "b": 96}, Path(tempfile.mkdtemp()) / "c.png")
        >>> out.stat().st_size > 0
        True
    """
    plt = _pyplot()
    names = list(before)
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * len(names) + 2), 3.5))
    ax.bar(x, [before[n] for n in names], color="#b7cde6", label="before", width=0.85)
    ax.bar(x, [after.get(n, 0) for n in names], color="#1f5fa8", label="after", width=0.85)
    kept = sum(after.get(n, 0) for n in names) / max(1, sum(before.values()))
    ax.set_title(f"Output channels per layer (kept {kept:.0%} in all)")
    ax.set_xlabel("layer (forward order)")
    ax.set_ylabel("channels")
    step = max(1, len(names) // 30)
    ax.set_xticks(list(x)[::step], [n.removesuffix(".conv") for n in names][::step], rotation=90, fontsize=5)
    ax.legend()
    return _save(fig, path)


def plot_gamma_histogram(models: Mapping[str, nn.Module], path: str | Path, bins: int = 60) -> Path:
    """Histogram of the BatchNorm |γ| of each model, overlaid; on a log |γ| axis when they span over a decade.

    Raises:
        ValueError: no model has a BatchNorm with a weight.

    Example:
        >>> import tempfile
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        >>> plot_gamma_histogram({"model": net}, Path(tempfile.mkdtemp()) / "g.png").suffix
        '.png'
    """
    gammas = {name: _gammas(m) for name, m in models.items()}
    gammas = {name: g for name, g in gammas.items() if g.numel()}
    if not gammas:
        raise ValueError(f"Expected a BatchNorm with a weight in one of the models {list(models)} but found none.")
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter

    low = max(1e-6, min(float(g.min()) for g in gammas.values()))
    high = max(low * 1.01, max(float(g.max()) for g in gammas.values()))
    log = high / low > 10  # network slimming drives γ towards 0: decades matter then
    if log:
        edges = torch.logspace(torch.log10(torch.tensor(low)), torch.log10(torch.tensor(high)), bins + 1)
    else:
        edges = torch.linspace(min(float(g.min()) for g in gammas.values()), high, bins + 1)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, g in gammas.items():
        values = g.clamp_min(low) if log else g
        ax.hist(values.numpy(), bins=edges.numpy(), alpha=0.6, label=f"{name} ({g.numel()} channels)")
    if log:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_title("BatchNorm |γ|")
    ax.set_xlabel("|γ|")
    ax.set_ylabel("channels")
    ax.legend()
    return _save(fig, path)


def plot_map_vs_macs(points: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Validation mAP50-95 against MACs, one point per validation (``{"macs", "mAP", "epoch"}``), in order.

    Raises:
        ValueError: no point has both ``macs`` and ``mAP``.

    Example:
        >>> import tempfile
        >>> points = [{"epoch": 0, "macs": 4e9, "mAP": 0.3}, {"epoch": 1, "macs": 2e9, "mAP": 0.28}]
        >>> plot_map_vs_macs(points, Path(tempfile.mkdtemp()) / "m.png").exists()
        True
    """
    usable = [p for p in points if p.get("macs") is not None and p.get("mAP") is not None]
    if not usable:
        raise ValueError("Expected validation points with `macs` and `mAP` but got none.")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    macs = [p["macs"] / 1e9 for p in usable]
    maps = [p["mAP"] for p in usable]
    ax.plot(macs, maps, "-o", color="#1f5fa8", markersize=3)
    for p, x, y in zip(usable, macs, maps):
        if "epoch" in p:
            ax.annotate(str(p["epoch"]), (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.invert_xaxis()  # compression goes to the right
    ax.set_title("Validation mAP50-95 along the schedule (labels: epochs)")
    ax.set_xlabel("GMACs")
    ax.set_ylabel("mAP50-95")
    return _save(fig, path)


def _gammas(model: nn.Module) -> torch.Tensor:
    values = [
        m.weight.detach().abs().flatten().float().cpu()
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None
    ]
    return torch.cat(values) if values else torch.zeros(0)


def _save(fig: Any, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_sensitivity(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    baseline: float,
    path: str | Path,
    highlight: Sequence[str] = (),
) -> Path:
    """mAP50-95 against the ratio each group is pruned by alone: one thin grey line per group, ``highlight``'s in
    colour with a legend (e.g. the ten most sensitive), the unpruned model's mAP dashed.

    Args:
        curves: ``{group: [(ratio, mAP in [0, 1]), ...]}`` (:meth:`~lightning_prune.pruning.sensitivity.
            SensitivityResult.curves`).
        baseline: the unpruned model's mAP, in [0, 1]; every curve starts there at ratio 0.
        path: the PNG to write.
        highlight: groups drawn in colour and named in the legend, in legend order.

    Raises:
        ValueError: no curve has a point.

    Example:
        >>> import tempfile
        >>> curves = {"a": [(0.5, 0.30), (0.9, 0.10)], "b": [(0.5, 0.39), (0.9, 0.38)]}
        >>> plot_sensitivity(curves, 0.4, Path(tempfile.mkdtemp()) / "s.png", highlight=["a"]).exists()
        True
    """
    usable = {name: sorted(points) for name, points in curves.items() if points}
    if not usable:
        raise ValueError("Expected at least one group with a (ratio, mAP) point but got none.")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in usable.items():
        if name not in highlight:
            ax.plot(
                [0.0] + [r for r, _ in points],
                [100 * baseline] + [100 * m for _, m in points],
                color="#bbbbbb",
                linewidth=0.6,
                zorder=1,
            )
    colors = plt.get_cmap("tab10")
    for i, name in enumerate(n for n in highlight if n in usable):
        points = usable[name]
        ax.plot(
            [0.0] + [r for r, _ in points],
            [100 * baseline] + [100 * m for _, m in points],
            "-o",
            color=colors(i % 10),
            linewidth=1.2,
            markersize=2.5,
            label=name,
            zorder=2,
        )
    ax.axhline(100 * baseline, color="black", linestyle="--", linewidth=0.8, label="unpruned", zorder=0)
    ax.set_title(f"Pruning one group alone ({len(usable)} groups; grey: the rest)")
    ax.set_xlabel("fraction of the group's channels removed")
    ax.set_ylabel("mAP50-95 (points)")
    ax.legend(fontsize=6, loc="lower left")
    return _save(fig, path)
