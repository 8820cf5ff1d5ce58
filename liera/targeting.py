"""Which tensors of a model a config touches: the weights it adapts (``find_targets``, and ``plan_adapter`` with
the generator each one gets) and the parameters it trains in full (``saved_parameters``, modules_to_save).
Nothing here changes the model: LieRAModel attaches a plan only after every check passed."""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass

from torch import Tensor, nn

from .config import TARGET_SHORTCUTS, LieRAConfig
from .generators import Generator
from .layers import LayerKind, kind_of, supported_kinds_text
from .layers.base import WeightLayout
from .names import name_matches, warn_user
from .sparsity import LayerSparsity, layer_sparsity, sparsity_report
from .weight import ADAPTER_PREFIX, AdaptedWeight, AdapterSettings, build_adapter, float_weight, is_sharded

MODULES_TO_SAVE = "modules_to_save"  # file keys of tensors trained in full: "modules_to_save.<path>.<name>"


@dataclass
class Target:
    """One weight to adapt: ``owner.<param_name>``, addressed as ``path`` (module path) in the model."""

    path: str
    owner: nn.Module
    param_name: str
    kind: LayerKind | None  # None for target_parameters on modules without a layer kind

    @property
    def key(self) -> str:
        """The weight's full name, also used for rank/alpha patterns and file keys."""
        return f"{self.path}.{self.param_name}" if self.path else self.param_name

    @property
    def weight(self) -> Tensor:
        weight = self.owner._parameters[self.param_name]
        assert weight is not None  # find_targets keeps only weights that are set
        return weight

    @property
    def values(self) -> Tensor:
        """The weight as floats (a quantized layer's dequantized weight): what an adapter is built for."""
        return float_weight(self.owner, self.param_name)

    @property
    def input_axis(self) -> int:
        """The weight's axis of inputs, along which N:M groups run: 1, or 0 for (in, out) layouts (GPT-2's Conv1D,
        transposed convolutions)."""
        transposed = getattr(self.owner, "transposed", False) is True
        return 0 if transposed or (self.kind is not None and self.kind.layout == WeightLayout.IN_OUT) else 1


def _named_modules(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, (AdaptedWeight, Generator)) or f".{ADAPTER_PREFIX}" in f".{name}":
            continue
        yield name, module


def _output_head(model: nn.Module) -> nn.Module | None:
    """The layer the "all-*" shortcuts leave out (as PEFT does): a transformers-style model's output
    embeddings (none for an encoder such as BertModel), else the last linear-like layer (a plain model's head)."""
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except (NotImplementedError, AttributeError):
            head = None
        return head if isinstance(head, nn.Module) else None
    last = None
    for _, module in _named_modules(model):
        kind = kind_of(module)
        if kind is not None and kind.category == "linear":
            last = module
    return last


def _shortcut_matches(shortcut: str, module: nn.Module, head: nn.Module | None) -> bool:
    kind = kind_of(module)
    if kind is None or module is head:
        return False
    if shortcut == "all-linear":
        return kind.category == "linear"
    if shortcut == "all-conv":
        return kind.category == "conv"
    return True  # "all"


def _closest(wanted: list[str], names: list[str]) -> str:
    pool = sorted(set(names) | {n.rsplit(".", 1)[-1] for n in names})
    hints = []
    for w in wanted:
        hints += difflib.get_close_matches(w, pool, n=5, cutoff=0.4)
    hints = list(dict.fromkeys(hints))[:8] or pool[:8]
    return ", ".join(hints)


