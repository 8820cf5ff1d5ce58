"""transformers' GPT-2 ``Conv1D``: a linear layer with W stored as (in, out), run as addmm(b, x, W)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import LayerKind, WeightLayout, WeightOp, bind_arguments


def _is_gpt2_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers") for c in cls.__mro__)


class AddmmOp(WeightOp):
    def __init__(self, x: Tensor, bias: Tensor | None, beta: float, alpha: float) -> None:
        self.input, self.bias, self.beta, self.alpha = x, bias, beta, alpha

    def forward(self, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        if bias is None:
            return self.alpha * (x @ w)
        return torch.addmm(bias, x, w, beta=self.beta, alpha=self.alpha)

    def backward(
        self, grad: Tensor, x: Tensor, w: Tensor, need_x: bool, need_w: bool, need_bias: bool
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        gx = self.alpha * (grad @ w.t()) if need_x else None
        gw = self.alpha * (x.t() @ grad) if need_w else None
        gb = (self.beta * grad).sum_to_size(self.bias.shape) if need_bias and self.bias is not None else None
        return gx, gw, gb


def _bind_addmm(args: tuple, kwargs: dict[str, Any], weight: Tensor) -> AddmmOp | None:
    a = bind_arguments(("input", "mat1", "mat2"), args, kwargs, {"beta": 1, "alpha": 1})
    if a["mat2"] is not weight or "out" in a:
        return None
    return AddmmOp(a["mat1"], a["input"], a["beta"], a["alpha"])


KIND = LayerKind(
    "transformers Conv1D (GPT-2)", "linear", _is_gpt2_conv1d, {torch.addmm: _bind_addmm}, layout=WeightLayout.IN_OUT
)
