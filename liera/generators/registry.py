"""Name -> generator class. Register your own with ``@liera.register_generator``."""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from torch import Tensor

from .base import Generator

GENERATORS: dict[str, type[Generator]] = {}
G = TypeVar("G", bound=type[Generator])


def register_generator(cls: G) -> G:
    """Class decorator: make ``LieRAConfig(generator=cls.name)`` build this generator."""
    if not (isinstance(cls, type) and issubclass(cls, Generator)):
        raise TypeError(f"register_generator expects a subclass of liera.Generator, got {cls!r}")
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a class attribute `name` (the value of LieRAConfig.generator)")
    GENERATORS[cls.name] = cls
    return cls


def get_generator(name: str) -> type[Generator]:
    try:
        return GENERATORS[name]
    except KeyError:
        raise ValueError(
            f"unknown generator {name!r}; known generators: {sorted(GENERATORS)}. "
            f"Register a new one with @liera.register_generator."
        ) from None


def build_generator(
    config: Any, path: str, param_name: str, weight: Tensor, dtype: torch.dtype | None = None
) -> Generator:
    """The one place where a LieRAConfig becomes the generator of one weight (``path`` is the owning module's
    path, ``param_name`` the tensor's name on it): the model, the model-free merge and ``liera inspect`` all
    build through here, so per-layer ranks, alphas and scalings agree everywhere."""
    cls = get_generator(config.generator)
    return cls(
        weight,
        r=config.rank_for(path, param_name),
        alpha=config.alpha_for(path, param_name),
        use_rslora=config.use_rslora,
        init_weights=config.init_weights,
        dtype=dtype,
        layer_scaling=config.layer_scaling,
        **config.generator_kwargs,
    )
