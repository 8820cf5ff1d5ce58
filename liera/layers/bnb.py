"""bitsandbytes ``Linear4bit`` (nf4 / fp4, double quantization) and ``Linear8bitLt``: QLoRA-style quantized bases.

The stored weight is packed integers, so no torch call can receive a float W to redirect. While an adapter acts,
liera runs the layer itself (``interception.quantized_forward``): F.linear on the effective weight, built from the
dequantized weight in the recompute path (dequantized again in backward, never kept: LoRA's memory, not HiRA's).
bitsandbytes is imported only by the functions that read its weights; a model without it never reaches them.
"""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
from torch import Tensor, nn

from .base import LayerKind, QuantizedWeight, WeightLayout
from .linear import LinearOp

_CLASSES = ("Linear4bit", "Linear8bitLt")


def is_bnb_linear(module: nn.Module) -> bool:
    """A bitsandbytes quantized linear layer (or a subclass), recognised without importing bitsandbytes."""
    return any(c.__name__ in _CLASSES and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


def dequantize(module: nn.Module, stored: Tensor) -> Tensor:
    """The float weight (out, in) of a bitsandbytes layer, from its stored tensor; the module is not changed."""
    import bitsandbytes as bnb
    from bitsandbytes import functional as bnbf

    if type(stored).__name__ == "Params4bit" or stored.dtype == torch.uint8:
        state = getattr(stored, "quant_state", None) or getattr(module.weight, "quant_state", None)
        data = stored.data
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks a 4-bit weight for its CPU inference kernel the first time the layer runs in eval
            # without gradients; its inverse rewrites the state it is given, so it gets a copy (the layer keeps its own)
            data, state = bnbf._convert_weight_packed_for_cpu_inverse(data, copy.copy(state))
        return bnbf.dequantize_4bit(data, state)
    scale: Tensor | None = getattr(stored, "SCB", None)
    if scale is None:  # Linear8bitLt keeps the row scales in its MatmulLtState
        scale = cast("bnb.MatmulLtState", module.state).SCB
    if stored.dtype != torch.int8 or scale is None:
        raise ValueError(
            f"{type(module).__name__}: its weight is not quantized yet (dtype {stored.dtype}); move the "
            f"layer to its device first (bitsandbytes quantizes on .to(device)), then attach adapters."
        )
    return bnb.functional.int8_vectorwise_dequant(stored.data, scale.to(stored.device))


def compute_dtype(module: nn.Module, x: Tensor) -> Any:
    """Linear4bit's compute_dtype where set (bnb_4bit_compute_dtype), else the input's dtype (as bitsandbytes)."""
    return getattr(module, "compute_dtype", None) or x.dtype


KIND = LayerKind(
    "bitsandbytes Linear4bit / Linear8bitLt",
    "linear",
    is_bnb_linear,
    {},
    layout=WeightLayout.OUT_IN,
    quantized=QuantizedWeight(dequantize, compute_dtype, LinearOp),
)
