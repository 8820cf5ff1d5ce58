"""Pruning before a sparse recovery: Wanda and magnitude, unstructured and N:M, written here on purpose.

* Wanda (Sun et al. 2023, locuslab/wanda): score S_ij = |W_ij| * ||X_j||_2 over the calibration tokens; the lowest
  ``sparsity`` fraction of each output row is pruned. Layers go in order: each stage's input norms are collected
  with the earlier stages already pruned (one stage per layer by default; ``stage_pattern`` groups, for example, a
  decoder block's projections into one pass, as the reference code does).
* Magnitude: the lowest |W_ij| of the whole layer (one threshold per layer).
* N:M (both methods): at most N non-zeros in every M consecutive inputs of a row (liera.sparsity's convention,
  2:4 = the pattern sparse tensor cores run): the M - N lowest scores of each group are pruned.

Why not a library: torchao 0.18's ``WandaSparsifier`` installs beside torch 2.13 without pulling another torch, but
it ranks scores over the whole layer instead of per output row, supports N:M only as M/2:M, collects every layer's
norms in one pass on the dense model, and goes through the deprecated ``torch.ao.quantization.prepare``;
llm-compressor would downgrade transformers (5.25 -> 5.17) and huggingface_hub. docs/results-sparse.md has the
record. Pruned entries are written as +0.0, so a keep_zeros adapter keeps exactly these bits.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..config import LieRAConfig
from ..layers import kind_of
from ..layers.base import WeightLayout
from ..sparsity import LayerSparsity, layer_sparsity, nm_groups, parse_nm
from ..targeting import Target, find_targets, model_sparsity
from ..weight import adapted_weights_of

METHODS = ("wanda", "magnitude")


@dataclass(frozen=True)
class PruneSpec:
    """What to prune: a method and either an unstructured fraction or an N:M pattern."""

    method: str = "wanda"
    sparsity: float | None = None
    nm: tuple[int, int] | None = None

    def __str__(self) -> str:
        amount = f"{self.nm[0]}:{self.nm[1]}" if self.nm else f"{self.sparsity:g}"
        return f"{self.method}:{amount}"

    @property
    def target_fraction(self) -> float:
        return 1.0 - self.nm[0] / self.nm[1] if self.nm else _fraction(self.sparsity)


def _fraction(sparsity: float | None) -> float:
    """The unstructured fraction to prune, where no N:M pattern is given."""
    if sparsity is None:
        raise TypeError("pruning needs a sparsity fraction or an N:M pattern; got neither.")
    return float(sparsity)


def parse_prune(text: str) -> PruneSpec:
    """``wanda:0.5``, ``magnitude:0.5``, ``wanda:2:4``, ``magnitude:2:4``; a bare ``0.5`` or ``2:4`` means Wanda."""
    parts = str(text).strip().split(":")
    method = parts.pop(0) if parts and parts[0] in METHODS else "wanda"
    hint = "write e.g. wanda:0.5, magnitude:0.5, 2:4 (Wanda) or magnitude:2:4"
    if parts and not parts[0].replace(".", "", 1).isdigit():
        raise ValueError(f"--prune {text!r}: unknown method {parts[0]!r}; methods are {list(METHODS)}; {hint}.")
    if len(parts) == 1:
        try:
            fraction = float(parts[0])
        except ValueError:
            raise ValueError(
                f"--prune {text!r}: unknown method or amount {parts[0]!r}; methods are {list(METHODS)}; {hint}."
            ) from None
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"--prune {text!r}: the fraction pruned must be in (0, 1), got {fraction}; {hint}.")
        return PruneSpec(method, sparsity=fraction)
    if len(parts) == 2:
        try:
            return PruneSpec(method, nm=parse_nm(":".join(parts)))
        except ValueError as exc:
            raise ValueError(f"--prune {text!r}: {exc}") from None
    raise ValueError(f"--prune {text!r} is not METHOD:AMOUNT; {hint}.")


# ====================================================================== the masks (True = prune)
def lowest_in_rows(score: Tensor, k: int) -> Tensor:
    """Mask of the k lowest scores of each row of a 2-D score (ties: the earlier entry goes first)."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        idx = torch.argsort(score, dim=1, stable=True)[:, :k]
        mask.scatter_(1, idx, True)
    return mask


def nm_mask(score: Tensor, n: int, m: int, dim: int = 1) -> Tensor:
    """Prune the m - n lowest scores of every m consecutive entries along ``dim`` (leaving at most n non-zeros)."""
    groups = nm_groups(score, m, dim)
    if groups is None:
        raise ValueError(
            f"an {n}:{m} pattern needs the input axis (dim {dim}, length "
            f"{score.shape[dim] if score.dim() > dim else 'none'}) to be a multiple of {m}."
        )
    moved = score.movedim(dim, -1)
    return lowest_in_rows(groups, m - n).reshape(moved.shape).movedim(-1, dim)


