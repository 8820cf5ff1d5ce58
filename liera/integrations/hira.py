"""PEFT interop: a LieRA-Taylor adapter with the LoRA generator *is* a PEFT HiRA adapter.

HiRA computes W + W * (B_h @ A_h) with no scaling, on the same (out, prod(rest)) matricisation, so
liera's s * B @ A maps onto it exactly by folding s into B. Everything else has no exact HiRA
equivalent (the exact map, other generators, the additive update, grouped or transposed convolutions,
raw target parameters, layer kinds that declare no weight layout) and is refused with the reason, before
anything is read or written. What can be exported is read from typed fields, not names: a generator's
``single_product`` / ``transforms_weight()`` and a layer kind's ``layout``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import Tensor, nn

from .. import io
from ..config import LieRAConfig
from ..generators import Generator, get_generator
from ..group import MULTIPLICATIVE, TAYLOR
from ..layers import WeightLayout, kind_of
from ..model import DEFAULT_ADAPTER, LieRAModel
from ..targeting import MODULES_TO_SAVE

PREFIX = "base_model.model."
PathLike = str | os.PathLike


def generator_refusal(cls: type[Generator]) -> str | None:
    """Why HiRA cannot hold this generator's adapter (None: it can), from the class's typed capabilities alone."""
    if cls.transforms_weight():
        return (
            f"generator={cls.name!r} (W_eff = {cls.form}; HiRA has no step after W + W * D, so only a "
            f"generator without transform() exports)"
        )
    if not cls.single_product:
        return f"generator={cls.name!r} (its D = {cls.form}; HiRA's D is one plain product B @ A)"
    return None


def _layout(key: str, owner: nn.Module, param_name: str) -> tuple[WeightLayout | None, str | None]:
    """(the weight's layout, None) if HiRA can hold an update of ``owner.<param_name>``, else (None, why not)."""
    kind = kind_of(owner)
    if kind is None or param_name != kind.weight_name:
        return None, f"{key} is a target parameter (HiRA adapts modules only)"
    if kind.layout is None:
        return None, (
            f"{key} is a {kind.name}, whose LayerKind declares no weight layout (set layout=WeightLayout...."
            f" on it, so that the export knows how W is stored)"
        )
    if isinstance(owner, nn.modules.conv._ConvTransposeNd):
        return None, f"{key} is a transposed convolution (HiRA has none)"
    if int(getattr(owner, "groups", 1)) > 1:
        return None, f"{key} is a grouped/depthwise convolution (HiRA refuses groups > 1)"
    return kind.layout, None


def export_peft(model: LieRAModel, save_directory: PathLike, adapter_name: str | None = None) -> None:
    """Write the adapter as a PEFT HiRA adapter that ``peft.PeftModel.from_pretrained`` loads. Everything that
    HiRA cannot express is refused, with every reason, before any tensor is read or any file written."""
    name = model.known(adapter_name or model.active_adapters[0])[0]
    cfg = model.peft_config[name]
    why = []
    if cfg.exp_map != TAYLOR:
        why.append("exp_map='exact' (HiRA is the first-order Taylor map W + W * D)")
    if cfg.update != MULTIPLICATIVE:
        why.append("update='additive' (that is LoRA, not HiRA; export it as a PEFT LoRA adapter instead)")
    adapted_here = [(key, owner, adapted) for key, owner, adapted in model.adapted_weights() if name in adapted]
    classes = {get_generator(cfg.generator), *(type(adapted[name]) for _, _, adapted in adapted_here)}
    why += sorted({reason for cls in classes if (reason := generator_refusal(cls)) is not None})
    layouts = {}
    for key, owner, adapted in adapted_here:
        layout, reason = _layout(key, owner, adapted.param_name)
        if reason is not None:
            why.append(reason)
        layouts[key] = layout
    if why:
        raise ValueError(
            "this adapter has no exact PEFT HiRA equivalent: " + "; ".join(why[:6]) + (" ..." if len(why) > 6 else "")
        )
    layers: list[tuple[str, WeightLayout | None, torch.Size, Tensor, Tensor]] = []
    for key, owner, adapted in adapted_here:  # every check passed: now read the factors
        b, a = (f.detach().float() for f in adapted[name].factors())
        layers.append((key.rsplit(".", 1)[0], layouts[key], adapted.owner_weight(owner).shape, a, b))
    tensors: dict[str, Tensor] = {}
    # one rank for all layers, lower ranks padded with zero components (B @ A unchanged): PEFT's HiRA builds every
    # layer at config.r and ignores rank_pattern (peft 0.21); import_peft trims the padding again
    rank = max(a.shape[0] for _, _, _, a, _ in layers)
    for path, layout, weight_shape, a, b in layers:
        pad = rank - a.shape[0]
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])], 0)
        b = torch.cat([b, b.new_zeros(b.shape[0], pad)], 1)
        if layout is WeightLayout.OUT_IN:
            out = {"hira_A": a, "hira_B": b}
        elif layout is WeightLayout.KERNEL:
            out = {
                "hira_A": a.reshape(rank, *weight_shape[1:]),
                "hira_B": b.reshape(b.shape[0], rank, *([1] * (len(weight_shape) - 2))),
            }
        elif layout is WeightLayout.TABLE:
            out = {"hira_embedding_A": b.t(), "hira_embedding_B": a.t()}
        elif layout is WeightLayout.IN_OUT:  # GPT-2 Conv1D keeps W as (in, out); PEFT transposes B @ A for it
            out = {"hira_A": b.t(), "hira_B": a.t()}
        else:  # a new WeightLayout member needs its own branch here
            raise AssertionError(f"export_peft has no HiRA layout for {layout}")
        for suffix, t in out.items():
            tensors[f"{PREFIX}{path}.{suffix}"] = t.contiguous()
    for key, t in model.get_adapter_state_dict(name).items():
        if key.startswith(MODULES_TO_SAVE + "."):
            tensors[PREFIX + key[len(MODULES_TO_SAVE) + 1 :]] = t.float().contiguous()
    config: dict[str, Any] = {
        "peft_type": "HIRA",
        "task_type": None,
        "r": rank,
        "target_modules": sorted(p for p, *_ in layers),
        "rank_pattern": {},
        "hira_dropout": cfg.dropout,
        "init_weights": True,
        "fan_in_fan_out": False,
        "modules_to_save": cfg.modules_to_save,
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
        "base_model_name_or_path": None,
        "revision": None,
    }
    io.write_folder(save_directory, json.dumps(config, indent=2), tensors)


