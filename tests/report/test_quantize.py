"""INT8 quantization: a file under a third of the float one whose outputs follow the float model's, for each
calibration; the entropy search against the exhaustive one; calibration images letterboxed as the dataset does."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from PIL import Image
from torch import nn

from lightning_prune.data.datasets import CocoDetection
from lightning_prune.data.shapes import generate_shapes
from lightning_prune.data.transforms import PAD_VALUE, detection_transforms
from lightning_prune.models import build_detector
from lightning_prune.report.export import export_onnx, file_size_mb
from lightning_prune.report.onnx_runtime import OnnxModel
from lightning_prune.report.quantize import (
    CALIBRATION_METHODS,
    _kl_threshold,
    _name_nodes,
    load_calibration_images,
    output_nodes,
    quantize_onnx,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

S = 128  # YOLOv8n at 128 px: weights are most of the file (3M parameters)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """12 images of our shapes dataset (images of 96-128 px, so letterboxing pads) and their COCO json."""
    root = tmp_path_factory.mktemp("shapes")
    return root / "val", generate_shapes(root, "val", num_images=12, image_size=(96, 128))


@pytest.fixture(scope="module")
def yolov8n(shapes: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A YOLOv8n whose BatchNorm statistics are estimated on the images (a random net's outputs have signal then),
    exported to ONNX; with 8 calibration images and 4 held-out ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module scope: the `one_thread` fixture is not active yet
    torch.manual_seed(0)
    images = torch.cat(load_calibration_images(shapes[0], S, batch_size=4))
    model = build_detector("yolov8n", num_classes=4, img_size=S)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batch
    with torch.no_grad():
        model.train()(images)
    model.eval()
    held_out = images[8:]
    with torch.no_grad():
        expected = model(held_out)
    fp32 = export_onnx(model, images[:1], tmp_path_factory.mktemp("onnx") / "yolov8n.onnx")
    yield {
        "model": model,
        "fp32": fp32,
        "calibration": [images[i : i + 2] for i in range(0, 8, 2)],
        "held_out": held_out,
        "expected": expected,
    }
    torch.set_num_threads(threads)


def mean_centered_cosine(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """Cosine similarity of each output map with its reference after removing each channel's mean (the biases are
    constant over locations, and large in the class logits: they would make any output look similar), averaged."""
    cosines = []
    for a, e in zip(actual, expected):
        a, e = (t.transpose(0, 1).flatten(1) for t in (a, e))  # (C, B * H * W)
        a, e = a - a.mean(1, keepdim=True), e - e.mean(1, keepdim=True)
        cosines.append(float(nn.functional.cosine_similarity(a.flatten(), e.flatten(), dim=0)))
    return sum(cosines) / len(cosines)


@pytest.mark.parametrize("method", CALIBRATION_METHODS)
def test_int8_is_under_a_third_of_the_size_and_follows_the_float_model(tmp_path, yolov8n, method):
    int8 = quantize_onnx(yolov8n["fp32"], tmp_path / "yolov8n.int8.onnx", yolov8n["calibration"], method=method)
    assert file_size_mb(int8) <= 0.3 * file_size_mb(yolov8n["fp32"])  # measured 0.279
    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops

    raw = OnnxModel(int8)(yolov8n["held_out"])
    assert isinstance(raw, list)  # the output structure survived the quantizer
    model, expected = yolov8n["model"], yolov8n["expected"]
    assert [r.shape for r in raw] == [e.shape for e in expected]
    # measured (mean over the 3 levels): entropy 0.43, minmax 0.68, percentile 0.66; calibrated on blank images 0.05
    assert mean_centered_cosine(raw, expected) > 0.3
    assert len(model.postprocess(raw)) == len(yolov8n["held_out"])


def test_the_accuracy_check_fails_on_a_badly_calibrated_model(tmp_path, yolov8n):
    blank = [torch.zeros(1, 3, S, S)] * 2  # activation ranges of blank images: most real activations saturate
    int8 = quantize_onnx(yolov8n["fp32"], tmp_path / "bad.int8.onnx", blank, method="minmax")
    assert mean_centered_cosine(OnnxModel(int8)(yolov8n["held_out"]), yolov8n["expected"]) < 0.15


def weight_is_quantized(graph: onnx.GraphProto, node: onnx.NodeProto) -> bool:
    """Whether ``node``'s weight (input 1) comes out of a DequantizeLinear (else it is a float initializer)."""
    return any(n.op_type == "DequantizeLinear" and node.input[1] in n.output for n in graph.node)


