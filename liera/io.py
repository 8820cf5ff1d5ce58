"""Adapter folders: adapter_config.json + adapter_model.safetensors, written atomically, read with checks.

The one reader (``read_folder``) and writer (``write_folder``) of every adapter format liera touches: its own
(``read_adapter_files`` / ``save_adapter_files``), PEFT-native LieRA and PEFT HiRA (the integrations add only their
keys and config). Every check runs before the caller touches the model; a write goes to a temporary file in the same
directory and is renamed into place, so an interrupted save never leaves a half-written adapter.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from .config import LieRAConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME_PT = "adapter_model.bin"

PathLike = str | os.PathLike


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write(path: PathLike, write: Callable[[str], object]) -> None:
    """Call write(tmp_path) and rename the result onto path; on any error leave path as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_folder(
    directory: PathLike,
    config_text: str,
    tensors: Mapping[str, Tensor],
    safe_serialization: bool = True,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """The one writer of adapter folders (liera's own, PEFT-native LieRA, PEFT HiRA): the tensors (safetensors, or
    torch's pickle without safe_serialization), then adapter_config.json, each written atomically."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"cannot save the adapter to {str(directory)!r}: it is a file; pass a directory path.")
    directory.mkdir(parents=True, exist_ok=True)
    payload = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    if safe_serialization:
        meta = {"format": "pt", **(metadata or {})}
        atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(payload, tmp, metadata=meta))
    else:
        atomic_write(directory / WEIGHTS_NAME_PT, lambda tmp: torch.save(payload, tmp))
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(config_text))


def save_adapter_files(
    directory: PathLike,
    config: LieRAConfig,
    tensors: Mapping[str, Tensor],
    safe_serialization: bool = True,
    weight_shapes: Mapping[str, tuple] | None = None,
) -> None:
    """A liera adapter folder. weight_shapes (adapted weight key -> shape) goes into the file's metadata, so that
    tools such as `liera merge` and `liera inspect` can rebuild the generators without the model's code."""
    shapes = json.dumps({k: list(v) for k, v in (weight_shapes or {}).items()})
    write_folder(
        directory, config.to_json(), tensors, safe_serialization, metadata={"library": "liera", "weight_shapes": shapes}
    )


def adapter_folder(path: PathLike) -> Path:
    """The adapter folder for a path to it or to one of its two files (adapter_config.json, the weights)."""
    path = Path(path)
    if path.is_file() and path.name in (CONFIG_NAME, WEIGHTS_NAME, WEIGHTS_NAME_PT):
        return path.parent
    if path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} is a file, not an adapter folder; pass the folder that save_pretrained "
            f"wrote (it holds {CONFIG_NAME} and {WEIGHTS_NAME})."
        )
    return path


def check_not_input(source: PathLike, target: PathLike, what: str) -> None:
    """Refuse to write an adapter folder over the one it is read from: both formats use the same two file names, so
    the input would be replaced (raised before anything is written)."""
    src, dst = Path(source), Path(target)
    src = src.parent if src.is_file() else src
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise ValueError(
            f"{what}: the output {str(target)!r} is the input adapter folder; a conversion never overwrites its "
            f"input. Choose another folder, e.g. {str(src.resolve().parent / (src.resolve().name + '-converted'))!r}."
        )


def unreadable(path: PathLike, exc: Exception) -> ValueError:
    """The error for a weights file that safetensors or torch cannot read."""
    return ValueError(
        f"cannot read {path}: the file is truncated or corrupted ({type(exc).__name__}: {exc}). "
        f"Save the adapter again (save_pretrained) or copy it again whole."
    )


def _weights_file(directory: Path) -> Path | None:
    return next((p for p in (directory / WEIGHTS_NAME, directory / WEIGHTS_NAME_PT) if p.is_file()), None)


def _checked_folder(directory: PathLike, weights: bool) -> Path:
    """The adapter folder of ``directory``, checked to hold adapter_config.json (and a weights file if ``weights``);
    raise naming every file that is missing."""
    directory = adapter_folder(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"adapter directory {str(directory)!r} does not exist (or is not a directory); "
            f"pass the directory that save_pretrained wrote."
        )
    present = ((CONFIG_NAME, (directory / CONFIG_NAME).is_file()), (WEIGHTS_NAME, _weights_file(directory) is not None))
    missing = [name for name, ok in present[: 2 if weights else 1] if not ok]
    if missing:
        raise FileNotFoundError(
            f"adapter directory {str(directory)!r} lacks {missing}; an adapter folder holds {CONFIG_NAME} and "
            f"{WEIGHTS_NAME} (written by save_pretrained): copy the whole folder."
        )
    return directory


