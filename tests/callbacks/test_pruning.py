"""StructuredPruning in real (tiny) Trainer runs: shrinking, optimizer patching, resume and reload of pruned models."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader

from lightning_prune.callbacks import StructuredPruning, pruning_history
from lightning_prune.models.base import count_parameters
from lightning_prune.models.yolov3 import YOLOv3
from lightning_prune.models.yolov8 import YOLOv8
from lightning_prune.pruning.channels import layer_widths

FAMILIES = {
    "yolov3": lambda: YOLOv3("tiny", num_classes=2, img_size=64),
    "yolov8": lambda: YOLOv8("n", num_classes=2, img_size=64),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _collate(batch: list) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    images, targets = zip(*batch, strict=True)
    return torch.stack(images), list(targets)


def make_loader(n: int = 4, batch_size: int = 2) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = []
    for i in range(n):
        xy = torch.rand(2, generator=g) * 32
        box = torch.cat([xy, xy + 16 + torch.rand(2, generator=g) * 16])
        data.append((torch.rand(3, 64, 64, generator=g), {"boxes": box[None], "labels": torch.tensor([i % 2])}))
    return DataLoader(data, batch_size=batch_size, collate_fn=_collate, shuffle=False)


def make_trainer(tmp_path, callbacks: list, max_epochs: int, **kwargs: Any) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        max_epochs=max_epochs,
        limit_train_batches=2,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        deterministic=True,
    )
    return pl.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


class Recorder(pl.Callback):
    """Parameter counts at each epoch start (after pruning) and every training loss."""

    def __init__(self) -> None:
        self.params: dict[int, int] = {}
        self.losses: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.params[trainer.current_epoch] = count_parameters(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def optimizer_params(trainer: pl.Trainer) -> list[nn.Parameter]:
    return [p for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]]


# ---------------------------------------------------------------------------------------------- training runs
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_one_shot_prunes_and_training_continues(family, tmp_path):
    pl.seed_everything(0)
    model = FAMILIES[family]()
    example = model.example_input_array
    shapes = [tuple(r.shape) for r in model.eval()(example)]
    before = count_parameters(model)
    recorder = Recorder()
    callback = StructuredPruning(pruning_ratio=0.5, importance="l2", epochs=[1])
    trainer = make_trainer(tmp_path, [callback, recorder], max_epochs=2, limit_val_batches=1, num_sanity_val_steps=1)
    trainer.fit(model, make_loader(), make_loader())

    assert recorder.params[0] == before  # nothing pruned before epoch 1 (nor in the sanity check)
    assert recorder.params[1] < 0.6 * before
    assert count_parameters(model) == recorder.params[1]
    assert len(recorder.losses) == 4 and all(math.isfinite(x) for x in recorder.losses)
    assert [tuple(r.shape) for r in model.eval()(example)] == shapes
    assert len(pruning_history(model)) == 1 and callback.state_dict() == {"steps_done": 1}
    # every optimized parameter is a live parameter and vice versa, and all carry momentum
    live = list(model.parameters())
    assert sorted(map(id, optimizer_params(trainer))) == sorted(map(id, live))
    assert all("momentum_buffer" in trainer.optimizers[0].state[p] for p in live)


def test_iterative_steps_at_scheduled_epochs_are_logged(tmp_path):
    pl.seed_everything(0)
    model = FAMILIES["yolov3"]()
    recorder = Recorder()
    callback = StructuredPruning(pruning_ratio=0.5, schedule="cubic", epochs=[1, 2], lr_scale=0.5)
    logger = CSVLogger(tmp_path, name="logs")
    trainer = make_trainer(tmp_path, [callback, recorder], max_epochs=3, logger=logger)
    trainer.fit(model, make_loader())

    p = recorder.params
    assert p[0] > p[1] > p[2] and p[2] < 0.6 * p[0]
    assert len(pruning_history(model)) == 2
    assert trainer.optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(model.lr * 0.25)
    assert trainer.lr_scheduler_configs[0].scheduler.base_lrs == pytest.approx([model.lr * 0.25] * 2)
    logged = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = logged[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=True)) for line in logged[1:]]
    ratios = [float(r["prune/params_ratio"]) for r in rows if r.get("prune/params_ratio")]
    assert ratios == pytest.approx([p[1] / p[0], p[2] / p[1]], rel=0.02)


def test_taylor_calibrates_without_logging(tmp_path):
    pl.seed_everything(0)
    model = FAMILIES["yolov3"]()
    before = count_parameters(model)
    callback = StructuredPruning(pruning_ratio=0.3, importance="taylor", epochs=[1], calibration_batches=1)
    trainer = make_trainer(tmp_path, [callback], max_epochs=2)
    trainer.fit(model, make_loader())
    assert count_parameters(model) < before
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    assert "log" not in vars(model)  # the silencing patch is gone


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_and_gradient_accumulation(tmp_path, precision):
    pl.seed_everything(0)
    model = FAMILIES["yolov8"]()
    before = count_parameters(model)
    recorder = Recorder()
    callback = StructuredPruning(pruning_ratio=0.5, importance="taylor", epochs=[1], calibration_batches=2)
    # fp16 autocast with a gradient scaler, as on a GPU (Lightning maps "16-mixed" on CPU to bf16 otherwise)
    plugins = (
        [pl.plugins.MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))] if precision == "16-mixed" else []
    )
    kwargs = {"plugins": plugins} if plugins else {"precision": precision}
    trainer = make_trainer(
        tmp_path, [callback, recorder], max_epochs=2, limit_train_batches=4, accumulate_grad_batches=2, **kwargs
    )
    trainer.fit(model, make_loader(8, 2))

    assert recorder.params[1] < 0.6 * before and count_parameters(model) == recorder.params[1]
    assert len(recorder.losses) == 8 and all(math.isfinite(x) for x in recorder.losses)
    assert trainer.global_step == 4  # two optimizer steps per epoch of four batches
    live = list(model.parameters())
    assert sorted(map(id, optimizer_params(trainer))) == sorted(map(id, live))
    state = trainer.optimizers[0].state
    assert all(state[p]["momentum_buffer"].shape == p.shape for p in live if p.requires_grad)


@pytest.mark.slow
def test_resume_between_steps_and_reload_in_a_fresh_process(tmp_path):
    def run(ckpt_path=None, checkpoint=None):
        pl.seed_everything(0)
        model = FAMILIES["yolov3"]()
        callback = StructuredPruning(pruning_ratio=0.5, schedule="cubic", epochs=[1, 2])
        callbacks = [callback] + ([checkpoint] if checkpoint else [])
        trainer = make_trainer(tmp_path, callbacks, max_epochs=3, enable_checkpointing=checkpoint is not None)
        trainer.fit(model, make_loader(), ckpt_path=ckpt_path)
        return model, callback

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1)
    full, _ = run(checkpoint=checkpoint)
    ckpt = torch.load(tmp_path / "ckpt" / "epoch=1.ckpt", weights_only=True)  # plain data only
    assert len(ckpt["lightning_prune"]["history"]["steps"]) == 1
    assert ckpt["callbacks"][next(k for k in ckpt["callbacks"] if "StructuredPruning" in k)] == {"steps_done": 1}

    resumed, callback = run(ckpt_path=tmp_path / "ckpt" / "epoch=1.ckpt")
    assert callback.steps_done == 2 and pruning_history(resumed) == pruning_history(full)
    expected, got = full.state_dict(), resumed.state_dict()
    assert list(expected) == list(got)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key

    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.save({"x": x, "y": full.eval()(x)}, tmp_path / "expected.pt")
    code = textwrap.dedent(f"""
        import torch
        torch.set_num_threads(1)
        from lightning_prune.models.yolov3 import YOLOv3
        model = YOLOv3.load_from_checkpoint({str(tmp_path / "ckpt" / "epoch=2.ckpt")!r}).eval()
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        with torch.no_grad():
            for a, b in zip(model(expected["x"]), expected["y"]):
                assert torch.equal(a, b)
        print("OK", sum(p.numel() for p in model.parameters()))
    """)
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["OK", str(count_parameters(full))]


# ---------------------------------------------------------------------------------------------- pruning semantics
def fake_trainer(epoch: int = 0, loader: DataLoader | None = None) -> Any:
    """What a pruning step reads from its Trainer, for a single process; ``loader`` feeds calibration."""
    return SimpleNamespace(
        sanity_checking=False,
        current_epoch=epoch,
        global_step=0,
        is_global_zero=True,
        world_size=1,
        optimizers=[],
        lr_scheduler_configs=[],
        strategy=SimpleNamespace(batch_to_device=lambda batch: batch),
        logger=None,
        train_dataloader=loader,
    )


def test_max_layer_ratio_caps_every_layer_against_the_original():
    model = FAMILIES["yolov3"]()
    widths = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    callback = StructuredPruning(pruning_ratio=0.9, schedule="linear", epochs=[0, 1], max_layer_ratio=0.5)
    callback.on_train_epoch_start(fake_trainer(epoch=1), model)  # both overdue steps, in order
    assert callback.steps_done == 2 and len(pruning_history(model)) == 2
    now = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert all(now[n] >= math.ceil(widths[n] / 2) for n in widths)
    assert any(now[n] == math.ceil(widths[n] / 2) for n in widths)  # the cap binds
    assert sum(now.values()) < sum(widths.values())
    assert all(now[n] == widths[n] for n in model.adapter.output_layers(model))


def test_ignored_layers_and_submodule():
    model = FAMILIES["yolov8"]()
    before = count_parameters(model)
    neck = {n: m.out_channels for n, m in model.neck.named_modules() if isinstance(m, nn.Conv2d)}
    callback = StructuredPruning(pruning_ratio=0.5, ignored_layers=[r"neck"])
    callback.setup(None, model, "fit")
    callback.on_train_epoch_start(fake_trainer(), model)
    # ignoring a layer keeps its outputs (its inputs follow the layers before it)
    assert {n: m.out_channels for n, m in model.neck.named_modules() if isinstance(m, nn.Conv2d)} == neck
    assert count_parameters(model) < before

    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    host = pl.LightningModule()
    host.net = plain
    host.example_input_array = torch.zeros(1, 3, 16, 16)
    callback = StructuredPruning(pruning_ratio=0.5, submodule="net")
    callback.setup(None, host, "fit")
    callback.on_train_epoch_start(fake_trainer(), host)
    assert (plain[0].out_channels, plain[3].out_channels) == (4, 4)  # the output conv keeps its width
    assert pruning_history(host).steps[0][0]["module"] in {"0", "1", "3"}  # names relative to the submodule


def test_layer_ratios_prune_named_layers_by_their_own_ratio_on_the_schedule():
    model = FAMILIES["yolov3"]()
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    widths = {n: m.out_channels for n, m in convs.items()}
    named = sorted((n for n in widths if n.startswith("backbone.")), key=widths.get)[-2:]  # the widest
    pattern = "|".join(n.replace(".", r"\.") for n in named)
    callback = StructuredPruning(
        pruning_ratio=0.2, layer_ratios={pattern: 0.75}, schedule="linear", epochs=[0, 1], global_pruning=False
    )
    callback.on_train_epoch_start(fake_trainer(epoch=0), model)
    half = {n: convs[n].out_channels for n in named}
    callback.on_train_epoch_start(fake_trainer(epoch=1), model)
    for n in named:  # 0.75 of the original in two linear steps: 0.375 then 0.75
        assert half[n] == int(widths[n] * (1 - 0.375)), n
        assert abs(convs[n].out_channels - widths[n] * 0.25) <= 1, n
    others = [n for n in widths if n not in named and n not in model.adapter.output_layers(model)]
    kept = [convs[n].out_channels > widths[n] * 0.7 for n in others]  # the rest lose about 0.2 (but those coupled)
    assert sum(kept) >= 0.8 * len(kept)
    for n in named:  # what the step log reports
        assert callback.layer_widths[0][n] == (widths[n], half[n])
        assert callback.layer_widths[1][n] == (half[n], convs[n].out_channels)


def test_pruning_ratio_zero_prunes_only_the_layer_ratios():
    model = FAMILIES["yolov3"]()
    widths = layer_widths(model)
    named = max((n for n in widths if n.startswith("backbone.")), key=widths.get)
    callback = StructuredPruning(pruning_ratio=0.0, layer_ratios={re.escape(named): 0.5}, global_pruning=False)
    callback.on_train_epoch_start(fake_trainer(), model)
    changed = {n for n, w in layer_widths(model).items() if w != widths[n]}
    assert named in changed and len(pruning_history(model)) == 1
    coupled = {r["module"] for r in pruning_history(model).steps[0] if r["kind"] == "out"}
    assert changed <= coupled and len(changed) < 0.2 * len(widths)  # the layer and what shares its channels, no more
    with pytest.raises(ValueError, match=r"Expected argument `pruning_ratio` to be a float in \(0, 1\) but got 0.0."):
        StructuredPruning(pruning_ratio=0.0)  # nothing to prune without layer_ratios


def test_example_input_argument_replaces_example_input_array():
    model = FAMILIES["yolov8"]()
    model.example_input_array = None
    callback = StructuredPruning(pruning_ratio=0.3, example_input=[1, 3, 32, 32])  # a shape, as in YAML
    callback.setup(None, model, "fit")
    callback.on_train_epoch_start(fake_trainer(), model)
    assert len(pruning_history(model)) == 1
    assert tuple(callback.example_input.shape) == (1, 3, 32, 32)
    assert model.example_input_array is None


def test_resume_with_a_module_missing_its_history_errors():
    model = YOLOv3("tiny", num_classes=2, img_size=64)
    callback = StructuredPruning(schedule="linear", epochs=[1, 2])
    callback.load_state_dict({"steps_done": 1})
    with pytest.raises(MisconfigurationException, match=r"Expected the module to hold 1 pruning steps .* holds 0"):
        callback.on_train_epoch_start(fake_trainer(epoch=2), model)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pruning_ratio": 1.5}, r"Expected argument `pruning_ratio` to be a float in \(0, 1\) but got 1.5."),
        ({"pruning_ratio": 0.0}, r"Expected argument `pruning_ratio` to be a float in \(0, 1\) but got 0.0."),
        ({"importance": "l3"}, r"Expected argument `importance` to be one of \[.*\] or a torch_pruning Importance"),
        ({"schedule": "exp", "epochs": [1]}, r"Expected argument `schedule` to be one of \[.*\] or a callable"),
        ({"schedule": "cubic"}, r"Expected argument `epochs` to be a list of epochs for schedule 'cubic'."),
        ({"epochs": [2, 1], "schedule": "linear"}, r"Expected argument `epochs` to be strictly increasing ints >= 0"),
        ({"epochs": [-1]}, r"Expected argument `epochs` to be strictly increasing ints >= 0 but got \[-1\]."),
        ({"epochs": [1, 2]}, r"Expected argument `steps` to be 1 for the 'one_shot' schedule but got 2."),
        ({"round_to": 0}, r"Expected argument `round_to` to be None or an int >= 1 but got 0."),
        ({"max_layer_ratio": 0}, r"Expected argument `max_layer_ratio` to be a float in \(0, 1\] but got 0."),
        ({"calibration_batches": 0}, r"Expected argument `calibration_batches` to be an int >= 1 but got 0."),
        ({"lr_scale": -1.0}, r"Expected argument `lr_scale` to be None or a float > 0 but got -1.0."),
        ({"ignored_layers": ["head("]}, r"Expected argument `ignored_layers` to hold valid regexes but got 'head\('"),
        ({"layer_ratios": [0.5]}, r"Expected argument `layer_ratios` to be a dict of regex -> ratio in \(0, 1\)"),
        (
            {"layer_ratios": {"neck": 1.0}},
            r"Expected argument `layer_ratios` to map each regex to a ratio in \(0, 1\) "
            r"but got 'neck': 1.0.",
        ),
        ({"layer_ratios": {"neck(": 0.5}}, r"Expected argument `layer_ratios` to hold valid regexes but got 'neck\('"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StructuredPruning(**kwargs)


def test_gradient_criterion_without_training_data_errors():
    model = FAMILIES["yolov3"]()
    with pytest.raises(MisconfigurationException, match="Expected a training dataloader to calibrate"):
        StructuredPruning(importance="taylor").on_train_epoch_start(fake_trainer(), model)
    assert all(m.training for m in model.modules())  # train mode restored on the error path


def test_setup_errors():
    model = FAMILIES["yolov3"]()
    with pytest.raises(MisconfigurationException, match=r"`ignored_layers` .* 'neck.nothing' matches none"):
        StructuredPruning(ignored_layers=["head", "neck.nothing"]).setup(None, model, "fit")
    with pytest.raises(MisconfigurationException, match=r"Expected argument `submodule` to name a submodule of"):
        StructuredPruning(submodule="tail").setup(None, model, "fit")
    with pytest.raises(MisconfigurationException, match=r"`layer_ratios` .* 'backbone.nothing' matches none"):
        StructuredPruning(layer_ratios={"backbone.nothing": 0.5}).setup(None, model, "fit")
    model.example_input_array = None
    with pytest.raises(MisconfigurationException, match=r"Expected `YOLOv3.example_input_array` to be set"):
        StructuredPruning().setup(None, model, "fit")


class Untraceable(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3), Reshaper())
        self.example_input_array = torch.zeros(1, 3, 16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.stem(x))


class Reshaper(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], 5, -1)  # 8 channels cannot split into 5: fails at trace time


def test_a_model_that_cannot_be_traced_is_named_at_setup():
    with pytest.raises(
        MisconfigurationException,
        match=r"Expected torch-pruning to trace Untraceable on its example input but it failed in module `body.1` "
        r"\(Reshaper\): RuntimeError",
    ):
        StructuredPruning().setup(None, Untraceable(), "fit")


class ConvBN(nn.Sequential):
    def __init__(self, c1: int, c2: int) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c1, c2, 1, bias=False), nn.BatchNorm2d(c2)


class ChunkC2f(nn.Module):
    """The Ultralytics C2f layout: one conv whose output is chunked in two."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.cv1, self.cv2, self.m = ConvBN(c, c), ConvBN(3 * c // 2, c), nn.ModuleList([ConvBN(c // 2, c // 2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.append(self.m[0](y[-1]))
        return self.cv2(torch.cat(y, 1))


