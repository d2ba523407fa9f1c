"""The compression report of a ``fit``: the model as it started and as it ended, measured side by side."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn
from typing_extensions import override

from lightning_prune.callbacks._modules import copy_module, example_from_shape, is_int, resolve_example
from lightning_prune.pruning.channels import layer_widths
from lightning_prune.pruning.checkpoint import pruning_history
from lightning_prune.report.compression import (
    RUNTIMES,
    check_batch_sizes,
    compression_report,
    report_metrics,
    write_report,
)
from lightning_prune.report.quantize import CALIBRATION_METHODS
from lightning_prune.report.summary import model_stats

_ORIGINAL_FILE = "original.pt"


class CompressionReport(pl.Callback):
    """At the end of ``fit``, measure the module as it was at fit start and as it is now; write, print and log it.

    What a pruning paper's table shows, measured in one run on this machine (see
    :func:`~lightning_prune.report.compression.compression_report`): params, MACs, size on disk, latency (CPU eager
    with BatchNorm fused; ONNX Runtime with the ``export`` extra; CUDA when present; at each of ``batch_sizes``,
    medians of interleaved rounds), val mAP50 / mAP50-95 (the module's own decoding and NMS over the whole
    validation set of the data module), and with ``int8`` a row for the compressed model quantized by ONNX Runtime
    (static, QDQ, ``calibration_method`` on ``calibration_images`` training images, the output convs in float: see
    :func:`~lightning_prune.report.quantize.quantize_onnx`; its mAP evaluated through ONNX Runtime). Put it after
    the pruning callbacks.

    Written into ``dirpath`` (default ``<log_dir>/compression_report``): ``compression_report.md`` and ``.json``,
    the ONNX files, and with matplotlib (the ``report`` extra) ``channels.png`` (channels per layer before/after),
    ``gamma.png`` (BatchNorm |γ| histograms) and ``map_vs_macs.png`` (validation mAP against MACs at every
    validation of the run). The table is printed on rank 0 and its numbers logged as ``report/<row>/<column>``.

    The original is kept in memory from fit start, and its weights saved as ``original.pt`` in ``dirpath``, so that
    a run resumed with ``fit(ckpt_path=...)`` after pruning still compares against it (it is rebuilt from the
    module's saved hyperparameters).

    Args:
        dirpath: the report folder.
        batch_sizes: batch sizes timed.
        runtimes: among ``cpu``, ``ort``, ``cuda``; default all available (``ort`` with the ``export`` extra).
        int8: add the INT8 ONNX row (needs the ``export`` extra).
        calibration_images: training images for the INT8 calibration (the data module's, letterboxed, not
            augmented).
        calibration_method: ``entropy`` (KL divergence), ``minmax`` or ``percentile``.
        limit_val_batches: evaluate mAP on the first batches of the validation set only (``None``: all).
        latency_repeats: timed rounds per latency.
        plots: write the PNGs (``None``: when matplotlib is installed).
        example_input: input to measure with (a tensor or a shape); default ``example_input_array``.

    Raises:
        ValueError: an argument out of range or of the wrong type.
        ModuleNotFoundError: at ``setup``, ``int8``/``ort`` without the ``export`` extra, or ``plots=True`` without
            matplotlib.
        MisconfigurationException: at ``setup``, no example input, or a module without ``postprocess`` (needed for
            the mAP) while the data module has validation data.

    Example:
        >>> CompressionReport(batch_sizes=[1], int8=False, plots=False).batch_sizes
        [1]
    """

    def __init__(
        self,
        dirpath: str | None = None,
        batch_sizes: list[int] | None = None,
        runtimes: list[str] | None = None,
        int8: bool = False,
        calibration_images: int = 64,
        calibration_method: str = "entropy",
        limit_val_batches: int | None = None,
        latency_repeats: int = 20,
        plots: bool | None = None,
        example_input: Any = None,
    ) -> None:
        self.dirpath = dirpath
        self.batch_sizes = [1, 8] if batch_sizes is None else check_batch_sizes(batch_sizes)
        if runtimes is not None and (not runtimes or any(r not in RUNTIMES for r in runtimes)):
            raise ValueError(
                f"Expected argument `runtimes` to be None or a non-empty list among {list(RUNTIMES)} but got "
                f"{runtimes!r}."
            )
        if not is_int(calibration_images) or calibration_images < 1:
            raise ValueError(
                f"Expected argument `calibration_images` to be an int >= 1 but got {calibration_images!r}."
            )
        if calibration_method not in CALIBRATION_METHODS:
            raise ValueError(
                f"Expected argument `calibration_method` to be one of {list(CALIBRATION_METHODS)} but got "
                f"{calibration_method!r}."
            )
        if limit_val_batches is not None and (not is_int(limit_val_batches) or limit_val_batches < 1):
            raise ValueError(
                f"Expected argument `limit_val_batches` to be None or an int >= 1 but got {limit_val_batches!r}."
            )
        if not is_int(latency_repeats) or latency_repeats < 1:
            raise ValueError(f"Expected argument `latency_repeats` to be an int >= 1 but got {latency_repeats!r}.")
        self.runtimes = None if runtimes is None else list(runtimes)
        self.int8 = int8
        self.calibration_images = calibration_images
        self.calibration_method = calibration_method
        self.limit_val_batches = limit_val_batches
        self.latency_repeats = latency_repeats
        self.plots = plots
        self.example_input = example_from_shape(example_input)
        self.rows: list[dict[str, Any]] = []
        self.points: list[dict[str, Any]] = []  # one per validation: epoch, params, macs, mAP, mAP50
        self._original: nn.Module | None = None
        self._original_file: str | None = None
        self._example: torch.Tensor | None = None
        self._stats_key: tuple[int, int] | None = None
        self._stats: dict[str, float] = {}

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.int8 or (self.runtimes is not None and "ort" in self.runtimes):
            from lightning_prune.report.export import require_export_extra

            require_export_extra()
        if self.plots:
            from lightning_prune.report.plots import require_matplotlib

            require_matplotlib()
        example = resolve_example(self.example_input, pl_module, pl_module, "CompressionReport", "measure the model")
        if not isinstance(example, torch.Tensor):
            raise MisconfigurationException(
                f"Expected the example input of CompressionReport to be a tensor but got {type(example).__name__}."
            )
        self._example = example[:1].detach().cpu()
        if not callable(getattr(pl_module, "postprocess", None)):
            raise MisconfigurationException(
                f"Expected {type(pl_module).__name__} to have a `postprocess(raw) -> detections` method for the "
                "report's mAP but it has none. HINT: our DetectorModule has one; add it to your module."
            )
        if self.dirpath is None:
            self.dirpath = str(Path(trainer.log_dir or trainer.default_root_dir) / "compression_report")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._original is not None:
            return
        assert self.dirpath is not None
        if not len(pruning_history(pl_module)):
            self._original = copy_module(pl_module).cpu().eval()
            if trainer.is_global_zero:
                path = Path(self.dirpath) / _ORIGINAL_FILE
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"state_dict": self._original.state_dict()}, path)
                self._original_file = str(path)
        elif self._original_file is not None and Path(self._original_file).is_file():
            # resumed after pruning: the unpruned architecture from the hyperparameters, its weights from fit start
            original = type(pl_module)(**pl_module.hparams)
            state = torch.load(self._original_file, map_location="cpu", weights_only=True)["state_dict"]
            original.load_state_dict(state)
            self._original = original.eval()
        else:
            raise MisconfigurationException(
                f"Expected the module at fit start to be unpruned, or the original saved by a previous run "
                f"({self._original_file!r}), but the module is pruned and the file is missing."
            )

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        point: dict[str, Any] = {"epoch": trainer.current_epoch, **self._current_stats(pl_module)}
        for name, key in (("mAP", "val/mAP"), ("mAP50", "val/mAP50")):
            if key in metrics:
                point[name] = float(metrics[key])
        self.points.append(point)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self._report(trainer, pl_module)
        trainer.strategy.barrier("CompressionReport")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"original_file": self._original_file, "points": self.points}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._original_file = state_dict.get("original_file")
        self.points = list(state_dict.get("points", []))

    # ------------------------------------------------------------------ the report
    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._original is not None and self._example is not None and self.dirpath is not None
        compressed = copy_module(pl_module).cpu().eval()
        datamodule = getattr(trainer, "datamodule", None)
        # the whole validation set: the data module's own loader (the Trainer's is split across ranks under DDP)
        dataloader = datamodule.val_dataloader() if datamodule is not None else trainer.val_dataloaders
        calibration = None
        if self.int8:
            calibration = _calibration_images(trainer, self.calibration_images)
        self.rows = compression_report(
            {"Original": self._original, "Compressed": compressed},
            self._example,
            dataloader=dataloader,
            postprocess=compressed.postprocess,
            out_dir=self.dirpath,
            batch_sizes=self.batch_sizes,
            runtimes=self.runtimes,
            int8=self.int8,
            calibration=calibration,
            calibration_method=self.calibration_method,
            repeats=self.latency_repeats,
            limit_val_batches=self.limit_val_batches,
        )
        md, _ = write_report(self.rows, self.dirpath, tuple(self._example.shape))
        if self.plots or (self.plots is None and importlib.util.find_spec("matplotlib") is not None):
            self._plot(compressed)
        for logger in trainer.loggers:
            logger.log_metrics(report_metrics(self.rows), step=trainer.global_step)
        rank_zero_info(f"[lightning-prune] compression report ({md}):\n{md.read_text()}")

    def _plot(self, compressed: nn.Module) -> None:
        from lightning_prune.report.plots import plot_channels, plot_gamma_histogram, plot_map_vs_macs

        assert self._original is not None and self.dirpath is not None
        out = Path(self.dirpath)
        plot_channels(layer_widths(self._original), layer_widths(compressed), out / "channels.png")
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in compressed.modules()):
            plot_gamma_histogram({"original": self._original, "compressed": compressed}, out / "gamma.png")
        if any("mAP" in p for p in self.points):
            plot_map_vs_macs(self.points, out / "map_vs_macs.png")

    def _current_stats(self, pl_module: pl.LightningModule) -> dict[str, float]:
        """Params and MACs of the module now; counted again only when its parameter count changed (pruning)."""
        key = (len(pruning_history(pl_module)), sum(p.numel() for p in pl_module.parameters()))
        if key != self._stats_key:
            assert self._example is not None
            stats = model_stats(pl_module, self._example.to(pl_module.device))
            self._stats, self._stats_key = {"params": stats["params"], "macs": stats["macs"]}, key
        return dict(self._stats)


def _calibration_images(trainer: pl.Trainer, limit: int) -> list[torch.Tensor]:
    """``limit`` training images: unaugmented from our data module, else the first batches of the train loader."""
    datamodule = getattr(trainer, "datamodule", None)
    if callable(getattr(datamodule, "calibration_images", None)):
        return datamodule.calibration_images(limit)  # type: ignore[union-attr]
    images: list[torch.Tensor] = []
    loader = trainer.train_dataloader
    for batch in loader if loader is not None else []:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        images.extend(x[i : i + 1].cpu() for i in range(min(len(x), limit - len(images))))
        if len(images) >= limit:
            break
    if not images:
        raise MisconfigurationException("Expected training data to calibrate INT8 with but the train loader is empty.")
    return images
