"""COCO mAP of any forward function (a PyTorch module, an ONNX Runtime session) with one decoding, no Trainer imports.

The compression report compares a model with its pruned and quantized versions: their mAP must come from the same
data, the same decoding and NMS and the same metric as the validation ``val/mAP`` of training, so that a difference
in the table is a difference of the models. :func:`evaluate_map` is that loop: it runs ``forward`` on each batch's
images, decodes with ``postprocess`` (the detector's own, :meth:`DetectorModule.postprocess
<lightning_prune.models.DetectorModule.postprocess>`), maps boxes back to original image pixels and feeds
:func:`~lightning_prune.metrics.build_map_metric`, exactly as ``DetectorModule.validation_step`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from lightning_prune.metrics.coco import MapBackend, build_map_metric
from lightning_prune.models.base import letterbox_to_original

Forward = Callable[[torch.Tensor], Any]
Postprocess = Callable[[Any], list[dict[str, torch.Tensor]]]


@torch.no_grad()
def evaluate_map(
    forward: Forward,
    postprocess: Postprocess,
    dataloader: Iterable[Any],
    *,
    device: torch.device | str = "cpu",
    limit_batches: int | None = None,
    backend: MapBackend = "pycocotools",
) -> dict[str, float]:
    """COCO box mAP of ``postprocess(forward(images))`` over ``dataloader``.

    Args:
        forward: images (B, 3, S, S) on ``device`` → the raw head output (a module in eval mode, an
            :class:`~lightning_prune.report.onnx_runtime.OnnxModel`, ...).
        postprocess: raw output → per image ``boxes`` (K, 4) xyxy input pixels, ``scores`` (K,), ``labels`` (K,).
        dataloader: batches ``(images, targets)`` as :class:`~lightning_prune.data.DetectionDataModule` gives them
            (targets with ``boxes``, ``labels`` and, for letterboxed data, ``letterbox`` and ``orig_size``).
        device: where the images go before ``forward``.
        limit_batches: evaluate only the first batches.
        backend: the mAP backend (:func:`~lightning_prune.metrics.build_map_metric`).

    Returns:
        ``{"mAP": ..., "mAP50": ..., "mAP75": ...}`` (mAP50-95, mAP at IoU 0.5 and 0.75, in [0, 1]).

    Raises:
        ValueError: ``limit_batches`` < 1, or the dataloader gives no batch.

    Example:
        >>> from lightning_prune.models import YOLOv8
        >>> model = YOLOv8("n", num_classes=2, img_size=64).eval()
        >>> target = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])}
        >>> result = evaluate_map(model, model.postprocess, [(torch.rand(1, 3, 64, 64), [target])])
        >>> sorted(result), 0.0 <= result["mAP"] <= 1.0
        (['mAP', 'mAP50', 'mAP75'], True)
    """
    if limit_batches is not None and not (isinstance(limit_batches, int) and limit_batches >= 1):
        raise ValueError(f"Expected argument `limit_batches` to be None or an int >= 1 but got {limit_batches!r}.")
    metric = build_map_metric(backend, sync=False)  # this process's data only: under DDP one rank may run it alone
    seen = 0
    for batch_idx, (images, targets) in enumerate(dataloader):
        if limit_batches is not None and batch_idx >= limit_batches:
            break
        preds = postprocess(forward(images.to(device)))
        metric.update(
            [
                {k: v.cpu() for k, v in p.items()} | {"boxes": letterbox_to_original(p["boxes"].cpu(), t)}
                for p, t in zip(preds, targets)
            ],
            [{"boxes": letterbox_to_original(t["boxes"], t), "labels": t["labels"]} for t in targets],
        )
        seen += 1
    if not seen:
        raise ValueError("Expected argument `dataloader` to give at least one batch but it gave none.")
    result = metric.compute()
    return {"mAP": float(result["map"]), "mAP50": float(result["map_50"]), "mAP75": float(result["map_75"])}
