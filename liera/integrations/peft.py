"""LieRA as a PEFT method: ``peft.get_peft_model(model, LieraPeftConfig(...))``.

Importing this module registers the method with PEFT (peft_type "LIERA", parameter prefix "liera_"). PEFT wraps
each adapted module (or raw parameter) in one ``LieraLayer``, a PEFT tuner layer holding liera's ``AdaptedWeight``
that runs its base layer inside ``liera.interception.redirect``: the generators (built by ``build_adapter``), the group
map, the fast path and the merge math are liera's own, as in ``LieRAModel``; nothing is computed twice. The
model-wide merges and activation checks run ``liera.lifecycle``, as LieRAModel's do (every layer checked before any
changes). PEFT's machinery does the rest: adapter names, set_adapter, disable_adapter, unloading, modules_to_save,
save_pretrained / PeftModel.from_pretrained, and transformers.Trainer's adapter-only checkpoints.

A folder PEFT writes for this method says ``"peft_type": "LIERA"`` and ``"requires": "import
liera.integrations.peft"`` in adapter_config.json: PEFT reads it only after that import. ``liera_to_peft`` and
``peft_to_liera`` convert folders between this format and liera's own.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peft
from packaging.specifiers import SpecifierSet
from packaging.version import Version

SUPPORTED_PEFT = ">=0.21,<0.22"  # the tested range; pyproject's [hf] extra declares the same (a test compares them)


def check_peft_version(version: str) -> None:
    """Raise ImportError unless ``version`` is in SUPPORTED_PEFT: this module follows PEFT's tuner contract
    (BaseTuner / BaseTunerLayer internals), which changes between PEFT's minor versions."""
    if not SpecifierSet(SUPPORTED_PEFT).contains(Version(version), prereleases=True):
        raise ImportError(
            f"liera.integrations.peft supports peft{SUPPORTED_PEFT}, but peft {version} is installed. "
            f"Install a supported version (pip install 'peft{SUPPORTED_PEFT}'), or use liera's own API "
            f"(liera.get_liera_model), which needs no PEFT."
        )


check_peft_version(peft.__version__)

import torch  # noqa: E402
from peft.config import PeftConfig  # noqa: E402
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING  # noqa: E402
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge  # noqa: E402
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, AuxiliaryTrainingWrapper  # noqa: E402
from peft.utils.peft_types import PeftType, register_peft_method  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from .. import io, lifecycle  # noqa: E402
from ..config import PEFT_IMPORT, PEFT_TYPE, TARGET_SHORTCUTS, LieRAConfig  # noqa: E402
from ..interception import quantized_forward, redirect  # noqa: E402
from ..layers import kind_of, supported_kinds_text  # noqa: E402
from ..lifecycle import Adapted  # noqa: E402
from ..names import name_matches  # noqa: E402
from ..targeting import MODULES_TO_SAVE, find_targets  # noqa: E402
from ..weight import AdaptedWeight, build_adapter, float_weight, quantization_of  # noqa: E402
from .statedict import adapters_by_weight  # noqa: E402

PathLike = str | os.PathLike

PREFIX = "liera_"  # PEFT's method prefix: every adapter parameter name contains it
# the LieraLayer attribute with the AdaptedWeight; file keys <path>.liera_adapters.<tensor>
ADAPTERS = "liera_adapters"
BASE_LAYER = "base_layer"  # PEFT's name for the module a tuner layer wraps
PEFT_KEY_PREFIX = "base_model.model."  # what PEFT's files put before module paths
SAVED = MODULES_TO_SAVE + "."  # liera's file keys of modules trained in full: modules_to_save.<path>.<param>
BIASES = ("none", "all", "liera_only")
# LieRAConfig field -> LieraPeftConfig field, where PEFT's naming differs (LoraConfig's lora_alpha, lora_dropout)
RENAMED = {"alpha": "liera_alpha", "dropout": "liera_dropout"}
# Default targets per transformers model type (used when target_modules is None): PEFT's LoRA table, and for LLaMA
# the projections the LieRA paper adapts.
TARGET_MODULE_MAPPING = {
    **TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    "llama": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
}


