"""Restore a pruned model's structure from its checkpoint, on the module side.

Lightning restores the module's weights (``LightningModule.on_load_checkpoint``, then a strict ``load_state_dict``)
*before* any callback state, and ``LightningModule.load_from_checkpoint`` involves no callback at all. So the layers
must be resized by the module itself: :class:`PrunableMixin` replays the
:class:`~lightning_prune.pruning.PruningHistory` on the freshly built module before its weights load, from two places:

- ``checkpoint["lightning_prune"]``, in ``on_load_checkpoint`` (``fit(ckpt_path=...)``, ``load_from_checkpoint``);
- the module's own ``state_dict()``, which carries the history as the root's ``_extra_state`` (JSON bytes in a uint8
  tensor, so that code treating every state-dict value as a tensor keeps working): it is loaded before any child's
  weights, so a bare ``model.load_state_dict(torch.load(path))`` works too, and so does the weights-only
  file that ``ddp_spawn`` hands back to the main process at the end of ``fit``.

The history is plain data, so checkpoints load with ``torch.load(weights_only=True)``.

Fine-grained masks (:mod:`lightning_prune.pruning.masks`, boolean ``<param>_mask`` buffers) are restored the same
way: ``load_state_dict`` first creates the mask buffers the state dict holds, with its shapes, then loads strictly.

Our reference detectors (:class:`~lightning_prune.models.DetectorModule`) already include the mixin; for your
own module it is the one line to add: ``class MyDetector(PrunableMixin, pl.LightningModule)``.

This module imports no Trainer internals: the mixin only implements the two checkpoint hooks.

Example:
    >>> from torch import nn
    >>> len(pruning_history(nn.Conv2d(3, 8, 3)))
    0
"""

from __future__ import annotations

import importlib
import json
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_prune.pruning.history import PruningHistory
from lightning_prune.pruning.masks import add_mask_buffers

CHECKPOINT_KEY = "lightning_prune"
CLASS_KEY = "lightning_prune_class"  # the class path of the module that saved the checkpoint (any pruning or none)
_EXTRA_STATE_KEY = "_extra_state"  # torch's key for `get_extra_state()` in a state dict
_HISTORY_ATTR = "_lightning_prune_history"
_ROOT_ATTR = "_lightning_prune_submodule"


def pruning_history(module: nn.Module) -> PruningHistory:
    """The pruning history of ``module`` (created empty on first use); module names are relative to its root."""
    history = module.__dict__.get(_HISTORY_ATTR)
    if history is None:
        history = PruningHistory()
        object.__setattr__(module, _HISTORY_ATTR, history)  # a plain attribute, not a submodule or a buffer
    return history


def pruning_root(module: nn.Module) -> str | None:
    """The dotted name of the submodule the history was recorded on, ``None`` for the module itself."""
    return module.__dict__.get(_ROOT_ATTR)


def set_pruning_root(module: nn.Module, submodule: str | None) -> None:
    object.__setattr__(module, _ROOT_ATTR, submodule)


def save_pruning_state(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Write the history of ``module`` into ``checkpoint[CHECKPOINT_KEY]`` as plain data (nothing when unpruned)."""
    history = pruning_history(module)
    if len(history):
        checkpoint[CHECKPOINT_KEY] = {"history": history.to_state(), "submodule": pruning_root(module)}


def restore_pruning_state(module: nn.Module, checkpoint: dict[str, Any]) -> int:
    """Replay the steps stored in ``checkpoint`` that ``module`` has not had yet, in place.

    Returns:
        The number of steps replayed.

    Raises:
        ValueError: the module was pruned differently from the checkpoint, or the history does not fit it.
    """
    state = checkpoint.get(CHECKPOINT_KEY)
    if not state:
        return 0
    stored = PruningHistory.from_state(state["history"])
    submodule = state.get("submodule")
    history = pruning_history(module)
    done = len(history)
    if history.steps != stored.steps[:done] or (done and submodule != pruning_root(module)):
        raise ValueError(
            f"Expected the module to be unpruned or pruned as in the checkpoint but it holds {history!r} on "
            f"`{pruning_root(module)}` and the checkpoint {stored!r} on `{submodule}`. "
            "HINT: load the checkpoint into a freshly built module."
        )
    target = module.get_submodule(submodule) if submodule else module
    stored.replay(target, start=done)
    for step in stored.steps[done:]:
        history.append(step)
    set_pruning_root(module, submodule)
    return len(stored) - done


def class_path(module: nn.Module) -> str:
    """``package.module.ClassName`` of ``module``'s class: what :func:`import_class` imports back."""
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def import_class(path: str, argument: str) -> type:
    """The class a dotted ``path`` names; a ``ValueError`` naming ``argument`` when it cannot be imported."""
    module, _, name = str(path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"Expected argument `{argument}` to be an importable class path but got {path!r}.") from err
    if not isinstance(cls, type):
        raise ValueError(f"Expected argument `{argument}` to be an importable class path but got {path!r}.")
    return cls


class PrunableMixin:
    """Give a ``LightningModule`` pruned checkpoints: replays the stored pruning history before the strict load.

    Put it first among the bases: ``class MyDetector(PrunableMixin, MyLightningModule)``. Then
    ``trainer.fit(model, ckpt_path=...)`` resumes a pruned run and ``MyDetector.load_from_checkpoint(path)`` builds
    the pruned architecture in a fresh process.

    The module's ``state_dict()`` gains one entry, ``_extra_state`` (the history as plain data), replayed before the
    layers' weights load; a state dict without it (saved before the mixin was added) still loads. The fine-grained
    masks a state dict holds (``<param>_mask``) are created before the load too.
    """

    def get_extra_state(self) -> torch.Tensor:
        assert isinstance(self, nn.Module)
        state = {"history": pruning_history(self).to_state(), "submodule": pruning_root(self)}
        return torch.frombuffer(bytearray(json.dumps(state).encode()), dtype=torch.uint8)

    def set_extra_state(self, state: Any) -> None:
        assert isinstance(self, nn.Module)
        if not (isinstance(state, torch.Tensor) and state.dtype == torch.uint8 and state.dim() == 1):
            raise ValueError(
                f"Expected `_extra_state` of {type(self).__name__} to be the pruning history as a uint8 tensor but got "
                f"{type(state).__name__}."
            )
        decoded = json.loads(state.cpu().numpy().tobytes().decode())
        if decoded["history"]["steps"]:
            restore_pruning_state(self, {CHECKPOINT_KEY: decoded})

    def load_state_dict(self, state_dict: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
        assert isinstance(self, nn.Module)
        add_mask_buffers(self, state_dict)  # with the state dict's shapes: the history replayed below resizes weights
        if _EXTRA_STATE_KEY not in state_dict:  # an unpruned state dict from before the mixin: nothing to replay
            filled: OrderedDict[str, Any] = OrderedDict(state_dict)
            if hasattr(state_dict, "_metadata"):
                filled._metadata = state_dict._metadata  # type: ignore[attr-defined]
            filled[_EXTRA_STATE_KEY] = self.get_extra_state()
            state_dict = filled
        return super().load_state_dict(state_dict, *args, **kwargs)  # type: ignore[misc]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        assert isinstance(self, nn.Module)
        save_pruning_state(self, checkpoint)
        checkpoint[CLASS_KEY] = class_path(self)  # so that a checkpoint alone can be exported

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        assert isinstance(self, nn.Module)
        restore_pruning_state(self, checkpoint)
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
