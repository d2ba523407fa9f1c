"""DetectorModule's validation path: the logged COCO mAP equals pycocotools' COCOeval on the same detections."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from lightning_prune.data import DetectionDataModule
from lightning_prune.models import YOLOv3
from lightning_prune.models.base import WarmupCosine


class NoisyOracle(YOLOv3):
    """A detector whose detections are the ground truth, jittered, with misses and false positives.

    The network runs as usual (so the loss is real); only the detections are replaced, so that mAP is far from 0
    and the equality with COCOeval below is not 0 == 0. Everything after ``postprocess`` — mapping boxes back to
    original pixels, the metric, its logging — is the code under test.
    """

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._targets = batch[1]
        super().validation_step(batch, batch_idx)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        self._targets = batch[1]
        return super().predict_step(batch, batch_idx, dataloader_idx)

    def postprocess(self, raw: Any) -> list[dict[str, torch.Tensor]]:
        out = []
        for t in self._targets:
            g = torch.Generator().manual_seed(int(t["image_id"]))
            boxes, labels = t["boxes"], t["labels"]
            keep = torch.rand(len(boxes), generator=g) < 0.8  # misses
            wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
            noisy = boxes + torch.randn(boxes.shape, generator=g) * 0.07 * wh
            fp = torch.rand(2, 2, generator=g) * self.img_size / 2
            fp = torch.cat([fp, fp + 20 + torch.rand(2, 2, generator=g) * 40], dim=1)  # two false positives
            out.append(
                {
                    "boxes": torch.cat([noisy[keep], fp]),
                    "scores": torch.cat(
                        [torch.rand(int(keep.sum()), generator=g) * 0.5 + 0.5, torch.rand(2, generator=g) * 0.7]
                    ),
                    "labels": torch.cat([labels[keep], torch.randint(self.num_classes, (2,), generator=g)]),
                }
            )
        return out


def test_logged_map_equals_cocoeval(tmp_path: Path) -> None:
    torch.manual_seed(0)
    dm = DetectionDataModule(
        root=str(tmp_path / "data"), num_train=4, num_val=12, img_size=96, batch_size=4, num_workers=0
    )
    model = NoisyOracle(scale="tiny", num_classes=dm.num_classes, img_size=96)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    logged = trainer.validate(model, datamodule=dm, verbose=False)[0]
    predictions = trainer.predict(model, dataloaders=dm.val_dataloader())

    coco_ids = dm.val_dataset.category_ids
    detections = []
    for batch_preds, (_, targets) in zip(predictions, dm.val_dataloader()):
        for pred, target in zip(batch_preds, targets):
            for box, score, label in zip(pred["boxes"].tolist(), pred["scores"].tolist(), pred["labels"].tolist()):
                detections.append(
                    {
                        "image_id": int(target["image_id"]),
                        "category_id": coco_ids[label],
                        "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                        "score": score,
                    }
                )
    gt_file = next((tmp_path / "data").rglob("instances_val.json"))
    json.dump(detections, (tmp_path / "detections.json").open("w"))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        evaluator = COCOeval(gt, gt.loadRes(str(tmp_path / "detections.json")), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert evaluator.stats[0] > 0.3  # detections are good but not perfect: a meaningful comparison
    assert logged["val/mAP"] == pytest.approx(evaluator.stats[0], abs=1e-6)
    assert logged["val/mAP50"] == pytest.approx(evaluator.stats[1], abs=1e-6)
    assert logged["val/mAP75"] == pytest.approx(evaluator.stats[2], abs=1e-6)


def test_warmup_cosine_schedule() -> None:
    schedule = WarmupCosine(warmup=10, total=110, final_ratio=0.01)
    assert schedule(0) == pytest.approx(0.1) and schedule(9) == pytest.approx(1.0)
    assert schedule(10) == pytest.approx(1.0) and schedule(60) == pytest.approx(0.505)
    assert schedule(110) == pytest.approx(0.01) and schedule(500) == pytest.approx(0.01)
    values = [schedule(s) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))  # monotone decay after warmup


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 0}, r"Expected argument `num_classes` to be a positive int but got 0"),
        ({"img_size": 100}, r"Expected argument `img_size` to be a positive multiple of 32 but got 100"),
        ({"optimizer": "rmsprop"}, r"Expected argument `optimizer` to be one of \['sgd', 'adamw'\] but got 'rmsprop'"),
        ({"lr": 0.0}, r"Expected argument `lr` to be > 0 but got 0.0"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        YOLOv3(**{"scale": "tiny", "num_classes": 2, "img_size": 64, **kwargs})
