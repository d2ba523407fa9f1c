"""UnstructuredPruning in real (tiny) Trainer runs: exact sparsity on schedule, zeros kept, resume, reload and DDP."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from test_pruning import FAMILIES, fake_trainer, make_loader, make_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune.callbacks import StructuredPruning, UnstructuredPruning
from lightning_prune.models.yolov8 import YOLOv8
from lightning_prune.pruning.masks import masked_parameters

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def reference_keep(tensors: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """The ``round(sparsity · n)`` smallest |w| of all tensors together, by a full stable sort."""
    flat = torch.cat([t.detach().abs().flatten() for t in tensors.values()])
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[torch.sort(flat, stable=True).indices[: round(sparsity * flat.numel())]] = False
    pieces = keep.split([t.numel() for t in tensors.values()])
    return {name: piece.view(t.shape) for (name, t), piece in zip(tensors.items(), pieces, strict=True)}


def masks_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: mask.clone() for name, _, mask in masked_parameters(module)}


class Snapshot(pl.Callback):
    """The selected weights (before pruning, if placed first) or the masks (after it) at every epoch start."""

    def __init__(self, callback: UnstructuredPruning, what: str) -> None:
        self.callback, self.what, self.seen = callback, what, []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.what == "weights":
            params = self.callback.pruned_parameters(pl_module)
            self.seen.append({n: p.detach().clone() for n, p in params.items()})
        else:
            self.seen.append(masks_of(pl_module))


# ---------------------------------------------------------------------------------------------- training runs
def test_iterative_global_steps_reach_the_exact_sparsity_and_are_logged(tmp_path):
    pl.seed_everything(0)
    model = FAMILIES["yolov8"]()
    callback = UnstructuredPruning(amount=0.8, schedule="cubic", epochs=[1, 2], permanent_at_end=False)
    weights, masks = Snapshot(callback, "weights"), Snapshot(callback, "masks")
    logger = CSVLogger(tmp_path, name="logs")
    trainer = make_trainer(
        tmp_path, [weights, callback, masks], max_epochs=3, logger=logger, limit_val_batches=1, num_sanity_val_steps=1
    )
    trainer.fit(model, make_loader(), make_loader())

    assert masks.seen[0] == {}  # nothing before epoch 1, nor in the sanity check
    n = sum(p.numel() for p in weights.seen[0].values())
    for step, sparsity in enumerate(callback.sparsities, start=1):
        got = masks.seen[step]
        assert sum(int((~m).sum()) for m in got.values()) == round(sparsity * n)
        expected = reference_keep(weights.seen[step], sparsity)  # pruned entries are zeros: they rank first
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert all(not (masks.seen[2][k] & ~masks.seen[1][k]).any() for k in masks.seen[1])  # pruned stays pruned
    final = dict(model.named_parameters())
    assert all(not final[k][~m].any() for k, m in masks.seen[2].items())
    assert not any(k.startswith(tuple(model.adapter.output_layers(model))) for k in masks.seen[2])
    assert callback.state_dict() == {"steps_done": 2}

    logged = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = logged[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=True)) for line in logged[1:]]
    values = [float(r["unstructured/sparsity"]) for r in rows if r.get("unstructured/sparsity")]
    assert values == pytest.approx(callback.sparsities, abs=1e-6)


def test_per_layer_sparsity_ignored_layers_parameter_names_and_submodule():
    model = FAMILIES["yolov8"]()
    callback = UnstructuredPruning(amount=0.6, global_pruning=False, ignored_layers=[r"neck"])
    callback.setup(None, model, "fit")
    callback.on_train_epoch_start(fake_trainer(), model)
    masks = masks_of(model)
    outputs = model.adapter.output_layers(model)
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and not n.startswith("neck.")}
    assert set(masks) == {f"{n}.weight" for n in convs - set(outputs)} and len(masks) > 30
    for name, mask in masks.items():
        assert int((~mask).sum()) == round(0.6 * mask.numel()), name

    host = pl.LightningModule()
    host.net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    callback = UnstructuredPruning(amount=0.5, submodule="net", parameter_names=["weight", "bias"])
    callback.setup(None, host, "fit")
    callback.on_train_epoch_start(fake_trainer(), host)
    masks = masks_of(host.net)
    assert list(masks) == ["0.weight", "0.bias", "2.weight", "2.bias"]  # no adapter: the output conv is pruned too
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.5 * (216 + 8 + 32 + 4))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_masked_weights_stay_zero_through_optimizer_steps_and_become_permanent(tmp_path, optimizer):
    class AfterEveryStep(pl.Callback):
        """Nonzeros at pruned entries right after each optimizer step (before the callback masks them again)."""

        def __init__(self) -> None:
            self.revived: list[int] = []
            self.state_zero: list[bool] = []

        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            trainer.optimizers[0].register_step_post_hook(lambda opt, args, kwargs: self.check(opt, pl_module))

        def check(self, opt: torch.optim.Optimizer, pl_module: pl.LightningModule) -> None:
            masked = masked_parameters(pl_module)
            if masked:
                self.revived.append(sum(int(torch.count_nonzero(p[~m])) for _, p, m in masked))
                self.state_zero.append(
                    all(not v[~m].any() for _, p, m in masked for v in opt.state[p].values() if v.shape == p.shape)
                )

    pl.seed_everything(0)
    model = YOLOv8("n", num_classes=2, img_size=64, optimizer=optimizer)
    plain_keys = list(model.state_dict())
    callback = UnstructuredPruning(amount=0.7, epochs=[1])  # momentum / Adam moments built up in epoch 0
    probe, masks = AfterEveryStep(), Snapshot(callback, "masks")
    trainer = make_trainer(tmp_path, [callback, probe, masks], max_epochs=2, limit_train_batches=3)
    trainer.fit(model, make_loader(6, 2))

    assert probe.revived == [0, 0, 0] and probe.state_zero == [True] * 3  # by SGD momentum / AdamW alone
    pruned = masks.seen[1]
    params = dict(model.named_parameters())
    assert all(not params[k][~m].any() for k, m in pruned.items())
    # permanent at the end: plain parameters, the keys of an unpruned model, the zeros kept
    assert masked_parameters(model) == [] and list(model.state_dict()) == plain_keys
    assert all(isinstance(params[k], nn.Parameter) for k in pruned)
    zeros = sum(int((params[k] == 0).sum()) for k in pruned)
    assert zeros == round(0.7 * sum(m.numel() for m in pruned.values()))
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    YOLOv8("n", num_classes=2, img_size=64).load_state_dict(
        torch.load(tmp_path / "plain.ckpt", weights_only=True)["state_dict"]
    )


@pytest.mark.slow
def test_resume_between_steps_and_reload_in_a_fresh_process(tmp_path):
    def run(ckpt_path=None, checkpoint=None):
        pl.seed_everything(0)
        model = FAMILIES["yolov8"]()
        callback = UnstructuredPruning(amount=0.8, schedule="linear", epochs=[1, 2], permanent_at_end=False)
        callbacks = [callback] + ([checkpoint] if checkpoint else [])
        trainer = make_trainer(tmp_path, callbacks, max_epochs=3, enable_checkpointing=checkpoint is not None)
        trainer.fit(model, make_loader(), ckpt_path=ckpt_path)
        return model, callback

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1)
    full, _ = run(checkpoint=checkpoint)
    ckpt = torch.load(tmp_path / "ckpt" / "epoch=1.ckpt", weights_only=True)  # plain data only
    stored = {k: v for k, v in ckpt["state_dict"].items() if k.endswith("_mask")}
    assert len(stored) == 65 and all(v.dtype == torch.bool for v in stored.values())
    assert ckpt["callbacks"][next(k for k in ckpt["callbacks"] if "UnstructuredPruning" in k)] == {"steps_done": 1}

    resumed, callback = run(ckpt_path=tmp_path / "ckpt" / "epoch=1.ckpt")
    assert callback.steps_done == 2
    expected, got = full.state_dict(), resumed.state_dict()
    assert list(expected) == list(got)
    for key in expected:  # the masks and every weight, bit for bit
        assert torch.equal(expected[key], got[key]), key

    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.save({"x": x, "y": full.eval()(x)}, tmp_path / "expected.pt")
    code = textwrap.dedent(f"""
        import torch
        torch.set_num_threads(1)
        from lightning_prune.models.yolov8 import YOLOv8
        from lightning_prune.pruning.masks import masked_parameters
        path = {str(tmp_path / "ckpt" / "epoch=2.ckpt")!r}
        model = YOLOv8.load_from_checkpoint(path, weights_only=True).eval()
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        with torch.no_grad():
            for a, b in zip(model(expected["x"]), expected["y"]):
                assert torch.equal(a, b)
        print("OK", len(masked_parameters(model)), sum(int((~m).sum()) for _, _, m in masked_parameters(model)))
    """)
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    pruned = sum(int((~m).sum()) for m in masks_of(full).values())
    assert result.stdout.split() == ["OK", "65", str(pruned)]


class Plain(pl.LightningModule):
    """A LightningModule without PrunableMixin."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 2))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def test_a_module_without_the_mixin_resumes_its_masks(tmp_path):
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 2, (8,), generator=g)), 4)

    def run(max_epochs, ckpt_path=None):
        pl.seed_everything(0)
        model = Plain()
        callback = UnstructuredPruning(amount=0.5, schedule="linear", epochs=[0, 1], permanent_at_end=False)
        trainer = make_trainer(tmp_path, [callback], max_epochs=max_epochs)
        trainer.fit(model, loader, ckpt_path=ckpt_path)
        return model, trainer

    full, _ = run(2)
    _, trainer = run(1)
    trainer.save_checkpoint(tmp_path / "first.ckpt")
    resumed, _ = run(2, tmp_path / "first.ckpt")  # the callback's load pre-hook created the buffers
    expected, got = full.state_dict(), resumed.state_dict()
    assert list(got) == list(expected) and sum(k.endswith("_mask") for k in got) == 2
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_masks_on_a_structurally_pruned_model_reload_and_later_channel_pruning_is_refused(tmp_path):
    pruned = FAMILIES["yolov8"]()
    StructuredPruning(pruning_ratio=0.3).on_train_epoch_start(fake_trainer(), pruned)  # channels first
    UnstructuredPruning(amount=0.5).on_train_epoch_start(fake_trainer(), pruned)
    torch.save(pruned.state_dict(), tmp_path / "weights.pt")
    fresh = FAMILIES["yolov8"]()  # masks created with the stored shapes, then the pruning history resizes the layers
    fresh.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    assert [(k, v.shape) for k, v in masks_of(fresh).items()] == [(k, v.shape) for k, v in masks_of(pruned).items()]
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(fresh.eval()(x), pruned.eval()(x), strict=True))

    StructuredPruning(pruning_ratio=0.3).on_train_epoch_start(fake_trainer(), fresh)  # channels after the masks
    with pytest.raises(ValueError, match=r"Expected the mask of `.*` to have the parameter's shape .* HINT: prune ch"):
        UnstructuredPruning(amount=0.5).on_train_batch_end(None, fresh, None, None, 0)


