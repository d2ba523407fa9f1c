"""The benchmark scripts still run: a quick smoke pass into a temporary RESULTS file (no numbers checked)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def load(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


@pytest.mark.slow
def test_pruning_speed_quick_writes_its_section(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n<!-- other:start -->\n## other\n\nkept\n<!-- other:end -->\n")
    body = load("pruning_speed").main(
        ["--quick", "--scale", "n", "--threads", "1", "--repeats", "1", "--results", str(results)]
    )
    text = results.read_text()
    assert "<!-- pruning_speed:start -->" in text and "<!-- pruning_speed:end -->" in text
    assert "kept" in text  # other sections untouched
    for method in ("Torch-Pruning", "Torch-Pruning round_to=8", "ours"):
        assert f"| {method}" in body
    assert "pruning event" in body