# ---------------------------------------------------------------------------------------------- PeftType member
def _add_peft_type(name: str) -> PeftType:
    """PEFT lists its methods in a closed str-Enum, PeftType, and register_peft_method accepts only its members. Enum
    has no public way to add one, so this adds it the way the Enum class stores its own members (the class attribute
    and the three member tables); nothing else of PeftType changes. Idempotent (a re-import finds the member)."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = member._value_ = name
    # Enum's own member internals, absent from its type stubs
    member.__objclass__ = PeftType  # type: ignore[attr-defined]
    member._sort_order_ = len(PeftType._member_names_)  # type: ignore[attr-defined]
    type.__setattr__(PeftType, name, member)  # EnumType.__setattr__ refuses member names
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


LIERA = _add_peft_type(PEFT_TYPE)


# ---------------------------------------------------------------------------------------------- config
_LIERA_FIELDS = {f.name: f for f in dataclasses.fields(LieRAConfig)}


def _same_as(name: str, help: str) -> Any:
    """A dataclass field with the default of LieRAConfig's field ``name``: one default, one meaning, in both worlds."""
    source = _LIERA_FIELDS[name]
    if source.default_factory is not dataclasses.MISSING:
        return field(default_factory=source.default_factory, metadata={"help": help})
    return field(default=source.default, metadata={"help": help})


