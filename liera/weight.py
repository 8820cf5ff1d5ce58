"""How one weight tensor is adapted: its adapters, its effective weight, and the call interception.

An adapted weight W stays where it is (``module.weight`` is still the frozen Parameter, state-dict
keys of the base model do not change). Its adapters live in an ``AdaptedWeight`` child of the owning
module, named ``liera_<param>``. While the owner runs, a TorchFunctionMode is active; every torch call
that receives W is redirected:

* calls a layer kind knows (F.linear, F.conv*, torch.addmm, F.embedding) run on the fast path:
  one op with the effective weight, rebuilt in backward instead of stored (``autograd.py``), or only
  the gathered rows for embeddings;
* any other call (MultiheadAttention's in_proj_weight, a 3-D expert tensor, a subclass's custom
  forward...) receives the effective weight, built once per forward with plain autograd.

The module's own forward always runs, so subclasses that pad or reshape in their forward stay correct.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from . import group
from .autograd import autocast_dtype, autocast_off, recomputed_op, run_op
from .config import LieRAConfig
from .generators import Generator, build_generator
from .group import MULTIPLICATIVE, TAYLOR
from .layers import BINDERS, QuantizedWeight, WeightOp, kind_of

ADAPTER_PREFIX = "liera_"

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


@dataclass
class AdapterSettings:
    """Per-adapter switches that the group map needs (the rest lives in the generator)."""

    exp_map: str = TAYLOR
    update: str = MULTIPLICATIVE
    dropout: float = 0.0
    fast_path: bool = True
    update_branch: str = "merged"
    keep_zeros: bool = False

    @classmethod
    def from_config(cls, config: LieRAConfig) -> AdapterSettings:
        return cls(
            config.exp_map,
            config.update,
            float(config.dropout),
            config.fast_path,
            config.update_branch,
            config.keep_zeros,
        )


if TYPE_CHECKING:
    from typing import TypeGuard

    from torch.distributed.tensor import DTensor


def is_sharded(tensor: object) -> TypeGuard[DTensor]:
    """Whether a tensor is a DTensor (sharded by FSDP2 or tensor parallelism). A DTensor can only exist once its
    module was imported, so liera looks it up instead of importing it (that import alone takes about 1.5 s)."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(tensor, dtensor.DTensor)


def adapter_dtype(config: LieRAConfig, weight: Tensor) -> torch.dtype:
    """The dtype of the adapter tensors of ``weight``: float32 on a bf16/fp16 weight with adapter_dtype="float32",
    else the weight's own dtype."""
    if config.adapter_dtype == "float32" and weight.is_floating_point() and weight.element_size() < 4:
        return torch.float32
    return weight.dtype


def build_adapter(
    config: LieRAConfig, path: str, param_name: str, weight: Tensor, dtype: torch.dtype | None = None
) -> tuple[Generator, AdapterSettings]:
    """The one place a config becomes the adapter of one weight (its generator and settings): the model, the PEFT
    method and the model-free tools (`liera merge`, `liera inspect`) all build through here. dtype: that of the
    adapter tensors (default: the config's adapter_dtype for this weight)."""
    dtype = dtype or adapter_dtype(config, weight)
    return build_generator(config, path, param_name, weight.detach(), dtype), AdapterSettings.from_config(config)


