"""nn.Embedding: only the looked-up rows are updated (cost tokens x dim x r, not vocabulary x dim x r)."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .base import LayerKind, RowGather, WeightLayout, bind_arguments


def _bind_embedding(args: tuple, kwargs: dict[str, Any], weight: Tensor) -> RowGather | None:
    a = bind_arguments(
        ("input", "weight", "padding_idx", "max_norm"), args, kwargs, {"padding_idx": None, "max_norm": None}
    )
    if a["weight"] is not weight or a["max_norm"] is not None:
        return None  # max_norm renormalises W in place: let the generic path handle it
    return RowGather(a["input"])


KIND = LayerKind(
    "Embedding",
    "embedding",
    lambda m: isinstance(m, nn.Embedding),
    {F.embedding: _bind_embedding},
    layout=WeightLayout.TABLE,
)
