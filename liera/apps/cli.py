"""The `liera` command: demo | finetune | merge | inspect."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _demo(args) -> int:
    from .demo import DEMO_METHODS, run_demo

    lrs = {}
    for item in args.lr or []:
        method, _, value = item.partition("=")
        lrs[method] = float(value)
    methods = args.methods.split(",") if args.methods else list(DEMO_METHODS)
    if args.quick:  # a smoke run in seconds: tiny data, one epoch
        run_demo(args.out, methods, r=2, epochs=1, resolution=32, train_size=64, test_size=64, batch_size=32,
                 seed=args.seed, lrs=lrs, show_progress=not args.no_progress, threads=args.threads)
    else:
        run_demo(args.out, methods, r=args.r, alpha=args.alpha, epochs=args.epochs, resolution=args.resolution,
                 batch_size=args.batch_size, seed=args.seed, lrs=lrs, test_size=args.test_size,
                 show_progress=not args.no_progress, threads=args.threads)
    return 0


def _merge(args) -> int:
    import torch

    from ..integrations.statedict import merge_file
    from .progress import progress

    stats = merge_file(args.base, args.adapter, args.out, dtype=torch.float64 if args.float64 else torch.float32,
                       progress=None if args.no_progress else lambda items, desc: progress(items, desc))
    print(f"wrote {args.out}: {stats['merged']} weights merged, {stats['replaced']} replaced (modules_to_save), "
          f"{stats['copied']} copied")
    return 0


def _inspect(args) -> int:
    from ..integrations.statedict import inspect_adapter

    print(inspect_adapter(args.adapter))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import finetune

    parser = argparse.ArgumentParser(prog="liera", description="LieRA: Lie-group parameter-efficient fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compare LieRA, LoRA, linear probe and full fine-tuning on a real CNN")
    demo.add_argument("--out", default="liera-demo", help="output directory (results.json, results.md, results.png)")
    demo.add_argument("--methods", help="comma-separated arms: linear-probe, lora, liera-taylor, liera-exact, liera-rms, "
                                        "full, peft-lora, each optionally with @dw (adapt the stem and depthwise "
                                        "convs only, the paper's ConvNeXt-V2 analogue); default: "
                                        "linear-probe,lora,liera-rms,peft-lora,lora@dw,liera-taylor@dw,"
                                        "liera-rms@dw")
    demo.add_argument("--r", type=int, default=8)
    demo.add_argument("--alpha", type=float, default=None, help="default: r")
    demo.add_argument("--epochs", type=int, default=5)
    demo.add_argument("--resolution", type=int, default=64)
    demo.add_argument("--batch-size", type=int, default=32)
    demo.add_argument("--test-size", type=int, default=2000, help="up to 10000 with Debian's dataset-fashion-mnist")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--lr", action="append", metavar="METHOD=LR", help="override a learning rate, e.g. lora=1e-3")
    demo.add_argument("--threads", type=int, default=None)
    demo.add_argument("--quick", action="store_true", help="smoke run in seconds (tiny data, 1 epoch)")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(func=_demo)
    merge = sub.add_parser("merge", help="merge an adapter into a safetensors state dict, without the model's code")
    merge.add_argument("--base", required=True, help="base weights (.safetensors)")
    merge.add_argument("--adapter", required=True, help="adapter directory written by save_pretrained")
    merge.add_argument("--out", required=True, help="merged weights (.safetensors); never the base file")
    merge.add_argument("--float64", action="store_true", help="compute the merge in float64 (default float32)")
    merge.add_argument("--no-progress", action="store_true")
    merge.set_defaults(func=_merge)
    inspect = sub.add_parser("inspect", help="print an adapter's config, layers, parameter counts and D statistics")
    inspect.add_argument("adapter", help="adapter directory")
    inspect.set_defaults(func=_inspect)
    finetune.add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, RuntimeError) as exc:
        print(f"liera {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
