"""How one weight tensor is adapted: the state of its adapters and the math of its effective weight.

``AdaptedWeight`` holds the adapters (name -> generator) of one weight tensor and their state (which act, which
are merged, whether all are off), and forms W_eff from them with the group math of ``group.py``: in float32 or
wider, cast once; the whole weight, its difference W_eff - W, or only some rows (embeddings). ``build_adapter`` is
the one place a config becomes an adapter. How the effective weight reaches the owning module's torch calls is
``interception.py``.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from . import group
from .autograd import autocast_off
from .config import LieRAConfig
from .generators import Generator, build_generator
from .group import MULTIPLICATIVE, TAYLOR
from .layers import QuantizedWeight, kind_of

ADAPTER_PREFIX = "liera_"


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
    def compute_dtype(self, weight: Tensor, names: Sequence[str]) -> torch.dtype:
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
        cd = dtype or self.compute_dtype(weight, names)
        bound = list(self._generators(names, tensors))
        out = self._group_updated(weight, names, cd, bound)
        if self.has_transform(names):
            w = weight.to(cd)

            def transform(gen: Generator, given: dict | None) -> Callable[[Tensor], Tensor]:
                if given is None:
                    return lambda v: gen.transform(v, w)
                return lambda v: functional_call(gen, given, (v, w), {"transform": True})

            with autocast_off(w):
                out = group.transformed(w, out, [transform(g, given) for _, g, given in bound], self.keeps_zeros(names))
        return out.to(out_dtype or weight.dtype)

    def merged_weight(self, weight: Tensor, names: Sequence[str], dtype: torch.dtype) -> Tensor:
        """The weight with these adapters merged in (generators with a transform record what undoes it)."""
        cd = torch.promote_types(dtype, weight.dtype)
        w = weight.to(cd)
        out = self._group_updated(weight, names, cd, list(self._generators(names, None)))
        steps = [functools.partial(self[n].merge_transform, weight=w) for n in names if self.has_transform([n])]
        return group.transformed(w, out, steps, self.keeps_zeros(names)).to(weight.dtype)

    def unmerged_weight(self, weight: Tensor, names: Sequence[str], dtype: torch.dtype) -> Tensor:
        """The group inverse of merged_weight: W <- W * prod g(D_i)^-1, after undoing transforms."""
        cd = torch.promote_types(dtype, weight.dtype)
        merged = weight.to(cd)
        steps = [self[n].unmerge_transform for n in reversed(list(names)) if self.has_transform([n])]
        out = group.transformed(merged, merged, steps, self.keeps_zeros(names))  # the merged weight's zeros
        out = group.unapply(out, self.terms(names, cd), self.update_kind(names), self.keeps_zeros(names))
        return out.to(weight.dtype)

    def difference(
        self,
        weight: Tensor,
        names: Sequence[str],
        tensors: Sequence[Tensor] | None = None,
        out_dtype: torch.dtype | None = None,
    ) -> Tensor:
        """W_eff - W without cancellation (the update branch's weight), in W's dtype unless out_dtype is given."""
        cd = self.compute_dtype(weight, names)
        w = weight.to(cd)
        if self.has_transform(names):
            return (self.effective(weight, names, cd, tensors, out_dtype=cd) - w).to(out_dtype or weight.dtype)
        terms = self.terms(names, cd, tensors=tensors)
        return group.delta_weight(w, terms, self.update_kind(names), self.keeps_zeros(names)).to(
            out_dtype or weight.dtype
        )

    def effective_rows(self, weight: Tensor, index: Tensor, names: Sequence[str]) -> Tensor:
        """W_eff[index] from the gathered rows only (embeddings)."""
        cd = self.compute_dtype(weight, names)
        rows = F.embedding(index, weight).to(cd)
        out = group.apply(rows, self.terms(names, cd, index), self.update_kind(names), self.keeps_zeros(names))
        return out.to(weight.dtype)

    # ------------------------------------------------------------------ the eval-mode cache
    def cached(self, weight, names, params, grad_needed, training, what: str, build, cache: bool = True) -> Tensor:
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


def adapted_weights_of(module: nn.Module) -> list[AdaptedWeight]:
    return [
        m for name, m in module._modules.items() if name.startswith(ADAPTER_PREFIX) and isinstance(m, AdaptedWeight)
    ]
