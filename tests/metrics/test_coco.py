"""The mAP metric against pycocotools' COCOeval run directly on the same detections."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from lightning_prune.metrics import build_map_metric


def coco_eval_stats(gt_file: Path, detections: list[dict]) -> np.ndarray:
    """COCOeval's 12 summary numbers, computed by pycocotools alone."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        dt = gt.loadRes(detections)
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def random_scene(rng: np.random.Generator, num_images: int, num_classes: int) -> tuple[dict, list[dict]]:
    """COCO ground truth and detections near it (jittered, some missed, some false positives)."""
    images, annotations, detections = [], [], []
    for image_id in range(1, num_images + 1):
        w, h = int(rng.integers(200, 400)), int(rng.integers(200, 400))
        images.append({"id": image_id, "width": w, "height": h, "file_name": f"{image_id}.png"})
        for _ in range(int(rng.integers(0, 6))):
            bw, bh = rng.uniform(8, w / 2), rng.uniform(8, h / 2)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            cat = int(rng.integers(1, num_classes + 1))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cat,
                    "bbox": [x, y, bw, bh],
                    "area": bw * bh,
                    "iscrowd": 0,
                }
            )
            if rng.random() < 0.85:  # detected, with box noise
                jitter = rng.normal(0, 0.08, 4) * [bw, bh, bw, bh]
                detections.append(
                    {
                        "image_id": image_id,
                        "category_id": cat,
                        "score": float(rng.uniform(0.2, 1)),
                        "bbox": [float(v) for v in np.array([x, y, bw, bh]) + jitter],
                    }
                )
        for _ in range(int(rng.integers(0, 3))):  # false positives
            bw, bh = rng.uniform(8, w / 3), rng.uniform(8, h / 3)
            detections.append(
                {
                    "image_id": image_id,
                    "category_id": int(rng.integers(1, num_classes + 1)),
                    "score": float(rng.uniform(0, 0.6)),
                    "bbox": [float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh)), bw, bh],
                }
            )
    for det in detections:  # keep boxes valid after jitter
        det["bbox"][2], det["bbox"][3] = max(det["bbox"][2], 1.0), max(det["bbox"][3], 1.0)
    categories = [{"id": c, "name": f"c{c}"} for c in range(1, num_classes + 1)]
    return {"images": images, "annotations": annotations, "categories": categories}, detections


def xywh_to_xyxy(boxes: list[list[float]]) -> torch.Tensor:
    t = torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    return torch.cat([t[:, :2], t[:, :2] + t[:, 2:]], dim=1)


@pytest.mark.parametrize("seed", [0, 1])
def test_map_equals_cocoeval(tmp_path: Path, seed: int) -> None:
    gt, detections = random_scene(np.random.default_rng(seed), num_images=12, num_classes=3)
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps(gt))
    expected = coco_eval_stats(gt_file, detections)

    metric = build_map_metric("pycocotools")
    for image in gt["images"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == image["id"]]
        dets = [d for d in detections if d["image_id"] == image["id"]]
        metric.update(
            [
                {
                    "boxes": xywh_to_xyxy([d["bbox"] for d in dets]).float(),
                    "scores": torch.tensor([d["score"] for d in dets], dtype=torch.float32),
                    "labels": torch.tensor([d["category_id"] for d in dets], dtype=torch.long),
                }
            ],
            [
                {
                    "boxes": xywh_to_xyxy([a["bbox"] for a in anns]).float(),
                    "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.long),
                }
            ],
        )
    result = metric.compute()
    assert expected[0] > 0.2  # a non-trivial scene: equality below is not 0 == 0
    for key, index in (("map", 0), ("map_50", 1), ("map_75", 2), ("map_small", 3), ("mar_100", 8)):
        assert float(result[key]) == pytest.approx(expected[index], abs=1e-6), key


def test_unknown_backend_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"Expected argument `map_backend` to be one of .* but got 'coco'"):
        build_map_metric("coco")  # type: ignore[arg-type]


def test_missing_backend_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "faster_coco_eval" else real(name)
    )
    with pytest.raises(ModuleNotFoundError, match="pip install faster-coco-eval"):
        build_map_metric("faster_coco_eval")
