"""How much of a small multiplicative update survives a bfloat16 layer: liera vs PEFT HiRA, same factors.

liera forms W_eff = W + W * D in float32 and runs ONE op with W_eff rounded to the layer's dtype; PEFT's HiRA
runs the base op in bf16 and a second, float32 op with W * (B @ A) on a float32 copy of the input, adds the
outputs in float32 and rounds once; liera's update_branch="float32" does the same. This script measures what
each keeps of the update: a bf16 Linear(1024, 1024), factors scaled so
that mean |D| is 1e-4 ... 1e-1, and the error of the output change against a float64 reference:

    update error = || (y - y_base) - (y_ref - y_ref_base) || / || y_ref - y_ref_base ||

(1.0 means the update is lost entirely). The float32 row shows what a float32 layer keeps.

    python benchmarks/bf16_update.py
"""
from __future__ import annotations

import argparse
import copy
import json
import sys

import torch
from torch import nn

import liera


def update_error(y: torch.Tensor, y_base: torch.Tensor, ref: torch.Tensor, ref_base: torch.Tensor) -> float:
    true = ref - ref_base
    return float(((y.detach().double() - y_base.double()) - true).norm() / true.norm())


def factors(out_f: int, in_f: int, r: int, mean_abs_d: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, in), B (out, r) with mean |B @ A| = mean_abs_d (scaling folded into B)."""
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(r, in_f, generator=gen), torch.randn(out_f, r, generator=gen)
    return a, b * (mean_abs_d / (b @ a).abs().mean())


def liera_output(base: nn.Linear, a: torch.Tensor, b: torch.Tensor, x: torch.Tensor,
                 update_branch: str = "merged") -> torch.Tensor:
    lm = liera.get_liera_model(copy.deepcopy(base), liera.LieRAConfig(r=a.shape[0], alpha=float(a.shape[0]),
                                                                       target_parameters=["weight"],
                                                                       update_branch=update_branch))
    gen = lm.base_model.liera_weight["default"]
    with torch.no_grad():
        gen.lora_A.copy_(a)
        gen.lora_B.copy_(b / gen.scaling)
        return lm(x)


def hira_output(base: nn.Linear, a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    import peft

    holder = nn.Sequential(copy.deepcopy(base))
    pm = peft.get_peft_model(holder, peft.HiraConfig(r=a.shape[0], target_modules=["0"]))
    layer = pm.base_model.model[0]
    with torch.no_grad():
        layer.hira_A["default"].copy_(a)
        layer.hira_B["default"].copy_(b)
        return pm(x)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--scales", default="1e-4,1e-3,1e-2,1e-1")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    base32 = nn.Linear(args.size, args.size)
    x32 = torch.randn(args.batch, args.size)
    rows = []
    try:
        import peft  # noqa: F401
        has_peft = hasattr(peft, "HiraConfig")
    except ImportError:
        has_peft = False
    for dtype in (torch.bfloat16, torch.float32):
        base, x = copy.deepcopy(base32).to(dtype), x32.to(dtype)
        w, xd = base.weight.double(), x.double()
        ref_base = xd @ w.T + base.bias.double()
        with torch.no_grad():
            y_base = base(x)
        for scale in (float(s) for s in args.scales.split(",")):
            a, b = factors(args.size, args.size, args.rank, scale, seed=1)
            d = b.double() @ a.double()
            ref = xd @ (w + w * d).T + base.bias.double()
            row = {"dtype": str(dtype).replace("torch.", ""), "mean_abs_D": scale,
                   "liera": update_error(liera_output(base, a, b, x), y_base, ref, ref_base),
                   "liera_float32_branch": update_error(liera_output(base, a, b, x, "float32"), y_base, ref, ref_base)}
            if has_peft:
                row["peft_hira"] = update_error(hira_output(base, a, b, x), y_base, ref, ref_base)
            rows.append(row)
    print("| layer dtype | mean abs D | liera, one op with W_eff (default) | liera, update_branch='float32' "
          "| PEFT HiRA (base op + float32 W*BA op) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        hira = f"{row['peft_hira']:.3f}" if "peft_hira" in row else "n/a"
        print(f"| {row['dtype']} | {row['mean_abs_D']:g} | {row['liera']:.3f} | {row['liera_float32_branch']:.3f} "
              f"| {hira} |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"rows": rows, "torch": torch.__version__, "size": args.size, "batch": args.batch}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
