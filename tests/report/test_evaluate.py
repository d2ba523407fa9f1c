"""evaluate_map: the same mAP as the detector's own validation loop, for any forward function."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from lightning_prune.data import DetectionDataModule
from lightning_prune.models import YOLOv8
from lightning_prune.report.evaluate import evaluate_map

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A YOLOv8n trained a little on shapes, so that its detections are not all empty, and its data module."""
    root = tmp_path_factory.mktemp("shapes")
    dm = DetectionDataModule(root=str(root), num_train=8, num_val=6, img_size=64, batch_size=4, num_workers=0)
    pl.seed_everything(0)
    model = YOLOv8("n", num_classes=dm.num_classes, img_size=64, lr=0.01, warmup_epochs=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
    )
    trainer.fit(model, dm)
    return model, dm, trainer


def test_equals_the_validation_loop(trained):
    model, dm, trainer = trained
    logged = trainer.validate(model, dm, verbose=False)[0]
    model.eval()
    result = evaluate_map(model, model.postprocess, dm.val_dataloader())
    assert result["mAP"] == pytest.approx(logged["val/mAP"], abs=1e-7)
    assert result["mAP50"] == pytest.approx(logged["val/mAP50"], abs=1e-7)
    assert result["mAP75"] == pytest.approx(logged["val/mAP75"], abs=1e-7)


def oracle(dataloader, shift: float = 0.0):
    """A postprocess that answers each batch's ground truth (in input pixels, moved by ``shift``) with score 1."""
    batches = iter(dataloader)

    def postprocess(_raw):
        _, targets = next(batches)
        return [
            {"boxes": t["boxes"] + shift, "scores": torch.ones(len(t["labels"])), "labels": t["labels"]}
            for t in targets
        ]

    return postprocess


def test_ground_truth_scores_one_and_moved_boxes_less(trained):
    _, dm, _ = trained
    loader = dm.val_dataloader()
    assert evaluate_map(torch.nn.Identity(), oracle(loader), loader) == {"mAP": 1.0, "mAP50": 1.0, "mAP75": 1.0}
    moved = evaluate_map(torch.nn.Identity(), oracle(loader, shift=3.0), loader)
    assert moved["mAP"] < 1.0
    first = evaluate_map(torch.nn.Identity(), oracle(loader, shift=3.0), loader, limit_batches=1)
    assert first != moved  # 4 of the 6 images


def test_bad_arguments(trained):
    model, dm, _ = trained
    with pytest.raises(ValueError, match=r"Expected argument `limit_batches` to be None or an int >= 1 but got 0."):
        evaluate_map(model, model.postprocess, dm.val_dataloader(), limit_batches=0)
    with pytest.raises(
        ValueError, match=r"Expected argument `dataloader` to give at least one batch but it gave none."
    ):
        evaluate_map(model, model.postprocess, [])
