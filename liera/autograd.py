"""The fast training path: one full op forward, two backward, and no weight-sized tensor kept.

``RecomputedWeightOp`` runs ``op(x, build(weight, params))`` where ``build`` forms the effective weight
(or, for a dropout branch, the weight difference) from the frozen weight and the small adapter tensors.
``build`` receives the very tensors given to forward (not whatever a module holds at backward time), so
functional_call, torch.func and sharding wrappers that swap parameters stay correct. Forward
keeps only what LoRA keeps: the layer input and the small factors. Backward forms the weight again,
computes the op's input and weight gradients itself (``WeightOp.backward``), and pulls the weight
gradient back to the adapter parameters through the recomputed elementwise/low-rank graph. Because
``build`` is a pure function of (weight, params), every generator and exp map gets this for free.

Mixed precision: the op may run in another dtype than the one ``build`` returns (``dtype``, the autocast
dtype under ``torch.autocast``). The effective weight is then formed from float32 pieces and cast once, the
op runs in ``dtype`` with autocast switched off (the cast is explicit, so backward knows it), and backward
runs the op's two products in the same dtype, as autocast's own matmuls do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import overload

import torch
from torch import Tensor

from .layers import WeightOp

Build = Callable[[Tensor, Sequence[Tensor]], Tensor]


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs a matmul or convolution of ``x`` in, or None when autocast is off
    for ``x``'s device (every op a layer kind binds, linear, conv, conv_transpose and addmm, is on autocast's
    lower-precision list on CPU and CUDA)."""
    device = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


@contextlib.contextmanager
def autocast_off(where: Tensor | torch.device) -> Iterator[None]:
    """Switch autocast off for the device of ``where`` (a no-op where it is off): liera casts explicitly instead."""
    device = where.device.type if isinstance(where, Tensor) else where.type
    if torch.is_autocast_enabled(device):
        with torch.autocast(device, enabled=False):
            yield
    else:
        yield


@overload
def _cast(t: Tensor, dtype: torch.dtype | None) -> Tensor: ...
@overload
def _cast(t: Tensor | None, dtype: torch.dtype | None) -> Tensor | None: ...
def _cast(t: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    return t if t is None or dtype is None else t.to(dtype)


def run_op(op: WeightOp, x: Tensor, w: Tensor, bias: Tensor | None, dtype: torch.dtype | None) -> Tensor:
    """op(x, w, bias) with all three in ``dtype`` (None: as given), autocast off."""
    with autocast_off(x):
        return op.forward(_cast(x, dtype), _cast(w, dtype), _cast(bias, dtype))


class RecomputedWeightOp(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        bias: Tensor | None,
        op: WeightOp,
        build: Build,
        dtype: torch.dtype | None,
        weight: Tensor,
        *params: Tensor,
    ) -> Tensor:
        with torch.no_grad():
            w = build(weight, params)
        ctx.op, ctx.build, ctx.dtype = op, build, dtype
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        # ctx lives as long as the graph (until the loss tensor is dropped, often after the next forward);
        # the op must not keep the input alive that long: save_for_backward frees it right after backward.
        op.input = None  # type: ignore[assignment]
        x, bias = _cast(x, dtype), _cast(bias, dtype)  # under autocast: the low-precision input is what is kept
        # The frozen weight is referenced, not saved, so nothing weight-sized passes through saved-tensor
        # hooks. The small factors are saved as well so that autograd detects in-place changes.
        ctx.live = (weight, *params)
        ctx.save_for_backward(x, bias, *params)
        return run_op(op, x, w, bias, dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, bias, *_ = ctx.saved_tensors  # also checks the factors were not modified in place
        live = ctx.live
        needs = ctx.needs_input_grad
        need_x, need_bias = needs[0], needs[1]
        targets = [t for t, need in zip(live, needs[5:], strict=False) if need]
        with torch.set_grad_enabled(bool(targets)):
            w = _cast(ctx.build(live[0], live[1:]), ctx.dtype)
        assert w is not None
        with autocast_off(x):
            gx, gw, gb = ctx.op.backward(grad.to(x.dtype), x, w.detach(), need_x, bool(targets), need_bias)
        grads: list[Tensor | None] = [None] * len(live)
        if targets:
            found = torch.autograd.grad(w, targets, gw, allow_unused=True)
            it = iter(found)
            grads = [next(it) if need else None for need in needs[5:]]
        return (_cast(gx, ctx.x_dtype), _cast(gb, ctx.bias_dtype), None, None, None, *grads)


def recomputed_op(
    op: WeightOp,
    build: Build,
    weight: Tensor,
    params: Sequence[Tensor],
    x: Tensor | None = None,
    with_bias: bool = True,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """y = op(x, build()) with the effective weight rebuilt in backward instead of stored; the op runs in
    ``dtype`` (None: the dtype of what it is given)."""
    x = op.input if x is None else x
    return RecomputedWeightOp.apply(x, op.bias if with_bias else None, op, build, dtype, weight, *params)
