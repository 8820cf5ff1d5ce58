"""DoRA + LieRA: W_eff = m * V / ||V|| with V the LieRA-updated weight (LoRA generator inside).

m is a trainable magnitude per output channel (axis 0), initialised to ||W|| (norm over all other
axes), so W_eff == W at init. As in the DoRA paper, ||V|| is treated as a constant in backward
(``generator_kwargs={"detach_norm": False}`` gives the exact gradient instead). A merge
records ||V|| per channel (a vector, not a weight copy), which is what the unmerge needs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .lora import LoRAGenerator
from .registry import register_generator


def _row_norm(w: Tensor) -> Tensor:
    return w.reshape(w.shape[0], -1).norm(dim=1)


def _per_row(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den per channel, 0 where den is 0: a channel whose weights are all zero (a pruned row, which a
    multiplicative update keeps at zero) has no direction, and stays zero instead of becoming 0 / 0 = NaN (the
    inner where keeps NaN out of the gradient too)."""
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), torch.zeros_like(num))


@register_generator
class DoRAGenerator(LoRAGenerator):
    merged_norm: Tensor | None  # a buffer: ||V|| per channel, recorded by a merge for the unmerge
    name = "dora"
    form = "s * B @ A, with a magnitude vector applied after the group map"

    def __init__(self, weight: Tensor, *, detach_norm: bool = True, **kwargs: Any) -> None:
        super().__init__(weight, **kwargs)
        self.detach_norm = bool(detach_norm)
        cd = torch.promote_types(weight.dtype, torch.float32)
        self.magnitude = nn.Parameter(_row_norm(weight.detach().to(cd)).to(self.param_dtype))
        self.register_buffer("merged_norm", None, persistent=False)

    def transform(self, w_eff: Tensor, weight: Tensor) -> Tensor:
        norm = _row_norm(w_eff)
        norm = norm.detach() if self.detach_norm else norm
        return w_eff * _per_row(_ratio(self.magnitude.to(w_eff.dtype), norm), w_eff)

    def merge_transform(self, w_eff: Tensor, weight: Tensor) -> Tensor:
        self.merged_norm = _row_norm(w_eff).detach()
        return self.transform(w_eff, weight)

    def unmerge_transform(self, merged: Tensor) -> Tensor:
        if self.merged_norm is None:
            raise RuntimeError(
                "DoRA unmerge needs the norm recorded at merge time; it is missing (was the model "
                "merged in another process?). Reload the base weights instead."
            )
        out = merged * _per_row(_ratio(self.merged_norm.to(merged.dtype), self.magnitude.to(merged.dtype)), merged)
        self.merged_norm = None
        return out