def find_targets(model: nn.Module, config: LieRAConfig, strict: bool = False) -> list[Target]:
    """All weights the config adapts, in model order. Raises ValueError with a fix for bad targets. An entry of a
    target_modules list that matches no module warns with the closest names (raises with ``strict``), since a
    typo would otherwise leave a layer silently unadapted."""
    modules = list(_named_modules(model))
    spec, exclude = config.target_modules, config.exclude_modules
    head = _output_head(model) if spec in TARGET_SHORTCUTS else None
    trained_in_full = config.modules_to_save or []
    targets: list[Target] = []
    seen: set[tuple[int, str]] = set()
    for name, module in modules:
        if not name or spec is None:
            continue
        if exclude is not None and (
            _shortcut_matches(exclude, module, None) if exclude in TARGET_SHORTCUTS else name_matches(name, exclude)
        ):
            continue
        if spec in TARGET_SHORTCUTS:
            # a shortcut never adapts a module that is trained in full anyway (a classifier head, say)
            if not _shortcut_matches(spec, module, head) or name_matches(name, trained_in_full):
                continue
        elif not name_matches(name, spec):
            continue
        kind = kind_of(module)
        if kind is None:
            raise ValueError(
                f"target module {name!r} is a {type(module).__name__}, which liera cannot adapt as a module. "
                f"Supported module types: {supported_kinds_text()}. To adapt one of its parameter tensors directly, "
                f"use target_parameters=[...] (parameters here: "
                f"{[n for n, _ in module.named_parameters(recurse=False)]}); "
                f"to target its children, name them (for example {name!r} + '.<child>')."
            )
        if kind.weight_name not in module._parameters or module._parameters[kind.weight_name] is None:
            continue
        targets.append(Target(name, module, kind.weight_name, kind))
        seen.add((id(module), kind.weight_name))

    for wanted in config.target_parameters or []:
        found = False
        for name, module in modules:
            for pname, param in module.named_parameters(recurse=False):
                full = f"{name}.{pname}" if name else pname
                if not name_matches(full, [wanted]):
                    continue
                found = True
                if param.dim() < 2:
                    raise ValueError(
                        f"target parameter {full!r} has order {param.dim()} (shape {tuple(param.shape)}); "
                        f"LieRA adapts tensors of order >= 2. Leave it out of target_parameters "
                        f"(biases and norms are better trained in full via modules_to_save)."
                    )
                if (id(module), pname) not in seen:
                    targets.append(Target(name, module, pname, kind_of(module)))
                    seen.add((id(module), pname))
        if not found:
            names = [f"{n}.{p}" if n else p for n, m in modules for p, _ in m.named_parameters(recurse=False)]
            raise ValueError(
                f"target_parameters entry {wanted!r} matches no parameter of the model; "
                f"closest parameter names: {_closest([wanted], names)}."
            )

    if targets and isinstance(spec, list):
        names = [n for n, _ in modules if n]
        unused = [w for w in spec if not any(name_matches(n, [w]) for n in names)]
        if unused:
            message = (
                f"target_modules entries {unused} match no module of {type(model).__name__} (the other entries "
                f"adapt {len(targets)} weights); closest module names: {_closest(unused, names)}."
            )
            if strict:
                raise ValueError(message)
            warn_user(message + " Pass strict=True to make this an error.")
    if not targets:
        asked = spec if isinstance(spec, list) else [str(spec)]
        raise ValueError(
            f"target_modules={spec!r} matches no supported module of {type(model).__name__}"
            f"{' after exclude_modules' if exclude else ''}. Closest module names: "
            f"{_closest(asked, [n for n, _ in modules if n])}. Supported module types: "
            f"{supported_kinds_text()}."
        )
    return targets


def saved_modules(model: nn.Module, config: LieRAConfig) -> dict[str, nn.Module]:
    """path -> module for the config's modules_to_save (trained in full, stored with the adapter)."""
    found = {}
    for wanted in config.modules_to_save or []:
        hits = {n: m for n, m in _named_modules(model) if n and name_matches(n, [wanted])}  # never liera's copies
        if not hits:
            raise ValueError(
                f"modules_to_save entry {wanted!r} matches no module of the model; closest module names: "
                f"{_closest([wanted], [n for n, _ in _named_modules(model) if n])}."
            )
        found.update(hits)
    return found


