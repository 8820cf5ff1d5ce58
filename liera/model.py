"""LieRAModel: targeting, named adapters, enable/disable, merge/unmerge/unload, save/load.

The base model is adapted in place: each adapted weight gets an ``AdaptedWeight`` child on its owning
module (keys of the base state dict do not change) and two forward hooks. Every operation that can fail
checks first and changes the model only after all checks passed.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import group, io
from .config import LieRAConfig
from .generators import build_generator
from .targeting import Target, find_targets
from .weight import (ADAPTER_PREFIX, AdaptedWeight, AdapterSettings, adapted_weights_of, install_hooks,
                     remove_hooks)

MODULES_TO_SAVE = "modules_to_save"


class _Planned:
    """A weight and the generator built for it, not yet attached to the model."""

    def __init__(self, target: Target, generator: nn.Module) -> None:
        self.target, self.generator = target, generator


def _is_sharded(tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(tensor, DTensor)


def _call_base(self, *args, **kwargs):
    return self.base_model(*args, **kwargs)


class _ForwardToBase:
    """LieRAModel.forward: calls the base model (its hooks included) and, on an instance, carries the base
    model's signature, since tools inspect it (transformers.Trainer keeps only the dataset columns that
    the forward accepts). On the class it is a plain function, as inspection of the class expects."""

    def __get__(self, obj, objtype=None):
        if obj is None:
            return _call_base
        base = obj.base_model

        def forward(*args, **kwargs):
            return base(*args, **kwargs)

        forward.__wrapped__ = base.forward
        return forward


class LieRAModel(nn.Module):
    """A model with LieRA adapters. Calls, attributes and ``generate`` pass through to the base model."""

    def __init__(self, model: nn.Module, config: LieRAConfig, adapter_name: str = "default", *,
                 state_dict: Optional[Mapping[str, Tensor]] = None, is_trainable: bool = True) -> None:
        if isinstance(model, LieRAModel):
            raise ValueError("this model is already a LieRAModel; add another adapter with model.add_adapter(name, config).")
        if any(isinstance(m, AdaptedWeight) for m in model.modules()):
            raise ValueError("this model already carries liera adapters (it was wrapped before); reuse that LieRAModel and "
                             "call add_adapter(name, config), or call unload() on it first.")
        super().__init__()
        self.base_model = model
        self.peft_config: dict[str, LieRAConfig] = {}
        self._active: list[str] = []
        self._frozen: set[str] = set()
        self._zero_warned = False
        self.add_adapter(adapter_name, config, state_dict=state_dict, is_trainable=is_trainable)
        self.set_adapter(adapter_name)

    # ------------------------------------------------------------------ pass-through
    forward = _ForwardToBase()

    def __getattr__(self, name: str):
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

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str:
        return self._active[0] if len(self._active) == 1 else self._active  # type: ignore[return-value]

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / max(total, 1):.4f}")

    # ------------------------------------------------------------------ adding and choosing adapters
    def _plan(self, config: LieRAConfig) -> list[_Planned]:
        plan = []
        targets = find_targets(self.base_model, config)
        unmatched = config.unmatched_patterns([(t.path, t.param_name) for t in targets])
        for field_name, keys in unmatched.items():
            warnings.warn(f"{field_name} keys {keys} match none of the {len(targets)} adapted layers (e.g. "
                          f"{[t.path for t in targets[:3]]}); keys name module paths (exact, suffix or full regex), "
                          f"as in PEFT.", UserWarning, stacklevel=4)
        for target in targets:
            weight = target.owner._parameters[target.param_name]
            if _is_sharded(weight):
                raise ValueError(f"{target.key} is already sharded (a DTensor: fully_shard or tensor parallelism ran "
                                 f"before liera). Wrap first, then shard: get_liera_model(model, cfg), then "
                                 f"fully_shard(...) on the wrapped model, so that the adapter tensors are sharded and "
                                 f"their gradients reduced with the rest.")
            dtype = torch.float32 if config.adapter_dtype == "float32" and weight.is_floating_point() \
                and weight.element_size() < 4 else weight.dtype
            try:
                generator = build_generator(config, target.path, target.param_name, weight.detach(), dtype)
            except ValueError as exc:
                raise ValueError(f"{target.key}: {exc}") from None
            plan.append(_Planned(target, generator))
        return plan

    def _modules_to_save(self, config: LieRAConfig) -> dict[str, nn.Module]:
        found = {}
        for wanted in config.modules_to_save or []:
            hits = {n: m for n, m in self.base_model.named_modules() if n == wanted or n.endswith("." + wanted)}
            if not hits:
                raise ValueError(f"modules_to_save entry {wanted!r} matches no module of the model.")
            found.update(hits)
        return found

    def _saved_parameters(self, config: LieRAConfig) -> dict[str, nn.Parameter]:
        """File key -> parameter of the modules trained in full (their own, never liera's adapter tensors)."""
        out = {}
        for path, module in self._modules_to_save(config).items():
            for pname, p in module.named_parameters():
                if not any(part.startswith(ADAPTER_PREFIX) for part in pname.split(".")):
                    out[f"{MODULES_TO_SAVE}.{path}.{pname}"] = p
        return out

    def _expected_state(self, plan: list[_Planned], config: LieRAConfig) -> dict[str, tuple]:
        expected = {}
        for item in plan:
            for pname, p in item.generator.state_dict().items():
                expected[f"{item.target.key}.{pname}"] = tuple(p.shape)
        for key, p in self._saved_parameters(config).items():
            expected[key] = tuple(p.shape)
        return expected

    def add_adapter(self, adapter_name: str, config: LieRAConfig, *, state_dict: Optional[Mapping[str, Tensor]] = None,
                    is_trainable: bool = True) -> None:
        """Add an adapter (inactive unless it is the first; see set_adapter). Checks everything first."""
        if not isinstance(config, LieRAConfig):
            raise TypeError(f"config must be a liera.LieRAConfig, got {type(config).__name__}")
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter name {adapter_name!r} is not valid: use a non-empty name without '.'")
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} already exists on this model; pick another name or "
                             f"delete_adapter({adapter_name!r}) first.")
        config.validate()
        plan = self._plan(config)
        saved = self._saved_parameters(config)
        if state_dict is not None:
            io.check_tensors(self._expected_state(plan, config), state_dict, f"adapter {adapter_name!r}")
        # ---- all checks passed: change the model
        for item in plan:
            if state_dict is not None:
                item.generator.load_state_dict({k[len(item.target.key) + 1:]: v for k, v in state_dict.items()
                                                if k.startswith(item.target.key + ".")}, strict=False)
            owner, pname = item.target.owner, item.target.param_name
            child = ADAPTER_PREFIX + pname
            adapted = owner._modules.get(child)
            if adapted is None:
                adapted = AdaptedWeight(pname)
                owner.add_module(child, adapted)
            adapted.train(owner.training)
            adapted.add(adapter_name, item.generator,
                        AdapterSettings(config.exp_map, config.update, float(config.dropout), config.fast_path,
                                        config.update_branch))
            install_hooks(owner)
        if state_dict is not None:
            with torch.no_grad():
                for key, p in saved.items():
                    p.copy_(state_dict[key])
        self.peft_config[adapter_name] = config
        if not is_trainable:
            self._frozen.add(adapter_name)
        if len(self.peft_config) == 1:
            for p in self.base_model.parameters():
                p.requires_grad_(False)
        self._warn_zeros(plan, config)
        self._refresh_trainable()

    def _warn_zeros(self, plan: list[_Planned], config: LieRAConfig) -> None:
        if self._zero_warned or not plan or config.update != "multiplicative":
            return
        counts = []
        total = zeros = 0
        for item in plan:
            w = item.target.owner._parameters[item.target.param_name]
            z = int((w == 0).sum())
            total += w.numel()
            zeros += z
            if z:
                counts.append(f"{item.target.key} ({z})")
        if zeros:
            self._zero_warned = True
            warnings.warn(f"liera: {zeros:,d} of {total:,d} adapted weight entries ({100 * zeros / total:.3f}%) are exactly "
                          f"zero and cannot move under a multiplicative update. Layers: {', '.join(counts[:8])}"
                          f"{' ...' if len(counts) > 8 else ''}.", stacklevel=3)

    def _refresh_trainable(self) -> None:
        for _, _, adapted in self.adapted_weights():
            for name, generator in adapted.items():
                train = name in self._active and name not in self._frozen
                for p in generator.parameters():
                    p.requires_grad_(train)
        for name in self._active:
            if name in self._frozen:
                continue
            for p in self._saved_parameters(self.peft_config[name]).values():
                p.requires_grad_(True)

    def set_adapter(self, adapter_name: Union[str, Sequence[str]]) -> None:
        """Make these adapters active (several compose by the group product); only they train."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._check_known(names)
        for _, _, adapted in self.adapted_weights():
            present = [n for n in names if n in adapted]
            if len(present) > 1:
                adapted._update_kind(present)
        self._active = names
        for _, _, adapted in self.adapted_weights():
            adapted.active = [n for n in names if n in adapted]
            adapted._cache = None
        self._refresh_trainable()

    def _check_known(self, names: Sequence[str]) -> None:
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this model has {sorted(self.peft_config)}.")

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_known([adapter_name])
        merged = [k for k, _, a in self.adapted_weights() if adapter_name in a.merged]
        if merged:
            raise ValueError(f"adapter {adapter_name!r} is merged into {len(merged)} weights (e.g. {merged[:2]}); "
                             f"unmerge_adapter() before deleting it.")
        for _, owner, adapted in list(self.adapted_weights()):
            if adapter_name in adapted:
                adapted.remove(adapter_name)
            if len(adapted) == 0:
                delattr(owner, ADAPTER_PREFIX + adapted.param_name)
                if not adapted_weights_of(owner):
                    remove_hooks(owner)
        del self.peft_config[adapter_name]
        self._frozen.discard(adapter_name)
        self._active = [n for n in self._active if n != adapter_name]
        self._refresh_trainable()

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the base model: inside the block every adapter is off (merged ones stay merged)."""
        adapted = [a for _, _, a in self.adapted_weights()]
        before = [a.disabled for a in adapted]
        for a in adapted:
            a.disabled = True
        try:
            yield
        finally:
            for a, flag in zip(adapted, before):
                a.disabled = flag

    # ------------------------------------------------------------------ merging
    def _merge_names(self, adapter_names: Optional[Sequence[str]]) -> list[str]:
        names = self.active_adapters if adapter_names is None else (
            [adapter_names] if isinstance(adapter_names, str) else list(adapter_names))
        self._check_known(names)
        return names

    def merge_adapter(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False,
                      keep_merge_copy: bool = False, dtype: torch.dtype = torch.float32) -> None:
        """W <- W * g(D) for the given adapters (default: the active ones); no copy of W is kept.

        safe_merge checks every layer first (non-finite values, Taylor factors 1 + D near 0 that an unmerge
        could not undo) and raises before any weight changes. keep_merge_copy keeps the pre-merge weight
        for a bit-exact unmerge of bf16/fp16 models. dtype: precision the merge is computed in.
        """
        names = self._merge_names(adapter_names)
        jobs = []
        for key, owner, adapted in self.adapted_weights():
            todo = [n for n in names if n in adapted and n not in adapted.merged]
            if todo:
                adapted._update_kind(adapted.merged + todo)
                jobs.append((key, owner, adapted, todo))
        already = sorted({n for _, _, a in self.adapted_weights() for n in names if n in a.merged})
        if already:
            warnings.warn(f"adapter(s) {already} already merged; merging again changes nothing.", stacklevel=2)
        if safe_merge:
            for key, owner, adapted, todo in jobs:  # check everything before touching anything
                with torch.no_grad():
                    weight = adapted.owner_weight(owner)
                    new = adapted.merged_weight(weight, todo, dtype)
                    if not torch.isfinite(new).all():
                        raise ValueError(f"safe_merge: merging {todo} into {key} gives non-finite values; no weight was changed.")
                    bad = group.near_singular(adapted.terms(todo, dtype))
                    if bad is not None and bad.any():
                        raise ValueError(f"safe_merge: {int(bad.sum())} entries of {key} have a Taylor factor 1 + D near 0; "
                                         f"unmerging could not recover them, so nothing was merged.")
        singular = 0
        for key, owner, adapted, todo in jobs:
            with torch.no_grad():
                weight = adapted.owner_weight(owner)
                if keep_merge_copy and adapted.merge_copy is None:
                    adapted.merge_copy = weight.detach().clone()
                bad = group.near_singular(adapted.terms(todo, dtype))
                singular += 0 if bad is None else int(bad.sum())
                weight.copy_(adapted.merged_weight(weight, todo, dtype))
                adapted.merged = adapted.merged + todo
                adapted._cache = None
        if singular:
            warnings.warn(f"merge: {singular} weight entries have a Taylor factor 1 + D near 0; unmerge_adapter() cannot "
                          f"recover them (use safe_merge=True to refuse such merges, or keep_merge_copy=True).", stacklevel=2)

    def unmerge_adapter(self, adapter_names: Optional[Sequence[str]] = None, dtype: torch.dtype = torch.float32) -> None:
        """Undo merges with the group inverse (W <- W * g(D)^-1); exact where a copy was kept."""
        for key, owner, adapted in self.adapted_weights():
            todo = [n for n in adapted.merged if adapter_names is None or n in (
                [adapter_names] if isinstance(adapter_names, str) else adapter_names)]
            if not todo:
                continue
            with torch.no_grad():
                weight = adapted.owner_weight(owner)
                if adapted.merge_copy is not None and len(todo) == len(adapted.merged):
                    weight.copy_(adapted.merge_copy)
                    adapted.merge_copy = None
                else:
                    weight.copy_(adapted.unmerged_weight(weight, todo, dtype))
            adapted.merged = [n for n in adapted.merged if n not in todo]
            adapted._cache = None

    @property
    def merged_adapters(self) -> list[str]:
        return sorted({n for _, _, a in self.adapted_weights() for n in a.merged})

    def merge_and_unload(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> nn.Module:
        """Merge the adapters into the weights and return the plain base model (no liera left)."""
        names = [n for n in self._merge_names(adapter_names) if n not in self.merged_adapters]
        if names:
            self.merge_adapter(names, safe_merge=safe_merge)
        return self._strip()

    def unload(self) -> nn.Module:
        """Remove every adapter without merging (merged ones are unmerged first): the original model."""
        self.unmerge_adapter()
        return self._strip()

    def _strip(self) -> nn.Module:
        for _, owner, adapted in list(self.adapted_weights()):
            delattr(owner, ADAPTER_PREFIX + adapted.param_name)
            remove_hooks(owner)
        self.peft_config.clear()
        self._active = []
        return self.base_model

    # ------------------------------------------------------------------ state and files
    def get_adapter_state_dict(self, adapter_name: Optional[str] = None) -> dict[str, Tensor]:
        """The adapter's tensors, keyed independently of its local name (what the file holds)."""
        name = adapter_name or self._active[0]
        self._check_known([name])
        out: dict[str, Tensor] = {}
        for key, _, adapted in self.adapted_weights():
            if name in adapted:
                for pname, p in adapted[name].state_dict().items():
                    out[f"{key}.{pname}"] = p.detach()
        for key, p in self._saved_parameters(self.peft_config[name]).items():
            out[key] = p.detach()
        return out

    def _full_adapter_state_dict(self, adapter_name: str) -> dict[str, Tensor]:
        """get_adapter_state_dict with sharded (DTensor) tensors gathered: a collective, call on every rank."""
        return {k: (v.full_tensor() if _is_sharded(v) else v) for k, v in self.get_adapter_state_dict(adapter_name).items()}

    def set_adapter_state_dict(self, state_dict: Mapping[str, Tensor], adapter_name: Optional[str] = None) -> None:
        """Load tensors into an existing adapter; checks names and shapes before changing anything."""
        name = adapter_name or self._active[0]
        current = self.get_adapter_state_dict(name)
        io.check_tensors({k: tuple(v.shape) for k, v in current.items()}, state_dict, f"adapter {name!r}")
        if any(a.merged and name in a.merged for _, _, a in self.adapted_weights()):
            raise ValueError(f"adapter {name!r} is merged; unmerge_adapter() before loading new tensors into it.")
        with torch.no_grad():
            for k, tensor in self.get_adapter_state_dict(name).items():  # detached views of the live tensors
                tensor.copy_(state_dict[k])

    def save_pretrained(self, save_directory: Union[str, os.PathLike], adapter_names: Optional[Sequence[str]] = None,
                        safe_serialization: bool = True, is_main_process: bool = True) -> None:
        """Write adapter_config.json + adapter_model.safetensors; non-default adapters go to sub-folders.

        In a distributed run call it on every rank with is_main_process=(rank == 0): sharded adapter tensors are
        gathered (a collective) and only the main process writes.
        """
        names = list(self.peft_config) if adapter_names is None else (
            [adapter_names] if isinstance(adapter_names, str) else list(adapter_names))
        self._check_known(names)
        for name in names:
            tensors = self._full_adapter_state_dict(name)  # every rank takes part in gathering sharded tensors
            if not is_main_process:
                continue
            target = save_directory if name == "default" else os.path.join(save_directory, name)
            shapes = {k: tuple(a.owner_weight(o).shape) for k, o, a in self.adapted_weights() if name in a}
            io.save_adapter_files(target, self.peft_config[name], tensors, safe_serialization, weight_shapes=shapes)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: Union[str, os.PathLike], adapter_name: str = "default",
                        is_trainable: bool = False) -> "LieRAModel":
        """Wrap ``model`` with the adapter saved in ``model_id``; inference mode unless is_trainable."""
        config, tensors = io.read_adapter_files(model_id)
        wrapped = cls(model, config, adapter_name, state_dict=tensors, is_trainable=is_trainable)
        if not is_trainable:
            wrapped.eval()
        return wrapped

    def load_adapter(self, model_id: Union[str, os.PathLike], adapter_name: str, is_trainable: bool = False) -> None:
        """Add a saved adapter under a new name (inactive until set_adapter)."""
        config, tensors = io.read_adapter_files(model_id)
        self.add_adapter(adapter_name, config, state_dict=tensors, is_trainable=is_trainable)


def get_liera_model(model: nn.Module, config: LieRAConfig, adapter_name: str = "default") -> LieRAModel:
    """Adapt ``model`` in place with a LieRA adapter and return the wrapping LieRAModel."""
    return LieRAModel(model, config, adapter_name)
