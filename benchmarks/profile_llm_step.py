#!/usr/bin/env python
"""Where the time of one SmolLM2-135M training step goes, per arm: torch.profiler's self CPU time of every op,
grouped into matmuls (the layers' forward, input gradients and weight gradients), elementwise work (building the
effective weight W + W * D and its gradient W * G, activations, the optimizer), attention, and the rest.

    python benchmarks/profile_llm_step.py --arms peft-lora,liera-taylor,full --out benchmarks/results/llm_step_profile.json
    python benchmarks/profile_llm_step.py --smoke      # a tiny random LLaMA, seconds
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from liera.apps import lm
from liera.apps.lmtasks import wordnet_isa
from liera.apps.training import prepare_arm

GROUPS = {  # op name fragments -> group (first match wins)
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul"),
    "attention": ("scaled_dot_product", "_flash_attention", "aten::_efficient_attention"),
    "elementwise": ("aten::mul", "aten::add", "aten::addcmul", "aten::exp", "aten::expm1", "aten::sub", "aten::div",
                    "aten::silu", "aten::sigmoid", "aten::pow", "aten::rsqrt", "aten::mean", "aten::neg", "aten::sum",
                    "aten::lerp", "aten::sqrt", "aten::_foreach", "aten::copy_", "aten::clamp", "aten::where"),
}


def group_of(name: str) -> str:
    return next((g for g, keys in GROUPS.items() if any(k in name for k in keys)), "other")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", default="peft-lora,liera-taylor,full")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = wordnet_isa()
    base, tokenizer = lm.tiny_llama(task) if args.smoke else lm.load_causal_lm()
    data = lm.encode(task, "train", tokenizer)
    ids, mask, last = data.batch(list(range(args.batch_size)))
    target = data.option_ids[data.labels[:args.batch_size]]
    report = {"batch_size": args.batch_size, "tokens": int(mask.sum()), "threads": args.threads, "arms": {}}
    for arm in args.arms.split(","):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, _ = prepare_arm(arm, copy.deepcopy(base), r=16, alpha=32.0, target_modules=list(lm.LLAMA_TARGETS),
                                   full_scope="targets")
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)
        model.train()

        def step():
            loss = torch.nn.functional.cross_entropy(lm.answer_logits(model, ids, mask, last).float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        step()  # warm-up: the optimizer state appears here
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        groups: dict = {}
        for event in prof.key_averages():
            g = group_of(event.key)
            groups[g] = groups.get(g, 0.0) + event.self_cpu_time_total / 1e6
        total = sum(groups.values())
        report["arms"][arm] = {"total_s": total, **{f"{g}_s": v for g, v in sorted(groups.items())}}
        print(f"{arm:>13s}: {total:.2f} s  " + "  ".join(f"{g} {v:.2f} s ({100 * v / total:.0f}%)"
                                                     for g, v in sorted(groups.items(), key=lambda kv: -kv[1])))
        del model, opt
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
