"""Bridges to other tools, each importing its tool only when used:

* ``hira``: export a LieRA-Taylor adapter as a PEFT HiRA adapter and import one back (``export_peft``,
  ``import_peft``);
* ``trainer``: ``LieRATrainer`` and ``LieRASaveCallback`` for the Hugging Face ``transformers.Trainer``;
* ``statedict``: merge an adapter into a safetensors state dict without the model's code, and inspect an
  adapter (``liera merge``, ``liera inspect``).

diffusers models need no bridge: a UNet is a plain nn.Module (docs/interop.md).
"""
from __future__ import annotations

_LAZY = {"export_peft": "hira", "import_peft": "hira", "LieRATrainer": "trainer", "LieRASaveCallback": "trainer",
         "merge_file": "statedict", "inspect_adapter": "statedict"}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
