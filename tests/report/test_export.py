"""ONNX and TorchScript export: the files compute the PyTorch outputs at any batch size, the model is untouched, and
OnnxModel gives back what the detector's decoding expects."""

from __future__ import annotations

import logging
import sys
import warnings

import onnx
import pytest
import torch
import torch_pruning as tp
from test_fuse import randomize_bn  # rootdir-style import of tests/report/test_fuse.py
from torch import nn

import lightning_prune.report.export as export_module
from lightning_prune.models import build_detector
from lightning_prune.pruning import prune_channels
from lightning_prune.report.export import (
    OUTPUTS_KEY,
    check_export,
    export_onnx,
    export_torchscript,
    file_size_mb,
    require_export_extra,
    restore_outputs,
)
from lightning_prune.report.onnx_runtime import OnnxModel, onnx_latency_ms
from lightning_prune.report.quantize import quantize_onnx

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

S = 64


def detector(name: str, pruned: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = randomize_bn(build_detector(name, num_classes=4, img_size=S))
    if pruned:
        keep = [model.get_submodule(n) for n in model.adapter.output_layers(model)]
        before = sum(p.numel() for p in model.parameters())
        prune_channels(model, torch.rand(1, 3, S, S), tp.importance.MagnitudeImportance(p=2), 0.5, ignored_layers=keep)
        assert sum(p.numel() for p in model.parameters()) < 0.5 * before
    return model.train()


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def reference(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.eval()
    try:
        with torch.no_grad():
            return list(model(x))
    finally:
        model.train()


def assert_outputs_close(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, atol=1e-4 * max(1.0, e.abs().max().item()), rtol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
@pytest.mark.parametrize(
    ("name", "pruned"),
    [("yolov3-tiny", False), ("yolov8n", False), ("yolov8n", True)],
    ids=["v3t", "v8n", "v8n-pruned"],
)
def test_exports_compute_the_pytorch_outputs_at_batch_1_and_8(tmp_path, name, pruned):
    model = detector(name, pruned)
    before = state(model)
    onnx_path = export_onnx(model, torch.rand(1, 3, S, S), tmp_path / "model.onnx")
    ts_path = export_torchscript(model, torch.rand(1, 3, S, S), tmp_path / "model.pt")

    # the model itself is untouched: modes, parameters and buffers
    assert all(m.training for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    onnx_model, traced = OnnxModel(onnx_path), torch.jit.load(str(ts_path))
    for batch in (1, 8):
        x = torch.rand(batch, 3, S, S)
        expected = reference(model, x)
        raw = onnx_model(x)
        assert isinstance(raw, list)  # the structure the detector returns
        assert_outputs_close(raw, expected)
        assert_outputs_close(list(traced(x)), expected)
        assert check_export(model, onnx_path, x) <= 1e-4
        assert check_export(model, ts_path, x) <= 1e-4

        # the detector's own decoding consumes the ONNX output as it is
        boxes, scores = model.decode(raw)
        ref_boxes, ref_scores = model.decode(expected)
        torch.testing.assert_close(scores, ref_scores, atol=1e-4, rtol=0)
        torch.testing.assert_close(boxes, ref_boxes, atol=1e-3, rtol=0)
        detections = model.postprocess(raw)
        assert len(detections) == batch and set(detections[0]) == {"boxes", "scores", "labels"}
    assert onnx_model.size_mb == file_size_mb(onnx_path) > 0
    assert onnx_model.path == onnx_path and "MB" in repr(onnx_model)


class TupleNet(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.mean(dim=(2, 3)), x * 2


@pytest.mark.parametrize(
    ("net", "kind"),
    [(nn.Conv2d(3, 4, 1), "tensor"), (TupleNet(), "tuple")],
)
def test_the_output_structure_is_recorded_and_restored(tmp_path, net, kind):
    path = export_onnx(net, torch.rand(1, 3, 8, 8), tmp_path / "net.onnx")
    assert {p.key: p.value for p in onnx.load(str(path)).metadata_props} == {OUTPUTS_KEY: kind}
    out = OnnxModel(path)(torch.rand(2, 3, 8, 8))
    assert isinstance(out, torch.Tensor if kind == "tensor" else tuple)
    # a re-export over the same file keeps one key
    export_onnx(net, torch.rand(1, 3, 8, 8), path)
    assert len(onnx.load(str(path)).metadata_props) == 1


def test_static_batch_and_opset(tmp_path):
    net = nn.Conv2d(3, 4, 1)
    fixed = onnx.load(str(export_onnx(net, torch.rand(2, 3, 8, 8), tmp_path / "a.onnx", dynamic_batch=False, opset=13)))
    dynamic = onnx.load(str(export_onnx(net, torch.rand(2, 3, 8, 8), tmp_path / "b.onnx")))
    assert fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    assert dynamic.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert dynamic.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [o.version for o in fixed.opset_import if o.domain in ("", "ai.onnx")] == [13]


class UpNet(nn.Module):
    """Conv → BN → SiLU and a nearest upsampling: the ops of our necks, as a list of two maps."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.SiLU())
        self.up = nn.Upsample(scale_factor=2.0)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        y = self.block(x)
        return [y, self.up(y)]


@pytest.mark.parametrize("legacy", [True, False], ids=["torchscript-exporter", "dynamo-exporter"])
def test_either_exporter_writes_one_quiet_file(tmp_path, monkeypatch, capsys, caplog, legacy):
    monkeypatch.setattr(export_module, "_legacy_exporter_available", lambda: legacy)  # dynamo: once legacy is gone
    net = randomize_bn(UpNet()).train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = export_onnx(net, torch.rand(1, 3, 32, 32), tmp_path / "up.onnx")
    assert [str(w.message) for w in caught] == []  # deprecation notices and tracer warnings stayed inside
    assert capsys.readouterr().out == ""
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert [p.name for p in tmp_path.iterdir()] == ["up.onnx"]  # weights inside the file, no external data
    x = torch.rand(3, 3, 32, 32)
    assert_outputs_close(OnnxModel(path)(x), reference(net, x))


def test_a_file_that_computes_otherwise_fails_the_check(tmp_path):
    torch.manual_seed(0)
    a, b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
    for path in (
        export_onnx(a, torch.rand(1, 3, 8, 8), tmp_path / "a.onnx"),
        export_torchscript(a, torch.rand(1, 3, 8, 8), tmp_path / "a.pt"),
    ):
        with pytest.raises(ValueError, match=r"to compute the PyTorch outputs within atol=0.0001 .* differs by up to"):
            check_export(b, path, torch.rand(1, 3, 8, 8))
        assert check_export(b, path, torch.rand(1, 3, 8, 8), atol=100.0) > 1e-2  # the difference is returned


def test_onnx_latency_is_timed_interleaved(tmp_path, monkeypatch):
    small = export_onnx(nn.Conv2d(3, 4, 1), torch.rand(1, 3, 32, 32), tmp_path / "small.onnx")
    big = export_onnx(nn.Conv2d(3, 256, 7, padding=3), torch.rand(1, 3, 32, 32), tmp_path / "big.onnx")
    calls: list[str] = []
    run = OnnxModel.__call__

    def recording(self: OnnxModel, images: torch.Tensor):
        calls.append(self.path.stem)
        return run(self, images)

    monkeypatch.setattr(OnnxModel, "__call__", recording)
    small_ms, big_ms = onnx_latency_ms([small, big], torch.rand(1, 3, 32, 32), warmup=1, repeats=3)
    assert calls == ["small", "big"] * 4
    assert 0 < small_ms < big_ms  # ~1300x the multiply-adds


def test_threads_of_the_session(tmp_path):
    path = export_onnx(nn.Conv2d(3, 4, 1), torch.rand(1, 3, 8, 8), tmp_path / "c.onnx")
    assert OnnxModel(path, threads=2).session.get_session_options().intra_op_num_threads == 2
    assert OnnxModel(path).session.get_session_options().intra_op_num_threads == torch.get_num_threads()


def test_session_threads_do_not_spin_between_runs(tmp_path):
    """Spinning threads of one session slow the next session's run: interleaved timings need them asleep."""
    path = export_onnx(nn.Conv2d(3, 4, 1), torch.rand(1, 3, 8, 8), tmp_path / "c.onnx")
    options = OnnxModel(path).session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


@pytest.mark.parametrize("missing", ["onnx", "onnxruntime"])
def test_a_missing_extra_names_the_pip_install(tmp_path, monkeypatch, missing):
    path = export_onnx(nn.Conv2d(3, 4, 1), torch.rand(1, 3, 8, 8), tmp_path / "c.onnx")
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` now raises ImportError
    match = rf"`{missing}` .* HINT: `pip install 'lightning_prune\[export\]'`"
    for call in (
        require_export_extra,
        lambda: export_onnx(nn.Conv2d(3, 4, 1), torch.rand(1, 3, 8, 8), tmp_path / "d.onnx"),
        lambda: OnnxModel(path),
        lambda: quantize_onnx(path, tmp_path / "c.int8.onnx", [torch.rand(1, 3, 8, 8)]),
    ):
        with pytest.raises(ModuleNotFoundError, match=match):
            call()


class DictNet(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"y": x}


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda p: export_onnx(nn.Identity(), torch.rand(1, 3), p / "a.onnx", opset=10), ValueError,
         r"Expected argument `opset` to be an int >= 11 but got 10."),
        (lambda p: export_onnx(nn.Identity(), torch.rand(1, 3), p / "a.onnx", opset="17"), ValueError,
         r"Expected argument `opset` to be an int >= 11 but got '17'."),
        (lambda p: export_onnx(nn.Identity(), torch.rand(1, 3), p / "a.onnx", atol=0), ValueError,
         r"Expected argument `atol` to be a float > 0 but got 0."),
        (lambda p: export_torchscript(nn.Identity(), torch.rand(1, 3), p / "a.pt", atol=-1e-3), ValueError,
         r"Expected argument `atol` to be a float > 0 but got -0.001."),
        (lambda p: check_export(nn.Identity(), p / "a.onnx", torch.rand(1, 3), atol=0.0), ValueError,
         r"Expected argument `atol` to be a float > 0 but got 0.0."),
        (lambda p: check_export(nn.Identity(), p / "a.bin", torch.rand(1, 3)), ValueError,
         r"Expected argument `path` to end with one of \['.onnx', '.pt', '.ts', '.torchscript'\] but got '.*a.bin'."),
        (lambda p: check_export(nn.Identity(), p / "none.onnx", torch.rand(1, 3)), FileNotFoundError,
         r"Expected argument `path` to be an existing file but got '.*none.onnx'."),
        (lambda p: file_size_mb(p / "none.onnx"), FileNotFoundError,
         r"Expected argument `path` to be an existing file but got '.*none.onnx'."),
        (lambda p: export_onnx(nn.Identity(), [torch.rand(1, 3)], p / "a.onnx"), TypeError,
         r"Expected argument `example_input` to be a tensor \(an image batch\) but got list."),
        (lambda p: export_torchscript(DictNet(), torch.rand(1, 3), p / "a.pt"), TypeError,
         r"Expected the model to return a tensor or a list or tuple of tensors but got dict."),
        (lambda p: OnnxModel(p / "none.onnx"), FileNotFoundError,
         r"Expected argument `path` to be an existing ONNX file but got '.*none.onnx'."),
        (lambda p: OnnxModel(export_onnx(nn.Identity(), torch.rand(1, 3), p / "i.onnx"), threads=0), ValueError,
         r"Expected argument `threads` to be None or an int >= 1 but got 0."),
        (lambda p: onnx_latency_ms([], torch.rand(1, 3), warmup=-1), ValueError,
         r"Expected argument `warmup` to be an int >= 0 but got -1."),
        (lambda p: onnx_latency_ms([], torch.rand(1, 3), repeats=0), ValueError,
         r"Expected argument `repeats` to be an int >= 1 but got 0."),
        (lambda p: restore_outputs([torch.zeros(1), torch.zeros(1)], "tensor"), ValueError,
         r"Expected the output structure to be 'list', 'tuple' or 'tensor' \(with one output\) but got 'tensor' with"
         r" 2 outputs."),
    ],
)  # fmt: skip
def test_bad_arguments(tmp_path, call, error, match):
    with pytest.raises(error, match=match):
        call(tmp_path)
