"""LoKr: D = s * kron(C, B @ A), with (out, in) split as (o1 * o2, i1 * i2) chosen from the shape.

C (o1, i1) is a small full matrix; B @ A (o2, i2) has rank r. The split takes the divisor of each
dimension closest to its square root (the smaller factor goes to C), as LyCORIS does by default.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .base import Generator
from .registry import register_generator


def split(n: int) -> tuple[int, int]:
    """(a, b) with a * b == n, a <= b, a the largest divisor <= sqrt(n)."""
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return a, n // a


@register_generator
class LoKrGenerator(Generator):
    name = "lokr"
    form = "s * kron(C, B @ A), a Kronecker product"

    def __init__(self, weight: Tensor, **kwargs: Any) -> None:
        super().__init__(weight, **kwargs)
        (o1, o2), (i1, i2) = split(self.out_dim), split(self.in_dim)
        self.split_dims = (o1, i1, o2, i2)  # C is (o1, i1), B @ A is (o2, i2)
        self.lokr_C = nn.Parameter(torch.empty(o1, i1, **self.factory))
        self.lokr_A = nn.Parameter(torch.empty(self.r, i2, **self.factory))
        self.lokr_B = nn.Parameter(torch.zeros(o2, self.r, **self.factory))  # zero: D = 0 at init
        nn.init.kaiming_uniform_(self.lokr_C, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lokr_A, a=math.sqrt(5))
        if self.init_weights is False:
            nn.init.normal_(self.lokr_B, std=1.0 / self.r)

    def delta(self) -> Tensor:
        return (self.scaling * torch.kron(self.lokr_C, self.lokr_B @ self.lokr_A)).reshape(self.shape)
