"""latency_ms: interleaved medians of deployment-like copies, the models themselves untouched."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from lightning_prune.report import latency_ms

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class Sleeper(nn.Module):
    """Takes at least 5 ms per call; counts the calls."""

    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Sleeper.calls += 1
        time.sleep(0.005)
        return x


def test_each_model_is_timed_per_round_on_an_untouched_copy():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), Sleeper())
    Sleeper.calls = 0
    conv_ms, sleeper_ms = latency_ms([net[:2], net], torch.randn(1, 3, 16, 16), warmup=2, repeats=3, fuse=False)
    assert 0 < conv_ms and sleeper_ms >= 5.0
    assert Sleeper.calls == 2 + 3  # warmup + repeats
    latency_ms([net], torch.randn(1, 3, 16, 16), warmup=0, repeats=1)
    assert net.training and isinstance(net[1], nn.BatchNorm2d)  # a fused eval-mode copy was timed


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"warmup": -1}, r"Expected argument `warmup` to be an int >= 0 but got -1."),
        ({"repeats": 0}, r"Expected argument `repeats` to be an int >= 1 but got 0."),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        latency_ms([nn.Identity()], torch.zeros(1, 3, 4, 4), **kwargs)