def read_config_data(directory: PathLike, weights: bool = False) -> dict:
    """adapter_config.json of an adapter folder (or of the folder of one of its files) as a dict, checked to be a
    JSON object (``weights``: the weights file must be there too); raise naming what is wrong."""
    config_path = _checked_folder(directory, weights) / CONFIG_NAME
    try:
        data = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{config_path} is not valid JSON ({exc}); the adapter config is damaged.") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{config_path} does not hold a JSON object; it is not an adapter config.")
    return data


def read_folder(directory: PathLike) -> tuple[dict, dict[str, Tensor]]:
    """The one reader of adapter folders (liera's own, PEFT-native LieRA, PEFT HiRA): the config as a dict and the
    tensors, every file checked (present, valid JSON, weights readable and whole); raise naming what is wrong."""
    data = read_config_data(directory, weights=True)
    path = _weights_file(adapter_folder(directory))
    assert path is not None  # read_config_data checked it
    try:
        if path.name == WEIGHTS_NAME:
            tensors = load_file(str(path))
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors and torch raise several types for truncated or corrupt files
        raise unreadable(path, exc) from exc
    return data, dict(tensors)


def read_tensor_shapes(directory: PathLike) -> dict[str, tuple]:
    """Tensor name -> shape of an adapter folder's weights, from the file's header only (safetensors checks that the
    header is whole and that the file covers every tensor it lists, so a truncated file fails here)."""
    path = _weights_file(_checked_folder(directory, weights=True))
    assert path is not None  # _checked_folder checked it
    try:
        if path.name == WEIGHTS_NAME:
            with safe_open(str(path), framework="pt") as fh:
                return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
        return {k: tuple(v.shape) for k, v in torch.load(path, map_location="cpu", weights_only=True).items()}
    except Exception as exc:  # safetensors and torch raise several types for truncated or corrupt files
        raise unreadable(path, exc) from exc


def read_adapter_files(directory: PathLike) -> tuple[LieRAConfig, dict[str, Tensor]]:
    """Read and validate a liera adapter folder (or a path to one of its files); raise a clear error naming what is
    wrong."""
    data, tensors = read_folder(directory)
    return LieRAConfig.from_dict(data), tensors


def read_weight_shapes(directory: PathLike) -> dict[str, tuple]:
    """The adapted weights' shapes recorded by save_pretrained (empty for files without them)."""
    path = adapter_folder(directory) / WEIGHTS_NAME
    if not path.is_file():
        return {}
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    return {k: tuple(v) for k, v in json.loads(meta.get("weight_shapes", "{}")).items()}


def load_planned(plan: Sequence[tuple], saved: Mapping[str, Tensor], tensors: Mapping[str, Tensor], where: str) -> None:
    """Load an adapter's tensors into planned generators ((target, generator, settings), not attached yet) and into
    the parameters trained in full; every name and shape is checked before anything is loaded."""
    expected = {f"{t.key}.{k}": tuple(v.shape) for t, gen, _ in plan for k, v in gen.state_dict().items()}
    check_tensors({**expected, **{k: tuple(p.shape) for k, p in saved.items()}}, tensors, where)
    for target, generator, _ in plan:
        prefix = target.key + "."
        own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        generator.load_state_dict(own, strict=False)
    with torch.no_grad():
        for key, p in saved.items():
            p.copy_(tensors[key])


def check_tensors(expected: Mapping[str, tuple], tensors: Mapping[str, Tensor], where: str) -> None:
    """Raise if tensors has missing, unexpected or misshapen entries (naming the first few)."""
    missing = [k for k in expected if k not in tensors]
    extra = [k for k in tensors if k not in expected]
    shapes = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(expected[k])}"
        for k in expected
        if k in tensors and tuple(tensors[k].shape) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[:3]})")
    if extra:
        problems.append(f"{len(extra)} unexpected (e.g. {extra[:3]})")
    if shapes:
        problems.append(f"{len(shapes)} with other shapes (e.g. {shapes[:3]})")
    if problems:
        raise ValueError(
            f"adapter tensors do not fit this model ({where}): "
            + "; ".join(problems)
            + ". Was the adapter trained on another model or with another config?"
        )