@dataclass
class LieraPeftConfig(PeftConfig):
    """PEFT config of a LieRA adapter: liera's LieRAConfig options (same meaning, same defaults; see its docstring)
    under PEFT's names, plus PEFT's usual targeting options.

    Renamed as in PEFT's LoraConfig: ``liera_alpha`` is LieRAConfig.alpha (D is scaled by liera_alpha / r),
    ``liera_dropout`` is LieRAConfig.dropout (dropout on the input of the update branch, training only).
    PEFT-only: layers_to_transform / layers_pattern (select layers by index), bias ("none", "all", "liera_only":
    biases trained in full), which liera's own config cannot express (to_liera_config refuses them).
    adapted_layers: filled when PEFT builds the adapter: path of each LieraLayer in the model -> the parameter it
    adapts and that parameter's shape (what conversions to liera's format need). requires: the import a reader
    needs before PEFT can load the folder.
    """

    r: int = _same_as("r", "rank of the generator")
    liera_alpha: float = _same_as("alpha", "D is scaled by liera_alpha / r (liera_alpha / sqrt(r) with use_rslora)")
    target_modules: list[str] | set[str] | str | None = _same_as(  # PEFT stores name lists as sets
        "target_modules",
        "module names or suffixes, a full regex, or 'all-linear' | 'all-conv' | 'all' (liera's "
        "rule); None: PEFT's defaults for the model type",
    )
    exclude_modules: list[str] | str | None = _same_as("exclude_modules", "modules left out")
    target_parameters: list[str] | None = _same_as(
        "target_parameters", "parameter tensors of order >= 2 adapted directly (e.g. 'in_proj_weight')"
    )
    exp_map: str = _same_as("exp_map", "'taylor' (W + W*D) or 'exact' (W * exp(D))")
    update: str = _same_as("update", "'multiplicative' (LieRA) or 'additive' (an ablation)")
    generator: str = _same_as("generator", "lora, dora, pissa, milora, loha, lokr, tucker or a registered one")
    generator_kwargs: dict[str, Any] = _same_as("generator_kwargs", "extra arguments of the generator")
    liera_dropout: float = _same_as("dropout", "dropout on the update branch's input (training only)")
    use_rslora: bool = _same_as("use_rslora", "scale by alpha / sqrt(r)")
    init_weights: bool | str = _same_as("init_weights", "True (identity at init), False or 'gaussian'")
    rank_pattern: dict[str, int] = _same_as("rank_pattern", "per-layer r, keyed by module path (PEFT's rule)")
    alpha_pattern: dict[str, float] = _same_as("alpha_pattern", "per-layer alpha, keyed by module path")
    modules_to_save: list[str] | None = _same_as("modules_to_save", "modules trained in full and saved")
    adapter_dtype: str = _same_as("adapter_dtype", "'float32' (on a bf16/fp16 base) or 'base'")
    update_branch: str = _same_as("update_branch", "'merged' or 'float32'")
    layer_scaling: str = _same_as("layer_scaling", "'none' or 'rms'")
    fast_path: bool = _same_as("fast_path", "recompute the effective weight in backward instead of storing it")
    keep_zeros: bool = _same_as(
        "keep_zeros",
        "the zeros of W are intended (a pruned model): keep them exactly; "
        "with update='additive' the update is the masked W + D * (W != 0)",
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "layer indices to adapt (PEFT only)"}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "name of the layer list for layers_to_transform (PEFT only)"}
    )
    bias: str = field(default="none", metadata={"help": "'none', 'all' or 'liera_only' (PEFT only)"})
    adapted_layers: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata={"help": "LieraLayer path -> {'param': name, 'shape': [...]} (filled by LieraTuner)"},
    )
    requires: str = field(default=PEFT_IMPORT, metadata={"help": "what to import before PEFT can load this adapter"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = LIERA
        if isinstance(self.target_parameters, (str, tuple)):
            self.target_parameters = (
                [self.target_parameters] if isinstance(self.target_parameters, str) else list(self.target_parameters)
            )
        if self.bias not in BIASES:
            raise ValueError(f"LieraPeftConfig: bias must be one of {list(BIASES)}, got {self.bias!r}.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("LieraPeftConfig: layers_pattern needs layers_to_transform (the indices to adapt).")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(
                "LieraPeftConfig: layers_to_transform works with a list of target_modules, not a regex or a "
                "shortcut; write the indices into the regex instead."
            )
        try:
            self.adapter_config()  # liera's validation, with its messages
        except ValueError as exc:
            raise ValueError(peft_field_names(str(exc))) from None
        # the folder from_pretrained read this config from: an attribute, not a field (not in adapter_config.json)
        self._loaded_from: Path | None = None

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: PathLike, subfolder: str | None = None, **kwargs: Any
    ) -> LieraPeftConfig:
        """PEFT's config reader; a config read from a local folder remembers it, so that LieraTuner can check the
        folder's tensors against the model before PEFT injects anything (PeftModel.from_pretrained and load_adapter
        read the config first, then inject, then load the tensors)."""
        config = super().from_pretrained(os.fspath(pretrained_model_name_or_path), subfolder=subfolder, **kwargs)
        folder = Path(pretrained_model_name_or_path, subfolder or "")
        if isinstance(config, LieraPeftConfig) and (folder / io.CONFIG_NAME).is_file():
            config._loaded_from = folder
        return config

    def _liera_fields(self) -> dict[str, Any]:
        data = {name: getattr(self, RENAMED.get(name, name)) for name in _LIERA_FIELDS}
        for name in ("target_modules", "exclude_modules"):
            if isinstance(data[name], set):  # PEFT stores name lists as sets
                data[name] = sorted(data[name])
        return data

    def adapter_config(self) -> LieRAConfig:
        """The LieRAConfig that builds this config's adapters. Targets are PEFT's business here (it fills
        target_modules from the model type when None), so none is required."""
        data = self._liera_fields()
        if data["target_modules"] is None and not data["target_parameters"]:
            data["target_modules"] = []
        return LieRAConfig(**data)

    def to_liera_config(self) -> LieRAConfig:
        """The same adapter in liera's own config: liera.get_liera_model(model, config.to_liera_config()) builds
        identical adapters. PEFT-only options (layers_to_transform, bias) have no equivalent there and raise."""
        peft_only = [
            name
            for name, used in (
                ("layers_to_transform", self.layers_to_transform is not None),
                ("bias", self.bias != "none"),
            )
            if used
        ]
        if peft_only:
            raise ValueError(
                f"LieraPeftConfig: {peft_only} have no equivalent in liera's own LieRAConfig; select layers "
                f"with target_modules (a list of paths or a regex) and leave bias='none'."
            )
        return LieRAConfig(**self._liera_fields())

    @classmethod
    def from_liera_config(cls, config: LieRAConfig, **kwargs: Any) -> LieraPeftConfig:
        """The PEFT config of the adapter a LieRAConfig describes (kwargs: PEFT's own fields, e.g. task_type)."""
        return cls(**{RENAMED.get(name, name): getattr(config, name) for name in _LIERA_FIELDS}, **kwargs)


def peft_field_names(message: str) -> str:
    """A message of liera's LieRAConfig in LieraPeftConfig's words: the user of the PEFT method wrote liera_alpha and
    liera_dropout, not alpha and dropout (alpha_pattern keeps its name in both)."""
    message = message.replace("LieRAConfig:", "LieraPeftConfig:")
    return re.sub(r"\b(alpha|dropout)\b", lambda m: RENAMED[m.group(1)], message)


# ---------------------------------------------------------------------------------------------- the layer
class LieraLayer(nn.Module, BaseTunerLayer):
    """PEFT tuner layer of LieRA, one class for every layer kind (Linear, Conv1d/2d/3d incl. grouped and depthwise,
    ConvTranspose, Embedding, GPT-2 Conv1D, and raw parameters through ParamWrapper): it calls its base layer inside
    liera's redirect, so the base layer's own forward runs and its weight is replaced by the effective one.

    ``liera_adapters`` (an AdaptedWeight: adapter name -> generator) owns the adapter state the math uses; PEFT's
    attributes for that state (_active_adapter, _disable_adapters, merged_adapters) read and write it.
    """

    adapter_layer_names = (ADAPTERS,)
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, param_name: str, adapter_name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.param_name = param_name
        self.liera_adapters = AdaptedWeight(param_name)
        self._active_adapter = adapter_name

    # ---- PEFT's state attributes, kept in the AdaptedWeight (PEFT's base class assigns the first two)
    @property
    def _active_adapter(self) -> str | list[str]:
        return self._peft_active

    @_active_adapter.setter
    def _active_adapter(self, names: str | list[str]) -> None:
        self.liera_adapters.activate([names] if isinstance(names, str) else list(names))
        self._peft_active = names  # PEFT keeps every active name; the AdaptedWeight those present here

    @property
    def _disable_adapters(self) -> bool:
        return self.liera_adapters.disabled

    @_disable_adapters.setter
    def _disable_adapters(self, flag: bool) -> None:
        self.liera_adapters.set_disabled(flag)

    @property
    def merged_adapters(self) -> list[str]:
        return self.liera_adapters.merged

    # ---- adapters
    def base_weight(self) -> nn.Parameter:
        """The adapted tensor, on the innermost base layer (parameter wrappers nest)."""
        weight = self.get_base_layer()._parameters[self.param_name]
        assert weight is not None  # update_layer built the adapter on it
        return weight

    def update_layer(self, adapter_name: str, config: LieraPeftConfig, path: str) -> None:
        """Add an adapter built by liera's build_adapter (``path``: the owning module's path, for the patterns)."""
        generator, settings = build_adapter(
            config.adapter_config(), path, self.param_name, float_weight(self.get_base_layer(), self.param_name)
        )
        self.liera_adapters.add(adapter_name, generator.train(self.training), settings)
        self.set_adapter(self.active_adapters)  # as PEFT's layers do: only active adapters require grad

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.liera_adapters:
            self.liera_adapters.remove(adapter_name)
        super().delete_adapter(adapter_name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        base = self.get_base_layer()
        if base is self.base_layer and quantization_of(base, self.param_name) is not None:
            return quantized_forward(base, self.liera_adapters, self.training, *args, **kwargs)
        with redirect(base, [self.liera_adapters], self.training):
            return self.base_layer(*args, **kwargs)

    # ---- merging: the group map in place, undone by the group inverse (no copy of the weight is kept)
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """W <- W * g(D) for the given adapters (default: the active ones), by liera's lifecycle. safe_merge: check
        first (non-finite values, Taylor factors 1 + D near 0 that an unmerge could not undo) and raise before any
        change. (The tuner's merge_adapter and merge_and_unload check every layer before this one merges.)"""
        names = check_adapters_to_merge(self, adapter_names)
        if names:
            lifecycle.merge([self.adapted()], names, safe_merge=safe_merge)

    def adapted(self, path: str = "") -> Adapted:
        """This layer's weight as liera's lifecycle takes it; ``path``: the layer's path in the model (for the key)."""
        key = f"{_unwrapped(path)}.{self.param_name}" if path else self.param_name
        return Adapted(key, self.base_weight(), self.liera_adapters)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        lifecycle.unmerge([self.adapted()])

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: list[str] | None
    ) -> nn.Module:
        """The plain base layer, with this layer's adapters (and those of nested parameter wrappers) merged first
        when ``merge``; PEFT's unload and merge_and_unload call it. Without ``merge`` (unload), merged adapters are
        unmerged first (the group inverse), so that unload gives the base weights back, as LieRAModel.unload does."""
        layer: nn.Module = self
        while isinstance(layer, LieraLayer):
            if merge:  # the tuner merged every layer already (checked all first); this merges what is left, if any
                if layer.liera_adapters.to_merge(adapter_names or layer.active_adapters):
                    layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            elif layer.merged:
                layer.unmerge()
            layer = layer.base_layer
        return layer

    def __repr__(self) -> str:
        return "liera." + super().__repr__()


class ParamWrapper(LieraLayer):
    """A LieraLayer adapting a raw parameter (target_parameters), e.g. MultiheadAttention's in_proj_weight or a 3-D
    expert tensor. PEFT's BaseTuner._inject_parameters finds existing parameter wrappers by this class name and their
    ``parameter_name`` (to add an adapter to one, or to nest one per parameter of a module)."""

    @property
    def parameter_name(self) -> str:
        return self.param_name


# ---------------------------------------------------------------------------------------------- the tuner
def _unwrapped(path: str) -> str:
    """A module path without the tuner layers' ``base_layer`` steps (PEFT's names for the same module)."""
    return ".".join(part for part in path.split(".") if part != BASE_LAYER)


class LieraTuner(BaseTuner):
    """PEFT tuner of LieRA: creates LieraLayers; PEFT's BaseTuner does adapters, merging, unloading and files."""

    prefix: str = PREFIX
    tuner_layer_cls = LieraLayer
    # PEFT annotates dict[str, list[str]], but its own LoRA table (merged here) also holds regex strings
    target_module_mapping = TARGET_MODULE_MAPPING  # type: ignore[assignment]

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        config = self.peft_config[adapter_name]
        assert isinstance(
            config, LieraPeftConfig
        )  # PEFT builds a LieraTuner for peft_type LIERA, i.e. a LieraPeftConfig
        folder = getattr(config, "_loaded_from", None)
        if folder is not None:  # PeftModel.from_pretrained / load_adapter: check the files before any layer exists
            check_peft_folder(model, config, folder)
        super().inject_adapter(model, adapter_name, *args, **kwargs)  # keeps this config object in peft_config
        config.adapted_layers = {
            path: {"param": layer.param_name, "shape": list(layer.liera_adapters.weight_shape)}
            for path, layer in model.named_modules()
            if isinstance(layer, LieraLayer) and adapter_name in layer.liera_adapters
        }

    def _prepare_adapter_config(self, peft_config: LieraPeftConfig, model_config: dict) -> LieraPeftConfig:
        """target_modules None: PEFT's defaults for the model type, or none when target_parameters are given (as
        LoraModel does)."""
        if peft_config.target_modules is None:
            default = self.target_module_mapping.get(model_config["model_type"])
            if default is not None:
                peft_config.target_modules = default if isinstance(default, str) else set(default)
            elif not peft_config.target_parameters:
                raise ValueError(
                    "LieraPeftConfig: set target_modules or target_parameters (no defaults are known for "
                    f"model type {model_config['model_type']!r})."
                )
        return peft_config

    def weights(self) -> list[Adapted]:
        """Every adapted weight of the model as liera's lifecycle takes it (key in the plain model, tensor,
        adapters): the door's merges and activation run liera.lifecycle, as LieRAModel's do."""
        return [layer.adapted(path) for path, layer in self.model.named_modules() if isinstance(layer, LieraLayer)]

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """PEFT's merge_adapter with liera's guarantee: every layer is checked (a quantized base, and with
        safe_merge what a merge could not undo) before any layer merges; a refused merge leaves the model as it was.
        (PEFT's own loop merges layer by layer and would leave the model half merged.)"""
        self._check_merge_allowed()
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        lifecycle.merge(self.weights(), names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> Any:  # PEFT annotates None, but returns the unloaded model (merge_and_unload returns it)
        """merge_and_unload: merge every layer first (all checked before any changes), then PEFT unloads."""
        if merge:
            self._check_merge_allowed()
            names = self.active_adapters if adapter_names is None else list(adapter_names)
            lifecycle.merge(self.weights(), names, safe_merge=safe_merge, warn_merged=False)
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    def _prepare_model(self, peft_config: LieraPeftConfig, model: nn.Module) -> None:
        """liera's target shortcuts ("all-linear", "all-conv", "all") become the modules liera itself adapts (PEFT
        knows only "all-linear", by its own rule)."""
        if isinstance(peft_config.target_modules, str) and peft_config.target_modules in TARGET_SHORTCUTS:
            config = dataclasses.replace(peft_config.adapter_config(), target_parameters=None)
            aux = [name for name, m in model.named_modules() if isinstance(m, AuxiliaryTrainingWrapper)]
            peft_config.target_modules = {
                _unwrapped(t.path)
                for t in find_targets(model, config)
                if not any(t.path.startswith(a + ".") for a in aux)
            }

    def _create_and_replace(
        self,
        peft_config: LieraPeftConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        if parameter_name is None:  # a module: its layer kind names the weight
            path = current_key
            if isinstance(target, LieraLayer):  # another adapter on an adapted module
                layer = target
            else:
                kind = kind_of(target)
                if kind is None:
                    raise ValueError(
                        f"target module {current_key!r} is a {type(target).__name__}, which LieRA cannot adapt as a "
                        f"module. Supported module types: {supported_kinds_text()}. To adapt one of its parameter "
                        f"tensors directly, use target_parameters=[...] (parameters here: "
                        f"{[n for n, _ in target.named_parameters(recurse=False)]})."
                    )
                layer = LieraLayer(target, kind.weight_name, adapter_name)
        else:
            path = current_key.rpartition(".")[0]
            if isinstance(target, ParamWrapper) and target.param_name == parameter_name:
                layer = target
            else:
                base = target.get_base_layer() if isinstance(target, LieraLayer) else target
                param = base._parameters[parameter_name]
                assert param is not None  # PEFT passes a parameter the module holds (from named_parameters)
                if param.dim() < 2:
                    raise ValueError(
                        f"target parameter {current_key!r} has order "
                        f"{param.dim()}; LieRA adapts tensors of order >= 2 "
                        f"(train biases and norms in full via modules_to_save)."
                    )
                layer = ParamWrapper(target, parameter_name, adapter_name)
        layer.update_layer(adapter_name, peft_config, path)
        if layer is not target:
            if adapter_name not in self.active_adapters:
                layer.requires_grad_(False)  # an added adapter is not trainable until set_adapter
            self._replace_module(parent, target_name, layer, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """Swap the module in, nothing more: build_adapter made the adapter tensors on the weight's device, and a
        module unloaded from a LieraLayer is the original one (PEFT's default copies `weight`, which a
        MultiheadAttention or an expert module lacks)."""
        setattr(parent, child_name, new_module)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Nothing to do: liera's adapter_dtype set the adapter tensors' dtype when they were built (float32 on a
        bf16/fp16 base by default; PEFT's autocast would override adapter_dtype="base")."""

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        lifecycle.check_activate(self.weights(), names)  # several adapters must compose: every layer before any change
        super().set_adapter(adapter_name, inference_mode=inference_mode)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """<path>.liera_adapters.<adapter>.<tensor> -> <path>.liera_adapters.<tensor>, also for tensor names with
        dots (the tucker generator's tucker_factors.0), which PEFT's default leaves alone."""
        infix = f".{ADAPTERS}.{adapter_name}."
        if infix in key:
            return key.replace(infix, f".{ADAPTERS}.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)


def _register() -> None:
    """Make PEFT build LieraTuner for a LieraPeftConfig (and read "peft_type": "LIERA" folders). A reload of this module
    registers its new classes in place of the old ones."""
    for table in (PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING):
        table.pop(LIERA, None)
    register_peft_method(name=PEFT_TYPE.lower(), config_cls=LieraPeftConfig, model_cls=LieraTuner, prefix=PREFIX)


_register()


# ---------------------------------------------------------------------------------------------- load checks
def _model_weight(model: nn.Module, path: str, param: str) -> Tensor | None:
    """The parameter ``param`` of the module at ``path`` (inside any LieraLayer already there), None if absent."""
    try:
        module = model.get_submodule(path) if path else model
    except AttributeError:
        return None
    if isinstance(module, LieraLayer):
        module = module.get_base_layer()
    if module._parameters.get(param) is None:
        return None
    return float_weight(module, param)  # a quantized layer's weight as floats: the shapes an adapter is built for


def _generator_shapes(config: LieRAConfig, path: str, param: str, weight: Tensor) -> dict[str, tuple]:
    """Shapes of the adapter tensors liera builds for this weight, built on the meta device (no memory, no init
    cost); on the real weight if a generator cannot be built there."""
    try:
        generator, _ = build_adapter(config, path, param, torch.empty(weight.shape, dtype=weight.dtype, device="meta"))
    except Exception:
        generator, _ = build_adapter(config, path, param, weight)
    return {k: tuple(v.shape) for k, v in generator.state_dict().items()}


def check_peft_folder(model: nn.Module, config: LieraPeftConfig, folder: PathLike) -> None:
    """Check a PEFT-native LieRA folder against ``model`` before any layer is injected: the weights file is
    readable and whole, every adapted weight it records exists in the model with the recorded shape, and its
    adapter tensors are those (names and shapes) liera builds for this config on this model; modules trained in
    full must match the model's parameters. Raise naming the problem and the fix; the model is not touched."""
    folder = Path(folder)
    unchanged = "Nothing was injected: the model is unchanged."
    try:
        shapes = io.read_tensor_shapes(folder)
    except (OSError, ValueError) as exc:
        raise type(exc)(f"{exc} {unchanged}") from exc
    if not config.adapted_layers or getattr(model, "_checkpoint_conversion_mapping", None):
        return  # no record to check against, or transformers renames keys while PEFT loads them
    fix = (
        f"Load {str(folder)!r} on the base model it was trained on, with the adapter_config.json saved with it. "
        f"{unchanged}"
    )
    adapter_config = config.adapter_config()
    expected: dict[str, tuple] = {}
    for layer, info in config.adapted_layers.items():
        path, param = _unwrapped(layer), info["param"]
        weight = _model_weight(model, path, param)
        if weight is None:
            raise ValueError(f"the adapter adapts {path}.{param}, which this model does not have. {fix}")
        if tuple(weight.shape) != tuple(info["shape"]):
            raise ValueError(
                f"the adapter was trained on a model whose {path}.{param} has shape "
                f"{tuple(info['shape'])}; this model's has {tuple(weight.shape)}. {fix}"
            )
        for name, shape in _generator_shapes(adapter_config, path, param, weight).items():
            expected[f"{PEFT_KEY_PREFIX}{layer}.{ADAPTERS}.{name}"] = shape
    infix = f".{ADAPTERS}."
    params = {_unwrapped(k): p for k, p in model.named_parameters()}
    for key, shape in shapes.items():  # modules trained in full: their file shapes against the model's
        p = params.get(key.removeprefix(PEFT_KEY_PREFIX))
        if infix not in key and p is not None and tuple(p.shape) != shape:
            raise ValueError(f"{key} has shape {shape} in the file but {tuple(p.shape)} in this model. {fix}")
    found = {k: torch.empty(s, device="meta") for k, s in shapes.items() if infix in k}
    try:
        io.check_tensors(expected, found, str(folder))
    except ValueError as exc:
        raise ValueError(
            f"{exc} (adapter_config.json says r={config.r}, generator={config.generator!r}: a config "
            f"edited after saving, or files from two adapters, do not fit.) {unchanged}"
        ) from None


# ---------------------------------------------------------------------------------------------- file conversion
def _layer_paths(weight_keys: Sequence[str]) -> dict[str, str]:
    """Adapted weight key -> path of its LieraLayer in PEFT's model, given the keys in build order: PEFT nests one
    wrapper per adapted parameter of a module, the first built innermost (<path>.base_layer...)."""
    by_module: dict[str, list[str]] = {}
    for key in weight_keys:
        path = key.rpartition(".")[0]
        if not path:
            raise ValueError(f"adapted weight {key!r} sits on the top-level module; PEFT cannot wrap it.")
        by_module.setdefault(path, []).append(key)
    return {
        key: path + f".{BASE_LAYER}" * (len(keys) - 1 - i)
        for path, keys in by_module.items()
        for i, key in enumerate(keys)
    }


def _build_order(shapes: dict[str, tuple], base_model: nn.Module | None) -> list[str]:
    """liera's weight keys in the order PEFT builds their layers (within a module: its parameter order)."""
    by_module: dict[str, list[str]] = {}
    for key in shapes:
        by_module.setdefault(key.rpartition(".")[0], []).append(key)
    order = []
    for path, keys in by_module.items():
        if len(keys) > 1:
            if base_model is None:
                raise ValueError(
                    f"module {path!r} has {len(keys)} adapted parameters ({keys}); PEFT nests one wrapper "
                    f"per parameter in the module's parameter order, which the files do not record: pass "
                    f"base_model= (the model the adapter was trained on) to liera_to_peft from Python; "
                    f"the `liera convert` command cannot load your model."
                )
            params = [f"{path}.{name}" for name, _ in base_model.get_submodule(path).named_parameters(recurse=False)]
            keys = [k for k in params if k in keys]
        order += keys
    return order


def _write_peft(directory: PathLike, config: LieraPeftConfig, tensors: dict[str, Tensor]) -> None:
    data = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    io.write_folder(directory, json.dumps(data, indent=2, sort_keys=True), tensors)


def _read_peft(directory: PathLike) -> tuple[LieraPeftConfig, dict[str, Tensor]]:
    data, tensors = io.read_folder(directory)
    if data.get("peft_type") != PEFT_TYPE:
        raise ValueError(
            f"{str(directory)!r} holds a {data.get('peft_type') or data.get('library')!r} adapter, not a "
            f"PEFT-native LieRA adapter (peft_type {PEFT_TYPE!r})."
        )
    return LieraPeftConfig.from_peft_type(**data), tensors


def liera_to_peft(liera_adapter_dir: PathLike, out_dir: PathLike, base_model: nn.Module | None = None) -> None:
    """Write a liera adapter folder (LieRAModel.save_pretrained) as a PEFT-native LieRA folder with the same tensors:
    PeftModel.from_pretrained(model, out_dir) then gives the outputs of LieRAModel.from_pretrained(model, folder).
    base_model is needed only when one module has several adapted parameters (to order PEFT's nested wrappers)."""
    io.check_not_input(liera_adapter_dir, out_dir, "liera_to_peft")
    config, grouped, shapes, saved = adapters_by_weight(liera_adapter_dir)
    order = _build_order(shapes, base_model)
    layers = _layer_paths(order)
    tensors = {
        f"{PEFT_KEY_PREFIX}{layers[key]}.{ADAPTERS}.{name}": t
        for key, state in grouped.items()
        for name, t in state.items()
    }
    tensors.update({PEFT_KEY_PREFIX + key: t for key, t in saved.items()})
    adapted = {layers[key]: {"param": key.rpartition(".")[2], "shape": list(shapes[key])} for key in order}
    peft_config = LieraPeftConfig.from_liera_config(config, adapted_layers=adapted)
    _write_peft(out_dir, peft_config, tensors)


def peft_to_liera(peft_dir: PathLike, out_dir: PathLike) -> None:
    """Write a PEFT-native LieRA folder as a liera adapter folder with the same tensors (LieRAModel.from_pretrained,
    `liera merge` and `liera inspect` read it). Entries PEFT adds that liera does not keep (embedding base weights
    saved with save_embedding_layers) are left out."""
    io.check_not_input(peft_dir, out_dir, "peft_to_liera")
    config, tensors = _read_peft(peft_dir)
    if not config.adapted_layers:
        raise ValueError(
            f"{peft_dir}: adapter_config.json has no adapted_layers (LieraTuner records them); the "
            f"folder was not written by this PEFT method."
        )
    by_layer = {layer: f"{_unwrapped(layer)}.{info['param']}" for layer, info in config.adapted_layers.items()}
    out, dropped = {}, []
    infix = f".{ADAPTERS}."
    for key, t in tensors.items():
        body = key.removeprefix(PEFT_KEY_PREFIX)
        layer, found, name = body.partition(infix)
        if found and layer in by_layer:
            out[f"{by_layer[layer]}.{name}"] = t
        elif any(
            name_matches(body.rsplit(".", i)[0], config.modules_to_save or []) for i in range(1, body.count(".") + 1)
        ):
            out[SAVED + body] = t
        else:
            dropped.append(key)
    if dropped:
        warnings.warn(
            f"peft_to_liera: left out {len(dropped)} tensors liera's format does not keep (e.g. {dropped[:3]}).",
            stacklevel=2,
        )
    io.save_adapter_files(
        out_dir,
        config.to_liera_config(),
        out,
        weight_shapes={by_layer[layer]: tuple(info["shape"]) for layer, info in config.adapted_layers.items()},
    )


# ---------------------------------------------------------------------------------------------- old names
DEPRECATED_NAMES = {"LieraConfig": "LieraPeftConfig", "LieraModel": "LieraTuner"}


def __getattr__(name: str) -> Any:
    """The names this door had until 2026-12 (they differed from liera's own LieRAConfig / LieRAModel by capitals
    only), with a DeprecationWarning."""
    if name in DEPRECATED_NAMES:
        new = DEPRECATED_NAMES[name]
        warnings.warn(
            f"liera.integrations.peft.{name} is now {new}: the name says it is PEFT's door (liera's own API has "
            f"LieRAConfig / LieRAModel). The old name will be removed; import {new} instead.",
            DeprecationWarning,
            stacklevel=2,
        )
        return globals()[new]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
