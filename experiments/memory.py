"""Training-step memory of each arm, counted exactly (liera.apps.memory.TensorMemory), for the Taylor-vs-exact ablation.

Memory does not depend on the seed or the data, only on the model, the method, the rank and the batch, so one
measured run per arm is the number: parameters and buffers, gradients, optimizer state, activations kept for
backward and temporaries, at the peak of the first three AdamW steps (the optimizer state appears in the first).

    python experiments/memory.py --out runs/memory            # EfficientNet-Lite0 and MiniLM, r in {2, 4, 8, 16}
    python experiments/memory.py --smoke --out /tmp/mem-smoke  # seconds, for CI
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings
from pathlib import Path

import torch

from liera.apps.memory import TensorMemory
from liera.apps.training import fit, prepare_arm, trainable_count

from common import RANK_FREE

METHODS = ("linear-probe", "lora", "liera-taylor", "liera-exact", "full", "peft-lora")  # arms of the method table
STEPS = 3


def vision_setup(resolution: int):
    from liera.apps.efficientnet import HEAD, load_efficientnet_lite0

    x = torch.randn(STEPS * 32, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
    return "EfficientNet-Lite0 (all convs)", load_efficientnet_lite0(10), HEAD, "all-conv", x, None


def language_setup(max_length: int):
    from language import HEAD, TARGETS, load_template, packed_forward

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (STEPS * 32, max_length), generator=gen)
    x = torch.stack([ids, torch.ones_like(ids)], 1)
    return "MiniLM-L6 (36 encoder linears)", load_template(20), HEAD, TARGETS, x, packed_forward


def measure(template, method: str, r: int, head: str, targets, x, forward) -> dict:
    model, note = prepare_arm(method, copy.deepcopy(template), head=head, r=r, alpha=float(r), target_modules=targets)
    y = torch.randint(0, 10, (len(x),), generator=torch.Generator().manual_seed(1))
    mem = TensorMemory([*model.parameters(), *model.buffers()])
    fit(model, x, y, epochs=1, lr=1e-4, batch_size=len(x) // STEPS, seed=0, show_progress=False, forward=forward,
        memory=mem, memory_steps=STEPS)
    return {"method": method, "r": r, "trainable_params": trainable_count(model), "static_mb": round(mem.static_mb, 2),
            "peak_mb": round(mem.peak_mb, 2), "note": note}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vision,language")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--ranks", default="2,4,8,16")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--out", default="runs/memory")
    p.add_argument("--smoke", action="store_true", help="tiny run in seconds (CI keeps the code alive)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
    models, methods, ranks = args.models.split(","), args.methods.split(","), [int(r) for r in args.ranks.split(",")]
    if args.smoke:
        models, methods, ranks, args.resolution = ["vision"], ["lora", "liera-taylor"], [2], 32
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    lines = ["| model | method | r | trainable params | params + buffers (MB) | peak (MB) | peak / LoRA |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for which in models:
        name, template, head, targets, x, forward = (vision_setup(args.resolution) if which == "vision"
                                                     else language_setup(args.max_length))
        for r in ranks:
            lora = None
            for method in methods:
                if method in RANK_FREE and r != ranks[0]:
                    continue
                try:
                    row = {"model": name, **measure(template, method, r, head, targets, x, forward)}
                except Exception as exc:  # PEFT LoRA on EfficientNet: see docs/results.md
                    row = {"model": name, "method": method, "r": r, "error": f"{type(exc).__name__}: {exc}"[:160]}
                rows.append(row)
                if method == "lora" and "peak_mb" in row:
                    lora = row["peak_mb"]
                if "error" in row:
                    lines.append(f"| {name} | {method} | {r} | - | - | failed | - |")
                    continue
                ratio = f"{row['peak_mb'] / lora:.2f}" if lora else "-"
                shown = "-" if method in RANK_FREE else r
                lines.append(f"| {name} | {method} | {shown} | {row['trainable_params']:,} | {row['static_mb']:.1f} | "
                             f"{row['peak_mb']:.1f} | {ratio} |")
                print(lines[-1], flush=True)
    (out / "memory.json").write_text(json.dumps(rows, indent=2))
    (out / "memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
