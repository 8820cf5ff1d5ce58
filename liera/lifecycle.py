"""The model-wide lifecycle that both front doors run: merge, unmerge and activation over all adapted weights.

``LieRAModel`` (liera's own API) and the PEFT tuner (``integrations/peft.py``) keep their adapters in the same
``AdaptedWeight`` objects; they differ only in how they find them (liera: ``liera_<param>`` children, PEFT: its
tuner layers). Each door lists its weights as ``Adapted`` records and hands them to the functions here, so the rules
live once: every weight is checked before any weight changes (a refused merge leaves the whole model as it was, not
half merged), one warning says what a merge cannot undo, and the names in messages are the weights' keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .names import warn_user
from .weight import AdaptedWeight, check_mergeable


class Adapted(NamedTuple):
    """One adapted weight as a door sees it: its key in the plain model (``"0.weight"``), the tensor merges write
    into, and its adapters."""

    key: str
    weight: Tensor
    adapters: AdaptedWeight


def check_activate(weights: Iterable[Adapted], names: Sequence[str]) -> None:
    """Raise before any change if these adapters cannot act together on some weight (an additive and a
    multiplicative update, or a masked and a plain additive one)."""
    for item in weights:
        item.adapters.check_activate(names)


def merge(
    weights: Iterable[Adapted],
    names: Sequence[str],
    *,
    safe_merge: bool = False,
    dtype: torch.dtype = torch.float32,
    keep_copy: bool = False,
    warn_merged: bool = True,
) -> None:
    """W <- W * g(D) for these adapters on every weight that holds them and has not merged them yet.

    Everything is checked first, on every weight: a quantized weight is refused (``check_mergeable``), and with
    ``safe_merge`` a merge that gives non-finite values or cannot be undone is refused; only then does any weight
    change. keep_copy keeps each pre-merge weight (a bit-exact unmerge of bf16/fp16 models); dtype: the precision the
    merge is computed in; warn_merged=False: adapters merged already are skipped without a warning (merge_and_unload).
    """
    weights = list(weights)
    already = sorted({n for item in weights for n in names if n in item.adapters.merged})
    if already and warn_merged:
        warn_user(f"adapter(s) {already} already merged; merging again changes nothing.")
    jobs = [(item, todo) for item in weights for todo in [item.adapters.to_merge(names)] if todo]
    for item, todo in jobs:
        check_mergeable(item.weight, item.key)
        if safe_merge:
            item.adapters.check_merge(item.weight, todo, dtype, item.key)
    singular = sum(item.adapters.merge(item.weight, todo, dtype, keep_copy) for item, todo in jobs)
    if singular:
        warn_user(
            f"merge: {singular} weight entries have a Taylor factor 1 + D near 0 (or, with keep_zeros, became exact "
            f"zeros); an unmerge cannot recover them (safe_merge=True refuses such merges; liera's "
            f"merge_adapter(keep_merge_copy=True) keeps a copy to unmerge exactly)."
        )


def unmerge(weights: Iterable[Adapted], names: Sequence[str] | None = None, dtype: torch.dtype = torch.float32) -> None:
    """Undo merges (default: every merged adapter) with the group inverse, W <- W * g(D)^-1; exact where a copy was
    kept. An unmerge cannot fail, so it needs no check first."""
    for item in weights:
        item.adapters.unmerge(item.weight, names, dtype)
