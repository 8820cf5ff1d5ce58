"""Options of `liera finetune`: the command-line arguments, config files (YAML/JSON) and their coercion."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ...group import EXP_MAPS
from ..methods import METHODS
from .constants import BUILTIN_DATA, BUILTIN_MODELS, DEFAULTS, HEAD_NAMES, LM_DATA

HELP = "fine-tune a model on your own data (image folder, .npz, CSV/JSONL text) or a built-in task"

_INT = ("r", "epochs", "batch_size", "seed", "resolution", "max_length", "threads", "train_examples", "max_steps")
_FLOAT = ("alpha", "lr")
_STR = ("data", "model", "out", "method", "exp_map", "generator", "head", "text_column", "label_column", "prune")


# ====================================================================== command line
def add_arguments(subparsers, description: str) -> argparse.ArgumentParser:
    """Register `liera finetune` and its arguments on the subparsers of the `liera` command."""
    p = subparsers.add_parser(
        "finetune",
        help=HELP,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )  # absent flags stay absent, so a --config file can fill them
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file whose keys are these option names")
    p.add_argument(
        "--data",
        help=f"image folder, .npz, .csv, .jsonl, a built-in image set ({', '.join(BUILTIN_DATA)}) "
        f"or a language-model task ({', '.join(LM_DATA)})",
    )
    p.add_argument(
        "--model",
        help=f"transformers directory, module:function factory, or a built-in: "
        f"{', '.join(BUILTIN_MODELS)} (default: efficientnet-lite0 for images, minilm for "
        f"text, smollm2-135m for the language-model tasks)",
    )
    p.add_argument(
        "--method",
        help=f"one of {', '.join(METHODS)} (default liera-rms: LieRA-Taylor with each "
        f"layer's step scaled by 1 / rms(W), the LieRA form that measured best)",
    )
    p.add_argument(
        "--r",
        "--rank",
        dest="r",
        type=int,
        help="rank of the generator (default 8); under torchrun write --rank: torchrun reads --r as an abbreviation "
        "of its own --rdzv-* options",
    )
    p.add_argument(
        "--alpha",
        type=float,
        help="scale numerator, scale = alpha / r (default: r; 2r for a language-model "
        "task, as in the paper's LLaMA recipe)",
    )
    p.add_argument(
        "--exp-map",
        dest="exp_map",
        choices=list(EXP_MAPS),
        help="the map of a LieRA method: with liera-taylor / liera-exact it picks between them; "
        "with liera-rms (the default) it picks the map under the rms scaling",
    )
    p.add_argument("--generator", help="registered generator: lora (default), dora, pissa, loha, lokr, ...")
    p.add_argument(
        "--target-modules",
        dest="target_modules",
        help="comma-separated module names, a regex, or all-linear / all-conv / all "
        "(default: all-conv for CNNs, all-linear for transformers, q/k/v/up/down projections for a "
        "language-model task)",
    )
    p.add_argument("--head", help=f"module trained in full (default: the first of {', '.join(HEAD_NAMES)})")
    p.add_argument("--epochs", type=int, help="default 5")
    p.add_argument(
        "--train-examples",
        dest="train_examples",
        type=int,
        help="train on the first N questions of a language-model task (default: all, 500 for wordnet-isa)",
    )
    p.add_argument(
        "--max-steps",
        dest="max_steps",
        type=int,
        help="stop a language-model task after N optimizer steps; the warm-up and decay fit those steps",
    )
    p.add_argument(
        "--prune",
        help="prune the targeted weights first and keep their zeros through training and merging: "
        "wanda:0.5, magnitude:0.5, 2:4 (Wanda N:M), magnitude:2:4 (liera's methods only)",
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16", "bf16-autocast"],
        help="language-model tasks: fp32, bf16 weights, or float32 weights under bf16 autocast (default: "
        "bf16-autocast where the CPU has AMX / avx512_bf16 or the GPU bf16, else fp32; printed)",
    )
    p.add_argument(
        "--quantize",
        choices=["4bit", "8bit"],
        help="language-model tasks: load the base quantized by bitsandbytes, 4bit = nf4 + double "
        "quantization (QLoRA), 8bit = LLM.int8 (pip install 'liera[quant]'); the adapter stays unmerged",
    )
    p.add_argument("--lr", type=float, help="learning rate (default: per method and data kind)")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="default 32")
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--resolution", type=int, help="image side in pixels (default: 64, or the model's image_size)")
    p.add_argument("--max-length", dest="max_length", type=int, help="tokens per text (default 128)")
    p.add_argument("--text-column", dest="text_column", help="default: text")
    p.add_argument("--label-column", dest="label_column", help="default: label")
    p.add_argument("--out", help="output directory (default liera-finetune)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: the cores other processes leave free now)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def load_config(path: str | Path) -> dict[str, Any]:
    """Options from a YAML or JSON file; keys are option names (dashes or underscores)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"config file {str(path)!r} does not exist"
            + (" (it is a directory)" if path.is_dir() else "")
            + "; pass a .yaml or .json file."
        )
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
        raise ValueError(
            f"config file {str(path)!r} must hold a mapping of option names to values, got {type(data).__name__}."
        )
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name == "no_progress":
            name, value = "progress", not value
        if name not in DEFAULTS:
            raise ValueError(
                f"config file {str(path)!r}: unknown option {key!r}; known options: "
                f"{', '.join(k.replace('_', '-') for k in DEFAULTS)}."
            )
        out[name] = value
    return out


def coerce(options: dict[str, Any]) -> dict[str, Any]:
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
                if not isinstance(value, (str, list, tuple)) or (
                    not isinstance(value, str) and not all(isinstance(v, str) for v in value)
                ):
                    raise ValueError
            elif name == "progress":
                out[name] = bool(value)
        except (TypeError, ValueError):
            kind = (
                "an integer"
                if name in _INT
                else "a number"
                if name in _FLOAT
                else "a string"
                if name in _STR
                else "a string or a list of strings"
            )
            raise ValueError(f"option {name.replace('_', '-')} must be {kind}, got {value!r}.") from None
    return out
