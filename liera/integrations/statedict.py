"""Adapters without the model's code: merge into a safetensors state dict, and inspect an adapter.

The LieRA update is elementwise, so a weight's key and shape are all a merge needs. ``merge_file``
streams: it writes the output's header from the base file's header, then one tensor at a time, so
peak memory stays near the largest tensor (plus its adapter).
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import torch

from .. import io
from ..targeting import MODULES_TO_SAVE
from ..weight import AdaptedWeight, build_adapter

PathLike = Union[str, os.PathLike]
SAVED = MODULES_TO_SAVE + "."
ADAPTER = "adapter"  # the one adapter of a file, under a local name
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _read_header(path: Path) -> tuple[dict, int]:
    try:
        with open(path, "rb") as fh:
            size = struct.unpack("<Q", fh.read(8))[0]
            if size > os.path.getsize(path):
                raise ValueError("header length exceeds the file")
            header = json.loads(fh.read(size))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{str(path)!r} is not a safetensors file ({exc}); pass a .safetensors state dict "
                         f"(convert a torch .bin with safetensors.torch.save_file).") from exc
    return header, 8 + size


def _adapters_by_weight(adapter_dir: PathLike):
    config, tensors = io.read_adapter_files(adapter_dir)
    shapes = io.read_weight_shapes(adapter_dir)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    keys = sorted(shapes, key=len, reverse=True)
    for k, t in tensors.items():
        if k.startswith(SAVED):
            continue
        owner = next((w for w in keys if k.startswith(w + ".")), None)
        if owner is None:
            raise ValueError(f"adapter tensor {k!r} belongs to no recorded weight; the adapter was saved without "
                             f"weight shapes (liera < 0.1) or is damaged. Load it on the model and merge there.")
        grouped.setdefault(owner, {})[k[len(owner) + 1:]] = t
    saved = {k[len(SAVED):]: t for k, t in tensors.items() if k.startswith(SAVED)}
    return config, grouped, shapes, saved


def _generator(config, key: str, weight: torch.Tensor, state: dict):
    path, _, param_name = key.rpartition(".")
    generator, settings = build_adapter(config, path, param_name, weight, dtype=next(iter(state.values())).dtype)
    generator.load_state_dict(state)
    adapted = AdaptedWeight(param_name)
    adapted.add(ADAPTER, generator, settings)
    return adapted


def _match_keys(adapter_keys, base_keys) -> dict[str, str]:
    """adapter weight key -> base key, allowing one consistent prefix difference (e.g. 'model.')."""
    base = set(base_keys)
    mapping, missing = {}, []
    for k in adapter_keys:
        if k in base:
            mapping[k] = k
            continue
        hits = [b for b in base if b.endswith("." + k)] or [b for b in base if k.endswith("." + b)]
        if len(hits) == 1:
            mapping[k] = hits[0]
        else:
            missing.append(k)
    if missing:
        raise ValueError(f"{len(missing)} adapted weights have no matching key in the base file (e.g. {missing[:4]}); "
                         f"base keys look like {sorted(base)[:4]}. Is this the base model the adapter was trained on?")
    return mapping


def merge_file(base: PathLike, adapter_dir: PathLike, out: PathLike, dtype: torch.dtype = torch.float32,
               progress: Optional[Callable[[Iterable, str], Iterable]] = None) -> dict:
    """Merge an adapter into a safetensors state dict and write a new file atomically."""
    base, out = Path(base), Path(out)
    if not base.is_file():
        raise FileNotFoundError(f"base file {str(base)!r} does not exist.")
    if out.exists() and out.resolve() == base.resolve():
        raise ValueError("--out is the base file; the merge tool never overwrites its input. Choose another path.")
    if out.exists() and out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a directory; give a file path such as merged.safetensors.")
    header, data_start = _read_header(base)
    meta = header.pop("__metadata__", None)
    config, grouped, shapes, saved = _adapters_by_weight(adapter_dir)
    mapping = _match_keys(sorted(set(grouped) | set(saved)), [k for k in header])
    for k, b in mapping.items():
        want = shapes.get(k) or tuple(saved[k].shape)
        if tuple(header[b]["shape"]) != tuple(want):
            raise ValueError(f"shape mismatch for {b!r}: base file {tuple(header[b]['shape'])}, adapter {tuple(want)}.")
    by_base = {b: k for k, b in mapping.items()}
    order = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    stats = {"merged": 0, "replaced": 0, "copied": 0}

    def write(tmp: str) -> None:
        with open(base, "rb") as src, open(tmp, "wb") as dst:
            blob = json.dumps({**({"__metadata__": meta} if meta else {}), **header}, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)
            dst.write(struct.pack("<Q", len(blob)) + blob)
            for key in (progress(order, "merge") if progress else order):
                info = header[key]
                start, end = info["data_offsets"]
                src.seek(data_start + start)
                raw = src.read(end - start)
                if key in by_base:
                    k = by_base[key]
                    torch_dtype = _DTYPES[info["dtype"]]
                    weight = torch.frombuffer(bytearray(raw), dtype=torch_dtype).reshape(info["shape"]) if raw else \
                        torch.empty(info["shape"], dtype=torch_dtype)
                    new = weight
                    if k in saved:  # trained in full (modules_to_save): its saved value replaces the base one
                        new = saved[k].to(torch_dtype)
                        stats["replaced"] += 1
                    if k in grouped:
                        with torch.no_grad():
                            adapted = _generator(config, k, new, grouped[k])
                            new = adapted.merged_weight(new, [ADAPTER], dtype)
                        if not torch.isfinite(new).all():
                            raise ValueError(f"merging into {key!r} gives non-finite values; nothing was written.")
                        stats["merged"] += 1
                    raw = new.contiguous().numpy().tobytes() if torch_dtype != torch.bfloat16 else \
                        new.contiguous().view(torch.int16).numpy().tobytes()
                    assert len(raw) == end - start
                else:
                    stats["copied"] += 1
                dst.write(raw)

    io.atomic_write(out, write)
    return stats


def inspect_adapter(adapter_dir: PathLike) -> str:
    """A readable report: config, layers, parameter counts, and per-layer statistics of D."""
    config, grouped, shapes, saved = _adapters_by_weight(adapter_dir)
    lines = [f"liera adapter at {adapter_dir}", "",
             "config: " + ", ".join(f"{k}={v!r}" for k, v in config.to_dict().items()
                                    if v not in (None, {}, [], False) and k not in ("library",)), ""]
    total = 0
    rows = []
    for key in sorted(grouped):
        shape = shapes[key]
        adapted = _generator(config, key, torch.ones(shape), grouped[key])  # the weight only gives the shape
        gen = adapted[ADAPTER]
        with torch.no_grad():
            d = gen.delta().double()
        n = sum(p.numel() for p in gen.parameters())  # trained tensors only (not a layer_scale buffer)
        total += n
        taylor_err = ((1 + d) - torch.exp(d)).abs() / torch.exp(d)  # |W(1+D) - W e^D| / |W e^D|, elementwise
        rows.append(f"| {key} | {tuple(shape)} | {n:,} | {d.abs().max().item():.3g} | {d.abs().mean().item():.3g} | "
                    f"{taylor_err.max().item():.3g} |")
    saved_n = sum(t.numel() for t in saved.values())
    lines += [f"adapted weights: {len(grouped)}; adapter parameters: {total:,}"
              + (f"; modules_to_save parameters: {saved_n:,}" if saved_n else ""), "",
              "| weight | shape | params | max abs D | mean abs D | Taylor vs exact, max rel. error |",
              "| --- | --- | ---: | ---: | ---: | ---: |"] + rows
    return "\n".join(lines)
