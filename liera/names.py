"""How names select modules, with PEFT's rules (one place: targets, exclusions, modules_to_save, rank and alpha
patterns, and the model-free tools all match through here).

* A list of names selects a module whose path equals an entry or ends with "." + the entry.
* A string is a regular expression that must match the whole path.
* A pattern key (rank_pattern, alpha_pattern) is a regular expression that matches the end of a path at a
  "." boundary: ``(.*\\.)?<key>`` must match the whole path, so a plain name works as an exact name or a suffix.

``warn_user`` lives here too: every warning liera gives about what a user named (targets, patterns, weights,
merges) points at the user's line through it.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Iterable
from types import FrameType

Spec = str | Iterable[str]


def name_matches(name: str, spec: Spec) -> bool:
    """Whether ``name`` (a module path) is selected by ``spec``: a list of names / suffixes, or a full regex."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in spec)


def pattern_matches(key: str, name: str) -> bool:
    """Whether the pattern key ``key`` (exact name, suffix after a ".", or a regex for the path's end) names
    ``name``."""
    try:
        return re.fullmatch(rf"(.*\.)?(?:{key})", name) is not None
    except re.error:
        return name == key or name.endswith("." + key)


def pattern_key(keys: Iterable[str], name: str) -> str | None:
    """The first of ``keys`` that names ``name`` (None when none does)."""
    return next((k for k in keys if pattern_matches(k, name)), None)


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """warnings.warn pointing at the first frame outside liera: the user's line that named the target or pattern,
    however deep inside liera the check runs (a fixed stacklevel points into liera from some entry points)."""
    level = 2  # stacklevel 2 is the caller of this function
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, category, stacklevel=level)
