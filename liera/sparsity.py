"""The zero structure of weights: how many entries are exactly zero, and whether they form an N:M pattern.

Pure tensor functions (nothing here knows about modules), shared by the adapter report (``keep_zeros``), the
pruning step (liera.apps.prune) and ``liera inspect``. N:M follows the hardware convention: at most N non-zeros in
every M consecutive entries along the input axis (2:4 = half the entries, what sparse tensor cores run). The input
axis is dim 1 (nn.Linear's (out, in), a convolution's input channels, as NVIDIA's ASP groups them); GPT-2's Conv1D
stores (in, out) and passes dim=0.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

NM_PATTERNS: tuple[tuple[int, int], ...] = ((2, 4), (4, 8))  # the patterns a report checks by default


def parse_nm(text: str) -> tuple[int, int]:
    """(n, m) from "N:M" (e.g. "2:4"), checked: 0 < N < M."""
    try:
        n, m = (int(v) for v in text.split(":"))
    except (ValueError, AttributeError):
        raise ValueError(
            f"N:M pattern {text!r} is not two integers 'N:M'; write e.g. '2:4' (at most 2 non-zeros "
            f"in every 4 consecutive inputs)."
        ) from None
    if not 0 < n < m:
        raise ValueError(f"N:M pattern {text!r} needs 0 < N < M (N non-zeros kept of every M); e.g. '2:4'.")
    return n, m


def nm_groups(weight: Tensor, m: int, dim: int = 1) -> Tensor | None:
    """The entries as rows of ``m`` consecutive entries along ``dim`` (shape (groups, m)); None where the tensor has
    no such axis or its length is not a multiple of m (no N:M pattern can exist there)."""
    if weight.dim() < 2 or weight.shape[dim] % m:
        return None
    return weight.movedim(dim, -1).reshape(-1, m)


def nm_violations(weight: Tensor, n: int, m: int, dim: int = 1) -> int | None:
    """How many groups of m consecutive entries along ``dim`` hold more than n non-zeros (None: no such groups)."""
    groups = nm_groups(weight, m, dim)
    if groups is None:
        return None
    return int(((groups != 0).sum(dim=1) > n).sum())


def nm_valid(weight: Tensor, n: int, m: int, dim: int = 1) -> bool:
    """Whether ``weight`` is N:M sparse: at most n non-zeros in every m consecutive entries along ``dim`` (False
    where its length along dim is not a multiple of m)."""
    if not 0 < n < m:
        raise ValueError(f"nm_valid needs 0 < n < m, got n={n}, m={m}; e.g. nm_valid(w, 2, 4).")
    return nm_violations(weight, n, m, dim) == 0


def zero_count(weight: Tensor) -> int:
    """Entries exactly equal to zero (-0.0 included)."""
    return int((weight == 0).sum())


@dataclass
class LayerSparsity:
    """One weight's zeros: how many, of how many, and which N:M patterns hold (None: not applicable)."""

    key: str
    shape: tuple[int, ...]
    zeros: int
    numel: int
    nm: dict[str, bool | None] = field(default_factory=dict)
    dim: int = 1  # the axis the N:M groups run along (the inputs: 1 for Linear and convs, 0 for GPT-2's Conv1D)

    @property
    def fraction(self) -> float:
        return self.zeros / max(self.numel, 1)


def layer_sparsity(
    key: str, weight: Tensor, patterns: Sequence[tuple[int, int]] = NM_PATTERNS, dim: int = 1
) -> LayerSparsity:
    """The zero structure of one weight."""
    w = weight.detach()
    nm = {}
    for n, m in patterns:
        bad = nm_violations(w, n, m, dim)
        nm[f"{n}:{m}"] = None if bad is None else bad == 0
    return LayerSparsity(key, tuple(w.shape), zero_count(w), w.numel(), nm, dim)


def sparsity_report(rows: Iterable[LayerSparsity], title: str = "sparsity") -> str:
    """A markdown table of per-layer zeros and N:M validity, with the total on top."""
    rows = list(rows)
    zeros, total = sum(r.zeros for r in rows), sum(r.numel for r in rows)
    patterns = list(rows[0].nm) if rows else []
    mark = {True: "yes", False: "no", None: "-"}
    lines = [
        f"{title}: {zeros:,d} of {total:,d} entries are zero ({100 * zeros / max(total, 1):.2f}%) in "
        f"{len(rows)} weights"
        + "".join(f"; {p} valid in {sum(1 for r in rows if r.nm.get(p))} of them" for p in patterns),
        "",
        "| weight | shape | zeros | sparsity | " + " | ".join(patterns) + " |",
        "| --- | --- | ---: | ---: | " + " | ".join(":---:" for _ in patterns) + " |",
    ]
    lines += [
        f"| {r.key} | {r.shape} | {r.zeros:,d} | {100 * r.fraction:.2f}% | "
        + " | ".join(
            mark[r.nm[p]] + (f" (dim {r.dim})" if r.dim != 1 and r.nm[p] is not None else "") for p in patterns
        )
        + " |"
        for r in rows
    ]
    return "\n".join(lines)


def total_fraction(rows: Iterable[LayerSparsity]) -> float:
    """Zeros over entries, pooled over the layers."""
    rows = list(rows)
    return sum(r.zeros for r in rows) / max(sum(r.numel for r in rows), 1)


def same_zeros(before: Tensor, after: Tensor) -> bool:
    """Whether every zero of ``before`` is still a zero of ``after``, bit for bit (what keep_zeros guarantees)."""
    mask = before == 0
    if before.dtype != after.dtype:
        return False
    a, b = before[mask], after[mask]
    if a.is_floating_point():
        width = {2: torch.int16, 4: torch.int32, 8: torch.int64}.get(a.element_size())
        if width is not None:
            return torch.equal(a.view(width), b.view(width))
    return torch.equal(a, b)
