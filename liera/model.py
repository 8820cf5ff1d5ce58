"""LieRAModel: a thin facade over the adapted weights: targeting, the adapter registry, and file I/O.

The base model is adapted in place: each adapted weight gets an ``AdaptedWeight`` child on its owning
module (keys of the base state dict do not change) and two forward hooks. The AdaptedWeight owns its state
(active, merged, disabled); this class says which adapters exist and asks every weight to act. Modules in
modules_to_save are trained as one copy per adapter (``saved.py``, as in PEFT), so disabling gives the base back.
Every operation that can fail checks first and changes the model only after all checks passed.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import io, lifecycle
from .config import LieRAConfig
from .group import MULTIPLICATIVE
from .interception import attach, detach
from .lifecycle import Adapted
from .saved import add_copies, choose, file_keys, make_copies, release, remove_copies, saved_holders
from .sparsity import LayerSparsity
from .targeting import model_sparsity, plan_adapter, report_zero_entries, saved_modules, warn_zero_entries
from .weight import AdaptedWeight, adapted_weights_of, is_sharded

DEFAULT_ADAPTER = "default"
Names = str | Sequence[str] | None


def _call_base(self: LieRAModel, *args: Any, **kwargs: Any) -> Any:
    return self.base_model(*args, **kwargs)


class _ForwardToBase:
    """LieRAModel.forward: calls the base model; on an instance it carries the base model's signature (transformers'
    Trainer keeps the dataset columns the forward accepts), on the class it is a plain function."""

    def __get__(self, obj: LieRAModel | None, objtype: type | None = None) -> Callable[..., Any]:
        base = None if obj is None else obj.base_model
        return _call_base if base is None else functools.wraps(base.forward)(lambda *a, **k: base(*a, **k))


class LieRAModel(nn.Module):
    """A model with LieRA adapters. Calls, attributes and ``generate`` pass through to the base model."""

    def __init__(
        self,
        model: nn.Module,
        config: LieRAConfig,
        adapter_name: str = DEFAULT_ADAPTER,
        *,
        state_dict: Mapping[str, Tensor] | None = None,
        is_trainable: bool = True,
        strict: bool = False,
    ) -> None:
        if isinstance(model, LieRAModel):
            raise ValueError(
                "this model is already a LieRAModel; add another adapter with model.add_adapter(name, config)."
            )
        if any(isinstance(m, AdaptedWeight) for m in model.modules()):
            raise ValueError(
                "this model already carries liera adapters (it was wrapped before); reuse that LieRAModel "
                "and "
                "call add_adapter(name, config), or call unload() on it first."
            )
        super().__init__()
        self.base_model = model
        self.peft_config: dict[str, LieRAConfig] = {}
        self._active: list[str] = []
        self._frozen: set[str] = set()
        self._zero_warned = False
        self._disabled_depth = 0  # open disable_adapter() blocks: the originals of modules_to_save are in place
        self.add_adapter(adapter_name, config, state_dict=state_dict, is_trainable=is_trainable, strict=strict)
        self.set_adapter(adapter_name)

    # ------------------------------------------------------------------ pass-through
    forward = _ForwardToBase()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    # ------------------------------------------------------------------ introspection
    def adapted_weights(self) -> Iterator[tuple[str, nn.Module, AdaptedWeight]]:
        """(weight key, owner module, AdaptedWeight) for every adapted weight."""
        for path, module in self.base_model.named_modules():
            for adapted in adapted_weights_of(module):
                yield (f"{path}.{adapted.param_name}" if path else adapted.param_name), module, adapted

    def weights(self) -> list[Adapted]:
        """Every adapted weight as the shared lifecycle (liera.lifecycle) takes it: key, tensor, adapters."""
        return [Adapted(key, adapted.owner_weight(owner), adapted) for key, owner, adapted in self.adapted_weights()]

    @torch.no_grad()
    def weight_changes(self, adapter_names: Names = None, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """weight key -> the learned update W_eff - W of the given adapters (default: the live ones), in ``dtype``
        or wider. Merged adapters are already in W: their update is not repeated here. (Not the generators' D:
        "delta" in liera names D, the algebra element, as in ``Generator.delta``.)"""
        names = None if adapter_names is None else self.known(adapter_names)
        return {
            key: adapted.weight_change(
                adapted.owner_weight(owner),
                None if names is None else [n for n in names if n in adapted and n not in adapted.merged],
                dtype,
            )
            for key, owner, adapted in self.adapted_weights()
        }

    def delta_weights(self, adapter_names: Names = None, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """Deprecated name of ``weight_changes`` (W_eff - W), which it returns with a DeprecationWarning."""
        warnings.warn(
            "LieRAModel.delta_weights() is deprecated: it is weight_changes() (W_eff - W), renamed so that "
            "'delta' means the generators' D only. Call weight_changes() instead.",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.weight_changes(adapter_names, dtype)

    def sparsity(self, target_modules: str | list[str] | None = None) -> list[LayerSparsity]:
        """Zeros and N:M validity (liera.sparsity) of the base weights as they are now, merged adapters included
        (default: every weight of a layer kind liera knows); liera.sparsity.sparsity_report(rows) prints them."""
        return model_sparsity(self.base_model, target_modules)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str:
        return self._active[0] if len(self._active) == 1 else self._active  # type: ignore[return-value]

    @property
    def merged_adapters(self) -> list[str]:
        return sorted({n for _, _, a in self.adapted_weights() for n in a.merged})

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        share = 100 * trainable / max(total, 1)
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")

    def known(self, names: Names) -> list[str]:
        """The adapter names as a list (default: the active ones); ValueError naming any this model lacks."""
        names = self.active_adapters if names is None else [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this model has {sorted(self.peft_config)}.")
        return names

    # ------------------------------------------------------------------ adding and choosing adapters
    def add_adapter(
        self,
        adapter_name: str,
        config: LieRAConfig,
        *,
        state_dict: Mapping[str, Tensor] | None = None,
        is_trainable: bool = True,
        strict: bool = False,
    ) -> None:
        """Add an adapter (inactive unless it is the first; see set_adapter). Checks everything first.
        strict: a target_modules entry that matches no module raises instead of warning."""
        if not isinstance(config, LieRAConfig):
            raise TypeError(f"config must be a liera.LieRAConfig, got {type(config).__name__}")
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter name {adapter_name!r} is not valid: use a non-empty name without '.'")
        if adapter_name in self.peft_config:
            raise ValueError(
                f"an adapter named {adapter_name!r} already exists on this model; pick another name or "
                f"delete_adapter({adapter_name!r}) first."
            )
        config.validate()
        plan = plan_adapter(self.base_model, config, strict)
        saved_at = saved_modules(self.base_model, config)  # raises for a modules_to_save entry that matches nothing
        copies = {path: make_copies(module) for path, module in saved_at.items()}  # this adapter's, not attached yet
        saved = {k: p for path, c in copies.items() for k, p in file_keys(path, c).items()}
        if state_dict is not None:  # checks every name and shape, then loads (nothing is attached yet)
            io.load_planned(plan, saved, state_dict, f"adapter {adapter_name!r}")
        for target, generator, settings in plan:
            attach(target.owner, target.param_name, adapter_name, generator, settings)
        for path, module in saved_at.items():
            add_copies(module, adapter_name, copies[path])
        self.peft_config[adapter_name] = config
        if not is_trainable:
            self._frozen.add(adapter_name)
        if len(self.peft_config) == 1:
            for p in self.base_model.parameters():
                p.requires_grad_(False)
        if config.keep_zeros:  # the zeros are intended: a report, not a warning
            report_zero_entries([t for t, _, _ in plan])
        elif config.update == MULTIPLICATIVE and not self._zero_warned:  # once per model
            self._zero_warned = warn_zero_entries([t for t, _, _ in plan])
        self._refresh_trainable()

    def _refresh_trainable(self) -> None:
        for _, _, adapted in self.adapted_weights():
            for name, generator in adapted.items():
                generator.requires_grad_(name in self._active and name not in self._frozen)
        for _, _, holder in saved_holders(self.base_model):
            for name in holder.names():
                holder.copies[name].requires_grad_(name in self._active and name not in self._frozen)
        self._place_saved()

    def _place_saved(self, active: list[str] | None = None) -> None:
        """Put in place, in every module trained in full, the active adapter's copy (the original while disabled)."""
        found = list(saved_holders(self.base_model))
        chosen = choose([h for _, _, h in found], self._active if active is None else active, self._disabled_depth > 0)
        for (_, module, holder), adapter in zip(found, chosen, strict=False):
            holder.place(module, adapter)

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Make these adapters active (several compose by the group product); only they train."""
        names = self.known(adapter_name)
        weights = self.weights()
        lifecycle.check_activate(weights, names)  # every weight before any change
        choose([h for _, _, h in saved_holders(self.base_model)], names, False)  # raises for two copies of one module
        self._active = names
        for item in weights:
            item.adapters.activate(names)
        self._refresh_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge_adapter() before deleting it.")
        self.known(adapter_name)
        for _, owner, adapted in list(self.adapted_weights()):
            if adapter_name in adapted:
                adapted.remove(adapter_name)
            if len(adapted) == 0:
                detach(owner, adapted)
        for _, module, _ in list(saved_holders(self.base_model)):
            remove_copies(module, adapter_name)
        del self.peft_config[adapter_name]
        self._frozen.discard(adapter_name)
        self._active = [n for n in self._active if n != adapter_name]
        self._refresh_trainable()

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model: inside the block every adapter is off (merged ones stay merged) and modules_to_save
        run their original parameters."""
        weights = [a for _, _, a in self.adapted_weights()]
        before = [a.set_disabled(True) for a in weights]
        self._disabled_depth += 1
        self._place_saved()
        try:
            yield
        finally:
            for a, flag in zip(weights, before, strict=False):
                a.set_disabled(flag)
            self._disabled_depth -= 1
            self._place_saved()

    # ------------------------------------------------------------------ merging
    def merge_adapter(
        self,
        adapter_names: Names = None,
        safe_merge: bool = False,
        keep_merge_copy: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """W <- W * g(D) for the given adapters (default: the active ones); no copy of W is kept.

        safe_merge checks every layer first (non-finite values, Taylor factors 1 + D near 0 that an unmerge
        could not undo) and raises before any weight changes. keep_merge_copy keeps the pre-merge weight
        for a bit-exact unmerge of bf16/fp16 models. dtype: precision the merge is computed in.
        """
        lifecycle.merge(
            self.weights(), self.known(adapter_names), safe_merge=safe_merge, dtype=dtype, keep_copy=keep_merge_copy
        )

    def unmerge_adapter(self, adapter_names: Names = None, dtype: torch.dtype = torch.float32) -> None:
        """Undo merges with the group inverse (W <- W * g(D)^-1); exact where a copy was kept."""
        lifecycle.unmerge(self.weights(), None if adapter_names is None else self.known(adapter_names), dtype)

    def merge_and_unload(self, adapter_names: Names = None, safe_merge: bool = False) -> nn.Module:
        """Merge the adapters into the weights and return the plain base model (no liera left); a module in
        modules_to_save keeps the active adapter's trained copy (as in PEFT)."""
        lifecycle.merge(self.weights(), self.known(adapter_names), safe_merge=safe_merge, warn_merged=False)
        return self._strip()

    def unload(self) -> nn.Module:
        """Remove every adapter without merging (merged ones are unmerged first): the original model, except that a
        module in modules_to_save keeps the active adapter's trained copy (as in PEFT)."""
        self.unmerge_adapter()
        return self._strip()

    def _strip(self) -> nn.Module:
        for _, owner, adapted in list(self.adapted_weights()):
            detach(owner, adapted)
        for _, module, _ in list(saved_holders(self.base_model)):
            release(module)
        self.peft_config.clear()
        self._active = []
        return self.base_model

    # ------------------------------------------------------------------ state and files
    def get_adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, Tensor]:
        """The adapter's tensors, keyed independently of its local name (what the file holds)."""
        name = self.known(adapter_name or self._active[0])[0]
        out: dict[str, Tensor] = {}
        for key, _, adapted in self.adapted_weights():
            if name in adapted:
                out.update({f"{key}.{k}": p.detach() for k, p in adapted[name].state_dict().items()})
        for path, _, holder in saved_holders(self.base_model):
            if name in holder.copies:
                out.update({k: p.detach() for k, p in file_keys(path, holder.copy_of(name)).items()})
        return out

    def set_adapter_state_dict(self, state_dict: Mapping[str, Tensor], adapter_name: str | None = None) -> None:
        """Load tensors into an existing adapter; checks names and shapes before changing anything."""
        name = adapter_name or self._active[0]
        current = self.get_adapter_state_dict(name)
        io.check_tensors({k: tuple(v.shape) for k, v in current.items()}, state_dict, f"adapter {name!r}")
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged; unmerge_adapter() before loading new tensors into it.")
        with torch.no_grad():
            for k, tensor in current.items():  # detached views of the live tensors
                tensor.copy_(state_dict[k])

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        adapter_names: Names = None,
        safe_serialization: bool = True,
        is_main_process: bool = True,
    ) -> None:
        """Write adapter_config.json + adapter_model.safetensors; non-default adapters go to sub-folders.

        In a distributed run call it on every rank with is_main_process=(rank == 0): sharded adapter tensors are
        gathered (a collective) and only the main process writes.
        """
        for name in self.known(list(self.peft_config) if adapter_names is None else adapter_names):
            tensors = {
                k: (v.full_tensor() if is_sharded(v) else v)  # every rank takes part in gathering
                for k, v in self.get_adapter_state_dict(name).items()
            }
            if not is_main_process:
                continue
            target = save_directory if name == DEFAULT_ADAPTER else os.path.join(save_directory, name)
            shapes = {k: tuple(a.weight_shape) for k, o, a in self.adapted_weights() if name in a}
            io.save_adapter_files(target, self.peft_config[name], tensors, safe_serialization, weight_shapes=shapes)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = DEFAULT_ADAPTER,
        is_trainable: bool = False,
    ) -> LieRAModel:
        """Wrap ``model`` with the adapter saved in ``model_id``; inference mode unless is_trainable."""
        config, tensors = io.read_adapter_files(model_id)
        wrapped = cls(model, config, adapter_name, state_dict=tensors, is_trainable=is_trainable)
        if not is_trainable:
            wrapped.eval()
        return wrapped

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False) -> None:
        """Add a saved adapter under a new name (inactive until set_adapter)."""
        config, tensors = io.read_adapter_files(model_id)
        self.add_adapter(adapter_name, config, state_dict=tensors, is_trainable=is_trainable)


def get_liera_model(
    model: nn.Module, config: LieRAConfig, adapter_name: str = DEFAULT_ADAPTER, *, strict: bool = False
) -> LieRAModel:
    """Adapt ``model`` in place with a LieRA adapter and return the wrapping LieRAModel. strict: a target_modules
    entry that matches no module raises instead of warning."""
    return LieRAModel(model, config, adapter_name, strict=strict)
