"""LieRAConfig: what to adapt and how, validated up front, with a JSON round trip."""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .group import EXP_MAPS, UPDATES

LIBRARY = "liera"
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
    """

    r: int = 8
    alpha: float = 8.0
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    target_parameters: Optional[list[str]] = None
    exp_map: str = "taylor"
    update: str = "multiplicative"
    generator: str = "lora"
    generator_kwargs: dict[str, Any] = field(default_factory=dict)
    dropout: float = 0.0
    use_rslora: bool = False
    init_weights: Union[bool, str] = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: Optional[list[str]] = None
    adapter_dtype: str = "float32"
    update_branch: str = "merged"
    fast_path: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.target_parameters, (tuple, str)):
            self.target_parameters = [self.target_parameters] if isinstance(self.target_parameters, str) else list(self.target_parameters)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError naming the bad field and what would be accepted."""
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LieRAConfig: r must be a positive integer, got {self.r!r}; try r=8.")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LieRAConfig: alpha must be a positive number, got {self.alpha!r}; a common choice is alpha = 2 * r.")
        if self.exp_map not in EXP_MAPS:
            raise ValueError(f"LieRAConfig: unknown exp_map {self.exp_map!r}; use one of {list(EXP_MAPS)} ('taylor' is the paper's LieRA).")
        if self.update not in UPDATES:
            raise ValueError(f"LieRAConfig: unknown update {self.update!r}; use one of {list(UPDATES)}.")
        if not (0.0 <= float(self.dropout) < 1.0):
            raise ValueError(f"LieRAConfig: dropout must be in [0, 1), got {self.dropout!r}.")
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise ValueError(f"LieRAConfig: adapter_dtype must be one of {list(ADAPTER_DTYPES)}, got {self.adapter_dtype!r}.")
        if self.update_branch not in UPDATE_BRANCHES:
            raise ValueError(f"LieRAConfig: update_branch must be one of {list(UPDATE_BRANCHES)}, got {self.update_branch!r}; "
                             "'float32' keeps small updates on a bf16/fp16 base at the cost of one float32 op.")
        if self.init_weights not in (True, False, "gaussian"):
            raise ValueError(f"LieRAConfig: init_weights must be True, False or 'gaussian', got {self.init_weights!r}.")
        if self.target_modules is None and not self.target_parameters:
            raise ValueError("LieRAConfig: nothing to adapt; set target_modules (names, a regex, or 'all-linear' / 'all-conv' / 'all') "
                             "or target_parameters.")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                if value not in TARGET_SHORTCUTS:
                    try:
                        re.compile(value)
                    except re.error as exc:
                        raise ValueError(f"LieRAConfig: {name} {value!r} is not a valid regex ({exc}); pass a list of names instead.") from exc
            elif value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise ValueError(f"LieRAConfig: {name} must be a list of module names, a regex string or None, got {value!r}.")
        for key, value in self.rank_pattern.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"LieRAConfig: rank_pattern[{key!r}] must be a positive integer, got {value!r}.")
        for key, value in self.alpha_pattern.items():
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"LieRAConfig: alpha_pattern[{key!r}] must be a positive number, got {value!r}.")
        from .generators import get_generator  # late import: generators import nothing from config

        get_generator(self.generator)  # raises with the list of known generators

    # ------------------------------------------------------------------ per-layer values
    def rank_for(self, name: str) -> int:
        return _pattern_value(self.rank_pattern, name, self.r)

    def alpha_for(self, name: str) -> float:
        return float(_pattern_value(self.alpha_pattern, name, self.alpha))

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        from . import __version__

        data = dataclasses.asdict(self)
        data["library"] = LIBRARY
        data["liera_version"] = __version__
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LieRAConfig":
        from . import __version__

        data = dict(data)
        library = data.pop("library", None)
        if library != LIBRARY:
            kind = data.get("peft_type") or library or "unknown"
            raise ValueError(f"this adapter config belongs to {kind!r}, not liera; load it with that library "
                             f"(or liera.import_peft for a PEFT HiRA adapter).")
        version = str(data.pop("liera_version", "0"))
        if version.split(".")[0] != __version__.split(".")[0]:
            raise ValueError(f"adapter was saved by liera {version}, which is not compatible with liera {__version__} "
                             f"(major versions differ); install liera=={version.split('.')[0]}.* to load it.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"adapter config has unknown fields {unknown}; it may come from a newer liera.")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "LieRAConfig":
        return cls.from_dict(json.loads(text))


def _pattern_value(pattern: dict, name: str, default):
    """PEFT-style pattern lookup: a key matches a module name as a suffix or as a full regex."""
    for key, value in pattern.items():
        if name == key or name.endswith("." + key) or re.fullmatch(key, name):
            return value
    return default
