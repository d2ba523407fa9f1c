"""Training-step timing shared by the benchmarks: per-batch wall times of real Trainer fits on synthetic data."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch


class StepTimer(pl.Callback):
    """Wall time of every training batch (forward, backward, optimizer step and the callbacks in between)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.times.append(time.perf_counter() - self._start)


def synthetic_loader(size: int, batch: int, steps: int) -> torch.utils.data.DataLoader:
    """``steps`` batches of random images with one box each (timing only)."""
    g = torch.Generator().manual_seed(0)
    box = torch.tensor([[0.1, 0.1, 0.6, 0.6]]) * size
    data = [(torch.rand(3, size, size, generator=g), {"boxes": box, "labels": torch.tensor([0])})] * (batch * steps)

    def collate(items: list) -> tuple[torch.Tensor, list]:
        images, targets = zip(*items, strict=True)
        return torch.stack(images), list(targets)

    return torch.utils.data.DataLoader(data, batch_size=batch, collate_fn=collate)


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    """A CPU Trainer without validation, logger, checkpoints, progress bar or model summary (``kwargs`` added)."""
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        **kwargs,
    )


SKIP = 2  # warm-up batches of each timed fit, not timed


def timed_steps(text: str) -> int:
    """``--steps``'s type: batches per timed fit, more than the :data:`SKIP` warm-up batches."""
    try:
        steps = int(text)
    except ValueError:
        steps = 0
    if steps <= SKIP:
        raise argparse.ArgumentTypeError(
            f"expected an int > {SKIP} (the first {SKIP} batches of each timed fit are warm-up) but got {text!r}"
        )
    return steps


def step_times(model: pl.LightningModule, callbacks: list[pl.Callback], loader: Any, skip: int = SKIP) -> list[float]:
    """Per-batch seconds of one epoch of ``model`` on ``loader`` with ``callbacks``, the first ``skip`` dropped."""
    timer = StepTimer()
    trainer = quiet_trainer(max_epochs=1, callbacks=[*callbacks, timer])
    trainer.fit(model, loader)
    return timer.times[skip:]


def interleaved(variants: dict[str, Callable[[], list[float]]], rounds: int) -> dict[str, list[float]]:
    """Run every variant once per round, the order reversed every other round; all the samples per variant."""
    names = list(variants)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            samples[name] += variants[name]()
    return samples


def run_command(cmd: list[str], cwd: Path, what: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``cmd`` as a user would (a subprocess); its result and wall time in s. A failure prints its output tail."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-5000:])
        raise SystemExit(f"{what} failed with exit code {proc.returncode}")
    return proc, wall
