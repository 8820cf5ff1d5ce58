"""The Lie-group math of LieRA, as pure tensor functions (nothing here knows about modules).

A weight W of any shape is an element of the abelian group of non-zero tensors under the Hadamard
product. An adapter contributes an algebra element D (same shape as W) and acts through a *factor* g(D)
given by its exp map:

* ``exact``:  W_eff = W * exp(D)        (the exponential map)
* ``taylor``: W_eff = W * (1 + D)       (its first-order form, the paper's default LieRA)

Each map is one ``ExpMap`` record (factor, factor - 1, inverse, log) in ``EXP_MAPS``; ``exp_map(name)`` is the
one place an unknown name is rejected. Several adapters compose by multiplying their factors. For the exact
map that is the same as adding their algebra elements (exp(D1) exp(D2) = exp(D1 + D2)); for the Taylor map
the product keeps sequential and batch merges equal in any order. The ``additive`` update (W + D, plain LoRA)
is the ablation: a different group (tensors under addition), kept here so arms differ only in the group op.

``keep_zeros=True`` says the zeros of W are intended (a pruned model): every entry where W == 0 keeps its exact
bits through apply, unapply and delta_weight. The multiplicative update keeps them by construction (0 * g = 0; the
``where`` only pins the sign of a zero and guards 0 * inf); the additive update becomes the masked one,
W + D * (W != 0) (SQFT, masked LoRA). The mask is read from the tensor at hand, never stored: a merged weight has
the zeros of W, so unapply finds the same mask, unless an update lands a non-zero entry exactly on 0
(``new_zeros`` finds those; a merge counts them as entries it cannot undo).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

TAYLOR, EXACT = "taylor", "exact"
MULTIPLICATIVE, ADDITIVE = "multiplicative", "additive"
UPDATES = (MULTIPLICATIVE, ADDITIVE)

Term = tuple[Tensor, str]  # (algebra element D, exp_map name)


@dataclass(frozen=True)
class ExpMap:
    """How an algebra element D acts: the factor g(D), g(D) - 1 without cancellation, g(D)^-1, and the log
    that recovers D from a ratio W_eff / W. ``additive_algebra``: g(a) g(b) = g(a + b), so several such
    adapters are summed in the algebra before one map. ``singular``: where g(D) can be (near) zero, a merge
    there cannot be undone (None when g never vanishes)."""

    name: str
    factor: Callable[[Tensor], Tensor]
    factor_minus_one: Callable[[Tensor], Tensor]
    inverse: Callable[[Tensor], Tensor]
    log: Callable[[Tensor], Tensor]
    additive_algebra: bool
    singular: Callable[[Tensor, float], Tensor] | None = None


EXP_MAPS: dict[str, ExpMap] = {
    TAYLOR: ExpMap(
        TAYLOR,
        lambda d: 1.0 + d,
        lambda d: d,
        lambda d: torch.reciprocal(1.0 + d),
        lambda ratio: ratio - 1.0,
        additive_algebra=False,
        singular=lambda d, eps: (1.0 + d).abs() < eps,
    ),
    EXACT: ExpMap(EXACT, torch.exp, torch.expm1, lambda d: torch.exp(-d), torch.log, additive_algebra=True),
}


def exp_map(name: str) -> ExpMap:
    """The exp map called ``name``; the one place an unknown name is rejected."""
    try:
        return EXP_MAPS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown exp_map {name!r}; use one of {list(EXP_MAPS)} ({TAYLOR!r} is the paper's "
            f"LieRA, {EXACT!r} the exponential map)."
        ) from None


def check_update(update: str) -> str:
    if update not in UPDATES:
        raise ValueError(f"unknown update {update!r}; use one of {list(UPDATES)} ({ADDITIVE!r} is LoRA's W + D).")
    return update


def factor(delta: Tensor, name: str) -> Tensor:
    """The group element g(D) that multiplies W: exp(D) or 1 + D."""
    return exp_map(name).factor(delta)


def factor_minus_one(delta: Tensor, name: str) -> Tensor:
    """g(D) - 1 without cancellation (expm1 for the exact map): W_eff - W = W * (g(D) - 1)."""
    return exp_map(name).factor_minus_one(delta)


def inverse_factor(delta: Tensor, name: str) -> Tensor:
    """g(D)^-1, the factor that undoes g(D): exp(-D) or 1 / (1 + D)."""
    return exp_map(name).inverse(delta)


def combined_factor_minus_one(terms: Sequence[Term]) -> Tensor:
    """prod_i g_i(D_i) - 1 for several adapters, formed without cancellation.

    Terms of maps with an additive algebra (exact) are summed there first, one map per kind; the remaining
    factors are multiplied using (1+a)(1+b) - 1 = a + b + a*b so that small updates keep their precision.
    """
    if not terms:
        raise ValueError("combined_factor_minus_one needs at least one term")
    summed: dict[str, Tensor] = {}
    parts: list[Tensor] = []
    for d, name in terms:
        m = exp_map(name)
        if m.additive_algebra:
            summed[name] = d if name not in summed else summed[name] + d
        else:
            parts.append(m.factor_minus_one(d))
    parts = [EXP_MAPS[name].factor_minus_one(d) for name, d in summed.items()] + parts
    total = parts[0]
    for e in parts[1:]:
        total = total + e + total * e
    return total


def keep_zeros_of(weight: Tensor, out: Tensor) -> Tensor:
    """``out`` where W != 0 and W's own entry (its exact bits, -0.0 included) where W == 0."""
    return torch.where(weight == 0, weight, out)


