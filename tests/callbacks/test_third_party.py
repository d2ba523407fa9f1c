"""StructuredPruning on a detector nobody here wrote: torchvision's SSDLite, wrapped in a LightningModule."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.models.detection import ssdlite320_mobilenet_v3_large

from lightning_prune.callbacks import StructuredPruning, pruning_history

# SSDLite's last 1×1 convs predict anchors × 4 box offsets and anchors × C class logits per level; their outputs
# are reshaped and concatenated before they leave the model: the callback must find them on the traced graph.
PREDICTION_CONVS = r"model\.head\.(classification|regression)_head\.module_list\.\d+\.1"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class SSDLiteDetector(pl.LightningModule):
    """torchvision's SSDLite as it comes: ``training_step`` calls it with (images, targets) and sums its loss dict.

    ``forward`` takes a batched tensor already at the model's 320×320 input size and returns the raw head output
    (the path torch-pruning traces); ``self.model(list_of_images)`` remains the full detector (resize, decode, NMS).
    """

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes)
        # batch 2: the last extra feature map is 1×1, and BatchNorm in train mode needs more than one value per channel
        self.example_input_array = torch.zeros(2, 3, 320, 320)
        self.seen: list[tuple[int, int, float]] = []  # (epoch, parameter count, loss) per training step

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        # {"bbox_regression": (B, A, 4), "cls_logits": (B, A, C)}
        return self.model.head(list(self.model.backbone(images).values()))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        loss = sum(self.model(images, targets).values())
        self.seen.append((self.current_epoch, sum(p.numel() for p in self.parameters()), float(loss.detach())))
        return loss  # type: ignore[return-value]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def make_loader(n: int = 4, size: int = 160) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = []
    for i in range(n):
        xy = torch.rand(2, generator=g) * size / 2
        boxes = torch.stack([torch.cat([xy, xy + size / 4]), torch.cat([xy / 2, xy / 2 + size / 3])])[: 1 + i % 2]
        data.append((torch.rand(3, size, size, generator=g), {"boxes": boxes, "labels": torch.arange(len(boxes)) + 1}))
    return DataLoader(data, batch_size=2, collate_fn=lambda b: tuple(map(list, zip(*b, strict=True))))


def test_ssdlite_prunes_and_keeps_training(tmp_path):
    torch.manual_seed(0)
    detector = SSDLiteDetector()
    params = sum(p.numel() for p in detector.parameters())
    with torch.no_grad():
        raw_shapes = {k: v.shape for k, v in detector.eval()(detector.example_input_array).items()}
    detector.train()
    predictors = {n: m.out_channels for n, m in detector.named_modules() if re.fullmatch(PREDICTION_CONVS, n)}
    assert len(predictors) == 12
    callback = StructuredPruning(pruning_ratio=0.3, epochs=[1])  # no ignored_layers: found automatically
    trainer = pl.Trainer(
        max_epochs=2,
        limit_train_batches=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        callbacks=[callback],
    )
    trainer.fit(detector, make_loader())

    assert len(pruning_history(detector)) == 1
    assert {n: detector.get_submodule(n).out_channels for n in predictors} == predictors
    pruned = sum(p.numel() for p in detector.parameters())
    assert pruned < 0.8 * params
    epochs = [(epoch, count) for epoch, count, _ in detector.seen]
    assert epochs == [(0, params), (0, params), (1, pruned), (1, pruned)]  # pruned at the start of epoch 1
    assert all(math.isfinite(loss) for *_, loss in detector.seen)
    assert any(isinstance(m, nn.BatchNorm2d) and m.training for m in detector.modules())  # train mode restored

    detector.eval()
    with torch.no_grad():
        assert {k: v.shape for k, v in detector(detector.example_input_array).items()} == raw_shapes
        detections = detector.model([torch.rand(3, 160, 160), torch.rand(3, 200, 120)])
    assert [d["boxes"].shape[1] for d in detections] == [4, 4]
    assert all(len(d["boxes"]) > 0 and d["labels"].max() < 3 for d in detections)
    assert detections[1]["boxes"][:, 2].max() <= 120  # boxes mapped back to each image's own size
