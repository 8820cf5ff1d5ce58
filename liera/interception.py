"""The call interception: how an adapted weight acts while its owning module runs.

An adapted weight W stays where it is (``module.weight`` is still the frozen Parameter; state-dict keys of the base
model do not change); its adapters (``weight.AdaptedWeight``) live in a ``liera_<param>`` child of the owning module.
While the owner runs, a TorchFunctionMode is active and every torch call that receives W is redirected:

* calls a layer kind knows (F.linear, F.conv*, torch.addmm, F.embedding) run on the fast path: one op with the
  effective weight, rebuilt in backward instead of stored (``autograd.py``), or only the gathered rows for embeddings;
* any other call (MultiheadAttention's in_proj_weight, a 3-D expert tensor, a subclass's custom forward...) receives
  the effective weight, built once per forward with plain autograd.

The module's own forward always runs, so subclasses that pad or reshape in their forward stay correct. A quantized
layer (bitsandbytes) is the exception: no torch call receives its packed weight, so ``quantized_forward`` runs it.
``attach`` / ``detach`` put adapters on an owner and take them off, with the hooks.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .autograd import autocast_dtype, recomputed_op, run_op
from .generators import Generator
from .layers import BINDERS, RowGather, WeightOp
from .weight import ADAPTER_PREFIX, AdaptedWeight, AdapterSettings, adapted_weights_of, quantization_of

# Tensor properties and methods that only read metadata: they see the base weight unchanged.
_METADATA_PROPERTIES = {
    "shape",
    "dtype",
    "device",
    "requires_grad",
    "is_leaf",
    "ndim",
    "layout",
    "is_cuda",
    "is_sparse",
    "is_quantized",
    "is_meta",
    "names",
    "grad_fn",
    "_version",
    "is_mps",
    "is_xpu",
}
_METADATA_METHODS = {
    Tensor.size,
    Tensor.dim,
    Tensor.numel,
    Tensor.stride,
    Tensor.is_contiguous,
    Tensor.data_ptr,
    Tensor.element_size,
    Tensor.ndimension,
    Tensor.nelement,
    Tensor.is_floating_point,
    Tensor.get_device,
    Tensor.storage_offset,
}


def intercept(
    adapted: AdaptedWeight, func, args: tuple, kwargs: dict, weight: Tensor, training: bool, memo: dict
) -> Any:
    """One torch call that received ``weight``: a bound op (run_bound), the gathered rows of an embedding, or the
    call itself with the effective weight in place of W (built once per forward, kept in ``memo``)."""
    names = adapted.live()
    if not names:
        return func(*args, **kwargs)
    binder = BINDERS.get(func)
    op = binder(args, kwargs, weight) if binder is not None else None
    params = adapted.params(names)
    grad_needed = torch.is_grad_enabled() and (weight.requires_grad or any(p.requires_grad for p in params))
    if isinstance(op, RowGather):
        if (grad_needed or training) and not adapted.has_transform(names):
            return adapted.effective_rows(weight, op.index, names)
        op = None  # in eval the cached W_eff serves every lookup; a transform (DoRA) needs the whole weight
    if op is not None:
        out = run_bound(adapted, op, weight, names, training)
        if out is not None:
            return out
    key = id(adapted)
    if key not in memo:
        memo[key] = _generic_weight(adapted, weight, names, params, grad_needed, training)
    w_eff = memo[key]
    swap = lambda a: w_eff if a is weight else a  # noqa: E731
    args = tuple(swap(a) if not isinstance(a, (list, tuple)) else type(a)(swap(b) for b in a) for a in args)
    kwargs = {k: swap(v) for k, v in kwargs.items()}
    return func(*args, **kwargs)


def run_bound(
    adapted: AdaptedWeight,
    op: WeightOp,
    stored: Tensor,
    names: Sequence[str],
    training: bool,
    read: Callable[[Tensor], Tensor] | None = None,
    dtype: torch.dtype | None = None,
    base: Callable[[], Tensor] | None = None,
) -> Tensor | None:
    """The bound op with these adapters: the fast path (one op, the weight rebuilt in backward), the update
    branch (dropout, or update_branch="float32"), or, for a quantized weight, one op on the effective weight;
    None where the generic path serves a float weight (no gradient needed: one op with the cached W_eff).

    read: stored tensor -> float weight (a quantized layer's dequantization), applied inside every build so the
    float weight is never kept; dtype: the op's dtype outside autocast (None: that of its inputs); base: the op
    on the stored weight (a quantized layer's own kernel) for the update branch.
    """
    params = adapted.params(names)
    grad_needed = torch.is_grad_enabled() and (stored.requires_grad or any(p.requires_grad for p in params))
    fast = grad_needed and all(adapted.settings[n].fast_path for n in names) and not torch.compiler.is_compiling()
    # under torch.autocast the op runs in its dtype, with the weight formed from float32 pieces and cast once
    dtype = autocast_dtype(op.input) or dtype
    # the update as its own float32 op, summed in float32 and rounded once (HiRA's precision)
    wide = (
        adapted.compute_dtype(stored, names)
        if any(adapted.settings[n].update_branch == "float32" for n in names)
        else None
    )
    floated = (lambda w: w) if read is None else read

    def effective(w: Tensor, ps: Sequence[Tensor]) -> Tensor:
        return adapted.effective(floated(w), names, tensors=ps)

    def difference(w: Tensor, ps: Sequence[Tensor]) -> Tensor:
        return adapted.difference(floated(w), names, ps, out_dtype=wide)

    def base_op() -> Tensor:
        return base() if base is not None else run_op(op, op.input, stored, op.bias, dtype)

    p = max(adapted.settings[n].dropout for n in names) if training else 0.0
    if fast and p == 0.0 and wide is None:
        return recomputed_op(op, effective, stored, params, dtype=dtype)
    if fast:  # the update branch: op(x, W) + op(drop(x), W_eff - W); dropout acts on it only, as in LoRA
        y = base_op()
        x = op.input if wide is None else op.input.to(wide)
        dropped = F.dropout(x, p, training=True) if p > 0.0 else x
        branch = recomputed_op(op, difference, stored, params, x=dropped, with_bias=False, dtype=wide or dtype)
        return y + branch if wide is None else (y + branch).to(y.dtype)
    if wide is not None:
        diff = adapted.cached(
            stored,
            names,
            params,
            grad_needed,
            training,
            "difference",
            lambda: difference(stored, params),
            cache=read is None,
        )
        y = base_op()
        return (y + run_op(op, op.input, diff, None, wide)).to(y.dtype)
    if read is None:
        return None
    w_eff = adapted.cached(
        stored, names, params, grad_needed, training, "effective", lambda: effective(stored, params), cache=False
    )  # a float copy of a quantized layer
    return run_op(op, op.input, w_eff, op.bias, dtype)


def _generic_weight(adapted: AdaptedWeight, weight, names, params, grad_needed, training) -> Tensor:
    return adapted.cached(
        weight, names, params, grad_needed, training, "effective", lambda: adapted.effective(weight, names)
    )


def _mentions(weight: Tensor, args: tuple, kwargs: dict) -> bool:
    for a in (*args, *kwargs.values()):
        if a is weight or (isinstance(a, (list, tuple)) and any(b is weight for b in a)):
            return True
    return False


class _Redirect(TorchFunctionMode):
    """Active while an adapted module runs: routes calls that receive its adapted weights."""

    def __init__(self, owner: nn.Module, entries: list[AdaptedWeight], training: bool) -> None:
        super().__init__()
        self.owner = owner
        self.entries = entries
        self.training = training
        self.memo: dict = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _METADATA_METHODS and not (
            getattr(func, "__name__", "") == "__get__"
            and getattr(getattr(func, "__self__", None), "__name__", "") in _METADATA_PROPERTIES
        ):
            for adapted in self.entries:
                # looked up at call time: sharding wrappers (FSDP) swap in the gathered parameter in their own hooks
                weight = self.owner._parameters[adapted.param_name]
                if _mentions(weight, args, kwargs):
                    return intercept(adapted, func, args, kwargs, weight, self.training, self.memo)
        return func(*args, **kwargs)


def quantized_forward(owner: nn.Module, adapted: AdaptedWeight, training: bool, x: Tensor) -> Tensor:
    """A quantized layer's forward (layers/bnb.py): its own kernels while no adapter acts, else one float op on the
    effective weight, built from the dequantized weight inside the recompute path (never kept for backward)."""
    names = adapted.live()
    if not names:
        return type(owner).forward(owner, x)
    quantized = quantization_of(owner, adapted.param_name)
    assert quantized is not None
    y = run_bound(
        adapted,
        quantized.op(x, cast(Tensor | None, owner.bias)),
        adapted.owner_weight(owner),
        names,
        training,
        read=lambda w: quantized.dequantize(owner, w),
        dtype=quantized.compute_dtype(owner, x),
        base=lambda: type(owner).forward(owner, x),
    )
    assert y is not None
    return y if autocast_dtype(x) is not None else y.to(x.dtype)


def _quantized_module_forward(self: nn.Module, x: Tensor) -> Tensor:
    """Bound to a quantized owner as its instance ``forward`` while it holds adapters (its stored weight cannot be
    handed to a torch call, so the redirect hooks do not serve it)."""
    return quantized_forward(self, adapted_weights_of(self)[0], self.training, x)


@contextlib.contextmanager
def redirect(owner: nn.Module, adapted: Sequence[AdaptedWeight], training: bool) -> Iterator[None]:
    """While the block runs, torch calls that receive one of these adapted weights of ``owner`` get the effective
    weight (the fast path where a layer kind knows the call). What the forward hooks do around an owner's own
    forward; wrappers that call the owner themselves (the PEFT tuner layer) use it directly."""
    live = [a for a in adapted if a.live()]
    if not live:
        yield
        return
    with _Redirect(owner, live, training):
        yield


_MODE_STACK = "_liera_modes"


def redirect_pre_hook(module: nn.Module, args) -> None:
    stack = module.__dict__.setdefault(_MODE_STACK, [])
    mode = redirect(module, adapted_weights_of(module), module.training)
    mode.__enter__()
    stack.append(mode)


def redirect_post_hook(module: nn.Module, args, output) -> None:
    stack = module.__dict__.get(_MODE_STACK)
    if stack:
        stack.pop().__exit__(None, None, None)


def attach(owner: nn.Module, param_name: str, name: str, generator: Generator, settings: AdapterSettings) -> None:
    """Give ``owner.<param_name>`` the adapter ``name``: its AdaptedWeight child (made on first use) and the hooks."""
    child = ADAPTER_PREFIX + param_name
    adapted = cast(AdaptedWeight | None, owner._modules.get(child))
    if adapted is None:
        adapted = AdaptedWeight(param_name)
        owner.add_module(child, adapted)
    adapted.train(owner.training)
    adapted.add(name, generator, settings)
    install_hooks(owner)


def detach(owner: nn.Module, adapted: AdaptedWeight) -> None:
    """Remove an AdaptedWeight from its owner (and the hooks with the last one); the weight itself stays as it is."""
    delattr(owner, ADAPTER_PREFIX + adapted.param_name)
    if not adapted_weights_of(owner):
        remove_hooks(owner)


def install_hooks(module: nn.Module) -> None:
    """Register the redirect hooks on an owner module once (a quantized layer gets its instance forward instead)."""
    if any(quantization_of(module, a.param_name) is not None for a in adapted_weights_of(module)):
        module.forward = types.MethodType(_quantized_module_forward, module)
        return
    if any(h is redirect_pre_hook for h in module._forward_pre_hooks.values()):
        return
    module.register_forward_pre_hook(redirect_pre_hook)
    module.register_forward_hook(redirect_post_hook, always_call=True)


def remove_hooks(module: nn.Module) -> None:
    module.__dict__.pop("forward", None)  # a quantized layer's instance forward
    for hooks, fn in ((module._forward_pre_hooks, redirect_pre_hook), (module._forward_hooks, redirect_post_hook)):
        for key in [k for k, h in hooks.items() if h is fn]:
            del hooks[key]
            for extra in ("_forward_hooks_always_called", "_forward_hooks_with_kwargs"):
                getattr(module, extra, {}).pop(key, None)
    module.__dict__.pop(_MODE_STACK, None)