def magnitude_mask(
    weight: Tensor, sparsity: float | None = None, nm: tuple[int, int] | None = None, dim: int = 1
) -> Tensor:
    """Magnitude pruning: the int(sparsity * numel) smallest |W| of the layer, or N:M along ``dim``."""
    score = weight.detach().abs().float()
    if nm is not None:
        return nm_mask(score, nm[0], nm[1], dim)
    return lowest_in_rows(score.reshape(1, -1), int(score.numel() * _fraction(sparsity))).reshape(score.shape)


def wanda_mask(
    weight: Tensor, input_norm: Tensor, sparsity: float | None = None, nm: tuple[int, int] | None = None
) -> Tensor:
    """Wanda on an (out, in) weight: score |W_ij| * ||X_j||; per output row the int(sparsity * in) lowest, or N:M."""
    score = weight.detach().abs().float() * input_norm.float().reshape(1, -1)
    if nm is not None:
        return nm_mask(score, nm[0], nm[1], 1)
    return lowest_in_rows(score, int(score.shape[1] * _fraction(sparsity)))


# ====================================================================== pruning a model
class _StageDone(Exception):
    """Raised by a hook once every layer of the stage has seen its input: the rest of the forward is not needed."""


@dataclass
class PruneResult:
    """What pruning did: the spec, the per-layer sparsity after it, layers skipped (with why), the time taken."""

    spec: PruneSpec
    rows: list[LayerSparsity]
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def fraction(self) -> float:
        return sum(r.zeros for r in self.rows) / max(sum(r.numel for r in self.rows), 1)


def _matrix(target: Target) -> Tensor:
    """The weight as (out, in) for Wanda (GPT-2's Conv1D stores (in, out))."""
    w = target.weight.detach()
    return w.t() if target.kind is not None and target.kind.layout == WeightLayout.IN_OUT else w


