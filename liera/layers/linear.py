"""nn.Linear (and subclasses): y = x W^T + b."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .base import LayerKind, WeightLayout, WeightOp, bind_arguments


class LinearOp(WeightOp):
    def __init__(self, x: Tensor, bias: Tensor | None) -> None:
        self.input, self.bias = x, bias

    def forward(self, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, w, bias)

    def backward(
        self, grad: Tensor, x: Tensor, w: Tensor, need_x: bool, need_w: bool, need_bias: bool
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        g2 = grad.reshape(-1, grad.shape[-1])
        gx = grad @ w if need_x else None
        gw = g2.t() @ x.reshape(-1, x.shape[-1]) if need_w else None
        gb = g2.sum(0) if need_bias else None
        return gx, gw, gb


def _bind_linear(args: tuple, kwargs: dict[str, Any], weight: Tensor) -> LinearOp | None:
    a = bind_arguments(("input", "weight", "bias"), args, kwargs, {"bias": None})
    if a["weight"] is not weight:
        return None
    return LinearOp(a["input"], a["bias"])


KIND = LayerKind(
    "Linear", "linear", lambda m: isinstance(m, nn.Linear), {F.linear: _bind_linear}, layout=WeightLayout.OUT_IN
)
