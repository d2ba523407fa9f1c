"""What our callbacks share to find their way in a LightningModule: the target submodule, the example input to trace
with, and the module-name regexes they are configured with. Errors name the argument and the callback."""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_prune.pruning.sparsity import SCHEDULES


def resolve_target(pl_module: pl.LightningModule, submodule: str | None) -> nn.Module:
    """``pl_module`` itself, or its submodule named ``submodule`` (dotted)."""
    if submodule is None:
        return pl_module
    try:
        return pl_module.get_submodule(submodule)
    except AttributeError:
        raise MisconfigurationException(
            f"Expected argument `submodule` to name a submodule of {type(pl_module).__name__} but got {submodule!r}."
        ) from None


def copy_module(pl_module: pl.LightningModule, hook_ids: Sequence[int] = ()) -> pl.LightningModule:
    """A deep copy of the module without its Trainer, and without the hooks and the wrapped ``training_step`` that
    callbacks put on it: the module's own forward hooks, and the forward hooks ``hook_ids`` (their handles' ``id``) on
    its submodules."""
    memo = {id(getattr(pl_module, "_trainer", None)): None}
    copied = copy.deepcopy(pl_module, memo)
    copied._forward_hooks.clear()
    copied._forward_hooks_with_kwargs.clear()
    for module in copied.modules():
        for hook_id in hook_ids:
            module._forward_hooks.pop(hook_id, None)
    copied.__dict__.pop("training_step", None)
    return copied


def adapter_output_layers(target: nn.Module) -> list[str] | None:
    """Names of the layers whose width encodes the outputs, from the module's adapter; ``None`` without one."""
    adapter = getattr(target, "adapter", None)
    return list(adapter.output_layers(target)) if hasattr(adapter, "output_layers") else None


def example_from_shape(example_input: Any) -> Any:
    """A list of positive ints (a shape, as YAML gives it) becomes a zero tensor; anything else passes through."""
    if isinstance(example_input, list) and example_input and all(is_int(d) and d > 0 for d in example_input):
        return torch.zeros(example_input)
    return example_input


def resolve_example(
    example_input: Any, pl_module: pl.LightningModule, target: nn.Module, callback: str, purpose: str
) -> Any:
    """``example_input`` if given, else the target's or the LightningModule's ``example_input_array``."""
    if example_input is not None:
        return example_input
    example = getattr(target, "example_input_array", None)
    if example is None:
        example = getattr(pl_module, "example_input_array", None)
    if example is None:
        raise MisconfigurationException(
            f"Expected `{type(pl_module).__name__}.example_input_array` to be set to {purpose} but it is None. "
            "HINT: set `self.example_input_array = torch.zeros(1, 3, H, W)` in `__init__`, or pass "
            f"`{callback}(example_input=[1, 3, H, W])`."
        )
    return example


def compile_pattern(pattern: Any, argument: str) -> re.Pattern[str]:
    """A regex of module names, or a ``ValueError`` naming ``argument``."""
    if not isinstance(pattern, str):
        raise ValueError(f"Expected argument `{argument}` to hold regex strings but got {pattern!r}.")
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"Expected argument `{argument}` to hold valid regexes but got {pattern!r}: {err}.") from None


def check_patterns_match(target: nn.Module, argument: str, patterns: list[re.Pattern[str]]) -> None:
    """Every pattern fully matches some module name of ``target``."""
    names = [name for name, _ in target.named_modules()]
    for pattern in patterns:
        if not any(pattern.fullmatch(n) for n in names):
            raise MisconfigurationException(
                f"Expected every pattern of `{argument}` to match a module name but {pattern.pattern!r} matches "
                f"none. HINT: names are as in `model.named_modules()`, e.g. {names[1:4]}."
            )


def check_epochs(epochs: Any) -> list[int]:
    """``epochs`` as a list: strictly increasing ints >= 0, non-empty (else the ``ValueError`` naming the argument)."""
    if not (isinstance(epochs, (list, tuple)) and epochs and all(is_int(e) and e >= 0 for e in epochs)) or any(
        a >= b for a, b in itertools.pairwise(epochs)
    ):
        raise ValueError(f"Expected argument `epochs` to be strictly increasing ints >= 0 but got {epochs!r}.")
    return list(epochs)


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_number(name: str, value: Any, condition: Literal[">= 0", "> 0"]) -> None:
    """A real number (not a bool) ``>= 0`` or ``> 0``, or a ``ValueError`` naming the argument ``name``."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if not ok or not (value >= 0 if condition == ">= 0" else value > 0):
        raise ValueError(f"Expected argument `{name}` to be a float {condition} but got {value!r}.")


def check_epoch_schedule(schedule: Any, start_epoch: Any, stop_epoch: Any, warmup_epochs: Any) -> None:
    """Check the arguments of a weight schedule over epochs (:func:`~lightning_prune.pruning.sparsity.penalty_at`).

    Raises:
        ValueError: an unknown schedule, a negative or non-int epoch, ``stop_epoch <= start_epoch``, or no
            ``stop_epoch`` for a decaying schedule.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"Expected argument `schedule` to be one of {list(SCHEDULES)} but got {schedule!r}.")
    for name, value in (("start_epoch", start_epoch), ("warmup_epochs", warmup_epochs)):
        if not is_int(value) or value < 0:
            raise ValueError(f"Expected argument `{name}` to be an int >= 0 but got {value!r}.")
    if stop_epoch is not None and (not is_int(stop_epoch) or stop_epoch <= start_epoch):
        raise ValueError(
            f"Expected argument `stop_epoch` to be None or an int > `start_epoch` ({start_epoch}) but got "
            f"{stop_epoch!r}."
        )
    if schedule in ("linear", "cosine") and stop_epoch is None:
        raise ValueError(f"Expected argument `stop_epoch` to be set for schedule {schedule!r} but got None.")