def _default_run(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def prune_model(
    model: nn.Module,
    spec: PruneSpec | str,
    target_modules: str | list[str] = "all-linear",
    exclude_modules: str | list[str] | None = None,
    calibration: Iterable[Any] | None = None,
    run: Callable[[nn.Module, Any], Any] = _default_run,
    stage_pattern: str | None = None,
    strict_nm: bool = False,
) -> PruneResult:
    """Prune the weights ``target_modules`` names (LieRAConfig's rules) in place and report their sparsity.

    calibration: the batches Wanda runs (``run(model, batch)``; a dict is passed as keywords); magnitude needs none.
    stage_pattern: a regex whose match on a layer's path names its stage (e.g. r".*\\.layers\\.\\d+\\." for one pass
    per decoder block); layers of one stage take their input norms in the same pass. strict_nm: a layer whose input
    axis is not a multiple of M raises instead of being skipped (depthwise convolutions have one input per group).
    Checks everything before any weight changes.
    """
    spec = parse_prune(spec) if isinstance(spec, str) else spec
    if spec.method not in METHODS:
        raise ValueError(f"unknown pruning method {spec.method!r}; use one of {list(METHODS)}.")
    if any(adapted_weights_of(m) for m in model.modules()):
        raise ValueError(
            "this model already carries liera adapters; prune the base model first, then add the adapter "
            "with keep_zeros=True (get_liera_model(model, LieRAConfig(..., keep_zeros=True)))."
        )
    targets = find_targets(model, LieRAConfig(target_modules=target_modules, exclude_modules=exclude_modules))
    skipped: dict[str, str] = {}
    if spec.nm is not None:
        for t in targets:
            if nm_groups(t.weight, spec.nm[1], t.input_axis) is None:
                skipped[t.key] = (
                    f"input axis of length {t.weight.shape[t.input_axis]} is not a multiple of {spec.nm[1]}"
                )
        if skipped and strict_nm:
            raise ValueError(
                f"{spec}: {len(skipped)} weights cannot hold the pattern: {skipped}; leave them out "
                f"(exclude_modules) or prune them unstructured."
            )
        targets = [t for t in targets if t.key not in skipped]
    batches: list[Any] = []  # Wanda's calibration batches
    if spec.method == "wanda":
        odd = [
            t.key
            for t in targets
            if t.weight.dim() != 2 or t.kind is None or t.kind.layout not in (WeightLayout.OUT_IN, WeightLayout.IN_OUT)
        ]
        if odd:
            raise ValueError(
                f"Wanda scores the inputs of linear layers (nn.Linear, GPT-2 Conv1D); {odd[:4]} are not "
                f"one. Prune convolutions and other weights with magnitude:..., or leave them out."
            )
        if calibration is None:
            raise ValueError(
                "Wanda needs calibration batches (its score is |W| times the norm of each input over "
                "calibration tokens); pass calibration=[...] or use magnitude pruning."
            )
        batches = list(calibration)
        if not batches:
            raise ValueError("Wanda got an empty calibration set; pass at least one batch.")
    start = time.perf_counter()
    if spec.method == "magnitude":
        with torch.no_grad():
            for t in targets:
                t.weight.masked_fill_(magnitude_mask(t.weight, spec.sparsity, spec.nm, t.input_axis), 0.0)
    else:
        _wanda(model, targets, spec, batches, run, stage_pattern)
    rows = [layer_sparsity(t.key, t.weight, [spec.nm] if spec.nm else [(2, 4)], dim=t.input_axis) for t in targets]
    return PruneResult(spec, rows, skipped, time.perf_counter() - start)


def _stages(targets: list[Target], pattern: str | None) -> list[list[Target]]:
    order: dict[str, list[Target]] = {}
    for t in targets:
        hit = re.match(pattern, t.path) if pattern is not None else None
        order.setdefault(hit.group(0) if hit else t.key, []).append(t)
    return list(order.values())


def _wanda(model: nn.Module, targets: list[Target], spec: PruneSpec, calibration: list, run, pattern) -> None:
    was_training = model.training
    model.eval()
    try:
        for stage in _stages(targets, pattern):
            sums = {t.key: torch.zeros(_matrix(t).shape[1], dtype=torch.float64) for t in stage}
            seen: set[str] = set()
            hooks = []
            for t in stage:
                # hooks of this stage only (removed below): they bind this stage's accumulators explicitly
                def pre(module, args, kwargs=None, key=t.key, sums=sums):
                    x = args[0].detach()
                    sums[key] += x.reshape(-1, x.shape[-1]).double().pow(2).sum(0)

                def post(module, args, output, key=t.key, seen=seen, stage=stage):
                    seen.add(key)
                    if len(seen) == len(stage):
                        raise _StageDone

                hooks += [t.owner.register_forward_pre_hook(pre), t.owner.register_forward_hook(post)]
            try:
                with torch.no_grad():
                    for batch in calibration:
                        seen.clear()
                        try:
                            run(model, batch)
                        except _StageDone:
                            pass
            finally:
                for h in hooks:
                    h.remove()
            silent = [t.key for t in stage if not bool(sums[t.key].any())]
            if silent:
                raise ValueError(
                    f"Wanda: {silent} never saw a non-zero input on the calibration batches (the "
                    f"layers do not run in this forward?); leave them out or use magnitude pruning."
                )
            with torch.no_grad():
                for t in stage:
                    mask = wanda_mask(_matrix(t), sums[t.key].sqrt(), spec.sparsity, spec.nm)
                    is_t = t.kind is not None and t.kind.layout == WeightLayout.IN_OUT
                    t.weight.masked_fill_(mask.t() if is_t else mask, 0.0)
    finally:
        model.train(was_training)


# ====================================================================== after training
def zero_masks(model: nn.Module, keys: Sequence[str] | None = None) -> dict[str, Tensor]:
    """weight key -> where it is zero now (for re-masking a merged additive adapter, the common practice)."""
    rows = {t.key: t for t in _kind_targets(model)}
    return {k: (t.weight == 0).detach().clone() for k, t in rows.items() if keys is None or k in keys}


def apply_zero_masks(model: nn.Module, masks: dict[str, Tensor]) -> int:
    """Zero the weights again where ``masks`` says (merge-then-re-mask); returns how many entries changed."""
    changed = 0
    targets = {t.key: t for t in _kind_targets(model)}
    with torch.no_grad():
        for key, mask in masks.items():
            w = targets[key].weight
            changed += int((w[mask] != 0).sum())
            w.masked_fill_(mask, 0.0)
    return changed


def _kind_targets(model: nn.Module) -> list[Target]:
    """A Target for the weight of every module of a layer kind liera knows (what model_sparsity reports)."""
    return [
        Target(name, m, kind.weight_name, kind)
        for name, m in model.named_modules()
        for kind in [kind_of(m)]
        if kind is not None and m._parameters.get(kind.weight_name) is not None
    ]


def deployed_sparsity(model: nn.Module, patterns: Sequence[tuple[int, int]] = ((2, 4),)) -> list[LayerSparsity]:
    """The zeros a deployment would get: the effective weights of a LieRAModel's live adapters (as a merge writes
    them, without merging), else the model's weights as they are."""
    adapted = getattr(model, "adapted_weights", None)
    if adapted is None:
        return model_sparsity(model)
    rows = []
    with torch.no_grad():
        for key, owner, a in adapted():
            axis = Target(key, owner, a.param_name, kind_of(owner)).input_axis
            rows.append(layer_sparsity(key, a.effective(a.owner_weight(owner)), patterns, dim=axis))
    return rows