def test_output_nodes_are_the_head_prediction_convs_and_their_concats(yolov8n):
    # the adapter's output layers (head.box.<i>.2, head.cls.<i>.2) under the exporter's scope names, and the concats
    # that join box and class maps per level
    convs = [f"/head/{kind}.{i}/{kind}.{i}.2/Conv" for kind in ("box", "cls") for i in range(3)]
    assert len(yolov8n["model"].adapter.output_layers(yolov8n["model"])) == len(convs)
    concats = ["/head/Concat", "/head/Concat_1", "/head/Concat_2"]
    assert output_nodes(onnx.load(str(yolov8n["fp32"]))) == sorted(convs + concats)


@pytest.mark.parametrize("float_outputs", [True, False])
def test_float_outputs_keeps_the_output_convs_in_float(tmp_path, yolov8n, float_outputs):
    int8 = quantize_onnx(
        yolov8n["fp32"], tmp_path / "int8.onnx", yolov8n["calibration"], method="minmax", float_outputs=float_outputs
    )
    graph = onnx.load(str(int8)).graph
    producers = {out: node for node in graph.node for out in node.output}
    output_ops = {producers[o.name].op_type for o in graph.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    float_convs = [n.name for n in convs if not weight_is_quantized(graph, n)]
    if float_outputs:
        assert output_ops == {"Concat"}  # not re-quantized after the concat
        assert len(float_convs) == 6 and all("/head/" in n for n in float_convs)
        assert len(convs) - len(float_convs) > 50  # every other conv is int8
    else:
        assert output_ops == {"DequantizeLinear"}
        assert float_convs == []


def scale_read_by_last_conv(path: Path) -> float:
    """Scale of the QuantizeLinear whose DequantizeLinear feeds the activation input of a graph's last conv."""
    graph = onnx.load(str(path)).graph
    producers = {out: node for node in graph.node for out in node.output}
    conv = [n for n in graph.node if n.op_type == "Conv"][-1]  # nodes are in topological order
    dequantize = producers[conv.input[0]]
    quantize = producers[dequantize.input[0]]
    assert (dequantize.op_type, quantize.op_type) == ("DequantizeLinear", "QuantizeLinear")
    return float(next(numpy_helper.to_array(i) for i in graph.initializer if i.name == quantize.input[1]))


def test_what_the_float_output_convs_read_keeps_its_observed_range(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.LeakyReLU(0.1), nn.Conv2d(8, 2, 1))
    fp32 = export_onnx(net, torch.rand(1, 3, 16, 16), tmp_path / "net.onnx")
    gen = torch.Generator().manual_seed(0)
    batches = [torch.rand(2, 3, 16, 16, generator=gen) for _ in range(4)]
    batches[0][0, :, 5:8, 5:8] = 40.0  # one bright spot: an outlier in the activations the last conv reads

    def scale(method: str, float_outputs: bool) -> float:
        path = tmp_path / f"{method}-{float_outputs}.onnx"
        return scale_read_by_last_conv(
            quantize_onnx(fp32, path, batches, method=method, percentile=99.9, float_outputs=float_outputs)
        )

    observed = scale("minmax", True)
    assert scale("minmax", False) == pytest.approx(observed)
    for method in ("entropy", "percentile"):
        assert scale(method, True) == pytest.approx(observed, rel=1e-3)  # the full range, outliers included
        assert scale(method, False) < 0.8 * observed  # clipped when the conv is INT8 like the rest (0.69, 0.34)


def test_unnamed_nodes_are_named_for_the_exclusion(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    fp32 = export_onnx(net, torch.rand(1, 3, 8, 8), tmp_path / "net.onnx")
    model = onnx.load(str(fp32))
    for node in model.graph.node:
        node.name = ""
    assert output_nodes(model) == []
    assert _name_nodes(model) and not _name_nodes(model)  # named once, then nothing left to name
    names = [n.name for n in model.graph.node]
    assert all(names) and len(set(names)) == len(names)
    assert output_nodes(model) == [model.graph.node[-1].name]
    onnx.save(model, str(tmp_path / "unnamed.onnx"))
    int8 = quantize_onnx(tmp_path / "unnamed.onnx", tmp_path / "unnamed.int8.onnx", [torch.rand(2, 3, 8, 8)])
    graph = onnx.load(str(int8)).graph
    last = next(n for n in graph.node if n.op_type == "Conv" and n.output[0] == graph.output[0].name)
    assert not weight_is_quantized(graph, last)


def input_scale(path: Path) -> float:
    """Scale of the QuantizeLinear on the graph input (its activation range / 255)."""
    graph = onnx.load(str(path)).graph
    node = next(n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "images")
    return float(next(numpy_helper.to_array(i) for i in graph.initializer if i.name == node.input[1]))


def test_entropy_clips_outliers_that_minmax_keeps(tmp_path):
    fp32 = export_onnx(nn.Conv2d(3, 8, 3), torch.rand(1, 3, 16, 16), tmp_path / "conv.onnx")
    gen = torch.Generator().manual_seed(0)
    batches = [torch.rand(2, 3, 16, 16, generator=gen) for _ in range(4)]
    batches[0][0, 0, 0, 0] = 40.0  # one outlier pixel among 6144
    scales = {  # the single conv writes the output: with float_outputs nothing would be quantized
        method: input_scale(
            quantize_onnx(
                fp32, tmp_path / f"{method}.onnx", batches, method=method, percentile=99.9, float_outputs=False
            )
        )
        for method in CALIBRATION_METHODS
    }
    assert scales["minmax"] == pytest.approx(40.0 / 255, rel=1e-3)  # the observed range, outlier included
    # the histogram's mass is in [0, 1]; the narrowest window of 255 of 2048 bins is 1/8 of the range
    assert scales["entropy"] < scales["minmax"] / 4
    assert scales["percentile"] < scales["minmax"] / 4


def exhaustive_kl_threshold(hist: np.ndarray, edges: np.ndarray, levels: int = 255) -> float:
    """MXNet's ``_get_optimal_threshold`` search, loop for loop: every window, bins merged one group at a time."""
    n = hist.size
    zero, half = n // 2, levels // 2
    best, best_threshold = np.inf, float(edges[-1])
    for i in range(half, zero + 1):
        start, stop = zero - i, min(zero + i + 1, n)
        window = hist[start:stop].astype(np.float64)
        p = window.copy()
        p[0] += hist[:start].sum()
        p[-1] += hist[stop:].sum()
        nonzero = (p != 0).astype(np.int64)
        merged = window.size // levels
        quantized = np.array([window[j * merged : (j + 1) * merged].sum() for j in range(levels)])
        quantized[-1] += window[levels * merged :].sum()
        q = np.zeros(window.size)
        for j in range(levels):
            lo, hi = j * merged, window.size if j == levels - 1 else (j + 1) * merged
            if nonzero[lo:hi].sum():
                q[lo:hi] = quantized[j] / nonzero[lo:hi].sum()
        q[p == 0] = 0
        ps, qs = smoothed(p), smoothed(q)
        divergence = np.inf if ps is None or qs is None else float(np.sum(ps * np.log(ps / qs)))
        if divergence < best:
            best, best_threshold = divergence, float(edges[stop])
    return best_threshold


def smoothed(p: np.ndarray, eps: float = 1e-4) -> np.ndarray | None:
    zeros, nonzeros = (p == 0).sum(), (p != 0).sum()
    if not nonzeros:
        return None
    out = p + eps * (p == 0) - eps * zeros / nonzeros * (p != 0)
    return out / out.sum()


DISTRIBUTIONS = {
    "gaussian+outliers": lambda g: np.concatenate([g.standard_normal(50_000), g.standard_normal(20) * 30]),
    "silu": lambda g: (lambda z: z / (1 + np.exp(-z)))(g.standard_normal(50_000) * 2),
    "bimodal": lambda g: np.concatenate([g.normal(-3, 0.3, 25_000), g.normal(4, 0.5, 25_000)]),
}


@pytest.mark.parametrize("name", DISTRIBUTIONS)
def test_kl_threshold_is_the_exhaustive_search(name):
    x = DISTRIBUTIONS[name](np.random.default_rng(0))
    t = np.abs(x).max()
    small = np.histogram(x, 512, range=(-t, t))  # 129 windows: the coarse pass already tries them all
    assert _kl_threshold(*small) == exhaustive_kl_threshold(*small)
    full = np.histogram(x, 2048, range=(-t, t))  # 897 windows: coarse (128) then fine
    assert _kl_threshold(*full) == pytest.approx(exhaustive_kl_threshold(*full), abs=0.02 * t)
    if name == "gaussian+outliers":
        assert _kl_threshold(*full) < 0.5 * t  # the outliers are clipped


def test_calibration_images_are_letterboxed_as_the_dataset_does(shapes):
    folder, annotations = shapes
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub").mkdir(exist_ok=True)
    batches = load_calibration_images(folder, 64, limit=5, batch_size=2)
    assert [tuple(b.shape) for b in batches] == [(2, 3, 64, 64), (2, 3, 64, 64), (1, 3, 64, 64)]
    assert all(b.dtype == torch.float32 and 0 <= b.min() and b.max() <= 1 for b in batches)
    dataset = CocoDetection(folder, annotations, transforms=detection_transforms(64, train=False))
    by_name = {rec.path.name: i for i, rec in enumerate(dataset.records)}
    names = sorted(p.name for p in folder.glob("*.jpg"))[:5]  # sorted by name, first `limit`
    for image, name in zip(torch.cat(batches), names):
        torch.testing.assert_close(image, dataset[by_name[name]][0], rtol=0, atol=0)


def test_a_wide_image_is_padded_top_and_bottom(tmp_path):
    Image.new("RGB", (100, 50), (255, 255, 255)).save(tmp_path / "wide.png")
    (image,) = load_calibration_images(tmp_path, 64)[0]
    assert torch.all(image[:, 16:48] == 1.0)  # resized to 64 x 32, centred
    assert torch.allclose(image[:, :16], torch.tensor(PAD_VALUE / 255)) and torch.allclose(
        image[:, 48:], torch.tensor(PAD_VALUE / 255)
    )


@pytest.fixture
def conv_onnx(tmp_path: Path) -> Path:
    return export_onnx(nn.Conv2d(3, 4, 1), torch.rand(1, 3, 8, 8), tmp_path / "conv.onnx")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": "kl"}, ValueError,
         r"Expected argument `method` to be one of \['entropy', 'minmax', 'percentile'\] but got 'kl'."),
        ({"percentile": 0}, ValueError, r"Expected argument `percentile` to be a float in \(0, 100\] but got 0."),
        ({"percentile": 100.5}, ValueError,
         r"Expected argument `percentile` to be a float in \(0, 100\] but got 100.5."),
        ({"float_outputs": "yes"}, ValueError, r"Expected argument `float_outputs` to be a bool but got 'yes'."),
        ({"fp32_path": "none.onnx"}, FileNotFoundError,
         r"Expected argument `fp32_path` to be an existing ONNX file but got '.*none.onnx'."),
        ({"int8_path": "conv.onnx"}, ValueError,
         r"Expected argument `int8_path` to differ from `fp32_path` but both are '.*conv.onnx'."),
        ({"calibration": []}, ValueError,
         r"Expected argument `calibration` to yield at least one image batch but it yielded none."),
        ({"calibration": [torch.rand(3, 8, 8)]}, TypeError,
         r"Expected argument `calibration` to yield image batches \(B, 3, S, S\) but item 0 is a 3-D tensor."),
        ({"calibration": [np.zeros((1, 3, 8, 8))]}, TypeError,
         r"Expected argument `calibration` to yield image batches \(B, 3, S, S\) but item 0 is ndarray."),
    ],
)  # fmt: skip
def test_bad_quantize_arguments(conv_onnx, kwargs, error, match):
    folder = conv_onnx.parent
    args = {"fp32_path": conv_onnx, "int8_path": folder / "conv.int8.onnx", "calibration": [torch.rand(1, 3, 8, 8)]}
    args.update({k: folder / v if k.endswith("_path") else v for k, v in kwargs.items()})
    with pytest.raises(error, match=match):
        quantize_onnx(args.pop("fp32_path"), args.pop("int8_path"), args.pop("calibration"), **args)
    assert not (folder / "conv.int8.onnx").exists()