def saved_parameters(model: nn.Module, config: LieRAConfig) -> dict[str, nn.Parameter]:
    """File key -> parameter of the modules trained in full (their own, never liera's adapter tensors)."""
    out = {}
    for path, module in saved_modules(model, config).items():
        for pname, p in module.named_parameters():
            if not any(part.startswith(ADAPTER_PREFIX) for part in pname.split(".")):
                out[f"{MODULES_TO_SAVE}.{path}.{pname}"] = p
    return out


def warn_zero_entries(targets: list[Target]) -> bool:
    """Warn (and return True) if some adapted entries are exactly zero: a multiplicative update cannot move them."""
    counts, total = {}, 0
    for t in targets:  # one pass over each weight (dequantized once for a quantized layer)
        values = t.values
        counts[t.key], total = int((values == 0).sum()), total + values.numel()
    layers = [f"{key} ({n})" for key, n in counts.items() if n]
    zeros = sum(counts.values())
    if zeros:
        warn_user(
            f"liera: {zeros:,d} of {total:,d} adapted weight entries ({100 * zeros / total:.3f}%) are exactly "
            f"zero and cannot move under a multiplicative update. Layers: {', '.join(layers[:8])}"
            f"{' ...' if len(layers) > 8 else ''}."
        )
    return bool(zeros)


def target_sparsity(targets: list[Target]) -> list[LayerSparsity]:
    """Zeros and N:M validity of each target's weight (N:M groups along its input axis)."""
    return [layer_sparsity(t.key, t.values, dim=t.input_axis) for t in targets]


def model_sparsity(
    model: nn.Module, target_modules: str | list[str] | None = None, exclude_modules: str | list[str] | None = None
) -> list[LayerSparsity]:
    """Zeros and N:M validity of the weights that ``target_modules`` names (None: the weight of every module of a
    kind liera knows, heads included), as they are now: after a merge, what a deployment gets."""
    if target_modules is None:
        targets = [
            Target(name, module, kind.weight_name, kind)
            for name, module in _named_modules(model)
            for kind in [kind_of(module)]
            if kind is not None and module._parameters.get(kind.weight_name) is not None
        ]
    else:
        targets = find_targets(model, LieRAConfig(target_modules=target_modules, exclude_modules=exclude_modules))
    return target_sparsity(targets)


def report_zero_entries(targets: list[Target]) -> list[LayerSparsity]:
    """With keep_zeros the zeros are intended: log the sparsity that the adapter will keep (liera's logger, INFO)
    instead of warning that they cannot move; returns the per-layer rows."""
    rows = target_sparsity(targets)
    report = sparsity_report(rows, "liera keep_zeros: the adapted weights keep their zeros")
    logging.getLogger("liera").info("%s", report)
    return rows


def plan_adapter(
    model: nn.Module, config: LieRAConfig, strict: bool = False
) -> list[tuple[Target, Generator, AdapterSettings]]:
    """(target, generator, settings) for every weight the config adapts, built but not attached."""
    targets = find_targets(model, config, strict=strict)
    for field_name, keys in config.unmatched_patterns([(t.path, t.param_name) for t in targets]).items():
        warn_user(
            f"{field_name} keys {keys} match none of the {len(targets)} adapted layers (e.g. "
            f"{[t.path for t in targets[:3]]}); keys name module paths (exact, suffix or full regex), as in "
            f"PEFT."
        )
    plan = []
    for target in targets:
        weight = target.weight
        if is_sharded(weight):
            raise ValueError(
                f"{target.key} is already sharded (a DTensor: fully_shard or tensor parallelism ran "
                f"before liera). Wrap first, then shard: get_liera_model(model, cfg), then "
                f"fully_shard(...) on the wrapped model, so that the adapter tensors are sharded and "
                f"their gradients reduced with the rest."
            )
        try:
            plan.append((target, *build_adapter(config, target.path, target.param_name, target.values)))
        except ValueError as exc:
            raise ValueError(f"{target.key}: {exc}") from None
    return plan