def transformed(
    weight: Tensor, out: Tensor, transforms: Sequence[Callable[[Tensor], Tensor]], keep_zeros: bool
) -> Tensor:
    """``out`` (a group-updated weight) through the decompositions that act after the group map, in order (DoRA's
    magnitude m * V / ||V||, which is no group element); with keep_zeros the zeros of ``weight`` are pinned again,
    since a rescaling may move them (W's zeros for a merge, the merged weight's for an unmerge)."""
    for transform in transforms:
        out = transform(out)
    return keep_zeros_of(weight, out) if keep_zeros and transforms else out


def new_zeros(weight: Tensor, out: Tensor) -> Tensor:
    """Mask of entries that are non-zero in W but exactly zero in ``out``: with keep_zeros the mask is read back
    from the merged weight, so an unmerge would take these for intended zeros and leave them at 0."""
    return (out == 0) & (weight != 0)


def delta_weight(
    weight: Tensor, terms: Sequence[Term], update: str = MULTIPLICATIVE, keep_zeros: bool = False
) -> Tensor:
    """W_eff - W, computed without forming W_eff (what a dropout branch or a merge needs). keep_zeros: exactly
    +0 where W == 0 (the masked additive update D * (W != 0), or W * (g - 1) with its zeros pinned)."""
    if check_update(update) == ADDITIVE:
        deltas = [d for d, _ in terms]
        delta = sum(deltas[1:], deltas[0])
    else:
        delta = weight * combined_factor_minus_one(terms)
    return delta.masked_fill(weight == 0, 0.0) if keep_zeros else delta


def apply(weight: Tensor, terms: Sequence[Term], update: str = MULTIPLICATIVE, keep_zeros: bool = False) -> Tensor:
    """The effective weight W_eff for the given adapters (empty terms: W itself). keep_zeros: every zero of W
    stays bit-exact (W + D * (W != 0) for the additive update)."""
    if not terms:
        return weight
    if check_update(update) == MULTIPLICATIVE:  # W + W * (g - 1) in one fused pass
        out = torch.addcmul(weight, weight, combined_factor_minus_one(terms))
    else:
        out = weight + delta_weight(weight, terms, update)
    return keep_zeros_of(weight, out) if keep_zeros else out


def unapply(
    weight_eff: Tensor, terms: Sequence[Term], update: str = MULTIPLICATIVE, keep_zeros: bool = False
) -> Tensor:
    """The group inverse action: recover W from W_eff (no stored copy of W needed). keep_zeros: the mask is that of
    W_eff, which equals W's unless the merge made new zeros (see new_zeros)."""
    if not terms:
        return weight_eff
    if check_update(update) == ADDITIVE:
        out = weight_eff - delta_weight(weight_eff, terms, update)
    else:
        inv = inverse_factor(*terms[0])
        for d, name in terms[1:]:
            inv = inv * inverse_factor(d, name)
        out = weight_eff * inv
    return keep_zeros_of(weight_eff, out) if keep_zeros else out


def log(weight_eff: Tensor, weight: Tensor, name: str) -> Tensor:
    """The algebra element that maps W to W_eff: log(W_eff / W) or W_eff / W - 1 (where W != 0)."""
    return exp_map(name).log(weight_eff / weight)


def near_singular(terms: Iterable[Term], eps: float = 1e-6) -> Tensor | None:
    """Mask of entries whose factor is (nearly) zero (Taylor's 1 + D): a merge there cannot be undone."""
    mask = None
    for d, name in terms:
        test = exp_map(name).singular
        if test is not None:
            bad = test(d, eps)
            mask = bad if mask is None else mask | bad
    return mask
