"""Post-training static INT8 quantization of an exported ONNX file with ONNX Runtime, calibrated on images.

:func:`quantize_onnx` writes a QDQ model (``QuantizeLinear``/``DequantizeLinear`` pairs around float ops, which ONNX
Runtime's CPU kernels fuse into integer convolutions): int8 weights per output channel, uint8 activations whose
ranges come from calibration images (:func:`load_calibration_images` letterboxes a folder of them as our data
pipeline does). Activation ranges are chosen by one of :data:`CALIBRATION_METHODS`:

- ``entropy`` (default): the clipping threshold minimizing the KL divergence between a tensor's histogram and its
  8-bit quantization, TensorRT's calibration in MXNet's form (2048-bin signed histogram, 255 levels; Migacz, 8-bit
  Inference with TensorRT,
  https://on-demand.gputechconf.com/gtc/2017/presentation/s7310-8-bit-inference-with-tensorrt.pdf).
  ONNX Runtime's own ``CalibrationMethod.Entropy`` cannot be given its bin counts through ``quantize_static``
  (onnxruntime 1.32), and with its default of 128 bins for 128 levels there is a single candidate threshold: it is
  MinMax (measured: identical outputs); with 2048 bins its pure-Python search takes 100 s for a YOLOv8n. So ONNX
  Runtime collects the histograms, :func:`_kl_threshold` searches them (~7 ms a tensor, the exhaustive search's
  threshold to within a few bins), and the ranges go to ``quantize_static`` as ``TensorQuantOverrides``;
- ``minmax``: the observed range (outliers included);
- ``percentile``: the ``percentile`` of ``|x|`` (ONNX Runtime's, 2048 bins), clipped to the observed range.

With ``float_outputs`` (default), the nodes that write the graph's outputs stay in float (:func:`output_nodes`: for
a detector, the head's prediction convs and the concats behind them), and the activations they read keep their
observed range under every method: those convs turn them straight into raw box offsets and class logits with no
INT8 layer after them, so a clipping threshold there cuts the rarest, largest values right out of the outputs (the
KL threshold kept 30% of the observed range of the stride-8 head features of the YOLOv3-m baseline below). The
output convs hold a tiny share of the weights. Measured on YOLOv3-m at 128 px (the distilled model of RESULTS
``compression_yolov3`` / its unpruned baseline, 64 images), mAP50-95 against the fp32 file: entropy −0.63 / −2.70
instead of −2.08 / −4.84, minmax −0.31 / −0.03 instead of −1.25 / −0.51, percentile −0.09 / +0.11 instead of
−0.77 / −0.86; file ×0.2575 instead of ×0.2565 of the fp32 one. On a YOLOv8n (15 epochs at 128 px) every method
stays within 0.4 of fp32 either way.

Example:
    >>> import tempfile
    >>> from torch import nn
    >>> from lightning_prune.report.export import export_onnx, file_size_mb
    >>> folder = tempfile.mkdtemp()
    >>> net = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.Conv2d(64, 4, 1))
    >>> fp32 = export_onnx(net, torch.rand(1, 3, 32, 32), f"{folder}/net.onnx")
    >>> int8 = quantize_onnx(fp32, f"{folder}/net.int8.onnx", [torch.rand(2, 3, 32, 32) for _ in range(4)])
    >>> file_size_mb(int8) < 0.35 * file_size_mb(fp32)
    True
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from lightning_prune.data.datasets import IMAGE_EXTENSIONS
from lightning_prune.data.transforms import detection_transforms
from lightning_prune.report.export import require_export_extra

#: Names of the activation range calibrations :func:`quantize_onnx` knows.
CALIBRATION_METHODS = ("entropy", "minmax", "percentile")
#: Bins of the entropy calibration's signed histogram (TensorRT's 2048; it grows when a later batch exceeds it).
ENTROPY_BINS = 2048
#: Levels the KL divergence compares the clipped histogram with: 8 bits over the symmetric window (MXNet's 255).
ENTROPY_LEVELS = 255
#: Evenly spaced thresholds tried first by the entropy search, before every bin around the best of them.
ENTROPY_COARSE_STEPS = 128


def quantize_onnx(
    fp32_path: str | Path,
    int8_path: str | Path,
    calibration: Iterable[torch.Tensor],
    *,
    method: str = "entropy",
    per_channel: bool = True,
    percentile: float = 99.999,
    float_outputs: bool = True,
) -> Path:
    """Quantize the ONNX file ``fp32_path`` to INT8 (static, QDQ) and write it to ``int8_path``; that path.

    The float model is first pre-processed as ONNX Runtime recommends (shape inference, graph optimizations that
    fold constants and fuse BatchNorm into convs); then every calibration batch runs through it and each activation
    gets the range ``method`` picks. Weights are int8, symmetric, per output channel with ``per_channel``; biases
    int32. Activations are uint8 (asymmetric, with zero point): ONNX Runtime's recommendation for x86 CPUs (U8S8,
    VNNI or not); int8 activations measured as accurate on our detectors, not better (both are asymmetric here, and
    spend their 256 levels on the same range). The quantizer keeps the file's metadata, so the output structure
    recorded by :func:`~lightning_prune.report.export.export_onnx` holds and
    :class:`~lightning_prune.report.onnx_runtime.OnnxModel` returns the same list.

    Args:
        fp32_path: the float ONNX file (from :func:`~lightning_prune.report.export.export_onnx`).
        int8_path: the file to write.
        calibration: image batches (B, 3, S, S) float in [0, 1] as the model sees them (letterboxed: see
            :func:`load_calibration_images`); a few hundred images are typical, a few dozen work.
        method: one of :data:`CALIBRATION_METHODS`.
        per_channel: one weight scale per output channel (else one per tensor).
        percentile: the percentile of ``|x|`` kept by ``method="percentile"``, in (0, 100].
        float_outputs: keep the nodes that compute the graph's outputs in float (:func:`output_nodes`), and the
            activations they read at their observed range.

    Raises:
        ValueError: an unknown ``method``, ``percentile`` outside (0, 100], ``float_outputs`` not a bool,
            ``int8_path`` equal to ``fp32_path``, or no calibration batch.
        TypeError: a calibration batch that is not a 4-D tensor.
        FileNotFoundError: ``fp32_path`` is not a file.
        ModuleNotFoundError: the ``export`` extra is not installed.
    """
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"Expected argument `method` to be one of {list(CALIBRATION_METHODS)} but got {method!r}.")
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 < percentile <= 100:
        raise ValueError(f"Expected argument `percentile` to be a float in (0, 100] but got {percentile!r}.")
    if not isinstance(float_outputs, bool):
        raise ValueError(f"Expected argument `float_outputs` to be a bool but got {float_outputs!r}.")
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    if not fp32_path.is_file():
        raise FileNotFoundError(
            f"Expected argument `fp32_path` to be an existing ONNX file but got {str(fp32_path)!r}."
        )
    if int8_path.resolve() == fp32_path.resolve():
        raise ValueError(f"Expected argument `int8_path` to differ from `fp32_path` but both are {str(fp32_path)!r}.")
    require_export_extra()
    batches = _calibration_arrays(calibration)

    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    int8_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lightning_prune_quant_") as tmp, _quiet_quantizer():
        pre = Path(tmp) / "preprocessed.onnx"
        # ONNX Runtime's symbolic shape inference (meant for the symbolic dims of transformers) gives up on the
        # Resize of our necks; ONNX's own shape inference is all a convnet needs
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        graph = onnx.load(str(pre))
        if _name_nodes(graph):  # ONNX Runtime excludes nodes by name
            onnx.save(graph, str(pre))
        input_name = _input_name(graph)
        excluded = output_nodes(graph) if float_outputs else []
        extra: dict[str, Any] = {}
        calibrate_method = CalibrationMethod.MinMax
        if method != "minmax":
            full_range = {i for node in graph.graph.node if node.name in excluded for i in node.input}
            ranges = _clipped_ranges(pre, _reader(input_name, batches), Path(tmp), method, percentile, full_range)
            extra["TensorQuantOverrides"] = {
                name: [{"rmin": np.float32(lo), "rmax": np.float32(hi)}] for name, (lo, hi) in ranges.items()
            }
            batches = batches[:1]  # quantize_static still calibrates (MinMax) before the overrides replace it
        quantize_static(
            str(pre),
            str(int8_path),
            _reader(input_name, batches),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            calibrate_method=calibrate_method,
            nodes_to_exclude=excluded,
            extra_options=extra,
        )
    return int8_path


#: Ops that only move or gather data: :func:`output_nodes` walks back through them to the nodes that compute.
LAYOUT_OPS = frozenset({"Concat", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Split"})


def output_nodes(model: Any) -> list[str]:
    """Names of the nodes that compute an ONNX model's outputs: from each graph output, back through
    :data:`LAYOUT_OPS` (all their inputs) to the first other node on every path; those nodes and the layout ops on
    the way. For our detectors: the head's prediction convs (YOLOv3: ``preds.*``; YOLOv8: the box and class convs,
    and the concat that joins them). Nodes without a name are not listed.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    found: dict[int, Any] = {}
    stack = [o.name for o in model.graph.output]
    while stack:
        node = producers.get(stack.pop())
        if node is None or id(node) in found:  # a graph input or an initializer; or already walked
            continue
        found[id(node)] = node
        if node.op_type in LAYOUT_OPS:
            stack.extend(i for i in node.input if i)
    return sorted(node.name for node in found.values() if node.name)


