"""Progress bars for long work (training, merges): tqdm when it is installed, else nothing."""
from __future__ import annotations

from typing import Optional


def progress(iterable, desc: str, total: Optional[int] = None, enabled: bool = True):
    """tqdm when installed (and wanted), else the plain iterable."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)
