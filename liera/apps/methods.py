"""The method table: every training method the applications know, in one place.

A method is a name ("liera-rms"), a label for tables and plots, a family (how it is set up), the
``LieRAConfig`` keyword arguments that make it (liera's methods) or the PEFT config it builds (PEFT's), and a
default learning rate per domain. The CLI's choices and help, the demo's arms, ``liera finetune``, the training
loops, the experiments and the benchmarks all read this table; adding a method is one entry here.

The default rates are starting points, each chosen on a validation split of one task per domain (never on a
test set): ``image`` on Fashion-MNIST-1k with EfficientNet-Lite0, all convolutions (docs/results.md); ``text``
common transformer values (docs/results-language.md); ``lm`` SmolLM2-135M on the knowledge task
(docs/results-llm.md), and per language-model task the study's own choice (LM_TASK_RATES, read by `liera
finetune` and examples/smollm2_liera.py alike). PEFT's arms take the rate of liera's arm with the same math.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import LieRAConfig
from ..group import ADDITIVE, EXACT, EXP_MAPS, MULTIPLICATIVE, TAYLOR

LIERA, PEFT, PROBE, FULL = "liera", "peft", "probe", "full"
DOMAINS = ("image", "text", "lm")


@dataclass(frozen=True)
class Method:
    """One training method. ``options``: LieRAConfig keyword arguments (family liera) or the PEFT method and
    its config switches (family peft: {"peft": "lora" | "hira", ...})."""

    name: str
    label: str
    family: str
    options: Mapping[str, Any] = field(default_factory=dict)
    rates: Mapping[str, float] = field(default_factory=dict)

    @property
    def adapts(self) -> bool:
        """Whether the method trains an adapter (and so has a rank and target modules)."""
        return self.family in (LIERA, PEFT)

    @property
    def multiplicative(self) -> bool:
        return self.family == LIERA and self.options.get("update", MULTIPLICATIVE) == MULTIPLICATIVE

    def rate(self, domain: str, task: str | None = None) -> float:
        """The default rate: the study's choice for ``task`` where it made one (LM_TASK_RATES), else the domain's."""
        if task is not None and self.name in LM_TASK_RATES.get(task, {}):
            return LM_TASK_RATES[task][self.name]
        if domain not in self.rates:
            raise ValueError(
                f"method {self.name!r} has no default learning rate for {domain!r} "
                f"(it has {sorted(self.rates)}); pass one (--lr)."
            )
        return self.rates[domain]

    def liera_config(self, **fields: Any) -> LieRAConfig:
        """The LieRAConfig of this method with the caller's fields (targets, r, alpha, ...)."""
        if self.family != LIERA:
            raise ValueError(f"method {self.name!r} is not one of liera's adapters (family {self.family!r}).")
        return LieRAConfig(**{**fields, **self.options})

    def with_exp_map(self, exp_map: str | None) -> Method:
        """This method under another exp map: a table entry when one matches (liera-taylor -> liera-exact), else
        the same method with its map replaced (liera-rms keeps its scaling)."""
        if exp_map is None or self.options.get("exp_map", TAYLOR) == exp_map:
            return self
        if not self.multiplicative:
            raise ValueError(
                f"an exp map applies to LieRA's multiplicative methods "
                f"({', '.join(names(multiplicative=True))}), not to {self.name!r}."
            )
        if exp_map not in EXP_MAPS:
            raise ValueError(f"unknown exp map {exp_map!r}; use one of {list(EXP_MAPS)}.")
        options = {**self.options, "exp_map": exp_map}
        for method in METHODS.values():
            if method.family == LIERA and dict(method.options) == options:
                return method
        return dataclasses.replace(self, label=f"{self.label}, {exp_map} map", options=options)


# The LLM study's rates, each arm's chosen on the task's validation split with SmolLM2-135M (docs/results-llm.md);
# experiments/records/llm/<task>-chosen.json holds the same numbers (tests/apps/test_lm.py compares them).
LM_TASK_RATES: dict[str, dict[str, float]] = {
    "wordnet-isa": {
        "lora": 3e-3,
        "liera-taylor": 1e-2,
        "liera-exact": 1e-2,
        "liera-rms": 3e-3,
        "peft-lora": 1e-3,
        "peft-dora": 1e-3,
        "peft-hira": 1e-2,
    },
    "drug-reviews": {
        "lora": 1e-3,
        "liera-taylor": 3e-3,
        "liera-exact": 3e-3,
        "liera-rms": 3e-3,
        "peft-lora": 1e-3,
        "peft-dora": 1e-3,
        "peft-hira": 1e-2,
    },
}

_TABLE = [
    Method("linear-probe", "linear probe", PROBE, rates={"image": 3e-2, "text": 1e-2}),
    Method(
        "lora", "LoRA (liera, additive update)", LIERA, {"update": ADDITIVE}, {"image": 3e-3, "text": 1e-3, "lm": 3e-3}
    ),
    Method(
        "liera-taylor",
        "LieRA-Taylor (the paper's form)",
        LIERA,
        {"exp_map": TAYLOR},
        {"image": 1e-3, "text": 3e-3, "lm": 1e-2},
    ),
    Method("liera-exact", "LieRA-exact", LIERA, {"exp_map": EXACT}, {"image": 1e-3, "text": 3e-3, "lm": 1e-2}),
    Method(
        "liera-rms",
        "LieRA-Taylor + rms scaling",
        LIERA,
        {"exp_map": TAYLOR, "layer_scaling": "rms"},
        {"image": 3e-3, "text": 1e-3, "lm": 3e-3},
    ),
    Method("full", "full fine-tuning", FULL, rates={"image": 3e-4, "text": 5e-5, "lm": 5e-5}),
    Method("peft-lora", "PEFT LoRA", PEFT, {"peft": "lora"}, {"image": 3e-3, "text": 1e-3, "lm": 1e-3}),
    Method("peft-dora", "PEFT DoRA", PEFT, {"peft": "lora", "use_dora": True}, {"text": 1e-3, "lm": 1e-3}),
    Method("peft-hira", "PEFT HiRA (LieRA-Taylor math)", PEFT, {"peft": "hira"}, {"text": 3e-3, "lm": 1e-2}),
]
METHODS: dict[str, Method] = {m.name: m for m in _TABLE}


def get_method(name: str) -> Method:
    """The method called ``name``; the one place an unknown name is rejected."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}.") from None


def names(
    *,
    family: str | None = None,
    domain: str | None = None,
    multiplicative: bool | None = None,
    adapts: bool | None = None,
) -> tuple[str, ...]:
    """Method names in table order, filtered by family, by having a default rate for a domain, and so on."""
    return tuple(
        m.name
        for m in _TABLE
        if (family is None or m.family == family)
        and (domain is None or domain in m.rates)
        and (multiplicative is None or m.multiplicative == multiplicative)
        and (adapts is None or m.adapts == adapts)
    )


def label(name: str) -> str:
    """The label of a method name; an arm name such as "lora@dw" keeps its suffix."""
    base, at, rest = name.partition("@")
    return (METHODS[base].label if base in METHODS else base) + (f" @{rest}" if at else "")
