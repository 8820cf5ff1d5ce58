"""Vision experiment: EfficientNet-Lite0 convolutions, VTAB-1k style tasks, learning rate per method chosen
on a validation split carved from the 1,000 training images (mean over seeds), then test accuracy over
seeds at the chosen rate.

    python experiments/vision.py --task fashion --stage select --out runs/vision     # choose learning rates
    python experiments/vision.py --task fashion --stage test --ranks 2,8,16 --out runs/vision
    python experiments/vision.py --smoke                                             # seconds, for CI

--targets picks the adapted convolutions: "all" (all 49) or "dw", the analogue of the paper's ConvNeXt-V2 set
(its 4x4 stem, 2x2 downsampling convs and depthwise 7x7 convs; its pointwise layers are Linear): EfficientNet-Lite0's
stem and its 16 depthwise convs, which include the 5 strided depthwise convs that do its downsampling.
--shard i/n runs every n-th run of the plan (two processes share the cores and one record file).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from liera.apps.data import digits_1k, fashion_mnist_1k, textures_1k, to_model_input
from liera.apps.demo import HEAD, TARGET_SETS as TARGETS, load_efficientnet_lite0
from liera.apps.training import run_arm

from common import RANK_FREE, add_common_arguments, choose_rates, done, ladder_step, log, parse_lrs, read
from common import records as load_records

# widened where the best rate fell on an edge (the first grid was 3 rates per method)
GRID = {"linear-probe": [3e-3, 1e-2, 3e-2, 1e-1], "lora": [1e-3, 3e-3, 1e-2],
        "liera-taylor": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2], "liera-exact": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
        "liera-rms": [1e-3, 3e-3, 1e-2], "full": [1e-4, 3e-4, 1e-3, 3e-3]}
TASKS = {"fashion": lambda: fashion_mnist_1k(2000), "digits": digits_1k, "textures": textures_1k}


def tensors(task, resolution, limit=None, channels_last=False):
    n = limit or len(task.train_y)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return (to_model_input(task.train_x[:n], resolution).contiguous(memory_format=fmt),
            torch.as_tensor(task.train_y[:n]).long(),
            to_model_input(task.test_x[:n if limit else None], resolution).contiguous(memory_format=fmt),
            torch.as_tensor(task.test_y[:n if limit else None]).long())


def learned_updates(model) -> list:
    """(weight key, W, W_eff - W) in float64 for every adapted weight (none for the probe and full arms)."""
    from liera import LieRAModel

    if not isinstance(model, LieRAModel):
        return []
    weights = dict(model.base_model.named_parameters())
    return [(key, weights[key].detach().double(), delta) for key, delta in model.delta_weights(dtype=torch.float64).items()]


def update_ranks(updates: list, r: int) -> dict:
    """Numerical rank of each learned update W_eff - W (matricised), against the generator's rank r."""
    if not updates:
        return {}
    ranks, full = [], []
    for _, w, delta in updates:
        delta = delta.reshape(w.shape[0], -1)
        ranks.append(int(torch.linalg.matrix_rank(delta, rtol=1e-7)))
        full.append(min(delta.shape))
    return {"layers": len(ranks), "mean_rank": sum(ranks) / len(ranks), "mean_full_rank": sum(full) / len(full),
            "layers_above_r": sum(k > r for k in ranks), "layers_at_full_rank": sum(k == f for k, f in zip(ranks, full))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p, tasks=TASKS, default_task="fashion", methods=GRID, seeds="0,1", epochs=5, out="runs/vision")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--targets", choices=sorted(TARGETS), default="all")
    p.add_argument("--shard", default="0/1", help="i/n: run every n-th planned run, starting at i")
    p.add_argument("--widen", type=int, default=0, help="select: up to this many extra rates per method where the "
                                                           "best one sits on the grid's edge (x3 steps)")
    p.add_argument("--rate-as", default="", help="test: take one method's chosen rate for another, e.g. "
                                                   "'liera-exact=liera-taylor' (when only one was selected)")
    p.add_argument("--reuse", default="", help="records file of another run folder: a planned run with the same key "
                   "is copied from it instead of trained again (the runs are deterministic)")
    p.add_argument("--summarise-only", action="store_true")
    p.add_argument("--channels-last", action="store_true", help="NHWC model and inputs (about 1.3x faster on CPU; "
                                                                  "records get a 'cl' key so runs never mix)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")
    ranks = [int(r) for r in args.ranks.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    task = TASKS[args.task]()
    limit = None
    if args.smoke:
        methods, ranks, seeds, args.epochs, args.resolution, limit = ["lora", "liera-taylor"], [2], [0], 1, 32, 48
    name = args.task if args.targets == "all" else f"{args.task}-{args.targets}"  # "all" keeps the old file names
    records = out / f"{name}-{args.stage}.jsonl"
    if args.summarise_only:
        summarise(records, out, name, args.stage)
        return 0
    template = load_efficientnet_lite0(task.num_classes)
    if args.channels_last:
        template = template.to(memory_format=torch.channels_last)
    grid = {**GRID, **parse_lrs(args.grid)}
    shard, shards = (int(v) for v in args.shard.split("/"))
    run_plan = lambda plan, data: execute(plan, data, args, template, records, shard, shards)  # noqa: E731
    if args.stage == "select":
        data = tensors(task.validation_split(0.2, seed=0), args.resolution, limit, args.channels_last)
        grids = {m: (grid[m][:1] if args.smoke else list(grid[m])) for m in methods}
        for extra in range(args.widen + 1):
            plan = [(m, r, lr, s) for m in methods for r in (ranks[:1] if m in RANK_FREE else ranks)
                    for lr in grids[m] for s in seeds]
            run_plan(plan, data)
            if extra == args.widen or shards > 1 and not wait_for(records, plan, args):
                break
            grids = widen(grids, read(records))
    else:
        chosen = json.loads((out / f"{name}-chosen.json").read_text()) if not args.smoke else {}
        for pair in filter(None, args.rate_as.split(",")):
            dst, src = pair.split("=")
            if src in chosen:
                chosen.setdefault(dst, chosen[src])
        chosen.update({m: v[0] for m, v in parse_lrs(args.grid).items()})
        data = tensors(task, args.resolution, limit, args.channels_last)
        plan = [(m, r, chosen[m] if m in chosen else grid[m][1], s) for m in methods  # no default from a 1-rate --grid
                for r in (ranks[:1] if m in RANK_FREE else ranks) for s in seeds]
        run_plan(plan, data)
    summarise(records, out, name, args.stage)
    return 0


def run_key(args, method, r, lr, seed) -> list:
    key = [args.task, args.stage, method, r, lr, seed, args.epochs, args.resolution]
    key = key if args.targets == "all" else key + [args.targets]
    return key + ["cl"] if args.channels_last else key


def execute(plan, data, args, template, records: Path, shard: int, shards: int) -> None:
    finished = done(records)
    earlier = {tuple(row["key"]): row for row in load_records(Path(args.reuse))} if args.reuse else {}
    for i, (method, r, lr, seed) in enumerate(plan):
        key = run_key(args, method, r, lr, seed)
        if i % shards != shard or tuple(key) in finished:
            continue
        if tuple(key) in earlier:
            log(records, earlier[tuple(key)])
            print(f"[{i + 1}/{len(plan)}] {key}: copied from {args.reuse}", flush=True)
            continue
        t = time.time()
        result, model = run_arm(method, lambda: copy.deepcopy(template), data, head=HEAD, r=r, alpha=float(r),
                                target_modules=TARGETS[args.targets], lr=lr, epochs=args.epochs,
                                batch_size=args.batch_size, seed=seed, show_progress=False)
        rec = {"key": key, **result.to_dict(), "r": r, "targets": args.targets}
        if args.stage == "test":
            updates = learned_updates(model)
            rec["update_rank"] = update_ranks(updates, r)
            rec["update_stats"] = update_stats(updates)
        rec["losses"] = rec["losses"][:: max(1, len(rec["losses"]) // 100)]
        log(records, rec)
        print(f"[{i + 1}/{len(plan)}] {args.task}/{args.targets} {args.stage} {method} r={r} lr={lr:g} seed={seed}: "
              f"acc {result.test_accuracy:.4f} ({time.time() - t:.0f} s)", flush=True)


def wait_for(records: Path, plan, args, timeout_s: float = 3 * 3600) -> bool:
    """With shards, wait until every run of the plan is recorded (the other shard's too) before widening."""
    want = {tuple(run_key(args, m, r, lr, s)) for m, r, lr, s in plan}
    start = time.time()
    while not want <= done(records):
        if time.time() - start > timeout_s:
            return False
        time.sleep(10)
    return True


def widen(grids: dict, groups: dict) -> dict:
    """One x3 step past the edge where a method's best rate (mean validation accuracy) is the grid's lowest or
    highest, unless the step beyond has already been tried."""
    chosen = choose_rates({k: v for k, v in groups.items() if k[2] in grids.get(k[0], [])})
    out = {}
    for method, rates in grids.items():
        rates = sorted(rates)
        best = chosen.get(method)
        if best == rates[-1]:
            rates.append(ladder_step(rates[-1], up=True))
        elif best == rates[0] and len(rates) > 1:
            rates.insert(0, ladder_step(rates[0], up=False))
        out[method] = rates
    return out


def update_stats(updates: list) -> list:
    """Per adapted layer: rms(W), the relative update norm ||W_eff - W|| / ||W||, and the share of the update's
    squared norm that lands on the largest 10% of |W| (how much a multiplicative update favours large weights)."""
    rows = []
    for key, w, delta in updates:
        big = w.abs() >= torch.quantile(w.abs().flatten().float(), 0.9).double()
        total = float(delta.pow(2).sum())
        rows.append({"layer": key, "rms_w": float(w.pow(2).mean().sqrt()),
                     "rel_update": float(delta.norm() / w.norm()),
                     "top10_share": float(delta[big].pow(2).sum()) / total if total else 0.0})
    return rows


def summarise(records: Path, out: Path, task: str, stage: str) -> None:
    groups = read(records)
    test = stage == "test"
    lines = [f"| method | r | lr | {'test' if test else 'val'} accuracy (mean ± sd) | seeds |"
             + (" train time (s) | trainable params | rank of W_eff - W (mean / full) |" if test else ""),
             "| --- | ---: | ---: | ---: | ---: |" + (" ---: | ---: | ---: |" if test else "")]
    for (method, r, lr), group in sorted(groups.items()):
        accs = [g["test_accuracy"] for g in group]
        mean = statistics.mean(accs)
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        line = f"| {method} | {'-' if method in RANK_FREE else r} | {lr:g} | {mean:.4f} ± {sd:.4f} | {len(accs)} |"
        if test:
            ranks = [g["update_rank"] for g in group if g.get("update_rank")]
            rank = f"{statistics.mean(x['mean_rank'] for x in ranks):.1f} / {ranks[0]['mean_full_rank']:.1f}" if ranks else "-"
            # memory: experiments/memory.py counts it exactly (it does not depend on the seed)
            line += f" {statistics.median(g['train_time_s'] for g in group):.0f} | {group[0]['trainable_params']:,} | {rank} |"
        lines.append(line)
    (out / f"{task}-{stage}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not test:
        chosen = choose_rates(groups)
        (out / f"{task}-chosen.json").write_text(json.dumps(chosen, indent=2))
        print("chosen on validation:", chosen)


if __name__ == "__main__":
    sys.exit(main())
