"""What long work shows: progress bars (tqdm when it is installed, else nothing), and transformers kept quiet while
it loads a model (its load reports and bars are noise where the user asked for nothing new)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator


def progress(iterable, desc: str, total: int | None = None, enabled: bool = True):
    """tqdm when installed (and wanted), else the plain iterable."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


@contextlib.contextmanager
def quiet_transformers(show_progress: bool = False) -> Iterator[None]:
    """transformers' logging at error level, its warnings ignored and (unless show_progress) its bars off."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # transformers is optional
        yield
        return
    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    if not show_progress:
        hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