def test_arguments_are_checked_before_any_work(tmp_path):
    def never() -> Iterator[torch.Tensor]:
        raise AssertionError("calibration was read")
        yield  # pragma: no cover

    with pytest.raises(ValueError, match=r"Expected argument `method`"):
        quantize_onnx(tmp_path / "none.onnx", tmp_path / "out.onnx", never(), method="kl")
    with pytest.raises(FileNotFoundError, match=r"Expected argument `fp32_path`"):
        quantize_onnx(tmp_path / "none.onnx", tmp_path / "out.onnx", never())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"folder": "missing"}, FileNotFoundError,
         r"Expected argument `calibration` to be an existing folder of images but got '.*missing'."),
        ({"folder": "empty"}, ValueError, r"Expected images \(.jpg, .jpeg, .png, .bmp, .webp\) in .*empty but the"),
        ({"img_size": 0}, ValueError, r"Expected argument `img_size` to be an int >= 1 but got 0."),
        ({"batch_size": 0}, ValueError, r"Expected argument `batch_size` to be an int >= 1 but got 0."),
        ({"limit": 0}, ValueError, r"Expected argument `limit` to be None or an int >= 1 but got 0."),
    ],
)  # fmt: skip
def test_bad_calibration_folder_arguments(tmp_path, kwargs, error, match):
    (tmp_path / "images").mkdir()
    (tmp_path / "empty").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    args = {"folder": "images", "img_size": 32, **kwargs}
    args["folder"] = tmp_path / args["folder"]
    with pytest.raises(error, match=match):
        load_calibration_images(**args)
