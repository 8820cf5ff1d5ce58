"""PiSSA and MiLoRA: LoRA factors initialised from the principal (PiSSA) or minor (MiLoRA) singular
triplets of the matricised W, with the starting offset cancelled so the model starts exactly at W.

D = s * (B @ A - B0 @ A0), where B0, A0 are frozen copies of the initial factors (small buffers, no
weight-sized one, no division by W). Naively using PiSSA's B @ A inside the multiplicative update would
start far from the identity (the PiSSA + LieRA collapse reported against the official code).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import Generator
from .registry import register_generator


class _SVDInitGenerator(Generator):
    lora_B0: Tensor  # buffers: the frozen initial factors
    lora_A0: Tensor
    minor = False
    form = "s * (B @ A - B0 @ A0), the trained factors minus their frozen initial values"

    def __init__(self, weight: Tensor, *, init_iters: int | None = None, **kwargs: Any) -> None:
        super().__init__(weight, **kwargs)
        w = (
            weight.detach()
            .reshape(self.out_dim, self.in_dim)
            .to(torch.float32 if weight.dtype != torch.float64 else torch.float64)
        )
        r = min(self.r, *w.shape)
        if init_iters and not self.minor:
            q = min(r + 8, *w.shape)  # oversampling keeps the leading triplets accurate
            u, s, v = torch.svd_lowrank(w, q=q, niter=int(init_iters))
            vh = v.t()
        else:
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
        idx = slice(len(s) - r, len(s)) if self.minor else slice(0, r)
        root = torch.sqrt(s[idx] / self.scaling)  # s * B0 @ A0 equals the chosen part of W, as in PEFT
        b0, a0 = u[:, idx] * root, root[:, None] * vh[idx]
        pad = self.r - r  # ranks above min(out, in) get zero columns
        b0 = torch.cat([b0, b0.new_zeros(self.out_dim, pad)], 1)
        a0 = torch.cat([a0, a0.new_zeros(pad, self.in_dim)], 0)
        # separate storage: the frozen offset must not follow the trained factors
        self.lora_B = nn.Parameter(b0.to(**self.factory).clone())
        self.lora_A = nn.Parameter(a0.to(**self.factory).clone())
        self.register_buffer("lora_B0", b0.to(**self.factory).clone())
        self.register_buffer("lora_A0", a0.to(**self.factory).clone())

    def delta(self) -> Tensor:
        # two products, not one rank-2r product: identical inputs give bit-identical products, so D == 0 at init
        s = self.scaling
        return ((self.lora_B * s) @ self.lora_A - (self.lora_B0 * s) @ self.lora_A0).reshape(self.shape)

    def delta_rows(self, index: Tensor) -> Tensor:
        s = self.scaling
        rows = (self.lora_B[index] * s) @ self.lora_A - (self.lora_B0[index] * s) @ self.lora_A0
        return rows.reshape(*index.shape, *self.shape[1:])


@register_generator
class PiSSAGenerator(_SVDInitGenerator):
    """Principal singular triplets; init_iters > 0 uses a randomised SVD (fast on large weights)."""

    name = "pissa"


@register_generator
class MiLoRAGenerator(_SVDInitGenerator):
    """Minor singular triplets (always a full SVD)."""

    name = "milora"
    minor = True