DDP_SCRIPT = """
import hashlib, json, sys
import pytorch_lightning as pl
import torch
sys.path[:0] = [{root!r}, {here!r}]
from test_pruning import make_loader
from lightning_prune.callbacks import StructuredPruning, UnstructuredPruning
from lightning_prune.models.yolov8 import YOLOv8
from lightning_prune.pruning.masks import masked_parameters

class Report(pl.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        masked = masked_parameters(pl_module)
        json.dump({{
            "wrapped": type(trainer.strategy.model).__name__,
            "masks": {{n: hashlib.sha256(m.numpy().tobytes()).hexdigest() for n, _, m in masked}},
            "revived": sum(int(torch.count_nonzero(p[~m])) for _, p, m in masked),
            "weights": [float(p.detach().double().sum()) for p in pl_module.parameters()],
        }}, open({out!r} + f"/rank{{trainer.global_rank}}.json", "w"))

if __name__ == "__main__":
    torch.set_num_threads(1)
    pl.seed_everything(0)
    pruning = UnstructuredPruning(amount=0.7, schedule="linear", epochs=[1, 2], permanent_at_end=False)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=3, limit_train_batches=2,
                         limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir={out!r},
                         callbacks=[pruning, Report()])
    trainer.fit(YOLOv8("n", num_classes=2, img_size=64, optimizer="adamw"), make_loader(8, 2))
"""