def import_peft(
    model: nn.Module, directory: PathLike, adapter_name: str = DEFAULT_ADAPTER, is_trainable: bool = False
) -> LieRAModel:
    """Load a PEFT HiRA adapter as a liera adapter (LieRA-Taylor, LoRA generator, scale folded in)."""
    peft_cfg, raw = io.read_folder(directory)
    kind = peft_cfg.get("peft_type")
    if kind != "HIRA":
        raise ValueError(
            f"{str(directory)!r} holds a PEFT {kind!r} adapter; liera.import_peft reads HiRA adapters "
            f"only (HiRA is LieRA-Taylor); load {kind} adapters with peft itself."
        )
    base = model.base_model if isinstance(model, LieRAModel) else model
    factors: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, torch.Tensor] = {}
    for key, t in raw.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"unexpected key {key!r} in {str(directory)!r} (PEFT keys start with {PREFIX!r}).")
        path, _, suffix = key[len(PREFIX) :].rpartition(".")
        if suffix.startswith("hira_"):
            factors.setdefault(path, {})[suffix] = t
        else:
            saved[key[len(PREFIX) :]] = t
    tensors, ranks = {}, {}
    for path, f in factors.items():
        try:
            owner = base.get_submodule(path)
        except AttributeError:
            raise ValueError(f"the HiRA adapter adapts {path!r}, which this model does not have.") from None
        layout, reason = _layout(f"{path}.weight", owner, "weight")
        if reason is not None:
            raise ValueError(f"cannot read this HiRA adapter into this model: {reason}.")
        if layout is WeightLayout.TABLE:
            b, a = f["hira_embedding_A"].t(), f["hira_embedding_B"].t()
        elif layout is WeightLayout.IN_OUT:
            b, a = f["hira_A"].t(), f["hira_B"].t()
        else:
            a, b = f["hira_A"].reshape(f["hira_A"].shape[0], -1), f["hira_B"].reshape(f["hira_B"].shape[0], -1)
        keep = a.shape[0]  # trailing components that are zero in both factors are export padding (see export_peft)
        while keep > 1 and not a[keep - 1].any() and not b[:, keep - 1].any():
            keep -= 1
        a, b = a[:keep], b[:, :keep]
        tensors[f"{path}.weight.lora_A"], tensors[f"{path}.weight.lora_B"] = a.contiguous(), b.contiguous()
        ranks[path] = a.shape[0]
    modules_to_save = sorted({k.rsplit(".", 1)[0] for k in saved}) or None
    for key, t in saved.items():
        tensors[f"{MODULES_TO_SAVE}.{key}"] = t
    r = int(peft_cfg.get("r") or max(ranks.values()))
    config = LieRAConfig(
        r=r,
        alpha=float(r),
        target_modules=sorted(ranks),
        exp_map=TAYLOR,
        generator="lora",
        dropout=float(peft_cfg.get("hira_dropout") or 0.0),
        modules_to_save=modules_to_save,
        rank_pattern={p: k for p, k in ranks.items() if k != r},
        alpha_pattern={p: float(k) for p, k in ranks.items() if k != r},
    )
    if isinstance(model, LieRAModel):
        model.add_adapter(adapter_name, config, state_dict=tensors, is_trainable=is_trainable)
        return model
    wrapped = LieRAModel(model, config, adapter_name, state_dict=tensors, is_trainable=is_trainable)
    if not is_trainable:
        wrapped.eval()
    return wrapped
