"""LoRA generator: D = s * reshape(B @ A, W.shape), W matricised as (W.shape[0], prod(W.shape[1:]))."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .base import Generator
from .registry import register_generator


@register_generator
class LoRAGenerator(Generator):
    """B: (out, r) starts at zero so D = 0 (the identity); A: (r, in) kaiming-uniform or gaussian."""

    name = "lora"
    single_product = True
    form = "s * B @ A"

    def __init__(self, weight: Tensor, **kwargs: Any) -> None:
        super().__init__(weight, **kwargs)
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_dim, **self.factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_dim, self.r, **self.factory))
        with torch.no_grad():
            if self.init_weights == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / self.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            if self.init_weights is False:  # start away from the identity (tests, ablations)
                nn.init.normal_(self.lora_B, std=1.0 / self.r)

    def delta(self) -> Tensor:
        # scale the small factor, not the weight-sized product (one weight-sized pass less, three per step)
        return ((self.lora_B * self.scaling) @ self.lora_A).reshape(self.shape)

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.lora_B * self.scaling, self.lora_A

    def delta_rows(self, index: Tensor) -> Tensor:
        rows = (self.lora_B[index] * self.scaling) @ self.lora_A  # cost tokens x in x r, not vocabulary x in x r
        return rows.reshape(*index.shape, *self.shape[1:])
