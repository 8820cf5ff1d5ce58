#!/usr/bin/env python
"""LieRA through PEFT (peft.get_peft_model with liera.integrations.peft.LieraPeftConfig) against liera's own API, with
PEFT's LoRA as the reference, on CPU, in one process: the PEFT path runs the same redirect, so it should cost the
same as liera's own API within noise.

Variants (r=16, alpha=16, dropout 0, the same target modules)
    liera       liera.get_liera_model(model, LieRAConfig(...))
    peft-liera  peft.get_peft_model(model, LieraPeftConfig(...))       (the LieraPeftConfig of the same LieRAConfig)
    peft-lora   peft.get_peft_model(model, LoraConfig(...))         (reference)
    liera-2     a second, identical liera model: the A/A control; its ratio to liera is the noise floor of
                this machine (placement in memory, other processes), against which peft-liera / liera is judged

One step: forward + loss (output.float().pow(2).mean()) + backward + SGD step + zero_grad.

Timing: every variant gets a deep copy of the same base model and the same input; for warmup + repeats rounds each
variant runs one step, the order rotated every round (interleaved, so slow drift of the machine hits all alike);
warm-up rounds are discarded; medians of wall and process-CPU time, and the minimum (on a loaded machine the CPU
time and the minimum are steadier than the wall median).

Peak memory (exact): two more steps per variant inside liera.apps.memory.TensorMemory, written like a training loop
(`loss` rebound each step): parameters and buffers + the peak of every tensor created on top (activations,
temporaries, gradients). See benchmarks/train_step.py for the method.

    python benchmarks/peft_method.py --quick        # smoke run, seconds
    python benchmarks/peft_method.py                # the real run (1 thread), benchmarks/results/peft_method_cpu.json
"""
# (no `from __future__ import annotations`: the smoke test loads this file without registering it as a module, and
# dataclasses resolve string annotations through sys.modules)
import argparse
import copy
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

R, ALPHA = 16, 16
VARIANTS = ("liera", "peft-liera", "peft-lora", "liera-2")
PEAK_STEPS = 2  # the second step runs with the first one's graph alive, as in a training loop
RATIOS = (("peft-liera", "liera"), ("liera-2", "liera"), ("liera", "peft-lora"), ("peft-liera", "peft-lora"))
DEFAULT_OUT = "benchmarks/results/peft_method_cpu.json"


@dataclass
class Shape:
    key: str
    title: str
    model: nn.Module
    x: torch.Tensor
    targets: list[str]

    def lora_targets(self) -> list[str]:
        """The targets PEFT's LoRA accepts: it refuses a grouped conv whose groups do not divide r (depthwise)."""
        return [t for t in self.targets if R % getattr(self.model.get_submodule(t), "groups", 1) == 0]


def linear_stack(quick: bool) -> Shape:
    widths, tokens = ((64, 128, 128, 64), 64) if quick else ((512, 1024, 1024, 512), 2048)
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers += [nn.Linear(widths[i], widths[i + 1]), nn.GELU()]
    model = nn.Sequential(*layers[:-1])
    targets = [str(i) for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    return Shape("linear", f"{len(targets)} Linear layers {'->'.join(map(str, widths))}, input ({tokens}, {widths[0]})",
                 model, torch.randn(tokens, widths[0]), targets)


def conv_net(quick: bool) -> Shape:
    ch, hw, batch = (8, 8, 2) if quick else (64, 32, 16)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, ch, 3, padding=1), nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(ch, ch, 3, padding=1, groups=ch), nn.ReLU(), nn.Conv2d(ch, ch, 1))
    targets = [str(i) for i, m in enumerate(model) if isinstance(m, nn.Conv2d)]
    return Shape("conv", f"conv net: Conv2d 3->{ch} k3, {ch}->{ch} k3, depthwise k3, 1x1; input ({batch}, 3, {hw}, {hw})",
                 model, torch.randn(batch, 3, hw, hw), targets)


SHAPES: dict[str, Callable[[bool], Shape]] = {"linear": linear_stack, "conv": conv_net}


def build(name: str, shape: Shape) -> nn.Module:
    import liera
    import peft

    model = copy.deepcopy(shape.model).train()
    config = liera.LieRAConfig(r=R, alpha=ALPHA, target_modules=list(shape.targets))
    if name in ("liera", "liera-2"):
        return liera.get_liera_model(model, config)
    if name == "peft-liera":
        from liera.integrations.peft import LieraPeftConfig

        return peft.get_peft_model(model, LieraPeftConfig.from_liera_config(config))
    if name == "peft-lora":
        return peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=shape.lora_targets()))
    raise ValueError(f"unknown variant {name!r}")


