"""LieRAConfig: what to adapt and how, validated up front, with a JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .generators import check_layer_scaling, get_generator
from .group import MULTIPLICATIVE, TAYLOR, check_update, exp_map
from .names import pattern_matches, warn_user
from .version import __version__

LIBRARY = "liera"
# peft_type of a LieRA adapter written by PEFT itself (the PEFT method in liera.integrations.peft); liera's own
# loaders point such a folder to PEFT instead of reading it
PEFT_TYPE = "LIERA"
PEFT_IMPORT = "import liera.integrations.peft"
TARGET_SHORTCUTS = ("all-linear", "all-conv", "all")
ADAPTER_DTYPES = ("float32", "base")
UPDATE_BRANCHES = ("merged", "float32")


@dataclass
class LieRAConfig:
    """Configuration of one LieRA adapter (field names follow PEFT's LoraConfig where they overlap).

    r, alpha: rank and scale of the generator; the scale is alpha / r (alpha / sqrt(r) with use_rslora).
    target_modules: exact names or name suffixes, a regex (full match), or "all-linear" | "all-conv" | "all".
    target_parameters: names or suffixes of parameter tensors of order >= 2 to adapt directly
        (for example "in_proj_weight" of nn.MultiheadAttention, or a 3-D expert tensor).
    exp_map: "taylor" (W + W*D, the paper's LieRA) or "exact" (W * exp(D)).
    update: "multiplicative" (LieRA) or "additive" (W + D, i.e. LoRA with the same generator; an ablation).
    generator: name of a registered generator ("lora", ...) and generator_kwargs for it.
    dropout: dropout on the input of the update branch (as in LoRA), training only.
    modules_to_save: modules trained in full and stored with the adapter (a classifier head, say).
    adapter_dtype: "float32" keeps adapter tensors in float32 on a bf16/fp16 base; "base" uses its dtype.
    update_branch: "merged" (default) runs one op with W_eff rounded to W's dtype; "float32" runs
        op(x, W) + op(x, W_eff - W) with the second op in float32 (or wider) and one rounding of the sum, as
        PEFT's HiRA does: on a bf16/fp16 base it keeps about twice as much of a small update, for one more
        full-size float32 op (no gain on a float32 base; docs/lifecycle.md has the measurement).
    layer_scaling: "none" (default, the paper's LieRA) or "rms": D is multiplied by 1 / rms(W) of its layer, so
        that W * D moves each weight by about (|W| / rms(W)) * D, as LoRA's W + D does, whatever the layer's
        weight scale; one learning rate then suits layers whose weights differ 10x in scale. The factor is
        fixed when the adapter is created and saved with it (docs/concepts.md has the reasoning).
    keep_zeros: the zeros of the adapted weights are intended (a pruned model): every entry where W == 0 stays
        exactly zero through training, merge, unmerge, merge_and_unload, `liera merge` and PEFT's path. The
        multiplicative update keeps them by construction; the additive one becomes the masked W + D * (W != 0)
        (SQFT / masked LoRA). Adding such an adapter reports the sparsity instead of warning that zeros cannot move.
    rank_pattern, alpha_pattern: per-layer r and alpha, keyed like PEFT by module path (exact, suffix after a
        '.', or a full regex), e.g. {"encoder.layer.0.attention.self.query": 16}; for target_parameters the
        key may also name the parameter ("attn.in_proj_weight").
    """

    r: int = 8
    alpha: float = 8.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    target_parameters: list[str] | None = None
    exp_map: str = TAYLOR
    update: str = MULTIPLICATIVE
    generator: str = "lora"
    generator_kwargs: dict[str, Any] = field(default_factory=dict)
    dropout: float = 0.0
    use_rslora: bool = False
    init_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None
    adapter_dtype: str = "float32"
    update_branch: str = "merged"
    layer_scaling: str = "none"
    fast_path: bool = True
    keep_zeros: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.target_parameters, (tuple, str)):
            parameters = self.target_parameters
            self.target_parameters = [parameters] if isinstance(parameters, str) else list(parameters)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError naming the bad field and what would be accepted."""
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LieRAConfig: r must be a positive integer, got {self.r!r}; try r=8.")
        if (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, (int, float))
            or not math.isfinite(self.alpha)
            or self.alpha <= 0
        ):
            raise ValueError(
                f"LieRAConfig: alpha must be a positive number, got {self.alpha!r}; a common choice is alpha = 2 * r."
            )
        try:
            exp_map(self.exp_map)
            check_update(self.update)
        except ValueError as exc:
            raise ValueError(f"LieRAConfig: {exc}") from None
        if not (0.0 <= float(self.dropout) < 1.0):
            raise ValueError(f"LieRAConfig: dropout must be in [0, 1), got {self.dropout!r}.")
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise ValueError(
                f"LieRAConfig: adapter_dtype must be one of {list(ADAPTER_DTYPES)}, got {self.adapter_dtype!r}."
            )
        if self.update_branch not in UPDATE_BRANCHES:
            raise ValueError(
                f"LieRAConfig: update_branch must be one of {list(UPDATE_BRANCHES)}, got "
                f"{self.update_branch!r}; 'float32' keeps small updates on a bf16/fp16 base at the cost "
                f"of one float32 op."
            )
        check_layer_scaling(self.layer_scaling, "LieRAConfig")
        if not isinstance(self.keep_zeros, bool):
            raise ValueError(
                f"LieRAConfig: keep_zeros must be True or False, got {self.keep_zeros!r}; True says the "
                f"zeros of the adapted weights are intended (a pruned model) and keeps them exactly."
            )
        if self.init_weights not in (True, False, "gaussian"):
            raise ValueError(f"LieRAConfig: init_weights must be True, False or 'gaussian', got {self.init_weights!r}.")
        if self.target_modules is None and not self.target_parameters:
            raise ValueError(
                "LieRAConfig: nothing to adapt; set target_modules (names, a regex, or 'all-linear' / "
                "'all-conv' / 'all') or target_parameters."
            )
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                if value not in TARGET_SHORTCUTS:
                    try:
                        re.compile(value)
                    except re.error as exc:
                        raise ValueError(
                            f"LieRAConfig: {name} {value!r} is not a valid regex ({exc}); pass a list of names instead."
                        ) from exc
            elif value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise ValueError(
                    f"LieRAConfig: {name} must be a list of module names, a regex string or None, got {value!r}."
                )
        for key, value in self.rank_pattern.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"LieRAConfig: rank_pattern[{key!r}] must be a positive integer, got {value!r}.")
        for key, value in self.alpha_pattern.items():
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"LieRAConfig: alpha_pattern[{key!r}] must be a positive number, got {value!r}.")
        get_generator(self.generator)  # raises with the list of known generators

    # ------------------------------------------------------------------ per-layer values
    def rank_for(self, path: str, param_name: str = "weight") -> int:
        """r for the weight ``param_name`` of the module at ``path`` (rank_pattern, else r)."""
        return _pattern_value(self.rank_pattern, "rank_pattern", path, param_name, self.r)

    def alpha_for(self, path: str, param_name: str = "weight") -> float:
        """alpha for the weight ``param_name`` of the module at ``path`` (alpha_pattern, else alpha)."""
        return float(_pattern_value(self.alpha_pattern, "alpha_pattern", path, param_name, self.alpha))

    def unmatched_patterns(self, weights: list[tuple[str, str]]) -> dict[str, list[str]]:
        """Pattern keys that match none of the given (module path, parameter name) targets, by field."""
        out = {}
        for field_name in ("rank_pattern", "alpha_pattern"):
            keys = [
                k
                for k in getattr(self, field_name)
                if not any(_key_matches(k, path, param)[0] for path, param in weights)
            ]
            if keys:
                out[field_name] = keys
        return out

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["library"] = LIBRARY
        data["liera_version"] = __version__
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LieRAConfig:
        data = dict(data)
        library = data.pop("library", None)
        if data.get("peft_type") == PEFT_TYPE:
            raise ValueError(
                f"this is a PEFT-native LieRA adapter (peft_type {PEFT_TYPE!r}, written by PEFT's "
                f"save_pretrained), not a liera adapter folder: load it with PEFT after `{PEFT_IMPORT}` "
                f"(then peft.PeftModel.from_pretrained(model, path)), or convert it to liera's format "
                f"(`liera convert PATH --to liera --out DIR`, or liera.integrations.peft.peft_to_liera)."
            )
        if library != LIBRARY:
            kind = data.get("peft_type") or library or "unknown"
            raise ValueError(
                f"this adapter config belongs to {kind!r}, not liera; load it with that library "
                f"(or liera.import_peft for a PEFT HiRA adapter)."
            )
        version = str(data.pop("liera_version", "0"))
        if version.split(".")[0] != __version__.split(".")[0]:
            raise ValueError(
                f"adapter was saved by liera {version}, which is not compatible with liera {__version__} "
                f"(major versions differ); install liera=={version.split('.')[0]}.* to load it."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"adapter config has unknown fields {unknown}; it may come from a newer liera.")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LieRAConfig:
        return cls.from_dict(json.loads(text))


def _key_matches(key: str, path: str, param_name: str) -> tuple[bool, bool]:
    """(matches, by the deprecated weight-key form). Keys name module paths, as in PEFT; a target parameter
    (anything but a module's "weight") may also be named by its own full name."""
    if pattern_matches(key, path):
        return True, False
    full = f"{path}.{param_name}" if path else param_name
    if pattern_matches(key, full):
        return True, param_name == "weight"
    return False, False


def _pattern_value(pattern: dict, field_name: str, path: str, param_name: str, default):
    """PEFT-style pattern lookup: the first key that matches the module path (exact, suffix, full regex)."""
    for key, value in pattern.items():
        hit, old_form = _key_matches(key, path, param_name)
        if hit:
            if old_form:
                warn_user(
                    f"{field_name} key {key!r} names the weight ({path}.{param_name}); keys name module paths, "
                    f"as in PEFT: use {path!r}. The weight form still works but will be removed.",
                    FutureWarning,
                )
            return value
    return default
