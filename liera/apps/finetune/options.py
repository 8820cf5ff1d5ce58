"""Options of `liera finetune`: the command-line parser, config files (YAML/JSON) and their coercion, and the
constants (built-in data and models, head names, learning rates, defaults)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Union

from ..demo import DEFAULT_LRS

BUILTIN_DATA = ("fashion-1k", "digits-1k")
BUILTIN_MODELS = {"efficientnet-lite0": "image", "minilm": "text"}
HEAD_NAMES = ("classifier", "_fc", "fc", "head", "score")
LIERA_METHODS = ("lora", "liera-taylor", "liera-exact", "liera-rms")
IMAGE_SUFFIXES = (".npz",)
IMAGE_CACHE_BYTES = 512 * 2 ** 20  # larger image sets are converted batch by batch
TEXT_SUFFIXES = (".csv", ".jsonl", ".json")
# Starting points, not tuned for your data: images use the demo's learning rates (chosen on a validation split
# of Fashion-MNIST-1k with EfficientNet-Lite0); text uses common transformer values (liera-rms takes LoRA's:
# its scaling gives each layer LoRA's step size).
IMAGE_LRS = DEFAULT_LRS
TEXT_LRS = {"linear-probe": 1e-2, "lora": 1e-3, "liera-taylor": 3e-3, "liera-exact": 3e-3, "liera-rms": 1e-3,
            "full": 5e-5, "peft-lora": 1e-3}

DEFAULTS: dict[str, Any] = {
    "data": None, "model": None, "out": "liera-finetune", "method": "liera-rms", "r": 8, "alpha": None,
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
    from ..methods import METHODS
    from . import __doc__ as description  # the package's docstring: what `liera finetune --help` shows

    p = subparsers.add_parser(
        "finetune", help="fine-tune a model on your own data (image folder, .npz, CSV/JSONL text)",
        description=description.split("\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS)  # absent flags stay absent, so a --config file can fill them
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file whose keys are these option names")
    p.add_argument("--data", help="image folder, .npz, .csv, .jsonl, or a built-in: fashion-1k, digits-1k")
    p.add_argument("--model", help="transformers directory, module:function factory, or efficientnet-lite0 / minilm "
                                   "(default: efficientnet-lite0 for images, minilm for text)")
    p.add_argument("--method", help=f"one of {', '.join(METHODS)} (default liera-rms: LieRA-Taylor with each "
                                    f"layer's step scaled by 1 / rms(W), the LieRA form that measured best)")
    p.add_argument("--r", "--rank", dest="r", type=int, help="rank of the generator (default 8); under torchrun write --rank: torchrun reads --r as an abbreviation of its own --rdzv-* options")
    p.add_argument("--alpha", type=float, help="scale numerator, scale = alpha / r (default: r)")
    p.add_argument("--exp-map", dest="exp_map", choices=["taylor", "exact"],
                   help="the map of a LieRA method: with liera-taylor / liera-exact it picks between them; "
                        "with liera-rms (the default) it picks the map under the rms scaling")
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
    from .run import run_finetune

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

