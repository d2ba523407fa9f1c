"""Is a latency target given in milliseconds met on the device it was measured on?

Usage: python benchmarks/latency_target.py [--baseline CKPT] [--scale n] [--img_size 256] [--batches 1,8]
       [--fractions 0.7,0.5] [--allocations importance,sensitivity] [--sensitivity JSON] [--round_to 8]
       [--repeats 30] [--threads 2] [--results benchmarks/RESULTS.md]

For each batch size and fraction, ``StructuredPruning(target_latency_ms=fraction × the model's measured latency,
latency_batch_size=batch, round_to=...)`` prunes a fresh copy of the model one-shot (outside a Trainer; rank 0's
search on dry runs timed side by side with the model), then the pruned model is timed again *independently*: its
BatchNorm-fused eager forward interleaved with the unpruned model's, ``--repeats`` rounds, medians
(:func:`lightning_prune.report.latency_ms`). The error is (measured - target) / target. The model is a trained
checkpoint (``--baseline``) or a freshly seeded ``YOLOv8(scale)``; ``--allocations sensitivity`` needs the
checkpoint's ``--sensitivity`` table. Takes a few minutes on 2 cores; run it on a quiet machine (wall clock).

Target (issue #7): a latency target given in ms is met within 10% on the device it was measured on. Writes the
section "latency_target" of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _results import RESULTS, publish
from pruning_speed import fake_trainer

from lightning_prune.callbacks import StructuredPruning
from lightning_prune.export import load_module
from lightning_prune.models import YOLOv8
from lightning_prune.report import latency_ms
from lightning_prune.report.summary import model_stats


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default=None, help="trained checkpoint (default: a seeded YOLOv8 --scale)")
    parser.add_argument("--scale", default="n")
    parser.add_argument("--img_size", type=int, default=256)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--fractions", default="0.7,0.5")
    parser.add_argument("--allocations", default="importance")
    parser.add_argument("--sensitivity", default=None)
    parser.add_argument("--round_to", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.baseline:
        base = load_module(args.baseline).eval()
        source = f"checkpoint `{args.baseline}`"
    else:
        base = YOLOv8(args.scale, num_classes=80, img_size=args.img_size).eval()
        source = f"seeded YOLOv8{args.scale} (80 classes, random weights)"
    example = torch.zeros(1, 3, args.img_size, args.img_size)
    base.example_input_array = example
    stats = model_stats(base, example)
    rows, errors = [], []
    for batch in [int(b) for b in args.batches.split(",")]:
        x = example.expand(batch, -1, -1, -1).contiguous()
        start_ms = latency_ms([base], x, repeats=args.repeats)[0]
        for allocation in args.allocations.split(","):
            for fraction in [float(f) for f in args.fractions.split(",")]:
                target = fraction * start_ms
                model = copy.deepcopy(base).train()
                kwargs = {"sensitivity": args.sensitivity} if allocation == "sensitivity" else {}
                callback = StructuredPruning(
                    target_latency_ms=target,
                    latency_batch_size=batch,
                    round_to=args.round_to,
                    allocation=allocation,
                    **kwargs,
                )
                began = time.perf_counter()
                callback.on_train_epoch_start(fake_trainer(), model)
                seconds = time.perf_counter() - began
                before, after = latency_ms([base, model], x, repeats=args.repeats)
                error = (after - target) / target
                errors.append(abs(error))
                macs = model_stats(model, example)["macs"] / stats["macs"]
                rows.append(
                    f"| {batch} | {allocation} | {before:.2f} | {fraction:g} → {target:.2f} | {after:.2f} | "
                    f"{100 * error:+.1f}% | {macs:.3f} | {seconds:.1f} |"
                )
                print(rows[-1], flush=True)
    worst = max(errors)
    body = "\n".join(
        [
            f"Model: {source}, {stats['params'] / 1e6:.2f}M params, {stats['macs'] / 1e9:.3f} GMACs at "
            f"{args.img_size} px; StructuredPruning(target_latency_ms=..., round_to={args.round_to}), one-shot; "
            f"latency = BatchNorm-fused eager forward, median of {args.repeats} runs interleaved with the unpruned "
            f"model, {args.threads} threads, measured again after pruning (not the search's own estimate).",
            "",
            "| batch | allocation | unpruned (ms) | target (fraction → ms) | measured (ms) | error | MACs left | "
            "search (s) |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
            *rows,
            "",
            "| target (issue #7) | measured | |",
            "| --- | --- | --- |",
            f"| latency target in ms met within 10% | worst error {100 * worst:.1f}% | "
            f"{'met' if worst <= 0.10 else 'NOT met'} |",
        ]
    )
    return publish("latency_target", body, Path(args.results))


if __name__ == "__main__":
    main()