def load_calibration_images(
    folder: str | Path, img_size: int, limit: int | None = None, batch_size: int = 1
) -> list[torch.Tensor]:
    """The images of ``folder`` (sorted by name), letterboxed to ``img_size`` as our validation data, in batches.

    Each image goes through :func:`~lightning_prune.data.transforms.detection_transforms` (``train=False``): the
    same resize, centring and gray padding as the data module's validation samples.

    Args:
        folder: a folder of images (``.jpg``, ``.jpeg``, ``.png``, ``.bmp``, ``.webp``; sub-folders are ignored).
        img_size: the model's square input size S.
        limit: use only the first ``limit`` images.
        batch_size: images per batch (the last batch may be smaller).

    Returns:
        Batches (B, 3, S, S) float32 in [0, 1].

    Raises:
        FileNotFoundError: ``folder`` is not a folder.
        ValueError: it holds no image, or ``img_size``/``limit``/``batch_size`` is not a positive int.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> for i in range(3):
        ...     Image.new("RGB", (80, 40), (255, 0, 0)).save(f"{folder}/{i}.png")
        >>> batches = load_calibration_images(folder, 64, batch_size=2)
        >>> [tuple(b.shape) for b in batches], round(float(batches[0][0, 0, 32, 32]), 3)
        ([(2, 3, 64, 64), (1, 3, 64, 64)], 1.0)
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Expected argument `calibration` to be an existing folder of images but got {str(folder)!r}."
        )
    for name, value in (("img_size", img_size), ("batch_size", batch_size), ("limit", limit)):
        if (value is not None or name != "limit") and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            expected = "None or an int >= 1" if name == "limit" else "an int >= 1"
            raise ValueError(f"Expected argument `{name}` to be {expected} but got {value!r}.")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise ValueError(f"Expected images ({', '.join(IMAGE_EXTENSIONS)}) in {folder} but the folder has none.")
    transform = detection_transforms(img_size, train=False)
    images = []
    for path in paths[:limit]:
        with Image.open(path) as pil:
            image = tv_tensors.Image(F.pil_to_tensor(pil.convert("RGB")))
        no_boxes = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=tuple(image.shape[-2:]))
        image, _ = transform(image, {"boxes": no_boxes, "labels": torch.zeros(0, dtype=torch.int64)})
        images.append(image)
    return [torch.stack(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]


# ---------------------------------------------------------------------- helpers
def _calibration_arrays(calibration: Iterable[torch.Tensor]) -> list[np.ndarray]:
    batches = []
    for i, batch in enumerate(calibration):
        if not isinstance(batch, torch.Tensor) or batch.ndim != 4:
            got = f"a {batch.ndim}-D tensor" if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise TypeError(
                f"Expected argument `calibration` to yield image batches (B, 3, S, S) but item {i} is {got}."
            )
        batches.append(np.ascontiguousarray(batch.detach().cpu().float().numpy()))
    if not batches:
        raise ValueError("Expected argument `calibration` to yield at least one image batch but it yielded none.")
    return batches


def _reader(input_name: str, batches: list[np.ndarray]) -> Any:
    """An ONNX Runtime ``CalibrationDataReader`` over ``batches`` (built here: onnxruntime is an optional extra)."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self._items = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._items, None)
            return None if batch is None else {input_name: batch}

        def rewind(self) -> None:
            self._items = iter(batches)

    return _Batches()


