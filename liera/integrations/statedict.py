"""Adapters without the model's code: merge into a safetensors state dict, inspect an adapter, and report the
sparsity (zeros, N:M validity) of a safetensors file.

The LieRA update is elementwise, so a weight's key and shape are all a merge needs. ``merge_file``
streams: it writes the output's header from the base file's header, then one tensor at a time, so
peak memory stays near the largest tensor (plus its adapter).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from .. import io
from ..sparsity import NM_PATTERNS, LayerSparsity, layer_sparsity, sparsity_report
from ..targeting import MODULES_TO_SAVE
from ..weight import AdaptedWeight, build_adapter

PathLike = str | os.PathLike
SAVED = MODULES_TO_SAVE + "."
ADAPTER = "adapter"  # the one adapter of a file, under a local name
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def _raw_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()


def _read_header(path: Path) -> tuple[dict, int]:
    try:
        with open(path, "rb") as fh:
            size = struct.unpack("<Q", fh.read(8))[0]
            if size > os.path.getsize(path):
                raise ValueError("header length exceeds the file")
            header = json.loads(fh.read(size))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"{str(path)!r} is not a safetensors file ({exc}); pass a .safetensors state dict "
            f"(convert a torch .bin with safetensors.torch.save_file)."
        ) from exc
    return header, 8 + size


def adapters_by_weight(adapter_dir: PathLike):
    """(config, weight key -> {tensor name: tensor}, weight key -> shape, modules_to_save key -> tensor) of a liera
    adapter folder, its tensors grouped by the weight they adapt (through the recorded weight shapes)."""
    config, tensors = io.read_adapter_files(adapter_dir)
    shapes = io.read_weight_shapes(adapter_dir)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    keys = sorted(shapes, key=len, reverse=True)
    for k, t in tensors.items():
        if k.startswith(SAVED):
            continue
        owner = next((w for w in keys if k.startswith(w + ".")), None)
        if owner is None:
            raise ValueError(
                f"adapter tensor {k!r} belongs to no recorded weight; the adapter was saved without "
                f"weight shapes (liera < 0.1) or is damaged. Load it on the model and merge there."
            )
        grouped.setdefault(owner, {})[k[len(owner) + 1 :]] = t
    saved = {k[len(SAVED) :]: t for k, t in tensors.items() if k.startswith(SAVED)}
    return config, grouped, shapes, saved


def _generator(config, key: str, weight: torch.Tensor, state: dict):
    path, _, param_name = key.rpartition(".")
    generator, settings = build_adapter(config, path, param_name, weight, dtype=next(iter(state.values())).dtype)
    generator.load_state_dict(state)
    adapted = AdaptedWeight(param_name)
    adapted.add(ADAPTER, generator, settings)
    return adapted


def _match_keys(adapter_keys, base_keys, required: bool = True) -> dict[str, str]:
    """adapter key -> base key, allowing one consistent prefix difference (e.g. 'model.'). Keys that match nothing
    raise when ``required`` (adapted weights must exist in the base), else are left out."""
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
    if missing and required:
        raise ValueError(
            f"{len(missing)} adapted weights have no matching key in the base file (e.g. {missing[:4]}); "
            f"base keys look like {sorted(base)[:4]}. Is this the base model the adapter was trained on?"
        )
    return mapping


def merge_file(
    base: PathLike,
    adapter_dir: PathLike,
    out: PathLike,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[Iterable, str], Iterable] | None = None,
) -> dict:
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
    config, grouped, shapes, saved = adapters_by_weight(adapter_dir)
    mapping = _match_keys(sorted(grouped), list(header))
    # tensors trained in full (modules_to_save) replace the base's; one the base lacks (a new head) is added
    mapping.update(_match_keys(sorted(saved), list(header), required=False))
    added = {k: saved[k] for k in sorted(saved) if k not in mapping}
    for k, b in mapping.items():
        want = shapes.get(k) or tuple(saved[k].shape)
        if tuple(header[b]["shape"]) != tuple(want):
            raise ValueError(
                f"shape mismatch for {b!r}: base file {tuple(header[b]['shape'])}, adapter {tuple(want)}. "
                f"The adapter was trained on a model whose {b!r} has another shape: pass the base weights "
                f"of that model (same size and config; a head trained in full must have the base head's "
                f"number of classes)."
            )
    by_base = {b: k for k, b in mapping.items()}
    order = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    stats = {"merged": 0, "replaced": 0, "added": len(added), "copied": 0}
    end_of_data = max((header[k]["data_offsets"][1] for k in header), default=0)
    extra = {}  # header entries of the added tensors, after the base's data
    for k, t in added.items():
        if k in header:
            raise ValueError(f"the adapter's new tensor {k!r} clashes with a base key; nothing was written.")
        size = t.numel() * t.element_size()
        extra[k] = {
            "dtype": _DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [end_of_data, end_of_data + size],
        }
        end_of_data += size

    def write(tmp: str) -> None:
        with open(base, "rb") as src, open(tmp, "wb") as dst:
            blob = json.dumps(
                {**({"__metadata__": meta} if meta else {}), **header, **extra}, separators=(",", ":")
            ).encode()
            blob += b" " * (-len(blob) % 8)
            dst.write(struct.pack("<Q", len(blob)) + blob)
            for key in progress(order, "merge") if progress else order:
                info = header[key]
                start, end = info["data_offsets"]
                src.seek(data_start + start)
                raw = src.read(end - start)
                if key in by_base:
                    k = by_base[key]
                    torch_dtype = _DTYPES[info["dtype"]]
                    weight = (
                        torch.frombuffer(bytearray(raw), dtype=torch_dtype).reshape(info["shape"])
                        if raw
                        else torch.empty(info["shape"], dtype=torch_dtype)
                    )
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
                    raw = _raw_bytes(new)
                    assert len(raw) == end - start
                else:
                    stats["copied"] += 1
                dst.write(raw)
            for t in added.values():
                dst.write(_raw_bytes(t))

    io.atomic_write(out, write)
    return stats


def inspect_adapter(adapter_dir: PathLike) -> str:
    """A readable report: config, layers, parameter counts, and per-layer statistics of D."""
    config, grouped, shapes, saved = adapters_by_weight(adapter_dir)
    lines = [
        f"liera adapter at {adapter_dir}",
        "",
        "config: "
        + ", ".join(
            f"{k}={v!r}"
            for k, v in config.to_dict().items()
            if v not in (None, {}, [], False) and k not in ("library",)
        ),
        "",
    ]
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
        rows.append(
            f"| {key} | {tuple(shape)} | {n:,} | {d.abs().max().item():.3g} | {d.abs().mean().item():.3g} | "
            f"{taylor_err.max().item():.3g} |"
        )
    saved_n = sum(t.numel() for t in saved.values())
    lines += [
        f"adapted weights: {len(grouped)}; adapter parameters: {total:,}"
        + (f"; modules_to_save parameters: {saved_n:,}" if saved_n else ""),
        "",
        "| weight | shape | params | max abs D | mean abs D | Taylor vs exact, max rel. error |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ] + rows
    return "\n".join(lines)


def is_weights_file(path: PathLike) -> bool:
    """Whether ``path`` is a model's weights (a .safetensors file, or a folder of them) rather than a liera adapter
    folder or one of its files (which hold adapter_config.json beside them)."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    if (folder / io.CONFIG_NAME).is_file():
        return False
    return path.suffix == ".safetensors" if path.is_file() else path.is_dir() and any(path.glob("*.safetensors"))