def test_a_chunked_c2f_is_refused_with_the_converter_named():
    host = pl.LightningModule()
    host.block = ChunkC2f(8)
    host.example_input_array = torch.zeros(1, 8, 16, 16)
    with pytest.raises(MisconfigurationException, match=r"`block` \(ChunkC2f\) splits .*convert_c2f"):
        StructuredPruning().setup(None, host, "fit")


@pytest.mark.parametrize(
    ("optimizer", "match"),
    [
        (lambda ps: torch.optim.LBFGS(ps), r"optimizer 0 is LBFGS, whose state is one flat history"),
        (lambda ps: torch.optim.SGD(ps, lr=0.1), None),
    ],
)
def test_optimizers_that_cannot_follow_pruning_are_refused_at_fit_start(optimizer, match):
    model = FAMILIES["yolov3"]()
    trainer = SimpleNamespace(strategy=pl.strategies.SingleDeviceStrategy(), optimizers=[optimizer(model.parameters())])
    if match is None:
        StructuredPruning().on_fit_start(trainer, model)
        return
    with pytest.raises(MisconfigurationException, match=match):
        StructuredPruning().on_fit_start(trainer, model)


def test_a_sharding_strategy_is_refused_at_fit_start():
    trainer = SimpleNamespace(strategy=pl.strategies.FSDPStrategy(), optimizers=[])
    with pytest.raises(MisconfigurationException, match=r"Expected a single-device or DDP strategy .* FSDPStrategy"):
        StructuredPruning().on_fit_start(trainer, FAMILIES["yolov3"]())


