"""Vision experiment: EfficientNet-Lite0 convolutions, VTAB-1k style tasks, learning rate per method chosen
on a validation split carved from the 1,000 training images (mean over seeds), then test accuracy over
seeds at the chosen rate.

    python experiments/vision.py --task fashion --stage select --out runs/vision     # choose learning rates
    python experiments/vision.py --task fashion --stage test --ranks 2,8,16 --out runs/vision
    python experiments/vision.py --smoke                                             # seconds, for CI
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

from liera.data import digits_1k, fashion_mnist_1k, to_model_input
from liera.demo import HEAD, load_efficientnet_lite0
from liera.training import run_arm

from common import RANK_FREE, add_common_arguments, choose_rates, done, log, parse_lrs, read

# widened where the best rate fell on an edge (the first grid was 3 rates per method)
GRID = {"linear-probe": [3e-3, 1e-2, 3e-2, 1e-1], "lora": [1e-3, 3e-3, 1e-2],
        "liera-taylor": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2], "liera-exact": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
        "full": [1e-4, 3e-4, 1e-3, 3e-3]}
TASKS = {"fashion": lambda: fashion_mnist_1k(2000), "digits": digits_1k}


def tensors(task, resolution, limit=None):
    n = limit or len(task.train_y)
    return (to_model_input(task.train_x[:n], resolution), torch.as_tensor(task.train_y[:n]).long(),
            to_model_input(task.test_x[:n if limit else None], resolution),
            torch.as_tensor(task.test_y[:n if limit else None]).long())


def update_ranks(model, r: int) -> dict:
    """Numerical rank of each learned update W_eff - W (matricised), against the generator's rank r."""
    from liera import LieRAModel

    if not isinstance(model, LieRAModel):
        return {}
    ranks, full = [], []
    with torch.no_grad():
        for _, owner, adapted in model.adapted_weights():
            w = adapted.owner_weight(owner).double()
            delta = (adapted.effective(w) - w).reshape(w.shape[0], -1)
            ranks.append(int(torch.linalg.matrix_rank(delta, rtol=1e-7)))
            full.append(min(delta.shape))
    return {"layers": len(ranks), "mean_rank": sum(ranks) / len(ranks), "mean_full_rank": sum(full) / len(full),
            "layers_above_r": sum(k > r for k in ranks), "layers_at_full_rank": sum(k == f for k, f in zip(ranks, full))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p, tasks=TASKS, default_task="fashion", methods=GRID, seeds="0,1", epochs=5, out="runs/vision")
    p.add_argument("--resolution", type=int, default=64)
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
    template = load_efficientnet_lite0(task.num_classes)
    records = out / f"{args.task}-{args.stage}.jsonl"
    finished = done(records)
    grid = {**GRID, **parse_lrs(args.grid)}
    if args.stage == "select":
        data = tensors(task.validation_split(0.2, seed=0), args.resolution, limit)
        plan = [(m, r, lr, s) for m in methods for r in (ranks[:1] if m in RANK_FREE else ranks)
                for lr in (grid[m][:1] if args.smoke else grid[m]) for s in seeds]
    else:
        chosen = json.loads((out / f"{args.task}-chosen.json").read_text()) if not args.smoke else {}
        chosen.update({m: v[0] for m, v in parse_lrs(args.grid).items()})
        data = tensors(task, args.resolution, limit)
        plan = [(m, r, chosen.get(m, grid[m][1]), s) for m in methods
                for r in (ranks[:1] if m in RANK_FREE else ranks) for s in seeds]
    for i, (method, r, lr, seed) in enumerate(plan):
        key = [args.task, args.stage, method, r, lr, seed, args.epochs, args.resolution]
        if tuple(key) in finished:
            continue
        t = time.time()
        result, model = run_arm(method, lambda: copy.deepcopy(template), data, head=HEAD, r=r, alpha=float(r),
                                target_modules="all-conv", lr=lr, epochs=args.epochs, batch_size=args.batch_size,
                                seed=seed, show_progress=False)
        rec = {"key": key, **result.to_dict(), "r": r}
        if args.stage == "test":
            rec["update_rank"] = update_ranks(model, r)
        rec["losses"] = rec["losses"][:: max(1, len(rec["losses"]) // 100)]
        log(records, rec)
        print(f"[{i + 1}/{len(plan)}] {args.stage} {method} r={r} lr={lr:g} seed={seed}: "
              f"acc {result.test_accuracy:.4f} ({time.time() - t:.0f} s)", flush=True)
    summarise(records, out, args.task, args.stage)
    return 0


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