def _name_nodes(model: Any) -> bool:
    """Give every unnamed node of ``model`` a unique name, in place; whether any was unnamed."""
    taken = {node.name for node in model.graph.node}
    unnamed = [node for node in model.graph.node if not node.name]
    for i, node in enumerate(unnamed):
        name = f"{node.op_type}_{i}"
        while name in taken:
            name += "_"
        node.name = name
        taken.add(name)
    return bool(unnamed)


def _input_name(model: Any) -> str:
    initializers = {i.name for i in model.graph.initializer}  # old IRs list weights among the inputs
    return next(i.name for i in model.graph.input if i.name not in initializers)


def _clipped_ranges(
    model_path: Path, reader: Any, tmp: Path, method: str, percentile: float, full_range: set[str]
) -> dict[str, tuple[float, float]]:
    """``{tensor: (rmin, rmax)}`` by ``method`` (``entropy``: the KL threshold of each activation's histogram, within
    its observed range; ``percentile``: ONNX Runtime's), the tensors of ``full_range`` at their observed range."""
    from onnxruntime.quantization import CalibrationMethod, create_calibrator

    entropy = method == "entropy"
    calibrator = create_calibrator(
        model_path,
        augmented_model_path=str(tmp / "augmented.onnx"),
        calibrate_method=CalibrationMethod.Entropy if entropy else CalibrationMethod.Percentile,
        # entropy: collection only, the threshold search is ours
        extra_options={"num_bins": ENTROPY_BINS} if entropy else {"percentile": float(percentile)},
    )
    calibrator.collect_data(reader)
    histograms = calibrator.collector.histogram_dict
    percentiles: Any = {} if entropy else calibrator.compute_data()  # TensorsData: {tensor: its range}
    ranges = {}
    for name, (hist, edges, lowest, highest, *_) in histograms.items():
        lowest, highest = float(np.min(lowest)), float(np.max(highest))
        if name in full_range:
            ranges[name] = (lowest, highest)
        elif entropy:
            threshold = _kl_threshold(hist, edges)
            ranges[name] = (max(-threshold, lowest), min(threshold, highest))
        else:
            rmin, rmax = percentiles[name].range_value
            ranges[name] = (float(np.min(rmin)), float(np.max(rmax)))
    return ranges


