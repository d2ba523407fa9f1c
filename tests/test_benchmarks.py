"""The benchmark scripts still run: a quick smoke pass into a temporary RESULTS file (no numbers checked)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import yaml

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def load(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # as an import does: dataclasses look their module up there
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


@pytest.mark.slow
def test_slimming_writes_its_section(tmp_path):
    from test_pipeline import tiny  # a 64 px, few-image version of a pipeline recipe

    recipe = tiny(tmp_path, ROOT / "recipes/shapes/yolov3-slim.yaml")
    results = tmp_path / "RESULTS.md"
    args = [
        "--recipe",
        str(recipe),
        "--steps",
        "3",
        "--rounds",
        "1",
        "--results",
        str(results),
        "--latency_repeats",
        "2",
    ]
    body = load("slimming").main([*args, "--data.root", str(tmp_path / "cache")])
    assert "<!-- slimming:start -->" in results.read_text()
    for row in ("| Baseline |", "| Sparse |", "| Pruned |", "| Finetuned |", "without `fold_bias`", "step time"):
        assert row in body


@pytest.mark.slow
def test_distillation_writes_its_section(tmp_path):
    from test_pipeline import tiny

    recipe = tiny(tmp_path, ROOT / "recipes/shapes/yolov3-slim.yaml")
    results = tmp_path / "RESULTS.md"
    args = ["--recipe", str(recipe), "--seeds", "0", "--finetune_epochs", "1", "--steps", "3", "--rounds", "1"]
    kd = '{"loss": "fm_nms", "weight": 1.0, "features": ["neck.set3"]}'  # the default's layers are YOLOv8's
    body = load("distillation").main(
        [*args, "--kd", kd, "--results", str(results), "--data.root", str(tmp_path / "cache")]
    )
    assert "<!-- distillation:start -->" in results.read_text()
    for row in ("| without KD |", "| with KD |", "KD >= no KD + 0.5 point", "teacher forward", "'fm_nms'"):
        assert row in body


@pytest.mark.slow
def test_compression_writes_its_section(tmp_path):
    from test_pipeline import tiny

    recipe = tiny(tmp_path, ROOT / "recipes/shapes/yolov8n.yaml")
    results = tmp_path / "RESULTS.md"
    args = ["--recipe", str(recipe), "--finetune_epochs", "1", "--calibration_images", "2", "--repeats", "1"]
    extra = ["--trainer.max_epochs", "1", "--data.root", str(tmp_path / "cache")]
    body = load("compression").main([*args, "--results", str(results), *extra])
    assert "<!-- compression:start -->" in results.read_text()
    rows = (
        "| Baseline |",
        "| Pruned+KD |",
        "| Pruned+KD INT8 |",
        "INT8 file <= 0.3",
        "ONNX Runtime, batch 8",
        "| minmax | float |",
        "| entropy | INT8 |",
        "Distillation ({'loss': 'fm_nms', 'weight': 300, 'features': ['neck.td3'",  # YOLOv8: distillation.py's KD
        f"with `--trainer.max_epochs 1 --data.root {tmp_path / 'cache'}` for every stage",  # to rerun it
        f"Command: `python benchmarks/compression.py --recipe {recipe} ",
    )
    for row in rows:
        assert row in body


def test_compression_fidelity_verdict_is_the_median_of_the_runs():
    compression = load("compression")
    base = {"macs": 2.0, "latency_ms": {"cpu_b1": 10.0, "ort_b1": 10.0}}
    fp32 = {"macs": 1.0, "onnx_mb": 4.0, "mAP": 0.5, "latency_ms": {"cpu_b1": 5.0, "ort_b1": 6.0}}
    int8 = {"macs": 1.0, "onnx_mb": 1.0, "mAP": 0.495, "latency_ms": {}}
    # the report's own run: cpu 1.00, ort 0.83; three more runs each
    lines = compression.targets([base, fp32, int8], {"cpu_b1": [1.6, 1.6, 1.5], "ort_b1": [1.9, 2.0, 1.8]})
    cpu = next(line for line in lines if "CPU eager, batch 1" in line)
    ort = next(line for line in lines if "ONNX Runtime, batch 1" in line)
    assert "0.80, median of 4 runs (0.75–1.00; the table's 1.00)" in cpu and cpu.endswith("| NOT met |")
    assert "0.93, median of 4 runs (0.83–1.00; the table's 0.83)" in ort and ort.endswith("| met |")
    (alone,) = (line for line in compression.targets([base, fp32, int8]) if "CPU eager" in line)
    assert "| 1.00, ×2.00 fewer MACs | met |" in alone


def test_compression_refuses_negative_latency_runs(capsys):
    with pytest.raises(SystemExit):
        load("compression").main(["--latency_runs", "-1"])
    assert "--latency_runs: expected an int >= 0 but got -1" in capsys.readouterr().err


@pytest.mark.slow
def test_distillation_step_only_writes_its_own_section(tmp_path):
    from test_pipeline import tiny

    recipe = tiny(tmp_path, ROOT / "recipes/shapes/yolov3-slim.yaml")
    results = tmp_path / "RESULTS.md"
    args = ["--recipe", str(recipe), "--step_only", "--steps", "3", "--rounds", "1", "--results", str(results)]
    body = load("distillation").main([*args, "--kd", '{"loss": "fm_nms", "weight": 1.0}'])  # YOLOv3: no YOLOv8 necks
    assert "<!-- distillation_step:start -->" in results.read_text() and "distillation:start" not in results.read_text()
    assert "teacher forward" in body


@pytest.mark.slow
def test_compare_quick_writes_its_section(tmp_path):
    module = load("compare")
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n<!-- other:start -->\n## other\n\nkept\n<!-- other:end -->\n")
    args = ["--quick", "--threads", "1", "--data_root", str(tmp_path / "cache"), "--out", str(tmp_path / "runs")]
    args += ["--round_to", "4"]  # our rows' channel multiple; their stage files say it
    body = module.main([*args, "--latency_sizes", "64,96", "--results", str(results), "--section", "compare_quick"])
    text = results.read_text()
    assert "| CPU 64 px b1 (ms) | CPU 64 px b8 (ms) | CPU 96 px b1 (ms) | CPU 96 px b8 (ms) |" in body
    assert "at -50% MACs, 96 px, batch 8 |" in body  # a speedup verdict per measured side and batch
    assert "<!-- compare_quick:start -->" in text and "<!-- compare_quick:end -->" in text and "kept" in text
    assert "compare:start" not in text and module.resolve_args([]).section == "compare"
    for model in ("### yolov8n", "### yolov3-tiny"):
        assert model in body
    for method in ["Baseline", *module.METHODS]:
        assert f"| {method} |" in body
    for row in ("| SparsityRegularization", "| Distillation", "one pruning event", "beats every peer row"):
        assert row in body
    assert "ours with `round_to=4`" in body
    seed = tmp_path / "runs/yolov8n-64px-b1-quick/seed0"
    assert (seed / "baseline.ckpt").is_file() and list(seed.glob("sensitivity-r*-round4.json"))  # kept for a rerun
    assert (seed / "budget_allocated-e2-t0.5-round4.pt").is_file()
    assert (seed / "torch_pruning_one_shot-e2-t0.5.pt").is_file()  # the peers do not round: their names stay


@pytest.mark.slow
def test_allocation_trains_analyses_and_writes_its_section(tmp_path):
    recipe = tmp_path / "tiny.yaml"  # a 64 px, few-image single-stage recipe (the benchmark trains it)
    config = {
        "_base_": [str(ROOT / "recipes/shapes/yolov8n.yaml")],
        "data": {"img_size": 64, "num_train": 8, "num_val": 4, "batch_size": 4, "num_workers": 0},
        "trainer": {"accelerator": "cpu", "limit_train_batches": 2, "enable_progress_bar": False},
    }
    recipe.write_text(yaml.safe_dump(config))
    results = tmp_path / "RESULTS.md"
    args = ["--recipe", str(recipe), "--baseline_epochs", "1", "--ratios", "0.5", "--sensitivity_batches", "1"]
    args += ["--sensitivity_groups", r"backbone\.stage[45].*"]  # a few groups: each costs an evaluation
    args += ["--finetune_epochs", "1", "--train_batches", "1", "--target_macs", "0.9", "--out", str(tmp_path / "out")]
    args += ["--methods", "uniform,sensitivity", "--results", str(results), "--data.root", str(tmp_path / "cache")]
    body = load("allocation").main(args)
    assert "<!-- allocation:start -->" in results.read_text()
    for row in ("| uniform |", "| sensitivity |", "sensitivity-allocated >= uniform + 1.0 before finetune"):
        assert row in body
    assert (tmp_path / "out/sensitivity/sensitivity.json").is_file()  # reused by a rerun


@pytest.mark.slow
def test_latency_target_writes_its_section(tmp_path):
    results = tmp_path / "RESULTS.md"
    args = ["--img_size", "64", "--batches", "1", "--fractions", "0.7", "--repeats", "2", "--threads", "1"]
    body = load("latency_target").main([*args, "--results", str(results)])
    assert "<!-- latency_target:start -->" in results.read_text()
    assert "| 1 | importance |" in body and "latency target in ms met within 10%" in body


def test_latency_floor_writes_its_section(tmp_path):
    results = tmp_path / "RESULTS.md"
    body = load("latency_floor").main(["--quick", "--repeats", "1", "--threads", "1", "--results", str(results)])
    assert "<!-- latency_floor:start -->" in results.read_text()
    assert "| YOLOv8n (4 classes) | 128 | 1 |" in body


@pytest.mark.parametrize("family", ["yolov8", "yolov3"])
def test_the_floor_model_keeps_one_channel_per_group_and_the_output_shapes(family):
    import torch

    floor = load("latency_floor")
    make = (lambda: floor.build("n", 4)) if family == "yolov8" else (lambda: floor.yolov3("tiny", 4))
    base = make()
    model = floor.floor_model(make(), 64)
    outputs = set(model.adapter.output_layers(model))
    for name, conv in model.named_modules():
        if isinstance(conv, torch.nn.Conv2d) and name not in outputs:
            assert conv.out_channels == 1, name
    x = torch.zeros(1, 3, 64, 64)
    assert [o.shape for o in model(x)] == [o.shape for o in base(x)]


def test_compare_fit_trains_every_module_in_training_mode(tmp_path):
    """A model loaded for evaluation (eval mode) is finetuned with live BatchNorm: the Trainer keeps submodule modes."""
    module = load("compare")
    spec = module.resolve_spec("yolov8n", 64, {**module.QUICK_DATA, "root": str(tmp_path)})
    model = spec.build().eval()
    data = module.recipe_datamodule({"data": spec.data})
    modes: list[bool] = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            modes.extend(m.training for m in pl_module.modules())

    module.fit(model, data, 1, [Record()], {"limit_train_batches": 1, "default_root_dir": str(tmp_path)})
    assert modes and all(modes)


@pytest.mark.parametrize("script", ["compression", "distillation"])
@pytest.mark.parametrize(("flag", "value"), [("--kd", "5"), ("--prune", "[1, 2]"), ("--kd", "{a: [")])
def test_kd_and_prune_overrides_must_be_yaml_mappings(script, flag, value, capsys):
    with pytest.raises(SystemExit):
        load(script).main([flag, value, "--baseline", "/nonexistent.ckpt"])
    assert f"argument {flag}: expected a YAML mapping" in capsys.readouterr().err


@pytest.mark.parametrize("sizes", ["0", "128,x", ""])
def test_compare_latency_sizes_are_checked_at_parsing(sizes, capsys):
    with pytest.raises(SystemExit):
        load("compare").main(["--latency_sizes", sizes])
    assert "--latency_sizes: expected input sides >= 32" in capsys.readouterr().err


def test_the_recorded_command_can_be_pasted_into_a_shell():
    import shlex

    results = load("_results")
    argv = ["--prune", "{round_to: 16}", "--out", "/tmp/runs"]
    line = results.command("compression.py", argv)
    assert line == "python benchmarks/compression.py --prune '{round_to: 16}' --out /tmp/runs"
    assert shlex.split(line)[2:] == argv


@pytest.mark.parametrize("value", ["0", "x", "-8"])
def test_compare_round_to_is_checked_at_parsing(value, capsys):
    with pytest.raises(SystemExit):
        load("compare").main(["--round_to", value])
    assert f"--round_to: expected a channel multiple >= 1 (e.g. 16), got '{value}'" in capsys.readouterr().err


def test_compare_round_to_other_than_the_default_has_stage_files_of_its_own():
    module = load("compare")
    assert module.resolve_args([]).round_to == module.ROUND_TO == 8
    assert module.resolve_args(["--round_to", "16"]).round_to == 16
    # the default keeps the names of the stages already cached; another multiple never reuses them
    assert module.round_suffix(8) == "" and module.round_suffix(16) == "-round16"


@pytest.mark.parametrize("script", ["distillation", "slimming", "compare"])
def test_steps_at_most_the_warm_up_is_refused_before_any_run(script, capsys):
    with pytest.raises(SystemExit):
        load(script).main(["--steps", "2"])
    assert "--steps: expected an int > 2" in capsys.readouterr().err


def test_compare_reuses_the_kept_sensitivity_table(tmp_path):
    from lightning_prune.pruning.sensitivity import SensitivityResult, SensitivityRow

    module = load("compare")
    budget = module.Budget(5, 0.5, tmp_path / "b.ckpt", {}, {}, [0, 1], [0.25, 0.5], 4, {}, tmp_path)
    table = SensitivityResult(0.5, 1e6, [0.25, 0.5], {"conv": 16}, [SensitivityRow("conv", 0.5, 0.4, -0.1, 0.2, 8)])
    (tmp_path / "sensitivity-r0.25,0.5-s2.json").write_text(module.json.dumps({"table": table.to_dict(), "seconds": 7}))
    loaded, seconds = module.sensitivity_stage(None, budget)  # no model: nothing is analysed again
    assert loaded.to_dict() == table.to_dict() and seconds == 7.0
