"""Every criterion on both reference families at ratios 0.3 / 0.5 / 0.7: the pruned model works and keeps training."""

from __future__ import annotations

import math

import pytest
import torch
from test_pruning import FAMILIES, fake_trainer, make_loader
from torch import nn

from lightning_prune.callbacks import StructuredPruning, pruning_history
from lightning_prune.models.base import count_parameters
from lightning_prune.pruning.importance import IMPORTANCES

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("importance", sorted(IMPORTANCES))
def test_every_criterion_prunes_and_training_continues(family, ratio, importance):
    torch.manual_seed(0)
    model = FAMILIES[family]()
    example = model.example_input_array
    shapes = [tuple(r.shape) for r in model.eval()(example)]
    model.train()
    before = count_parameters(model)
    callback = StructuredPruning(pruning_ratio=ratio, importance=importance, calibration_batches=2)
    callback.on_train_epoch_start(fake_trainer(loader=make_loader()), model)

    assert len(pruning_history(model)) == 1
    after = count_parameters(model)
    assert after < before * (1.0 - ratio / 2)  # global channel ratio r removes well over r/2 of the weights
    assert all(m.out_channels >= 1 for m in model.modules() if isinstance(m, nn.Conv2d))
    assert model.training and all(p.grad is None for p in model.parameters())  # calibration left nothing behind
    assert [tuple(r.shape) for r in model.eval()(example)] == shapes
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for i, batch in enumerate(make_loader()):
        out = model.training_step(batch, i)
        loss = out["loss"] if isinstance(out, dict) else out
        assert math.isfinite(float(loss))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
