"""A layer kind: which modules it covers, and how its torch function consumes the weight.

liera never re-implements a module's forward. While an adapted module runs, calls of torch functions
that receive the adapted weight are intercepted (see ``weight.py``). A layer kind says, for the
functions it knows (F.linear, F.conv2d, torch.addmm, ...), how to run that call with another weight and
how to form the two backward products (input gradient and weight gradient) itself, which is what the
recompute-in-backward fast path needs. Any other call simply receives the effective weight.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor, nn


class WeightOp:
    """One intercepted call, bound to its arguments: y = op(input, w, bias)."""

    input: Tensor
    bias: Tensor | None

    def forward(self, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    def backward(
        self, grad: Tensor, x: Tensor, w: Tensor, need_x: bool, need_w: bool, need_bias: bool
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """(d input, d weight, d bias) for the output gradient; None where not needed."""
        raise NotImplementedError


@dataclass(frozen=True)
class RowGather:
    """One intercepted lookup of rows of the weight (F.embedding): served from the looked-up rows of W_eff alone
    (cost tokens x dim x r, not vocabulary x dim x r), with plain autograd through those rows. The second kind of
    intercepted call beside WeightOp: a lookup has no weight-sized product to recompute in backward."""

    index: Tensor


# what a kind's binder makes of one torch call that received the weight: an op, a row lookup, or None (the call
# then receives the effective weight on the generic path)
Binder = Callable[[tuple, dict, Tensor], WeightOp | RowGather | None]
Category = Literal["linear", "conv", "embedding"]


class WeightLayout(enum.Enum):
    """How a kind stores its weight, for tools that rewrite an update in another library's layout (PEFT's HiRA
    export): a name-based guess would silently transpose a new kind, so each kind says it."""

    OUT_IN = "(out, in), y = x W^T"  # nn.Linear
    IN_OUT = "(in, out), y = x W"  # transformers' GPT-2 Conv1D
    KERNEL = "(out, in / groups, *kernel)"  # convolutions (transposed ones: (in, out / groups, *kernel))
    TABLE = "(rows, dim), looked up by row"  # embeddings


@dataclass(frozen=True)
class QuantizedWeight:
    """How a kind whose weight is stored quantized (bitsandbytes 4-bit / 8-bit) is read and run. liera reads the
    float weight inside its recompute path and drops it again, so no weight-sized float tensor is kept for
    backward; the module's own kernels run only while no adapter acts.

    dequantize: (module, stored weight) -> the float weight, laid out as ``op`` wants it.
    compute_dtype: (module, input) -> the dtype the op runs in outside autocast (the module's compute dtype).
    op: (input, bias) -> the float op on the dequantized weight.
    """

    dequantize: Callable[[nn.Module, Tensor], Tensor]
    compute_dtype: Callable[[nn.Module, Tensor], Any]
    op: Callable[[Tensor, Tensor | None], WeightOp]


@dataclass(frozen=True)
class LayerKind:
    """name: shown in errors; category: for the target shortcuts ("all-linear", "all-conv"); layout: how the weight
    is stored (None: not declared, and tools that need it refuse the kind with the reason)."""

    name: str
    category: Category
    matches: Callable[[nn.Module], bool]
    binders: dict[Any, Binder] = field(default_factory=dict)
    weight_name: str = "weight"
    layout: WeightLayout | None = None
    quantized: QuantizedWeight | None = None


def bind_arguments(
    names: tuple[str, ...], args: tuple, kwargs: dict[str, Any], defaults: dict[str, Any]
) -> dict[str, Any]:
    """Map positional and keyword arguments of a torch function onto its parameter names."""
    bound = dict(defaults)
    bound.update(zip(names, args, strict=False))  # trailing parameters may be left to their defaults
    bound.update(kwargs)
    return bound
