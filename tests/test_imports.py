"""Every subpackage imports on its own in a fresh interpreter: no circular import hides behind an import order."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import lightning_prune

FIRST_IMPORTS = sorted(
    m.name
    for m in pkgutil.iter_modules(lightning_prune.__path__, "lightning_prune.")
    if m.name != "lightning_prune.__main__"
)


def test_each_subpackage_and_command_module_imports_first():
    assert {"lightning_prune.models", "lightning_prune.pruning", "lightning_prune.adapters"} <= set(FIRST_IMPORTS)
    procs = {
        m: subprocess.Popen([sys.executable, "-c", f"import {m}"], stderr=subprocess.PIPE, text=True)
        for m in FIRST_IMPORTS
    }
    failures = {m: p.communicate(timeout=300)[1].strip().splitlines()[-1:] for m, p in procs.items()}
    assert {m: err for m, err in failures.items() if procs[m].returncode} == {}
