"""PEFT's own adapters (the `peft-*` arms of the method table) on the layers liera's arms adapt, as outside
references. Plain models (transformers LLMs, BERT) need nothing special; EfficientNet-Lite0 does.

Two things keep PEFT from adapting a model such as EfficientNet-Lite0 as it is:

* PEFT builds its LoRA convs by calling the base conv's class constructor. Convs that pad in their own
  forward (efficientnet's ``Conv2dStaticSamePadding``: a ``static_padding`` module, then ``F.conv2d``) take
  other constructor arguments (an image size, asserted). :func:`plain_convs` swaps each for
  ``nn.Sequential(static_padding, plain conv)`` sharing the same weight and bias Parameters: same outputs.
* PEFT refuses grouped convs unless ``r % groups == 0``, so at r = 8 no depthwise conv (groups = channels)
  can be adapted. The plain conv of a grouped conv is a :class:`GroupedConv2d` (a marker subclass of
  ``nn.Conv2d``), which PEFT's custom-module mechanism (``LoraConfig._register_custom_module``, experimental
  in PEFT) hands to :class:`GroupedConvLora`: LoRA on the conv weight W of shape
  (out, in/groups, kh, kw), ``ΔW = (alpha / r) * reshape(B @ A, W.shape)`` with B (out, r) zero and
  A (r, in/groups*kh*kw) kaiming-uniform(a=sqrt(5)) at init, as PEFT initializes LoRA; the forward is one
  conv with W + ΔW. Its parameter count equals liera's LoRA on the same layer.

Every other conv (groups = 1) gets PEFT's own ``lora.Conv2d``. DoRA and HiRA get no grouped-conv layer (PEFT
refuses groups > 1 for them). This module imports peft; liera.apps.training imports it only for PEFT's arms.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from peft import HiraConfig, LoraConfig, get_peft_model
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from ..config import LieRAConfig
from ..targeting import find_targets
from .methods import Method


class GroupedConv2d(nn.Conv2d):
    """A plain nn.Conv2d with groups > 1; its own type only so that PEFT dispatches it to GroupedConvLora."""


def _pads_itself(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Conv2d)
        and type(module) not in (nn.Conv2d, GroupedConv2d)
        and isinstance(getattr(module, "static_padding", None), nn.Module)
    )


def plain_convs(model: nn.Module) -> dict[str, str]:
    """Replace (in place) every Conv2d subclass that pads in its own forward via a `static_padding` module
    by nn.Sequential(static_padding, plain conv) with the same Parameters (a GroupedConv2d when groups > 1).
    Returns {old path: path of the plain conv}."""
    moved = {}
    for name, conv in list(model.named_modules()):
        if not _pads_itself(conv) or conv.padding_mode != "zeros":
            continue
        cls = GroupedConv2d if conv.groups > 1 else nn.Conv2d
        with torch.device("meta"):  # no throwaway initialization; the real Parameters are set below
            plain = cls(
                conv.in_channels,
                conv.out_channels,
                conv.kernel_size,
                stride=tuple(conv.stride),
                padding=conv.padding,
                dilation=conv.dilation,
                groups=conv.groups,
                bias=conv.bias is not None,
            )
        plain.weight = conv.weight
        plain.bias = conv.bias
        parent, _, child = name.rpartition(".")
        model.get_submodule(parent).register_module(child, nn.Sequential(conv.static_padding, plain))
        moved[name] = f"{name}.1"
    return moved


class GroupedConvLora(nn.Module, LoraLayer):
    """PEFT LoRA layer for a grouped conv (see the module docstring), dispatched by PEFT for GroupedConv2d
    through `LoraConfig._register_custom_module({GroupedConv2d: GroupedConvLora})`."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1, **kwargs
    ) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs) -> None:
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        if config.use_dora or config.use_rslora or config.lora_bias or config.init_lora_weights not in (True, False):
            raise ValueError(
                "the grouped-conv LoRA layer supports plain LoRA only (no DoRA, rsLoRA, "
                "lora_bias or special initializations)"
            )
        weight = self.base_weight()
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / r
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_A[adapter_name] = nn.Linear(weight[0].numel(), r, bias=False)  # A: (r, in/groups*kh*kw)
        self.lora_B[adapter_name] = nn.Linear(r, weight.shape[0], bias=False)  # B: (out, r)
        self.lora_bias[adapter_name] = False
        self.use_rslora[adapter_name] = False
        self.use_dora[adapter_name] = False
        self.reset_lora_parameters(adapter_name, config.init_lora_weights)  # A kaiming(a=sqrt 5), B = 0
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def base_weight(self) -> torch.Tensor:
        """The conv's weight (a Parameter; typed here, since PEFT's get_base_layer() returns any Module)."""
        return self.get_base_layer().get_parameter("weight")

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        w = self.base_weight()
        delta = self.lora_B[adapter].get_parameter("weight") @ self.lora_A[adapter].get_parameter("weight")
        return (delta * self.scaling[adapter]).reshape(w.shape).to(w.dtype)

    def _conv(self, x, weight, bias):
        base = self.get_base_layer()
        return F.conv2d(x, weight, bias, base.stride, base.padding, base.dilation, base.groups)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        for name in check_adapters_to_merge(self, adapter_names):
            if name in self.lora_A:
                self.base_weight().data += self.get_delta_weight(name)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.lora_A:
                self.base_weight().data -= self.get_delta_weight(name)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.get_base_layer()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base(x)
        if self.merged:
            return base(x)
        weight, extra = self.base_weight(), None
        for a in self.active_adapters:
            if a not in self.lora_A:
                continue
            if isinstance(self.lora_dropout[a], nn.Identity):  # one conv with W + ΔW
                weight = weight + self.get_delta_weight(a)
            else:  # dropout acts on the adapter's input only
                out = self._conv(self.lora_dropout[a](x), self.get_delta_weight(a), None)
                extra = out if extra is None else extra + out
        result = self._conv(x, weight, base.bias)
        return result if extra is None else result + extra

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def peft_arm(
    model: nn.Module,
    method: Method,
    *,
    r: int,
    alpha: float,
    target_modules,
    head: str | None = None,
    dropout: float = 0.0,
):
    """PEFT's own adapter (method.options: {"peft": "lora" | "hira", "use_dora": ...}) on the layers liera's arms
    adapt for `target_modules` (model changed in place); the head, if any, is trained in full (modules_to_save).
    Returns (peft model, note)."""
    saved = [head] if head else None
    names = [
        t.path
        for t in find_targets(
            model, LieRAConfig(r=r, target_modules=target_modules, modules_to_save=saved, exclude_modules=saved)
        )
    ]
    moved = plain_convs(model)
    names = [moved.get(n, n) for n in names]
    exact = "|".join(re.escape(n) for n in names)  # exactly these paths
    options = {k: v for k, v in method.options.items() if k != "peft"}
    kind = method.options["peft"]
    config: LoraConfig | HiraConfig
    if kind == "lora":
        config = LoraConfig(
            r=r,
            # PEFT annotates lora_alpha as int; any number works (it only enters scaling = alpha / r)
            lora_alpha=alpha,  # type: ignore[arg-type]
            lora_dropout=dropout,
            modules_to_save=saved,
            target_modules=exact,
            **options,
        )
        if not options.get("use_dora"):
            config._register_custom_module({GroupedConv2d: GroupedConvLora})
    elif kind == "hira":  # HiRA has no alpha: W + W * (B @ A)
        config = HiraConfig(r=r, hira_dropout=dropout, modules_to_save=saved, target_modules=exact, **options)
    else:
        raise ValueError(f"method {method.name!r}: unknown PEFT method {kind!r}")
    wrapped = get_peft_model(model, config)
    n_grouped = sum(isinstance(m, GroupedConvLora) for m in wrapped.modules())
    grouped = (
        f" ({n_grouped} grouped convs through a custom PEFT LoRA layer: PEFT's own needs r % groups == 0)"
        if n_grouped
        else ""
    )
    note = f"{method.label} on {len(names)} layers{grouped}"
    return wrapped, note
