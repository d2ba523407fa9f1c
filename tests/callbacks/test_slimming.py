"""NetworkSlimming: the global |γ| threshold removes exactly the channels under it, within the per-layer floor."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from test_pruning import FAMILIES, fake_trainer, make_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune.callbacks import NetworkSlimming, pruning_history

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def bns(model: nn.Module) -> dict[str, nn.BatchNorm2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


def test_channels_with_zero_gamma_are_exactly_the_ones_removed():
    torch.manual_seed(0)
    model = FAMILIES["yolov3"]()
    layers = bns(model)
    for bn in layers.values():
        bn.weight.data = 0.5 + torch.rand_like(bn.weight)  # all clearly above the threshold
    # zero two channels in a BatchNorm that no residual add couples (YOLOv3's neck convs)
    name = next(n for n in layers if n.startswith("neck.") and layers[n].num_features >= 8)
    layers[name].weight.data[[1, 4]] = 0.0
    before = {n: bn.num_features for n, bn in layers.items()}
    callback = NetworkSlimming(threshold=1e-3)
    callback.on_train_epoch_start(fake_trainer(), model)
    after = {n: bn.num_features for n, bn in bns(model).items()}
    assert after[name] == before[name] - 2
    assert {n for n in before if after[n] != before[n]} == {name}
    assert callback.threshold_used == [pytest.approx(1e-3)] and len(pruning_history(model)) == 1
    assert torch.all(bns(model)[name].weight.abs() >= 0.5)  # the survivors are the large ones


def test_percentile_threshold_is_capped_and_every_layer_keeps_its_floor():
    torch.manual_seed(0)
    model = FAMILIES["yolov8"]()
    layers = bns(model)
    for bn in layers.values():
        bn.weight.data = torch.rand_like(bn.weight)
    tiny = next(n for n in layers if n.startswith("neck."))
    layers[tiny].weight.data *= 1e-3  # a layer whose every γ is small: the cap keeps its largest
    widths = {n: bn.num_features for n, bn in layers.items()}
    callback = NetworkSlimming(percentile=60, min_channels_ratio=0.25)
    callback.on_train_epoch_start(fake_trainer(), model)
    assert callback.threshold_used[0] <= float(layers[tiny].weight.abs().max()) + 1e-12
    now = {n: bn.num_features for n, bn in bns(model).items()}
    assert all(now[n] >= math.ceil(widths[n] * 0.25) for n in widths)
    assert sum(now.values()) < sum(widths.values())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, r"Expected exactly one of `percentile` and `threshold` but got None and None."),
        ({"percentile": 50, "threshold": 0.1}, r"Expected exactly one of `percentile` and `threshold`"),
        ({"percentile": 100}, r"Expected argument `percentile` to be a float in \(0, 100\) but got 100."),
        ({"threshold": 0}, r"Expected argument `threshold` to be a float > 0 but got 0."),
        ({"threshold": 0.1, "min_channels_ratio": 1.0}, r"Expected argument `min_channels_ratio` to be a float in"),
        ({"threshold": 0.1, "target_macs_ratio": 0.5}, r"Expected argument `target_macs_ratio` to be None for Netw"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NetworkSlimming(**kwargs)


def test_a_threshold_above_every_gamma_is_refused_at_the_step():
    model = FAMILIES["yolov3"]()
    for bn in bns(model).values():
        bn.weight.data = torch.rand_like(bn.weight)  # |γ| < 1
    callback = NetworkSlimming(threshold=5.0)
    with pytest.raises(MisconfigurationException, match=r"Expected argument `threshold` \(5.0\) to leave some chan"):
        callback.on_train_epoch_start(fake_trainer(), model)
    assert len(pruning_history(model)) == 0


class PointwiseClassifier(pl.LightningModule):
    """1×1 convs with BatchNorm (where folding is exact), a residual add and a linear head; SGD at lr 0."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8, momentum=0.0), nn.SiLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8, momentum=0.0), nn.SiLU())
        self.head = nn.Linear(8, 3)
        self.example_input_array = torch.zeros(1, 3, 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head((x + self.block(x)).mean(dim=(2, 3)))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)  # momentum=0 BatchNorms: nothing changes but pruning


@pytest.mark.parametrize("fold_bias", [True, False])
def test_slimming_in_fit_folds_the_removed_constants(tmp_path, fold_bias):
    torch.manual_seed(0)
    module = PointwiseClassifier()
    with torch.no_grad():
        for bn in (module.stem[1], module.block[1]):
            bn.bias.normal_()
            bn.running_mean.normal_()
        module.stem[1].weight[[1, 6]] = 0.0  # coupled by the residual add with block's BatchNorm: zeroed in both
        module.block[1].weight[[1, 6]] = 0.0
        module.block[1].weight[3] = 0.0  # but not stem's channel 3: the pair's mean |γ| keeps it
    data = TensorDataset(torch.randn(8, 3, 4, 4), torch.randint(0, 3, (8,)))
    x = torch.randn(5, 3, 4, 4)
    module.eval()
    with torch.no_grad():
        expected = module(x)
    trainer = make_trainer(tmp_path, [NetworkSlimming(threshold=1e-6, fold_bias=fold_bias)], max_epochs=1)
    trainer.fit(module, DataLoader(data, batch_size=4))
    module.eval()
    assert module.stem[1].num_features == 6 and module.head.in_features == 6
    with torch.no_grad():
        error = (module(x) - expected).abs().max()
    assert (error < 1e-5) if fold_bias else (error > 1e-3)


def test_yaml_instantiation_keeps_the_slimming_defaults():
    """jsonargparse passes the parent's defaults for ``**kwargs`` explicitly: slimming's own must be parameters."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(NetworkSlimming, "slimming")
    callback = parser.instantiate_classes(parser.parse_object({"slimming": {"percentile": 50}})).slimming
    assert callback.fold_bias is True and callback.max_layer_ratio == 0.9 and callback.global_pruning