def _tensor_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if files:
            return files
    raise FileNotFoundError(
        f"{str(path)!r} is neither a liera adapter folder nor a .safetensors file (or a folder "
        f"holding some); pass an adapter folder, a model's .safetensors state dict or its folder."
    )


def file_sparsity(path: PathLike, patterns=NM_PATTERNS) -> list[LayerSparsity]:
    """Zeros and N:M validity of every floating tensor of order >= 2 in a safetensors file or a folder of them, read
    one tensor at a time. N:M runs along dim 1 (the inputs of Linear and conv weights); a file does not say which
    module a 2-D tensor belongs to, so where dim 0 holds more of the patterns (GPT-2's Conv1D stores (in, out)),
    the row reports dim 0 and says so."""
    rows = []
    for file in _tensor_files(Path(path)):
        header, data_start = _read_header(file)
        header.pop("__metadata__", None)
        with open(file, "rb") as fh:
            for key in sorted(header, key=lambda k: header[k]["data_offsets"][0]):
                info = header[key]
                dtype = _DTYPES.get(info["dtype"])
                if dtype is None or not dtype.is_floating_point or len(info["shape"]) < 2:
                    continue
                start, end = info["data_offsets"]
                fh.seek(data_start + start)
                raw = fh.read(end - start)
                weight = (
                    torch.frombuffer(bytearray(raw), dtype=dtype).reshape(info["shape"])
                    if raw
                    else torch.empty(info["shape"], dtype=dtype)
                )
                row = layer_sparsity(key, weight, patterns)
                if weight.dim() == 2 and not all(row.nm.values()):
                    other = layer_sparsity(key, weight, patterns, dim=0)
                    if sum(map(bool, other.nm.values())) > sum(map(bool, row.nm.values())):
                        row = other  # laid out (in, out): the inputs run along dim 0
                rows.append(row)
    if not rows:
        raise ValueError(f"{str(path)!r} holds no floating-point tensor of order >= 2 (no weight to report on).")
    return rows


def inspect_sparsity(path: PathLike, patterns=NM_PATTERNS) -> str:
    """A readable per-tensor sparsity report of a safetensors state dict (``liera inspect model.safetensors``)."""
    return sparsity_report(file_sparsity(path, patterns), f"sparsity of {path}")
