"""The head `liera finetune` trains in full and the layers it adapts: finding, parsing and checking them."""

from __future__ import annotations

import math
import re

from torch import nn

from ...config import TARGET_SHORTCUTS, LieRAConfig
from ...layers import kind_of
from ...targeting import find_targets
from .constants import HEAD_NAMES


# ====================================================================== targets and head
def find_head(model: nn.Module, wanted: str | None) -> str:
    names = [n for n, _ in model.named_modules() if n]
    if wanted:
        if wanted in names:
            return wanted
        hits = [n for n in names if n.endswith("." + wanted)]
        if len(hits) == 1:
            return hits[0]
        children = [n for n, _ in model.named_children()]
        raise ValueError(
            f"--head {wanted!r} "
            + (
                f"is ambiguous: {hits[:6]}; give the full name."
                if hits
                else f"matches no module of the model; top-level modules: {children}."
            )
        )
    for cand in HEAD_NAMES:
        if cand in names:
            return cand
    for cand in HEAD_NAMES:
        hits = sorted((n for n in names if n.endswith("." + cand)), key=lambda n: n.count("."))
        if hits:
            return hits[0]
    raise ValueError(
        f"cannot find the classification head (looked for {', '.join(HEAD_NAMES)}); pass --head NAME. "
        f"Top-level modules: {[n for n, _ in model.named_children()]}."
    )


def parse_targets(spec) -> str | list[str]:
    """'all-linear' | 'a,b' | 'regex' -> the target_modules value of a LieRAConfig."""
    if isinstance(spec, (list, tuple)):
        return [str(s).strip() for s in spec if str(s).strip()]
    spec = str(spec).strip()
    if not spec:
        raise ValueError("--target-modules is empty; give names, a regex, or all-linear / all-conv / all.")
    if spec in TARGET_SHORTCUTS:
        return spec
    if "," in spec:
        return [s.strip() for s in spec.split(",") if s.strip()]
    if re.search(r"[*+?\[\](){}|^$\\]", spec):
        return spec
    return [spec]


def default_targets(model: nn.Module, head: str) -> str:
    """all-conv for a mostly convolutional model, else all-linear."""
    counts = {"linear": 0, "conv": 0}
    for name, module in model.named_modules():
        if name == head or name.startswith(head + "."):
            continue
        kind = kind_of(module)
        if kind is not None and kind.category in counts:
            counts[kind.category] += 1
    return "all-conv" if counts["conv"] > counts["linear"] else "all-linear"


def resolve_targets(model: nn.Module, targets, head: str, r: int) -> list:
    """The weights the run adapts (the head excluded; it trains in full); checks the rank against each."""
    cfg = LieRAConfig(r=r, target_modules=targets, exclude_modules=[head])
    found = find_targets(model, cfg)
    too_small = []
    for t in found:
        shape = tuple(t.weight.shape)
        limit = min(shape[0], math.prod(shape[1:]))
        if r > limit:
            too_small.append((t.key, shape, limit))
    if too_small:
        max_r = min(min(s[0], math.prod(s[1:])) for s in (tuple(t.weight.shape) for t in found))
        examples = ", ".join(f"{k} {tuple(s)} allows r <= {lim}" for k, s, lim in too_small[:4])
        raise ValueError(
            f"--r {r} is larger than {len(too_small)} of the {len(found)} targeted layers allow "
            f"(rank <= min(out, in) of the weight matricised as (W.shape[0], prod(W.shape[1:]))): "
            f"{examples}{' ...' if len(too_small) > 4 else ''}. The max usable rank for these targets is "
            f"{max_r}: pass --r {max_r} or less, or leave those layers out with --target-modules."
        )
    return found
