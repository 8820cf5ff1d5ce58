#!/usr/bin/env python
"""Where an adapted layer's time goes under bf16 autocast: one Linear(576, 1536) (SmolLM2's up_proj), r = 16, one
training step (forward, backward) of liera's LieRA-Taylor against PEFT LoRA at several token counts, in one process,
and the cost of forming the effective weight (W + W*D in float32, cast to bf16) once.

LieRA needs dL/dW, a weight-sized gradient (one more full matmul than LoRA, whose factor gradients are token x r),
and rebuilds W_eff in backward; both costs are fixed per layer, so they weigh most at few tokens per step.

    OMP_NUM_THREADS=1 python benchmarks/autocast_layer.py
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

import liera


def median_time(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="512,2048,8192")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    import peft

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(576, 1536, bias=False))
    lm = liera.get_liera_model(copy.deepcopy(base), liera.LieRAConfig(r=16, alpha=16, target_modules=["0"]))
    with torch.no_grad():
        for p in lm.parameters():
            if p.requires_grad:
                p.normal_(0, 0.01)
    lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=16, lora_alpha=16, target_modules=["0"]))
    adapted = next(a for _, _, a in lm.adapted_weights())
    weight = lm.base_model[0].weight
    print("| tokens | liera step (ms) | PEFT LoRA step (ms) | ratio | W_eff build + cast (ms) | 2 builds / liera step |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for tokens in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(tokens, 576)

        def step(model: nn.Module, x: torch.Tensor = x):
            def run() -> None:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    y = model(x)
                y.float().pow(2).mean().backward()

            return run

        def build() -> None:
            with torch.no_grad():
                adapted.effective(weight, ["default"]).to(torch.bfloat16)

        t_liera, t_lora = median_time(step(lm), args.repeats), median_time(step(lora), args.repeats)
        t_build = median_time(build, args.repeats)
        print(f"| {tokens} | {t_liera * 1e3:.1f} | {t_lora * 1e3:.1f} | {t_liera / t_lora:.2f} | {t_build * 1e3:.2f} | "
              f"{2 * t_build / t_liera:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
