"""The generator protocol: trainable parameters -> an algebra element D with the weight's shape.

A generator is a small nn.Module. It sees the frozen weight once, at construction (for its shape, and
for data-dependent initialisations such as PiSSA), and afterwards produces ``delta()``, a tensor of
exactly the weight's shape. Everything else (the group map, merging, the recompute-in-backward fast
path, save/load) is generic: the fast path simply calls ``delta()`` again in backward, so a generator
needs no backward of its own.

Optional hooks: ``delta_rows(index)`` (only the rows an embedding lookup touches) and
``transform(w_eff, weight)`` for decompositions that act after the group map (DoRA's magnitude).

``scaling`` (alpha / r) is what every generator multiplies its product by. With
``layer_scaling="rms"`` it also carries 1 / rms(W) of the weight the generator was built for, kept as a
buffer (``layer_scale``) so that it is saved with the adapter and a reloaded adapter acts identically
(docs/concepts.md, "Conditioning the step across layers").
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

LAYER_SCALINGS = ("none", "rms")


def check_layer_scaling(value: str, where: str) -> None:
    """The one check of the layer_scaling option (LieRAConfig and a generator built directly both call it)."""
    if value not in LAYER_SCALINGS:
        raise ValueError(
            f"{where}: layer_scaling must be one of {list(LAYER_SCALINGS)}, got {value!r}; 'rms' scales each "
            f"layer's D by 1 / rms(W) (one learning rate for layers of any weight scale)."
        )


def rms_scale(weight: Tensor) -> float:
    """1 / rms(W): the factor that gives every layer the same typical relative step under LieRA."""
    rms = float(weight.detach().double().pow(2).mean().sqrt())
    if not math.isfinite(rms) or rms == 0.0:
        raise ValueError(
            f"layer_scaling='rms' needs a weight with a finite, non-zero rms; this one "
            f"({tuple(weight.shape)}) has rms {rms}. Leave the layer out (exclude_modules) or use "
            f"layer_scaling='none'."
        )
    return 1.0 / rms


class Generator(nn.Module):
    """Base class. Subclasses set ``name`` and implement ``delta``."""

    name: ClassVar[str] = ""
    single_product: ClassVar[bool] = False
    """True when D is one low-rank product B @ A and ``factors()`` returns it: what a format that stores a single
    product without a scale (PEFT's HiRA) can hold. A subclass that sets it implements ``factors()``."""
    form: ClassVar[str] = "not exposed as one product B @ A"
    """D in words, for the error of a tool that needs one product B @ A (say why this generator is not one)."""

    def __init__(
        self,
        weight: Tensor,
        *,
        r: int,
        alpha: float,
        use_rslora: bool = False,
        init_weights: bool | str = True,
        dtype: torch.dtype | None = None,
        layer_scaling: str = "none",
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            raise TypeError(f"generator {self.name!r} got unknown generator_kwargs {sorted(kwargs)}")
        check_layer_scaling(layer_scaling, type(self).__name__)
        self.shape = tuple(weight.shape)
        self.r = int(r)
        self.alpha = float(alpha)
        self.base_scaling = self.alpha / (math.sqrt(self.r) if use_rslora else self.r)
        if layer_scaling == "rms":  # a buffer: saved with the adapter, restored on load
            self.register_buffer(
                "layer_scale", torch.tensor(rms_scale(weight), dtype=torch.float32, device=weight.device)
            )
        self.init_weights = init_weights
        self.param_dtype = dtype or torch.float32
        # where and how new tensors are made (Any: torch's factory overloads take it as keyword arguments)
        self.factory: dict[str, Any] = {"device": weight.device, "dtype": self.param_dtype}

    @property
    def scaling(self) -> float | Tensor:
        """alpha / r, times 1 / rms(W) with layer_scaling="rms" (then a 0-dim tensor, so no host sync)."""
        scale = getattr(self, "layer_scale", None)
        return self.base_scaling if scale is None else self.base_scaling * scale

    @property
    def out_dim(self) -> int:
        """Rows of the matricised weight (W.shape[0])."""
        return self.shape[0]

    @property
    def in_dim(self) -> int:
        """Columns of the matricised weight (prod(W.shape[1:]))."""
        return math.prod(self.shape[1:])

    def delta(self) -> Tensor:
        """The algebra element D, shape == weight shape."""
        raise NotImplementedError

    def delta_rows(self, index: Tensor) -> Tensor:
        """D[index] (rows of the first axis); override when it can be formed without all of D."""
        return self.delta()[index]

    def factors(self) -> tuple[Tensor, Tensor]:
        """(B, A) with D = reshape(B @ A, W.shape), the scaling folded into B, for generators whose D is one
        low-rank product (``single_product``; what a format without a scale, such as PEFT's HiRA, stores); others
        raise."""
        raise NotImplementedError(f"generator {self.name!r} has no single low-rank product B @ A")

    @classmethod
    def transforms_weight(cls) -> bool:
        """Whether ``transform`` acts after the group map (DoRA's magnitude), so W_eff is not W * g(D) alone."""
        return cls.transform is not Generator.transform

    def transform(self, w_eff: Tensor, weight: Tensor) -> Tensor:
        """Post-process the group-updated weight (identity except for decompositions such as DoRA)."""
        return w_eff

    def merge_transform(self, w_eff: Tensor, weight: Tensor) -> Tensor:
        """transform() for a merge; a generator that overrides transform records here what undoes it."""
        return self.transform(w_eff, weight)

    def unmerge_transform(self, merged: Tensor) -> Tensor:
        """Undo merge_transform (identity for pure group actions)."""
        if type(self).transform is not Generator.transform:
            raise NotImplementedError(
                f"generator {self.name!r} transforms the weight but cannot undo it on unmerge; "
                f"merge with keep_merge_copy=True instead."
            )
        return merged

    def forward(self, *args: Tensor, rows: Tensor | None = None, transform: bool = False) -> Tensor:
        """Dispatch used by torch.func.functional_call when the fast path binds other tensors."""
        if transform:
            return self.transform(*args)
        return self.delta() if rows is None else self.delta_rows(rows)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, r={self.r}, scaling={float(self.scaling):g}"