class AdaptedWeight(nn.ModuleDict):
    """The adapters (name -> Generator) of one weight, and their state: which act (active), which are merged
    into the weight, whether all are switched off (disabled). Only the methods below change that state, and
    each keeps the eval-mode weight cache right."""

    if TYPE_CHECKING:  # what the ModuleDict holds: generators only (add() is the one writer)

        def __getitem__(self, key: str) -> Generator: ...
        def values(self) -> Iterator[Generator]: ...  # type: ignore[override]
        def items(self) -> Iterator[tuple[str, Generator]]: ...  # type: ignore[override]

    def __init__(self, param_name: str) -> None:
        super().__init__()
        self.param_name = param_name
        self.settings: dict[str, AdapterSettings] = {}
        self._active: list[str] = []
        self._merged: list[str] = []
        self._disabled = False
        self._merge_copy: Tensor | None = None  # only with keep_merge_copy=True
        self._cache: tuple[tuple, Tensor] | None = None

    # ------------------------------------------------------------------ state
    @property
    def active(self) -> list[str]:
        return list(self._active)

    @property
    def merged(self) -> list[str]:
        return list(self._merged)

    @property
    def disabled(self) -> bool:
        return self._disabled

    @property
    def has_merge_copy(self) -> bool:
        return self._merge_copy is not None

    def add(self, name: str, generator: Generator, settings: AdapterSettings) -> None:
        self[name] = generator
        self.settings[name] = settings

    def remove(self, name: str) -> None:
        del self[name]
        self.settings.pop(name, None)
        self._active = [n for n in self._active if n != name]
        self._cache = None

    def check_activate(self, names: Sequence[str]) -> list[str]:
        """The names present here, checked to compose (raises before any state changes)."""
        present = [n for n in names if n in self._modules]
        if len(present) > 1:
            self.update_kind(present)
        return present

    def activate(self, names: Sequence[str]) -> None:
        """Make these adapters (those present here) the ones that act in forward."""
        self._active = self.check_activate(names)
        self._cache = None

    def set_disabled(self, flag: bool) -> bool:
        """Switch every adapter off (True) or back on; returns the previous flag."""
        before, self._disabled = self._disabled, bool(flag)
        self._cache = None
        return before

    def live(self) -> list[str]:
        """Adapters that act in forward: active, present here, not merged, not disabled."""
        if self._disabled:
            return []
        return [n for n in self._active if n in self._modules and n not in self._merged]

    def train(self, mode: bool = True) -> AdaptedWeight:
        self._cache = None  # train()/eval() invalidate the eval-mode weight cache
        return super().train(mode)

    @property
    def device(self) -> torch.device:
        """Where the adapter tensors live (the weight's device)."""
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def weight_shape(self) -> torch.Size:
        """The adapted weight's logical shape (its generators'), also for a quantized layer whose stored tensor is
        packed into another shape; what adapter files record."""
        for gen in self.values():
            return torch.Size(gen.shape)
        raise ValueError(f"{self.param_name!r} holds no adapter")

    def owner_weight(self, owner: nn.Module) -> Tensor:
        return cast(Tensor, owner._parameters[self.param_name])

    def to_merge(self, names: Sequence[str]) -> list[str]:
        """Of these adapters, those present here and not merged yet (checked to compose with the merged ones)."""
        todo = [n for n in names if n in self._modules and n not in self._merged]
        if todo:
            self.update_kind(self._merged + todo)
        return todo

    @torch.no_grad()
    def check_merge(self, weight: Tensor, names: Sequence[str], dtype: torch.dtype, where: str) -> None:
        """Raise ValueError if merging would give non-finite values or could not be undone; changes nothing."""
        new = self.merged_weight(weight, names, dtype)
        if not torch.isfinite(new).all():
            raise ValueError(
                f"safe_merge: merging {list(names)} into {where} gives non-finite values; no weight was changed."
            )
        bad = self.singular(weight, names, dtype)
        if bad is not None and bad.any():
            raise ValueError(
                f"safe_merge: {int(bad.sum())} entries of {where} have a Taylor factor 1 + D near 0; "
                f"unmerging could not recover them, so nothing was merged."
            )
        lost = self.lost_zeros(weight, new, names)
        if lost:
            raise ValueError(
                f"safe_merge: merging {list(names)} turns {lost} non-zero entries of {where} into exact "
                f"zeros; with keep_zeros an unmerge would take them for intended zeros, so nothing was "
                f"merged (merge with keep_merge_copy=True to unmerge exactly)."
            )

    @torch.no_grad()
    def merge(
        self, weight: Tensor, names: Sequence[str], dtype: torch.dtype = torch.float32, keep_copy: bool = False
    ) -> int:
        """W <- W * g(D) in place for these adapters; returns how many entries cannot be unmerged exactly."""
        if keep_copy and self._merge_copy is None:
            self._merge_copy = weight.detach().clone()
        bad = self.singular(weight, names, dtype)
        new = self.merged_weight(weight, names, dtype)
        lost = self.lost_zeros(weight, new, names)
        weight.copy_(new)
        self._merged = self._merged + list(names)
        self._cache = None
        return (0 if bad is None else int(bad.sum())) + lost

    def singular(self, weight: Tensor, names: Sequence[str], dtype: torch.dtype) -> Tensor | None:
        """Entries whose Taylor factor is near 0 (a merge there cannot be undone); with keep_zeros only where W != 0,
        since a zero of W stays zero whatever its factor. An additive update has no factor: None."""
        if self.update_kind(names) == group.ADDITIVE:
            return None
        bad = group.near_singular(self.terms(names, dtype))
        return bad & (weight != 0) if bad is not None and self.keeps_zeros(names) else bad

    def lost_zeros(self, weight: Tensor, merged: Tensor, names: Sequence[str]) -> int:
        """With keep_zeros: entries a merge turns from non-zero into exact zeros (an unmerge, which reads the mask
        from the merged weight, cannot recover them); 0 otherwise."""
        return int(group.new_zeros(weight, merged).sum()) if self.keeps_zeros(names) else 0

    @torch.no_grad()
    def unmerge(self, weight: Tensor, names: Sequence[str] | None = None, dtype: torch.dtype = torch.float32) -> None:
        """Undo merges with the group inverse (W <- W * g(D)^-1); exact where a copy was kept."""
        todo = [n for n in self._merged if names is None or n in names]
        if not todo:
            return
        if self._merge_copy is not None and len(todo) == len(self._merged):
            weight.copy_(self._merge_copy)
            self._merge_copy = None
        else:
            weight.copy_(self.unmerged_weight(weight, todo, dtype))
        self._merged = [n for n in self._merged if n not in todo]
        self._cache = None

    @torch.no_grad()
    def weight_change(
        self, weight: Tensor, names: Sequence[str] | None = None, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """The learned update W_eff - W of these adapters (default: the live ones), in ``dtype`` or wider (not a
        generator's D, which ``Generator.delta`` gives)."""
        names = self.live() if names is None else list(names)
        if not names:
            return torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, dtype))
        return self.difference(weight.to(torch.promote_types(weight.dtype, dtype)), names)

    # ------------------------------------------------------------------ the math
    def _compute_dtype(self, weight: Tensor, names: Sequence[str]) -> torch.dtype:
        dtype = torch.promote_types(weight.dtype, torch.float32)
        for n in names:
            for p in self[n].parameters():
                dtype = torch.promote_types(dtype, p.dtype)
        return dtype

    def update_kind(self, names: Sequence[str]) -> str:
        kinds = {self.settings[n].update for n in names}
        if len(kinds) > 1:
            raise ValueError(
                f"adapters {list(names)} on {self.param_name!r} mix updates {sorted(kinds)}: an additive and "
                f"a multiplicative update do not compose into one group element; activate one kind at a time."
            )
        kind = kinds.pop()
        if kind == group.ADDITIVE and len({self.settings[n].keep_zeros for n in names}) > 1:
            raise ValueError(
                f"adapters {list(names)} on {self.param_name!r} mix a masked additive update "
                f"(keep_zeros=True) with a plain one, which would fill the zeros the other keeps; "
                f"activate one kind at a time, or give both the same keep_zeros."
            )
        return kind

    def keeps_zeros(self, names: Sequence[str]) -> bool:
        """Whether these adapters keep the zeros of W (any with keep_zeros: a multiplicative one keeps them anyway,
        and update_kind refuses mixed additive ones)."""
        return any(self.settings[n].keep_zeros for n in names)

    def params(self, names: Sequence[str]) -> list[Tensor]:
        return [p for n in names for p in self[n].parameters()]

    def _generators(self, names: Sequence[str], tensors: Sequence[Tensor] | None):
        """Each generator, bound to the given tensors (in params() order) when they are not its own."""
        offset = 0
        for n in names:
            gen = self[n]
            own = dict(gen.named_parameters())
            if tensors is None:
                yield n, gen, None
                continue
            chunk = tensors[offset : offset + len(own)]
            offset += len(own)
            same = all(a is b for a, b in zip(chunk, own.values(), strict=False))
            yield n, gen, None if same else dict(zip(own, chunk, strict=False))

    def terms(
        self,
        names: Sequence[str],
        dtype: torch.dtype,
        index: Tensor | None = None,
        tensors: Sequence[Tensor] | None = None,
        bound: list | None = None,
    ) -> list[group.Term]:
        """(D, exp_map) per adapter; `bound` reuses a _generators() result (one binding per weight build)."""
        out = []
        with autocast_off(self.device):  # the adapter math stays in float32 under autocast
            for n, gen, given in bound if bound is not None else self._generators(names, tensors):
                if given is None:
                    d = gen.delta() if index is None else gen.delta_rows(index)
                else:
                    d = functional_call(gen, given, (), {"rows": index})
                out.append((d.to(dtype), self.settings[n].exp_map))
        return out

    def _group_updated(self, weight: Tensor, names: Sequence[str], cd: torch.dtype, bound: list) -> Tensor:
        """V = W * prod g(D_i) (or W + sum D_i), in the compute dtype, before any generator transform."""
        return group.apply(
            weight.to(cd), self.terms(names, cd, bound=bound), self.update_kind(names), self.keeps_zeros(names)
        )

    def has_transform(self, names: Sequence[str]) -> bool:
        return any(type(self[n]).transform is not Generator.transform for n in names)

    def effective(
        self,
        weight: Tensor,
        names: Sequence[str] | None = None,
        dtype: torch.dtype | None = None,
        tensors: Sequence[Tensor] | None = None,
        out_dtype: torch.dtype | None = None,
    ) -> Tensor:
        """W_eff for the given adapters (default: the live ones), formed in float32 or wider, cast once
        (to W's dtype unless out_dtype says otherwise)."""
        names = self.live() if names is None else list(names)
        if not names:
            return weight
        cd = dtype or self._compute_dtype(weight, names)
        bound = list(self._generators(names, tensors))
        out = self._group_updated(weight, names, cd, bound)
        if self.has_transform(names):
            w = weight.to(cd)
            with autocast_off(w):
                for _n, gen, given in bound:
                    out = (
                        gen.transform(out, w)
                        if given is None
                        else functional_call(gen, given, (out, w), {"transform": True})
                    )
            if self.keeps_zeros(names):  # a transform (DoRA's norm) rescales: pin the zeros again
                out = group.keep_zeros_of(w, out)
        return out.to(out_dtype or weight.dtype)

    def merged_weight(self, weight: Tensor, names: Sequence[str], dtype: torch.dtype) -> Tensor:
        """The weight with these adapters merged in (generators with a transform record what undoes it)."""
        cd = torch.promote_types(dtype, weight.dtype)
        w = weight.to(cd)
        out = self._group_updated(weight, names, cd, list(self._generators(names, None)))
        for n in names:
            out = self[n].merge_transform(out, w)
        if self.keeps_zeros(names) and self.has_transform(names):
            out = group.keep_zeros_of(w, out)
        return out.to(weight.dtype)

    def unmerged_weight(self, weight: Tensor, names: Sequence[str], dtype: torch.dtype) -> Tensor:
        """The group inverse of merged_weight: W <- W * prod g(D_i)^-1, after undoing transforms."""
        cd = torch.promote_types(dtype, weight.dtype)
        out = weight.to(cd)
        for n in reversed(list(names)):
            out = self[n].unmerge_transform(out)
        out = group.unapply(out, self.terms(names, cd), self.update_kind(names), self.keeps_zeros(names))
        if self.keeps_zeros(names) and self.has_transform(names):  # the zeros as the merged weight holds them
            out = group.keep_zeros_of(weight.to(cd), out)
        return out.to(weight.dtype)

    def difference(
        self,
        weight: Tensor,
        names: Sequence[str],
        tensors: Sequence[Tensor] | None = None,
        out_dtype: torch.dtype | None = None,
    ) -> Tensor:
        """W_eff - W without cancellation (the update branch's weight), in W's dtype unless out_dtype is given."""
        cd = self._compute_dtype(weight, names)
        w = weight.to(cd)
        if self.has_transform(names):
            return (self.effective(weight, names, cd, tensors, out_dtype=cd) - w).to(out_dtype or weight.dtype)
        terms = self.terms(names, cd, tensors=tensors)
        return group.delta_weight(w, terms, self.update_kind(names), self.keeps_zeros(names)).to(
            out_dtype or weight.dtype
        )

    def effective_rows(self, weight: Tensor, index: Tensor, names: Sequence[str]) -> Tensor:
        """W_eff[index] from the gathered rows only (embeddings)."""
        cd = self._compute_dtype(weight, names)
        rows = F.embedding(index, weight).to(cd)
        out = group.apply(rows, self.terms(names, cd, index), self.update_kind(names), self.keeps_zeros(names))
        return out.to(weight.dtype)

    # ------------------------------------------------------------------ the redirect
    def intercept(self, func, args: tuple, kwargs: dict, weight: Tensor, training: bool, memo: dict) -> Any:
        names = self.live()
        if not names:
            return func(*args, **kwargs)
        binder = BINDERS.get(func)
        op = binder(args, kwargs, weight) if binder is not None else None
        params = self.params(names)
        grad_needed = torch.is_grad_enabled() and (weight.requires_grad or any(p.requires_grad for p in params))
        if getattr(op, "gathers_rows", False):
            if (grad_needed or training) and not self.has_transform(names):
                return self.effective_rows(weight, cast(Any, op).index, names)
            op = None
        if op is not None:
            out = self.run(op, weight, names, training)
            if out is not None:
                return out
        key = id(self)
        if key not in memo:
            memo[key] = self._generic_weight(weight, names, params, grad_needed, training)
        w_eff = memo[key]
        swap = lambda a: w_eff if a is weight else a  # noqa: E731
        args = tuple(swap(a) if not isinstance(a, (list, tuple)) else type(a)(swap(b) for b in a) for a in args)
        kwargs = {k: swap(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)

    def run(
        self,
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
        params = self.params(names)
        grad_needed = torch.is_grad_enabled() and (stored.requires_grad or any(p.requires_grad for p in params))
        fast = grad_needed and all(self.settings[n].fast_path for n in names) and not torch.compiler.is_compiling()
        # under torch.autocast the op runs in its dtype, with the weight formed from float32 pieces and cast once
        dtype = autocast_dtype(op.input) or dtype
        # the update as its own float32 op, summed in float32 and rounded once (HiRA's precision)
        wide = (
            self._compute_dtype(stored, names)
            if any(self.settings[n].update_branch == "float32" for n in names)
            else None
        )
        floated = (lambda w: w) if read is None else read

        def effective(w: Tensor, ps: Sequence[Tensor]) -> Tensor:
            return self.effective(floated(w), names, tensors=ps)

        def difference(w: Tensor, ps: Sequence[Tensor]) -> Tensor:
            return self.difference(floated(w), names, ps, out_dtype=wide)

        def base_op() -> Tensor:
            return base() if base is not None else run_op(op, op.input, stored, op.bias, dtype)

        p = max(self.settings[n].dropout for n in names) if training else 0.0
        if fast and p == 0.0 and wide is None:
            return recomputed_op(op, effective, stored, params, dtype=dtype)
        if fast:  # the update branch: op(x, W) + op(drop(x), W_eff - W); dropout acts on it only, as in LoRA
            y = base_op()
            x = op.input if wide is None else op.input.to(wide)
            dropped = F.dropout(x, p, training=True) if p > 0.0 else x
            branch = recomputed_op(op, difference, stored, params, x=dropped, with_bias=False, dtype=wide or dtype)
            return y + branch if wide is None else (y + branch).to(y.dtype)
        if wide is not None:
            diff = self._cached(
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
        w_eff = self._cached(
            stored, names, params, grad_needed, training, "effective", lambda: effective(stored, params), cache=False
        )  # a float copy of a quantized layer
        return run_op(op, op.input, w_eff, op.bias, dtype)

    def _generic_weight(self, weight, names, params, grad_needed, training) -> Tensor:
        return self._cached(
            weight, names, params, grad_needed, training, "effective", lambda: self.effective(weight, names)
        )

    def _cached(self, weight, names, params, grad_needed, training, what: str, build, cache: bool = True) -> Tensor:
        """Built with autograd when gradients are needed; in eval, kept until a parameter or setting changes (unless
        ``cache`` is off: a quantized layer would keep a float copy of its weight)."""
        if grad_needed:
            return build()
        if training or not cache:
            with torch.no_grad():
                return build()
        key = (
            what,
            tuple(names),
            weight.data_ptr(),
            weight._version,
            weight.dtype,
            tuple((p.data_ptr(), p._version) for p in params),
            tuple(self.settings[n].exp_map for n in names),
        )
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, build())
        return self._cache[1]


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
                    return adapted.intercept(func, args, kwargs, weight, self.training, self.memo)
        return func(*args, **kwargs)


def float_weight(owner: nn.Module, param_name: str) -> Tensor:
    """The adapted tensor's values as floats: the parameter itself, or a quantized layer's dequantized weight (what
    an adapter is built for: its shape, dtype and, for rms scaling or PiSSA, its values)."""
    weight = cast(Tensor, owner._parameters[param_name])
    quantized = quantization_of(owner, param_name)
    return weight if quantized is None else quantized.dequantize(owner, weight).detach()


def quantization_of(owner: nn.Module, param_name: str) -> QuantizedWeight | None:
    """How ``owner.<param_name>`` is stored quantized (bitsandbytes), or None for a float tensor."""
    kind = kind_of(owner)
    return kind.quantized if kind is not None and param_name == kind.weight_name else None


def check_mergeable(weight: Tensor, where: str) -> None:
    """Refuse a merge into a quantized weight before anything changes: requantizing W_eff would round a learned
    update of a few percent of |W| into the quantization error (4-bit steps are ~10% of a block's range)."""
    if not weight.is_floating_point():
        raise ValueError(
            f"{where} is stored quantized ({type(weight).__name__}, {weight.dtype}); liera does not merge "
            f"into a quantized weight, since requantizing would round the learned update away. Keep the "
            f"adapter unmerged (it runs on the quantized base), or merge into a bf16 copy: load the base "
            f"model unquantized (torch_dtype=torch.bfloat16), load this adapter into it, then "
            f"merge_and_unload(). Nothing was merged."
        )


def quantized_forward(owner: nn.Module, adapted: AdaptedWeight, training: bool, x: Tensor) -> Tensor:
    """A quantized layer's forward (layers/bnb.py): its own kernels while no adapter acts, else one float op on the
    effective weight, built from the dequantized weight inside the recompute path (never kept for backward)."""
    names = adapted.live()
    if not names:
        return type(owner).forward(owner, x)
    quantized = quantization_of(owner, adapted.param_name)
    assert quantized is not None
    y = adapted.run(
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


def adapted_weights_of(module: nn.Module) -> list[AdaptedWeight]:
    return [
        m for name, m in module._modules.items() if name.startswith(ADAPTER_PREFIX) and isinstance(m, AdaptedWeight)
    ]


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
