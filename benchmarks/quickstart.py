"""The README's main job, timed: train the quickstart recipe on the built-in data and report wall time and mAP.

Usage: python benchmarks/quickstart.py [--recipe recipes/shapes/yolov3-tiny.yaml] [extra CLI overrides ...]

Runs `python -m lightning_prune fit --config RECIPE` in a subprocess exactly as a user would (data generation
included when the cache is cold; the install is excluded), then writes the section "quickstart" of
benchmarks/RESULTS.md: wall time, final val mAP50 / mAP50-95, and the mAP50 curve per epoch.
Target on 2 CPU cores: <= 10 minutes to mAP50 >= 0.8.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _results import publish
from _timing import run_command

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/shapes/yolov3-tiny.yaml")
    args, overrides = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "lightning_prune",
            "fit",
            "--config",
            args.recipe,
            "--trainer.default_root_dir",
            tmp,
            "--trainer.logger",
            "pytorch_lightning.loggers.CSVLogger",
            "--trainer.logger.save_dir",
            tmp,
            *overrides,
        ]
        proc, wall = run_command(cmd, ROOT, "quickstart")
        rows = list(csv.DictReader(next(Path(tmp).rglob("metrics.csv")).open()))
    curve = [(int(r["epoch"]), float(r["val/mAP50"]), float(r["val/mAP"])) for r in rows if r.get("val/mAP50")]
    summary = [line for line in proc.stdout.splitlines() if line.startswith("[lightning-prune]")]
    epoch, map50, map5095 = curve[-1]
    first_08 = next((e + 1 for e, m, _ in curve if m >= 0.8), None)  # 1-based epoch
    body = "\n".join(
        [
            f"Command: `{' '.join(['lightning-prune', *cmd[3:6], *overrides])}` (logger switched to CSV to read the"
            " curve; the data cache was warm unless the first run).",
            "",
            "| wall time (s) | epochs | final val mAP50 | final val mAP50-95 | first epoch with mAP50 >= 0.8"
            " | target |",
            "| --- | --- | --- | --- | --- | --- |",
            f"| {wall:.0f} | {epoch + 1} | {map50:.3f} | {map5095:.3f} | {first_08 or 'never'}"
            f" | <= 600 s to mAP50 >= 0.8: {'met' if wall <= 600 and map50 >= 0.8 else 'NOT met'} |",
            "",
            "mAP50 per epoch: " + ", ".join(f"{m:.3f}" for _, m, _ in curve),
            "",
            "```",
            *summary,
            "```",
        ]
    )
    publish("quickstart", body)


if __name__ == "__main__":
    main()