def test_restore_refuses_a_differently_pruned_module():
    pruned, other = FAMILIES["yolov3"](), FAMILIES["yolov3"]()
    StructuredPruning(pruning_ratio=0.5).on_train_epoch_start(fake_trainer(), pruned)
    StructuredPruning(pruning_ratio=0.2).on_train_epoch_start(fake_trainer(), other)
    checkpoint: dict[str, Any] = {}
    pruned.on_save_checkpoint(checkpoint)
    with pytest.raises(ValueError, match=r"Expected the module to be unpruned or pruned as in the checkpoint"):
        other.on_load_checkpoint(checkpoint)
    fresh = FAMILIES["yolov3"]()
    fresh.on_load_checkpoint(checkpoint)  # a fresh module takes the structure, then the weights load strictly
    fresh.load_state_dict(pruned.state_dict())
    fresh.on_load_checkpoint(checkpoint)  # already pruned as stored: nothing to replay
    assert pruning_history(fresh) == pruning_history(pruned)


def test_a_bare_state_dict_rebuilds_the_pruned_structure(tmp_path):
    pruned = FAMILIES["yolov8"]()
    StructuredPruning(pruning_ratio=0.4).on_train_epoch_start(fake_trainer(), pruned)
    state = pruned.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # EMA-style code iterating tensors still works
    torch.save(state, tmp_path / "weights.pt")
    fresh = FAMILIES["yolov8"]()
    fresh.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))  # no callback, no checkpoint dict
    assert pruning_history(fresh) == pruning_history(pruned)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(fresh.eval()(x), pruned.eval()(x), strict=True))

    legacy = {k: v for k, v in FAMILIES["yolov8"]().state_dict().items() if k != "_extra_state"}
    FAMILIES["yolov8"]().load_state_dict(legacy)  # saved before the mixin existed: still loads strictly
    with pytest.raises(ValueError, match=r"Expected `_extra_state` of YOLOv8 to be the pruning history as a uint8"):
        FAMILIES["yolov8"]().load_state_dict({**legacy, "_extra_state": {"history": []}})


