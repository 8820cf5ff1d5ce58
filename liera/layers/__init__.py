"""Layer kinds liera targets by module type. A new kind is one file with a ``KIND`` added here."""

from __future__ import annotations

from typing import Any

from torch import nn

from . import bnb, conv, embedding, gpt2_conv1d, linear
from .base import Binder, LayerKind, QuantizedWeight, RowGather, WeightLayout, WeightOp

# bnb before linear: its layers subclass nn.Linear
LAYER_KINDS: list[LayerKind] = [bnb.KIND, linear.KIND, gpt2_conv1d.KIND, conv.KIND, embedding.KIND]

# torch function -> binder, over all kinds (a call is bound only when the adapted weight sits in its weight slot)
BINDERS: dict[Any, Binder] = {func: binder for kind in LAYER_KINDS for func, binder in kind.binders.items()}


def kind_of(module: nn.Module) -> LayerKind | None:
    """The first kind whose ``matches`` accepts the module; None when liera has no kind for it."""
    for kind in LAYER_KINDS:
        if kind.matches(module):
            return kind
    return None


def supported_kinds_text() -> str:
    """The kinds' names, for error messages."""
    return ", ".join(kind.name for kind in LAYER_KINDS)


__all__ = [
    "LayerKind",
    "QuantizedWeight",
    "RowGather",
    "WeightLayout",
    "WeightOp",
    "LAYER_KINDS",
    "BINDERS",
    "kind_of",
    "supported_kinds_text",
]