@pytest.mark.slow
def test_ddp_ranks_mask_identically(tmp_path):
    here = Path(__file__).resolve().parent
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT.format(root=str(here.parents[1]), here=str(here), out=str(tmp_path)))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["wrapped"] == "DistributedDataParallel" and len(ranks[0]["masks"]) == 65
    assert ranks[0]["masks"] == ranks[1]["masks"]  # every rank decided alone, on its identical weights
    assert ranks[0]["weights"] == ranks[1]["weights"] and ranks[0]["revived"] == ranks[1]["revived"] == 0


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"amount": 1.0}, r"Expected argument `amount` to be a float in \(0, 1\) but got 1.0."),
        ({"amount": 0}, r"Expected argument `amount` to be a float in \(0, 1\) but got 0."),
        ({"amount": True}, r"Expected argument `amount` to be a float in \(0, 1\) but got True."),
        ({"schedule": "exp", "epochs": [1]}, r"Expected argument `schedule` to be one of \[.*\] or a callable"),
        ({"schedule": "cubic"}, r"Expected argument `epochs` \(or `every_n_epochs` and `steps`\) to be given for"),
        ({"epochs": [2, 1], "schedule": "linear"}, r"Expected argument `epochs` to be strictly increasing ints >= 0"),
        ({"epochs": [1, 2]}, r"Expected argument `steps` to be 1 for the 'one_shot' schedule but got 2."),
        ({"every_n_epochs": 2}, r"Expected argument `steps` to be an int >= 1 but got None."),
        ({"every_n_epochs": 0, "steps": 2}, r"Expected argument `every_n_epochs` to be an int >= 1 but got 0."),
        ({"epochs": [0], "steps": 2}, r"Expected either argument `epochs` or `every_n_epochs` with `steps` but got"),
        ({"parameter_names": []}, r"Expected argument `parameter_names` to be a non-empty list of parameter names"),
        ({"parameter_names": "weight"}, r"Expected argument `parameter_names` to be a non-empty list .* 'weight'."),
        ({"ignored_layers": ["head("]}, r"Expected argument `ignored_layers` to hold valid regexes but got 'head\('"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UnstructuredPruning(**kwargs)


def test_setup_errors_and_state():
    model = FAMILIES["yolov8"]()
    with pytest.raises(MisconfigurationException, match=r"`ignored_layers` .* 'neck.nothing' matches none"):
        UnstructuredPruning(ignored_layers=["neck.nothing"]).setup(None, model, "fit")
    with pytest.raises(MisconfigurationException, match=r"Expected argument `submodule` to name a submodule of"):
        UnstructuredPruning(submodule="tail").setup(None, model, "fit")
    with pytest.raises(MisconfigurationException, match=r"`parameter_names` to be a trainable .* 'scale' is none"):
        UnstructuredPruning(parameter_names=["weight", "scale"]).setup(None, model, "fit")
    with pytest.raises(MisconfigurationException, match=r"`parameter_names` to be a trainable .* 'weight' is none"):
        UnstructuredPruning(ignored_layers=["backbone|neck|head"]).setup(None, model, "fit")
    callback = UnstructuredPruning()
    callback.load_state_dict({})
    assert callback.steps_done == 0
    callback.load_state_dict({"steps_done": 1})
    callback.on_train_epoch_start(fake_trainer(epoch=3), model)  # the schedule is done: nothing happens
    assert masked_parameters(model) == []