class Runner:
    def __init__(self, name: str, shape: Shape) -> None:
        self.name, self.x = name, shape.x
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = build(name, shape)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(self.trainable, lr=1e-6)
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    def forward(self) -> torch.Tensor:
        return self.model(self.x).float().pow(2).mean()

    def update(self, loss: torch.Tensor) -> None:
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.update(self.forward())

    def peak(self) -> dict[str, int]:
        from liera.apps.memory import TensorMemory

        mem = TensorMemory([*self.model.parameters(), *self.model.buffers()])
        with mem:
            for _ in range(PEAK_STEPS):
                loss = self.forward()
                self.update(loss)
        del loss
        return {"peak_bytes": mem.static_bytes + mem.peak_bytes, "static_bytes": mem.static_bytes}


def run_shape(shape: Shape, args) -> dict:
    runners = [Runner(name, shape) for name in VARIANTS]
    gc.collect()
    for rnd in range(args.warmup + args.repeats):
        k = rnd % len(runners)
        for runner in runners[k:] + runners[:k]:  # rotated every round
            gc.collect()
            c0, t0 = time.process_time(), time.perf_counter()
            runner.step()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            if rnd >= args.warmup:
                runner.times.append(wall)
                runner.cpu_times.append(cpu)
    variants = {}
    for runner in runners:
        gc.collect()
        variants[runner.name] = {"median_s": statistics.median(runner.times), "min_s": min(runner.times),
                                 "cpu_median_s": statistics.median(runner.cpu_times),
                                 "trainable_params": sum(p.numel() for p in runner.trainable), **runner.peak()}
    ratios = {f"{a} / {b}": {"time": variants[a]["median_s"] / variants[b]["median_s"],
                              "min_time": variants[a]["min_s"] / variants[b]["min_s"],
                              "cpu_time": variants[a]["cpu_median_s"] / variants[b]["cpu_median_s"],
                              "peak": variants[a]["peak_bytes"] / variants[b]["peak_bytes"]} for a, b in RATIOS}
    left_out = sorted(set(shape.targets) - set(shape.lora_targets()))
    return {"key": shape.key, "title": shape.title, "variants": variants, "ratios": ratios,
            "peft_lora_left_out": left_out}


def table(result: dict) -> str:
    lines = [f"({result['key']}) {result['title']}",
             "| variant | median s | min s | CPU median s | peak MB | trainable |", "|---|---:|---:|---:|---:|---:|"]
    for name, v in result["variants"].items():
        lines.append(f"| {name} | {v['median_s']:.4f} | {v['min_s']:.4f} | {v['cpu_median_s']:.4f} | "
                     f"{v['peak_bytes'] / 2 ** 20:.2f} | {v['trainable_params']:,d} |")
    lines += ["", "| ratio | time (median) | time (min) | CPU time (median) | peak memory |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {r['time']:.3f} | {r['min_time']:.3f} | {r['cpu_time']:.3f} | {r['peak']:.3f} |"
              for name, r in result["ratios"].items()]
    if result["peft_lora_left_out"]:
        lines.append(f"(peft-lora leaves out {result['peft_lora_left_out']}: PEFT's LoRA refuses a grouped conv whose "
                     f"groups do not divide r={R})")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few rounds: a smoke run of seconds")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {','.join(SHAPES)}")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 15; 2 with --quick)")
    ap.add_argument("--warmup", type=int, default=None, help="discarded rounds (default 3; 1 with --quick)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--out", default=None, help=f"JSON results (default {DEFAULT_OUT}; none with --quick)")
    args = ap.parse_args(argv)
    args.repeats = args.repeats or (2 if args.quick else 15)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        ap.error(f"unknown shape(s) {unknown}")
    out = args.out or (None if args.quick else DEFAULT_OUT)
    torch.set_num_threads(args.threads)

    import liera
    import peft

    meta = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "peft": peft.__version__, "liera": liera.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "threads": torch.get_num_threads(), "repeats": args.repeats,
            "warmup": args.warmup, "quick": args.quick, "r": R, "alpha": ALPHA, "peak_steps": PEAK_STEPS,
            "loadavg_1min_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    print(f"torch {meta['torch']}, peft {meta['peft']}, liera {meta['liera']}, {meta['threads']} thread(s), "
          f"{args.warmup} warm-up + {args.repeats} timed rounds{', QUICK sizes' if args.quick else ''}", flush=True)
    t0 = time.perf_counter()
    results = []
    for key in shapes:
        result = run_shape(SHAPES[key](args.quick), args)
        results.append(result)
        print("\n" + table(result), flush=True)
    meta["total_wall_s"] = time.perf_counter() - t0
    meta["loadavg_1min_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"\ntotal {meta['total_wall_s']:.1f} s")
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as fh:
            json.dump({"meta": meta, "shapes": results}, fh, indent=1)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
