"""StructuredPruning(remove_blocks=N): whole residual blocks go at the first step, with channels, in a real fit."""

from __future__ import annotations

import logging

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from test_pruning import FAMILIES, Recorder, make_loader, make_trainer, optimizer_params
from torch import nn

from lightning_prune.callbacks import StructuredPruning, pruning_history
from lightning_prune.models.yolov3 import YOLOv3
from lightning_prune.models.yolov8 import YOLOv8
from lightning_prune.pruning.blocks import find_residual_blocks
from lightning_prune.report.summary import model_stats

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def weaken(model: nn.Module, names: list[str]) -> None:
    """Every block's BatchNorm γ to 1, those of ``names`` to 0.01: they rank lowest by ``bn_scale``."""
    for block in find_residual_blocks(model, model.example_input_array):
        for module in model.get_submodule(block).modules():
            if isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 0.01 if block in names else 1.0)


def test_the_weakest_blocks_go_and_training_continues(tmp_path, caplog):
    pl.seed_everything(0)
    model = FAMILIES["yolov3"]()
    blocks = find_residual_blocks(model, model.example_input_array)
    weak = [blocks[1], blocks[-1]]
    weaken(model, weak)
    before = model_stats(model, model.example_input_array)
    callback, recorder = StructuredPruning(pruning_ratio=0.0, remove_blocks=2), Recorder()
    trainer = make_trainer(tmp_path, [callback, recorder], max_epochs=2)
    with caplog.at_level(logging.INFO):
        trainer.fit(model, make_loader())

    # the log names the criterion and the blocks, not the scoring function's repr
    assert f"removed 2 residual blocks (lowest bn_scale): {', '.join(sorted(weak, key=blocks.index))}" in caplog.text
    assert [type(model.get_submodule(b)) is nn.Identity for b in blocks] == [b in weak for b in blocks]
    (step,) = pruning_history(model).steps
    assert step == [{"module": b, "kind": "block", "idxs": [], "size": None} for b in sorted(weak, key=blocks.index)]
    assert model_stats(model, model.example_input_array)["params"] < before["params"]
    assert set(map(id, optimizer_params(trainer))) == {id(p) for p in model.parameters()}
    assert recorder.losses and all(torch.isfinite(torch.tensor(loss)) for loss in recorder.losses)


def test_blocks_and_a_macs_target_together_survive_a_checkpoint(tmp_path):
    pl.seed_everything(0)
    model = FAMILIES["yolov8"]()
    before = model_stats(model, model.example_input_array)
    callback = StructuredPruning(target_macs_ratio=0.5, remove_blocks=1, round_to=4)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")
    trainer = make_trainer(tmp_path, [callback, checkpoint], max_epochs=1, enable_checkpointing=True)
    trainer.fit(model, make_loader())

    after = model_stats(model, model.example_input_array)
    assert after["macs"] / before["macs"] == pytest.approx(0.5, rel=StructuredPruning.tolerance)  # blocks count
    (step,) = pruning_history(model).steps
    assert step[0]["kind"] == "block" and all(r["kind"] != "block" for r in step[1:])
    loaded = YOLOv8.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt").eval()
    assert isinstance(loaded.get_submodule(step[0]["module"]), nn.Identity)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(loaded(x), model.eval()(x), strict=True):
            assert torch.equal(a, b)


def test_bad_block_arguments():
    with pytest.raises(ValueError, match=r"Expected argument `remove_blocks` to be an int >= 0 but got -1."):
        StructuredPruning(remove_blocks=-1)
    with pytest.raises(ValueError, match=r"Expected argument `block_importance` to be one of \[.*\] or a callable"):
        StructuredPruning(remove_blocks=1, block_importance="gamma")
    model = YOLOv3("tiny", num_classes=2, img_size=64)
    found = len(find_residual_blocks(model, model.example_input_array))
    with pytest.raises(MisconfigurationException, match=rf"`remove_blocks` to be at most the {found} residual blocks"):
        StructuredPruning(pruning_ratio=0.0, remove_blocks=found + 1).setup(None, model, "fit")
