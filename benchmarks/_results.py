"""Write a benchmark's section into benchmarks/RESULTS.md between its own markers, with the machine it ran on."""

from __future__ import annotations

import os
import platform
import re
import shlex
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = "# Benchmark results\n\nEach section is written by the script it names; rerun it to regenerate that section.\n"


def machine() -> str:
    """One line: CPU model, cores, threads torch uses, GPU if any, torch version."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), {gpu}, "
        f"Python {platform.python_version()}"
    )


def command(script: str, argv: list[str] | None) -> str:
    """The command line that ran ``benchmarks/<script>``: ``argv`` as ``main(argv)`` got it, or the process's, quoted
    for a POSIX shell (``--prune '{round_to: 16}'``) so that it can be pasted to rerun."""
    return shlex.join(["python", f"benchmarks/{script}", *(sys.argv[1:] if argv is None else argv)])


def mean_std(values: list[float]) -> str:
    """Fractions as ``mean ± std`` in points; one seed has no spread to show: ``mean (1 seed)``."""
    if len(values) == 1:
        return f"{100 * values[0]:.2f} (1 seed)"
    return f"{100 * statistics.fmean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def write_section(name: str, body: str, path: Path | None = None) -> None:
    """Replace (or append) the section ``name`` of RESULTS.md (or of ``path``)."""
    path = RESULTS if path is None else path
    text = path.read_text() if path.exists() else HEADER
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = (
        f"<!-- {name}:start -->\n## {name}\n\n"
        f"Machine: {machine()}. Run: {stamp}.\n\n{body.strip()}\n<!-- {name}:end -->\n"
    )
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->\n", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def publish(name: str, body: str, path: Path | None = None) -> str:
    """A benchmark's last step: :func:`write_section`, print ``body`` and return it."""
    write_section(name, body, path)
    print(body)
    return body
