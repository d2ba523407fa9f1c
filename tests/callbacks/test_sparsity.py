"""SparsityRegularization in real Trainer runs: the exact update, once per optimizer step, with pruning and AMP."""

from __future__ import annotations

import csv
import math

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from test_pruning import FAMILIES, make_loader, make_trainer
from torch import nn

from lightning_prune.callbacks import SparsityRegularization, StructuredPruning, pruning_history
from lightning_prune.pruning.sparsity import L1Subgradient

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1))
        self.example_input_array = torch.zeros(1, 3, 16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return self(batch[0]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def tiny_loader(n: int = 4) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(n, 3, 16, 16, generator=g))
    return torch.utils.data.DataLoader(data, batch_size=1)


def gammas_after(tmp_path, callbacks, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = Tiny()
    model.net[1].weight.data.uniform_(-1, 1)
    start = model.net[1].weight.detach().clone()
    trainer = make_trainer(tmp_path, callbacks, max_epochs=1, limit_train_batches=1, **kwargs)
    trainer.fit(model, tiny_loader())
    return start, model.net[1].weight.detach()


def test_one_step_moves_gamma_by_lr_times_penalty_times_sign(tmp_path):
    start, plain = gammas_after(tmp_path, [])
    _, regularized = gammas_after(tmp_path, [SparsityRegularization(penalty=0.01)])
    torch.testing.assert_close(regularized, plain - 0.5 * 0.01 * torch.sign(start))


def test_once_per_optimizer_step_with_gradient_accumulation(tmp_path, monkeypatch):
    calls = []
    original = L1Subgradient.__call__
    monkeypatch.setattr(L1Subgradient, "__call__", lambda *a, **k: calls.append(1) or original(*a, **k))
    model = Tiny()
    trainer = make_trainer(
        tmp_path, [SparsityRegularization(penalty=0.01)], max_epochs=1, limit_train_batches=4, accumulate_grad_batches=2
    )
    trainer.fit(model, tiny_loader())
    assert trainer.global_step == 2 and len(calls) == 2


def test_with_pruning_amp_and_logging(tmp_path):
    pl.seed_everything(0)
    model = FAMILIES["yolov8"]()
    sparsity = SparsityRegularization(penalty=1e-3, schedule="warmup", warmup_epochs=1, group_lasso=True)
    pruning = StructuredPruning(pruning_ratio=0.3, importance="bn_scale", epochs=[1])
    logger = CSVLogger(tmp_path, name="logs")
    trainer = make_trainer(tmp_path, [sparsity, pruning], max_epochs=3, logger=logger, precision="bf16-mixed")
    trainer.fit(model, make_loader())
    assert len(pruning_history(model)) == 1 and sparsity._traced_at == 1  # groups traced again after the step
    for group in sparsity.groups:  # and they fit the pruned layers
        for name, local, _ in group:
            assert max(local) < model.get_submodule(name).weight.numel()
    rows = list(csv.DictReader((tmp_path / "logs" / "version_0" / "metrics.csv").open()))
    logged = [r for r in rows if r.get("sparsity/gamma_below_1e-2")]
    assert len(logged) == 3
    assert [float(r["sparsity/penalty"]) for r in logged] == pytest.approx([0.0, 1e-3, 1e-3])
    assert all(
        0.0 <= float(r["sparsity/gamma_below_1e-3"]) <= float(r["sparsity/gamma_below_1e-2"]) <= 1.0 for r in logged
    )
    assert all(math.isfinite(p.detach().float().sum()) for p in model.parameters())


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"penalty": -1.0}, r"Expected argument `penalty` to be a float >= 0 but got -1.0."),
        (
            {"schedule": "step"},
            r"Expected argument `schedule` to be one of \['constant', 'warmup', 'linear', 'cosine'\]",
        ),
        ({"schedule": "cosine"}, r"Expected argument `stop_epoch` to be set for schedule 'cosine' but got None."),
        (
            {"start_epoch": 3, "stop_epoch": 3},
            r"Expected argument `stop_epoch` to be None or an int > `start_epoch` \(3\)",
        ),
        ({"warmup_epochs": -1}, r"Expected argument `warmup_epochs` to be an int >= 0 but got -1."),
        ({"ignored_layers": ["net("]}, r"Expected argument `ignored_layers` to hold valid regexes but got 'net\('"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparsityRegularization(**kwargs)


def test_setup_errors():
    with pytest.raises(MisconfigurationException, match=r"`ignored_layers` .* 'net.9' matches none"):
        SparsityRegularization(ignored_layers=["net.9"]).setup(None, Tiny(), "fit")
    plain = Tiny()
    plain.net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 2, 1))
    with pytest.raises(MisconfigurationException, match=r"Expected Tiny to have BatchNorms whose channels pruning"):
        SparsityRegularization().setup(None, plain, "fit")
    blind = Tiny()
    blind.example_input_array = None
    with pytest.raises(MisconfigurationException, match=r"Expected `Tiny.example_input_array` to be set"):
        SparsityRegularization().setup(None, blind, "fit")
