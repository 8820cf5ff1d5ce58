"""The fast training path: one full op forward, two backward, and no weight-sized tensor kept.

``RecomputedWeightOp`` runs ``op(x, build(weight, params))`` where ``build`` forms the effective weight
(or, for a dropout branch, the weight difference) from the frozen weight and the small adapter tensors.
``build`` receives the very tensors given to forward (not whatever a module holds at backward time), so
functional_call, torch.func and sharding wrappers that swap parameters stay correct. Forward
keeps only what LoRA keeps: the layer input and the small factors. Backward forms the weight again,
computes the op's input and weight gradients itself (``WeightOp.backward``), and pulls the weight
gradient back to the adapter parameters through the recomputed elementwise/low-rank graph. Because
``build`` is a pure function of (weight, params), every generator and exp map gets this for free.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .layers import WeightOp


class RecomputedWeightOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, bias: Optional[Tensor], op: WeightOp, build: Callable[[Tensor, Sequence[Tensor]], Tensor],
                weight: Tensor, *params: Tensor) -> Tensor:
        with torch.no_grad():
            w = build(weight, params)
        ctx.op, ctx.build = op, build
        # ctx lives as long as the graph (until the loss tensor is dropped, often after the next forward);
        # the op must not keep the input alive that long: save_for_backward frees it right after backward.
        op.input = None
        # The frozen weight is referenced, not saved, so nothing weight-sized passes through saved-tensor
        # hooks. The small factors are saved as well so that autograd detects in-place changes.
        ctx.live = (weight, *params)
        ctx.save_for_backward(x, bias, *params)
        return op.forward(x, w, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, bias, *_ = ctx.saved_tensors  # also checks the factors were not modified in place
        live = ctx.live
        needs = ctx.needs_input_grad
        need_x, need_bias = needs[0], needs[1]
        targets = [t for t, need in zip(live, needs[4:]) if need]
        w = None
        with torch.set_grad_enabled(bool(targets)):
            w = ctx.build(live[0], live[1:])
        gx, gw, gb = ctx.op.backward(grad, x, w.detach(), need_x, bool(targets), need_bias)
        grads: list[Optional[Tensor]] = [None] * len(live)
        if targets:
            found = torch.autograd.grad(w, targets, gw, allow_unused=True)
            it = iter(found)
            grads = [next(it) if need else None for need in needs[4:]]
        return (gx, gb, None, None, *grads)


def recomputed_op(op: WeightOp, build: Callable[[Tensor, Sequence[Tensor]], Tensor], weight: Tensor, params: Sequence[Tensor],
                  x: Optional[Tensor] = None, with_bias: bool = True) -> Tensor:
    """y = op(x, build()) with the effective weight rebuilt in backward instead of stored."""
    x = op.input if x is None else x
    return RecomputedWeightOp.apply(x, op.bias if with_bias else None, op, build, weight, *params)
