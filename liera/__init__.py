"""liera: LieRA, Lie-group parameter-efficient fine-tuning for weight tensors of any order.

W_eff = W * exp(D) (exact) or W + W * D (Taylor), with D = s * reshape(B @ A, W.shape) from a LoRA-style
generator (or any registered generator). See README.md and docs/.

The names below are loaded on first use (PEP 562): ``import liera`` itself does not import torch, so that the
``liera`` command starts in a fraction of a second and imports torch only for a command that needs it.
``export_peft`` / ``import_peft`` (PEFT HiRA files) come from ``liera.integrations.hira``: the core never imports
an integration, so they can only be found this way.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

_EXPORTS = {
    "LieRAConfig": ".config",
    "LieRAModel": ".model",
    "get_liera_model": ".model",
    "find_targets": ".targeting",
    "Target": ".targeting",
    "Generator": ".generators",
    "register_generator": ".generators",
    "get_generator": ".generators",
    "GENERATORS": ".generators",
    "group": ".group",
    "export_peft": ".integrations.hira",
    "import_peft": ".integrations.hira",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'liera' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name], __name__)
    value = module if name == "group" else getattr(module, name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # what static tools and IDEs see
    from . import group  # noqa: F401
    from .config import LieRAConfig  # noqa: F401
    from .generators import GENERATORS, Generator, get_generator, register_generator  # noqa: F401
    from .integrations.hira import export_peft, import_peft  # noqa: F401
    from .model import LieRAModel, get_liera_model  # noqa: F401
    from .targeting import Target, find_targets  # noqa: F401
