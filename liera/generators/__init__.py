"""Generators: one file per matrix PEFT method, all registered by name (see registry.py)."""

from . import dora, loha, lokr, lora, pissa, tucker  # noqa: F401  (each registers itself)
from .base import LAYER_SCALINGS, Generator, check_layer_scaling
from .registry import GENERATORS, build_generator, get_generator, register_generator

__all__ = [
    "LAYER_SCALINGS",
    "Generator",
    "check_layer_scaling",
    "GENERATORS",
    "build_generator",
    "get_generator",
    "register_generator",
]
