"""CompressionReport in real (tiny) Trainer runs: the original from fit start against the pruned end, side by side."""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from lightning_prune.callbacks import CompressionReport, StructuredPruning
from lightning_prune.data import DetectionDataModule
from lightning_prune.models import YOLOv8
from lightning_prune.models.base import count_parameters
from lightning_prune.report.evaluate import evaluate_map

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("shapes"))


def make_data(root: str) -> DetectionDataModule:
    return DetectionDataModule(root=root, num_train=4, num_val=4, img_size=64, batch_size=2, num_workers=0)


def make_trainer(tmp_path, callbacks, max_epochs=2, **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        max_epochs=max_epochs,
        limit_train_batches=2,
        num_sanity_val_steps=0,
        logger=CSVLogger(tmp_path, name="logs"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    return pl.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


def test_report_of_a_pruned_fit(tmp_path, shapes_root):
    pl.seed_everything(0)
    model = YOLOv8("n", num_classes=4, img_size=64)
    before = count_parameters(model)
    report = CompressionReport(batch_sizes=[1, 2], runtimes=["cpu"], latency_repeats=2, plots=True)
    trainer = make_trainer(tmp_path, [StructuredPruning(pruning_ratio=0.5, epochs=[1]), report])
    data = make_data(shapes_root)
    trainer.fit(model, data)

    out = tmp_path / "logs" / "version_0" / "compression_report"
    rows = json.loads((out / "compression_report.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["Original", "Compressed"] == [r["name"] for r in report.rows]
    original, compressed = rows
    assert original["params"] == before and compressed["params"] == count_parameters(model) < 0.6 * before
    assert compressed["macs"] < original["macs"] and compressed["size_mb"] < original["size_mb"]
    assert set(original["latency_ms"]) == {"cpu_b1", "cpu_b2"} and all(v > 0 for v in original["latency_ms"].values())
    # mAP of the final model over the whole validation set, as evaluate_map gives it
    expected = evaluate_map(model.eval(), model.postprocess, data.val_dataloader())
    assert compressed["mAP"] == pytest.approx(expected["mAP"], abs=1e-7)
    assert compressed["mAP50"] == pytest.approx(expected["mAP50"], abs=1e-7)
    table = (out / "compression_report.md").read_text()
    assert "| Compressed |" in table and "Compressed vs Original: params −" in table
    assert all((out / name).stat().st_size > 1000 for name in ("channels.png", "gamma.png", "map_vs_macs.png"))
    # one point per validation, the MACs falling at the pruning step
    assert [p["epoch"] for p in report.points] == [0, 1]
    assert report.points[1]["macs"] < report.points[0]["macs"] and "mAP" in report.points[0]
    logged = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "report/compressed/cpu_b1_ms" in logged and "report/original/params" in logged


def test_a_run_resumed_after_pruning_compares_against_the_original(tmp_path, shapes_root):
    pl.seed_everything(0)
    model = YOLOv8("n", num_classes=4, img_size=64)
    before = count_parameters(model)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True)

    def callbacks():
        report = CompressionReport(
            runtimes=["cpu"], batch_sizes=[1], latency_repeats=1, plots=False, limit_val_batches=1
        )
        return [StructuredPruning(pruning_ratio=0.5, epochs=[1]), report]

    make_trainer(tmp_path, [*callbacks(), ckpt], max_epochs=2, enable_checkpointing=True).fit(
        model, make_data(shapes_root)
    )
    resumed = YOLOv8("n", num_classes=4, img_size=64)
    report = callbacks()[1]
    trainer = make_trainer(tmp_path, [StructuredPruning(pruning_ratio=0.5, epochs=[1]), report], max_epochs=3)
    trainer.fit(resumed, make_data(shapes_root), ckpt_path=tmp_path / "ckpts" / "last.ckpt")
    assert [r["params"] for r in report.rows] == [before, count_parameters(resumed)]
    assert count_parameters(resumed) < 0.6 * before
    assert [p["epoch"] for p in report.points] == [0, 1, 2]  # the first run's points came back with the state


def test_bad_arguments():
    for kwargs, match in [
        ({"batch_sizes": []}, r"Expected argument `batch_sizes` to be a non-empty list of ints >= 1 but got \[\]."),
        ({"runtimes": ["tpu"]}, r"Expected argument `runtimes` to be None or a non-empty list among"),
        ({"calibration_images": 0}, r"Expected argument `calibration_images` to be an int >= 1 but got 0."),
        ({"calibration_method": "kl"}, r"Expected argument `calibration_method` to be one of"),
        ({"limit_val_batches": 0}, r"Expected argument `limit_val_batches` to be None or an int >= 1 but got 0."),
        ({"latency_repeats": 0}, r"Expected argument `latency_repeats` to be an int >= 1 but got 0."),
    ]:
        with pytest.raises(ValueError, match=match):
            CompressionReport(**kwargs)


class NoPostprocess(YOLOv8):
    postprocess = None


def test_setup_errors(tmp_path, shapes_root):
    with pytest.raises(MisconfigurationException, match=r"Expected NoPostprocess to have a `postprocess"):
        make_trainer(tmp_path, [CompressionReport(runtimes=["cpu"])]).fit(
            NoPostprocess("n", num_classes=4, img_size=64), make_data(shapes_root)
        )
    model = YOLOv8("n", num_classes=4, img_size=64)
    model.example_input_array = None
    with pytest.raises(MisconfigurationException, match=r"Expected `YOLOv8.example_input_array` to be set"):
        make_trainer(tmp_path, [CompressionReport(runtimes=["cpu"])]).fit(model, make_data(shapes_root))
    assert torch.is_tensor(YOLOv8("n", num_classes=4, img_size=64).example_input_array)


def test_onnx_runtime_columns_and_the_int8_row(tmp_path, shapes_root):
    pl.seed_everything(0)
    model = YOLOv8("n", num_classes=4, img_size=64)
    report = CompressionReport(
        batch_sizes=[1], runtimes=["cpu", "ort"], int8=True, calibration_images=2, latency_repeats=1, plots=False
    )
    data = make_data(shapes_root)
    make_trainer(tmp_path, [StructuredPruning(pruning_ratio=0.5, epochs=[0]), report], max_epochs=1).fit(model, data)
    original, compressed, int8 = report.rows
    assert int8["name"] == "Compressed INT8" and int8["format"] == "onnx-int8"
    assert set(original["latency_ms"]) == {"cpu_b1", "ort_b1"} and set(int8["latency_ms"]) == {"ort_b1"}
    assert int8["onnx_mb"] < 0.4 * compressed["onnx_mb"] < compressed["onnx_mb"] < original["onnx_mb"]
    assert int8["params"] == compressed["params"] and int8["mAP"] is not None
    out = tmp_path / "logs" / "version_0" / "compression_report"
    assert {p.name for p in out.glob("*.onnx")} == {"original.onnx", "compressed.onnx", "compressed.int8.onnx"}
    assert [row["onnx_file"] for row in report.rows] == [
        str(out / name) for name in ("original.onnx", "compressed.onnx", "compressed.int8.onnx")
    ]
    assert "Compressed INT8 vs Compressed: " in (out / "compression_report.md").read_text()


DDP_SCRIPT = """
import json, sys
import pytorch_lightning as pl
import torch
sys.path[:0] = [{root!r}]
from lightning_prune.callbacks import CompressionReport, StructuredPruning
from lightning_prune.data import DetectionDataModule
from lightning_prune.models import YOLOv8

if __name__ == "__main__":
    torch.set_num_threads(1)
    pl.seed_everything(0)
    report = CompressionReport(runtimes=["cpu"], batch_sizes=[1], latency_repeats=1, plots=False,
                               dirpath={out!r} + "/report")
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, limit_train_batches=1,
                         num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir={out!r},
                         callbacks=[StructuredPruning(pruning_ratio=0.5, epochs=[1]), report])
    data = DetectionDataModule(root={data!r}, num_train=4, num_val=4, img_size=64, batch_size=2, num_workers=0)
    trainer.fit(YOLOv8("n", num_classes=4, img_size=64), data)
    json.dump({{"rows": len(report.rows), "points": len(report.points)}},
              open({out!r} + f"/rank{{trainer.global_rank}}.json", "w"))
"""


@pytest.mark.slow
def test_ddp_rank_zero_reports_alone_without_waiting_for_the_others(tmp_path, shapes_root):
    import subprocess
    import sys
    from pathlib import Path

    make_data(shapes_root).setup("fit")  # generate the data once, before two processes want it
    script = tmp_path / "ddp_report.py"
    root = str(Path(__file__).resolve().parents[2])
    script.write_text(DDP_SCRIPT.format(root=root, out=str(tmp_path), data=shapes_root))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == {"rows": 2, "points": 2} and ranks[1]["rows"] == 0  # measured on rank 0 only
    rows = json.loads((tmp_path / "report" / "compression_report.json").read_text())["rows"]
    assert rows[1]["params"] < rows[0]["params"] and rows[1]["mAP"] is not None