DDP_SCRIPT = """
import json, os, sys
import pytorch_lightning as pl
import torch
sys.path[:0] = [{root!r}, {here!r}]
from test_pruning import YOLOv3, make_loader
from lightning_prune.callbacks import StructuredPruning, pruning_history

class Reseed(pl.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        torch.manual_seed(100 + trainer.global_rank)  # "random" scores differ by rank: only the broadcast agrees

def checksums(trainer, pl_module):
    optimizer = trainer.optimizers[0]
    return {{
        "params": [float(p.detach().double().sum()) for p in pl_module.parameters()],
        "state": [float(v.double().sum()) for p in pl_module.parameters() for v in optimizer.state[p].values()
                  if torch.is_tensor(v) and v.dim() > 0],
    }}

class Report(pl.Callback):  # after StructuredPruning: sees every step's result
    def __init__(self):
        self.steps = []

    def on_train_epoch_start(self, trainer, pl_module):
        history = pruning_history(pl_module)
        self.steps.append({{"pruned": len(history), "records": history.steps[-1] if len(history) else [],
                            **checksums(trainer, pl_module)}})

    def on_train_end(self, trainer, pl_module):
        live = {{id(p) for p in pl_module.parameters()}}
        out = {{
            "wrapped": type(trainer.strategy.model).__name__,
            "wrapped_is_live": {{id(p) for p in trainer.strategy.model.parameters()}} == live,
            "optimized_is_live": {{id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}} == live,
            "steps": self.steps,
            "final": checksums(trainer, pl_module),
            "weights": [p.detach().flatten().tolist() for p in pl_module.parameters()],
        }}
        json.dump(out, open({out!r} + f"/rank{{trainer.global_rank}}.json", "w"))

if __name__ == "__main__":
    torch.set_num_threads(1)
    pl.seed_everything(0)
    pruning = StructuredPruning(importance={importance!r}, schedule="linear", epochs=[1, 2], **{prune_kwargs!r})
    if pruning.allocation == "latency":  # a cost that differs by rank (not timings: they would make the test flaky)
        rank = int(os.environ.get("LOCAL_RANK", 0))
        pruning.latency_table = lambda layer, c_in, c_out: layer.macs(c_in, c_out) * (1 + rank * (len(layer.name) % 5))
    if pruning.remove_blocks:  # block scores that differ by rank: rank 1 alone would remove other blocks
        sign = -1 if int(os.environ.get("LOCAL_RANK", 0)) else 1
        pruning.block_importance = lambda name, module: sign * sum(map(ord, name))
    netadapt = pruning.allocation == "netadapt"
    if netadapt:  # proposal scores that differ by rank: rank 1 alone would cut other groups
        rank = int(os.environ.get("LOCAL_RANK", 0))
        pruning.netadapt_score = lambda model, batches: float(sum(
            (1 + rank * (len(name) % 3)) * m.out_channels
            for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)))
    callbacks = [Reseed(), pruning, Report()]
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy={strategy!r}, max_epochs=3, limit_train_batches=2,
                         limit_val_batches=1 if netadapt else 0, num_sanity_val_steps=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir={out!r}, callbacks=callbacks)
    model = YOLOv3("tiny", num_classes=2, img_size=64, optimizer={optimizer!r})
    trainer.fit(model, make_loader(8, 2), make_loader(4, 2) if netadapt else None)
    if trainer.is_global_zero:  # with ddp_spawn: the main process, given rank 0's weights back by Lightning
        json.dump({{"steps": len(pruning_history(model)),
                    "weights": [p.detach().flatten().tolist() for p in model.parameters()]}},
                  open({out!r} + "/main.json", "w"))
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "optimizer", "importance", "prune_kwargs"),
    [
        ("ddp", "sgd", "random", {}),
        # calibration on both ranks, gradients and input means averaged (SyncBatchNorm needs GPUs)
        ("ddp", "adamw", "taylor", {"fold_bias": True}),
        ("ddp_spawn", "adamw", "random", {"target_macs_ratio": 0.6}),
        # rank 0 decides with its latency table (rank 1's would choose other channels)
        ("ddp", "sgd", "random", {"target_macs_ratio": 0.6, "allocation": "latency"}),
        # rank 0 chooses the residual blocks to remove (rank 1's scores would pick others)
        ("ddp", "sgd", "l2", {"remove_blocks": 2}),
        # rank 0 runs NetAdapt's rounds (rank 1's proposal scores would cut other groups)
        ("ddp", "adamw", "l2", {"target_macs_ratio": 0.6, "allocation": "netadapt", "netadapt_step": 0.1}),
    ],
)
def test_ddp_ranks_prune_identically_and_keep_training(tmp_path, strategy, optimizer, importance, prune_kwargs):
    here = Path(__file__).resolve().parent
    script = tmp_path / "ddp_fit.py"
    script.write_text(
        DDP_SCRIPT.format(
            root=str(here.parents[1]),
            here=str(here),
            out=str(tmp_path),
            strategy=strategy,
            optimizer=optimizer,
            importance=importance,
            prune_kwargs=prune_kwargs,
        )
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in ranks:
        assert rank["wrapped"] == "DistributedDataParallel" and rank["wrapped_is_live"] and rank["optimized_is_live"]
        assert [s["pruned"] for s in rank["steps"]] == [0, 1, 2]
        assert all(s["state"] for s in rank["steps"][1:])  # optimizer state carried over, not reset
    for a, b in zip(*(rank["steps"] for rank in ranks), strict=True):  # after every step: same channels and values
        assert a == b
    assert ranks[0]["final"] == ranks[1]["final"]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # same channels kept, gradients still all-reduced
    main = json.loads((tmp_path / "main.json").read_text())
    assert main == {"steps": 2, "weights": ranks[0]["weights"]}  # ddp_spawn: pruned structure rebuilt, weights back
