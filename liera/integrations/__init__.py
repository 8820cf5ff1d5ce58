"""Bridges to other tools, each importing its tool only when used:

* ``peft``: LieRA as a PEFT method (``LieraPeftConfig`` for ``peft.get_peft_model``, the tuner ``LieraTuner``,
  ``LieraLayer``; the names say the PEFT door, beside liera's own ``LieRAConfig`` / ``LieRAModel``) and
  folder conversions between PEFT's files and liera's (``liera_to_peft``, ``peft_to_liera``); importing it
  registers the method with PEFT;
* ``hira``: export a LieRA-Taylor adapter as a PEFT HiRA adapter and import one back (``export_peft``,
  ``import_peft``);
* ``trainer``: ``LieRATrainer`` and ``LieRASaveCallback`` for the Hugging Face ``transformers.Trainer``;
* ``statedict``: merge an adapter into a safetensors state dict without the model's code, and inspect an
  adapter (``liera merge``, ``liera inspect``).

diffusers models need no bridge: a UNet is a plain nn.Module (docs/interop.md).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "export_peft": "hira",
    "import_peft": "hira",
    "LieRATrainer": "trainer",
    "LieRASaveCallback": "trainer",
    "merge_file": "statedict",
    "inspect_adapter": "statedict",
    "LieraPeftConfig": "peft",
    "LieraTuner": "peft",
    "LieraConfig": "peft",  # deprecated names of the two above (the module warns)
    "LieraModel": "peft",
    "LieraLayer": "peft",
    "liera_to_peft": "peft",
    "peft_to_liera": "peft",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
