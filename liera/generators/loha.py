"""LoHa: D = s * (B1 @ A1) * (B2 @ A2), a Hadamard product of two rank-r factors (rank up to r^2)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import Generator
from .registry import register_generator


@register_generator
class LoHaGenerator(Generator):
    name = "loha"
    form = "s * (B1 @ A1) * (B2 @ A2), a Hadamard product of two low-rank products"

    def __init__(self, weight: Tensor, **kwargs: Any) -> None:
        super().__init__(weight, **kwargs)
        std = 0.1
        self.hada_B1 = nn.Parameter(torch.randn(self.out_dim, self.r, **self.factory) * std)
        self.hada_A1 = nn.Parameter(torch.randn(self.r, self.in_dim, **self.factory) * std)
        self.hada_B2 = nn.Parameter(torch.zeros(self.out_dim, self.r, **self.factory))  # zero: D = 0 at init
        self.hada_A2 = nn.Parameter(torch.randn(self.r, self.in_dim, **self.factory) * std)
        if self.init_weights is False:
            nn.init.normal_(self.hada_B2, std=std)

    def delta(self) -> Tensor:
        return (self.scaling * (self.hada_B1 @ self.hada_A1) * (self.hada_B2 @ self.hada_A2)).reshape(self.shape)

    def delta_rows(self, index: Tensor) -> Tensor:
        rows = (self.hada_B1[index] @ self.hada_A1) * (self.hada_B2[index] @ self.hada_A2)
        return (self.scaling * rows).reshape(*index.shape, *self.shape[1:])
