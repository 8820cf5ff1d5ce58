"""The `liera` command: demo | finetune | merge | inspect | convert.

Each command registers its arguments, and imports what it needs, only when it is the command being run: `liera
--help` loads neither torch nor any model code, so it answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence

COMMANDS = {  # name -> one-line help (what `liera --help` lists without importing anything)
    "demo": "compare LieRA with LoRA, PEFT's LoRA and a linear probe on a real pretrained CNN (EfficientNet-Lite0)",
    "finetune": "fine-tune a model on your own data or a built-in task (images, text, a causal language model)",
    "merge": "merge an adapter into a safetensors state dict, without the model's code",
    "inspect": "print an adapter's config, layers, parameter counts and D statistics, or a weights file's sparsity",
    "convert": "convert an adapter folder between liera's format and PEFT's native LIERA format",
}


# ====================================================================== the commands
def _demo_arguments(p: argparse.ArgumentParser) -> Callable:
    from .demo import DEMO_METHODS
    from .efficientnet import TARGET_SETS
    from .methods import names

    p.add_argument("--out", default="liera-demo", help="output directory (results.json, results.md, results.png)")
    p.add_argument(
        "--methods",
        help=f"comma-separated arms: {', '.join(names(domain='image'))}, each optionally with "
        f"{' or '.join('@' + t for t in TARGET_SETS if t != 'all')} (adapt the stem and "
        f"depthwise convs only, the paper's ConvNeXt-V2 analogue); default: "
        f"{','.join(DEMO_METHODS)}",
    )
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=None, help="default: r")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--test-size", type=int, default=2000, help="up to 10000 with Debian's dataset-fashion-mnist")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", action="append", metavar="METHOD=LR", help="override a learning rate, e.g. lora=1e-3")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: the cores other processes leave free now, from /proc/stat)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run in seconds (tiny data, 1 epoch)")
    p.add_argument("--no-progress", action="store_true")
    return _demo


def _demo(args) -> int:
    from .demo import DEMO_METHODS, run_demo

    lrs = {}
    for item in args.lr or []:
        method, _, value = item.partition("=")
        lrs[method] = float(value)
    methods = args.methods.split(",") if args.methods else list(DEMO_METHODS)
    size = (
        dict(r=2, epochs=1, resolution=32, train_size=64, test_size=64, batch_size=32)
        if args.quick
        else dict(
            r=args.r,
            alpha=args.alpha,
            epochs=args.epochs,
            resolution=args.resolution,
            batch_size=args.batch_size,
            test_size=args.test_size,
        )
    )  # --quick: a smoke run in seconds
    run_demo(
        args.out, methods, seed=args.seed, lrs=lrs, show_progress=not args.no_progress, threads=args.threads, **size
    )
    return 0


def _merge_arguments(p: argparse.ArgumentParser) -> Callable:
    p.add_argument("--base", required=True, help="base weights (.safetensors)")
    p.add_argument("--adapter", required=True, help="adapter folder written by save_pretrained (or its .safetensors)")
    p.add_argument("--out", required=True, help="merged weights (.safetensors); never the base file")
    p.add_argument("--float64", action="store_true", help="compute the merge in float64 (default float32)")
    p.add_argument("--no-progress", action="store_true")
    return _merge


@contextlib.contextmanager
def _liera_format(adapter: str) -> Iterator[str]:
    """A liera adapter folder for ``adapter``: itself, or, for a PEFT-native LieRA folder (peft_type "LIERA"), its
    conversion into a temporary folder, so that inspect and merge read both kinds."""
    from .. import io

    try:
        folder = io.adapter_folder(adapter)
        native = io.read_config_data(folder).get("peft_type") == "LIERA"
    except (OSError, ValueError):
        native = False  # not readable here: the reader below says what is wrong
    if not native:
        yield adapter
        return
    from ..integrations import peft as peft_method

    with tempfile.TemporaryDirectory() as tmp:
        peft_method.peft_to_liera(folder, tmp)
        print(f"{adapter}: a PEFT-native LieRA folder, read through its liera conversion")
        yield tmp


def _merge(args) -> int:
    import torch

    from ..integrations.statedict import merge_file
    from .progress import progress

    with _liera_format(args.adapter) as adapter:
        stats = merge_file(
            args.base,
            adapter,
            args.out,
            dtype=torch.float64 if args.float64 else torch.float32,
            progress=None if args.no_progress else progress,
        )
    print(
        f"wrote {args.out}: {stats['merged']} weights merged, {stats['replaced']} replaced and {stats['added']} "
        f"added (modules_to_save: trained in full, a new head is written into the output), {stats['copied']} copied"
    )
    return 0


def _inspect_arguments(p: argparse.ArgumentParser) -> Callable:
    p.add_argument(
        "adapter",
        help="adapter folder (or the adapter_model.safetensors inside it), or a model's "
        ".safetensors state dict (or its folder): then each weight's zeros and N:M validity",
    )
    p.add_argument(
        "--nm",
        default="2:4,4:8",
        help="N:M patterns a sparsity report checks (at most N non-zeros in "
        "every M consecutive inputs), comma-separated; default 2:4,4:8",
    )
    return _inspect


def _inspect(args) -> int:
    from ..integrations.statedict import inspect_adapter, inspect_sparsity, is_weights_file
    from ..sparsity import parse_nm

    if is_weights_file(args.adapter):
        print(inspect_sparsity(args.adapter, [parse_nm(p) for p in args.nm.split(",") if p.strip()]))
    else:
        with _liera_format(args.adapter) as adapter:
            print(inspect_adapter(adapter).replace(adapter, args.adapter))  # the user's path, not a temporary one
    return 0


def _convert_arguments(p: argparse.ArgumentParser) -> Callable:
    p.add_argument("adapter", help="adapter folder to convert")
    p.add_argument(
        "--to",
        choices=["peft", "liera"],
        required=True,
        help="peft: PEFT's native LIERA format (peft.PeftModel.from_pretrained after "
        "`import liera.integrations.peft`); liera: liera's own format (LieRAModel.from_pretrained)",
    )
    p.add_argument("--out", required=True, help="output folder; never the input folder")
    return _convert


def _convert(args) -> int:
    from ..integrations import peft as peft_method

    convert = peft_method.liera_to_peft if args.to == "peft" else peft_method.peft_to_liera
    convert(args.adapter, args.out)
    print(f"wrote {args.out} ({'PEFT LIERA' if args.to == 'peft' else 'liera'} format)")
    return 0


# finetune registers its own parser (liera.apps.finetune.add_parser)
ARGUMENTS = {
    "demo": _demo_arguments,
    "merge": _merge_arguments,
    "inspect": _inspect_arguments,
    "convert": _convert_arguments,
}


# ====================================================================== parsing
def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `liera` parser; the arguments of ``command`` (all commands when None) are registered."""
    parser = argparse.ArgumentParser(prog="liera", description="LieRA: Lie-group parameter-efficient fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, text in COMMANDS.items():
        if command not in (None, name):
            sub.add_parser(name, help=text, add_help=False)  # listed in `liera --help`; not the command run
        elif name == "finetune":
            from . import finetune

            finetune.add_parser(sub)
        else:
            p = sub.add_parser(name, help=text, description=text)
            p.set_defaults(func=ARGUMENTS[name](p))
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    """The command word of argv, if it is one ("liera --help" has none)."""
    return next((a for a in argv if not a.startswith("-")), None) if argv else None


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `liera inspect ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: Sequence[str] | None) -> int:
    from .errors import UserError  # a few lines: `liera --help` stays instant

    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_of(argv)
    parser = build_parser(command if command in COMMANDS else "")
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, UserError) as exc:
        # the user's mistake: one line and exit 2. Anything else (a RuntimeError from torch, say) is a bug: its
        # traceback is what a report needs, so it propagates.
        print(f"liera {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