def _kl_threshold(
    hist: np.ndarray, edges: np.ndarray, levels: int = ENTROPY_LEVELS, coarse: int = ENTROPY_COARSE_STEPS
) -> float:
    """The clipping threshold T of a signed histogram (symmetric bins around 0) minimizing KL(P || Q).

    For a window of ``2i + 1`` bins around zero, P is the histogram inside it with the outliers added to its two end
    bins; Q is the window merged into ``levels`` groups of equal width (the last takes the remainder), each group's
    count spread evenly over its non-empty bins. Both are smoothed (zeros replaced by 1e-4, taken from the rest) as
    in MXNet's ``_get_optimal_threshold``. The ``coarse`` evenly spaced windows are tried first, then every window
    between the neighbours of the best: the exhaustive search's threshold to within a few bins where the curve is
    flat, at ~1/7 of its cost.
    """
    counts = hist.astype(np.float64)
    n = counts.size
    zero, half = n // 2, levels // 2
    if zero <= half:  # fewer bins than levels: nothing to clip
        return float(edges[-1])
    cumulative = np.concatenate([[0.0], np.cumsum(counts)])

    def divergence(i: int) -> float:
        start, stop = zero - i, min(zero + i + 1, n)
        window = counts[start:stop]
        p = window.copy()
        p[0] += cumulative[start]  # outliers on either side are clipped into the end bins
        p[-1] += cumulative[n] - cumulative[stop]
        nonzero = p != 0
        group = np.minimum(np.arange(window.size) // (window.size // levels), levels - 1)
        total = np.bincount(group, weights=window, minlength=levels)
        filled = np.bincount(group, weights=nonzero, minlength=levels)
        q = np.where(nonzero, (total / np.maximum(filled, 1))[group], 0.0)
        p, q = _smooth(p), _smooth(q)
        if p is None or q is None:
            return float("inf")
        p, q = p / p.sum(), q / q.sum()
        return float(np.sum(p * np.log(p / q)))

    steps = np.unique(np.linspace(half, zero, min(coarse, zero - half + 1)).round().astype(int))
    best = int(np.argmin([divergence(int(i)) for i in steps]))
    fine = np.arange(steps[max(best - 1, 0)], steps[min(best + 1, steps.size - 1)] + 1)
    i = int(fine[int(np.argmin([divergence(int(i)) for i in fine]))])
    return float(edges[min(zero + i + 1, n)])


def _smooth(p: np.ndarray, eps: float = 1e-4) -> np.ndarray | None:
    zero = p == 0
    nonzero = int((~zero).sum())
    if not nonzero:
        return None
    return p + eps * zero - eps * zero.sum() / nonzero * ~zero


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """ONNX Runtime's quantization tools print progress and log warnings on the root logger: silence both here."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)
