"""compression_report / format_report / write_report on small models, and the plots' argument errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lightning_prune.report.compression import compression_report, format_report, report_metrics, write_report
from lightning_prune.report.plots import plot_gamma_histogram, plot_map_vs_macs

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def net(width: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, 4, 1))


def test_rows_measure_both_models_and_leave_them_untouched(tmp_path):
    original, compressed = net(32), net(8)
    compressed.train()
    rows = compression_report(
        {"Big": original, "Small": compressed},
        torch.zeros(1, 3, 32, 32),
        batch_sizes=[1, 3],
        runtimes=["cpu"],
        repeats=2,
    )
    assert [r["name"] for r in rows] == ["Big", "Small"]
    big, small = rows
    assert big["params"] == sum(p.numel() for p in original.parameters())
    assert small["macs"] < big["macs"] and small["size_mb"] < big["size_mb"]
    assert set(big["latency_ms"]) == {"cpu_b1", "cpu_b3"} and big["mAP"] is None and big["onnx_mb"] is None
    assert big["onnx_file"] is None and small["onnx_file"] is None
    assert compressed.training and isinstance(compressed[1], nn.BatchNorm2d)  # timed on fused eval copies
    md, js = write_report(rows, tmp_path, (1, 3, 32, 32))
    assert json.loads(js.read_text())["rows"] == rows
    text = md.read_text()
    assert "| Big | " in text and "CPU b3 (ms)" in text and "Small vs Big: params −" in text and "Input 3×32×32" in text
    metrics = report_metrics(rows)
    assert metrics["report/small/params"] == small["params"] and "report/big/cpu_b3_ms" in metrics


def test_fidelity_is_speedup_over_macs_reduction():
    row = {"params": 1.0, "macs": 1e9, "size_mb": 1.0, "onnx_mb": None, "mAP": None, "mAP50": None}
    rows = [
        {**row, "name": "A", "macs": 4e9, "latency_ms": {"cpu_b1": 8.0}},
        {**row, "name": "B", "latency_ms": {"cpu_b1": 4.0}},
    ]
    assert "MACs −75.0% (÷4.00)" in format_report(rows) and "CPU b1 ×2.00 (fidelity 0.50)" in format_report(rows)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"runtimes": ["tpu"]}, r"Expected argument `runtimes` to be a non-empty list among \['cpu', 'ort', 'cuda'\]"),
        ({"runtimes": []}, r"Expected argument `runtimes` to be a non-empty list among"),
        ({"batch_sizes": [0]}, r"Expected argument `batch_sizes` to be a non-empty list of ints >= 1 but got \[0\]."),
        (
            {"runtimes": ["ort"]},
            r"Expected argument `out_dir` to be set for ONNX Runtime latency and INT8 but got None.",
        ),
        ({"int8": True, "out_dir": "x"}, r"Expected argument `calibration` to be image batches for `int8=True`"),
        ({"dataloader": []}, r"Expected argument `postprocess` to decode Sequential's raw output for the mAP"),
        ({"models": {}}, r"Expected argument `models` to map row names to models but got an empty mapping."),
    ],
)
def test_bad_arguments(kwargs, match):
    kwargs = {"models": {"a": net(8), "b": net(4)}, "runtimes": ["cpu"], **kwargs}
    with pytest.raises(ValueError, match=match):
        compression_report(example_input=torch.zeros(1, 3, 16, 16), **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without a GPU")
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(ValueError, match=r"Expected a CUDA device for `runtimes` with 'cuda' but torch sees none."):
        compression_report({"a": net(8), "b": net(4)}, torch.zeros(1, 3, 16, 16), runtimes=["cuda"])


def test_plot_errors(tmp_path):
    with pytest.raises(ValueError, match=r"Expected a BatchNorm with a weight in one of the models \['a'\]"):
        plot_gamma_histogram({"a": nn.Conv2d(3, 3, 1)}, tmp_path / "g.png")
    with pytest.raises(ValueError, match=r"Expected validation points with `macs` and `mAP` but got none."):
        plot_map_vs_macs([{"epoch": 0, "macs": 1.0}], tmp_path / "m.png")


def test_missing_matplotlib_names_the_extra(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'lightning_prune\[report\]'"):
        plot_map_vs_macs([{"macs": 1.0, "mAP": 0.1}], tmp_path / "m.png")
