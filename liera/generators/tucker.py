"""Tucker: D = s * core x_1 U1 x_2 U2 ... x_n Un, an N-mode low-rank form that keeps the kernel's modes.

Each mode k has rank min(r, W.shape[k]); for a 2-D weight this is U1 @ core @ U2^T, LoRA's function
class with an r x r core. U1 starts at zero, so D = 0 at init (FLoRA-style for convolution kernels).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .base import Generator
from .registry import register_generator


@register_generator
class TuckerGenerator(Generator):
    name = "tucker"
    form = "s * core x_1 U1 ... x_n Un, an N-mode Tucker product"

    def __init__(self, weight: Tensor, **kwargs: Any) -> None:
        super().__init__(weight, **kwargs)
        self.ranks = tuple(min(self.r, d) for d in self.shape)
        self.tucker_core = nn.Parameter(torch.randn(*self.ranks, **self.factory) / math.sqrt(math.prod(self.ranks)))
        factors = []
        for k, (d, rk) in enumerate(zip(self.shape, self.ranks, strict=True)):
            if k == 0 and self.init_weights is not False:
                factors.append(nn.Parameter(torch.zeros(d, rk, **self.factory)))
            else:
                factors.append(nn.Parameter(torch.randn(d, rk, **self.factory) / math.sqrt(rk)))
        self.tucker_factors = nn.ParameterList(factors)

    def delta(self) -> Tensor:
        d: Tensor = self.tucker_core
        for k, u in enumerate(self.tucker_factors):
            d = torch.movedim(torch.tensordot(u, d, dims=([1], [k])), 0, k)
        return self.scaling * d
