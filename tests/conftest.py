"""Fixtures shared by the whole suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run on one torch thread, then restore the thread count and the deterministic-algorithms flag.

    Two OpenMP threads on a shared 2-core machine spin at every barrier (measured 30x slower), and
    ``Trainer(deterministic=True)`` sets the deterministic flag process-wide.
    """
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)
