"""Vision experiment: EfficientNet-Lite0 (or --model efficientnet-lite2) convolutions, VTAB-1k style tasks,
learning rate per method chosen on a validation split carved from the 1,000 training images (mean over seeds),
then test accuracy over seeds at the chosen rate.

    python experiments/vision.py --task fashion --stage select --out runs/vision     # choose learning rates
    python experiments/vision.py --task fashion --stage test --ranks 2,8,16 --out runs/vision
    python experiments/vision.py --task fashion --stage test-grid --ranks 4 --seeds 0,1,2 --out runs/vision
    python experiments/vision.py --smoke                                             # seconds, for CI

--stage test-grid tests every rate the select stage tried (any --val-fraction), not only the chosen one, so that
experiments/selection.py can score any selection rule afterwards without training again; a run the test stage
already recorded (same rate) is copied. --val-fraction sets the validation share of the 1,000 training images
(0.2 by default); another share gets its own record files ("-val40") and keys. Tasks: fashion, digits, textures,
and elpv (solar cells; pip install --no-deps elpv-dataset==1.0.0.post1). Lite0's records keep their old names and
keys; another network's get a prefix ("lite2-fashion-dw-select.jsonl") and a key entry.

--targets picks the adapted convolutions: "all" (all 49) or "dw", the analogue of the paper's ConvNeXt-V2 set
(its 4x4 stem, 2x2 downsampling convs and depthwise 7x7 convs; its pointwise layers are Linear): EfficientNet-Lite0's
stem and its 16 depthwise convs (Lite2: 21), which include the strided depthwise convs that do its downsampling
(checked when the model loads).
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
import torch.nn.functional as F
from torch import nn

from liera import find_targets
from liera.apps.data import digits_1k, elpv_1k, fashion_mnist_1k, textures_1k, to_model_input
from liera.apps.efficientnet import HEAD, MODELS, TARGET_SETS as TARGETS, load_efficientnet
from liera.apps.training import method_free_config, run_arm

from common import (RANK_FREE, add_common_arguments, choose_rates, done, log, mean_sd, parse_lrs, read, wait_for,
                    widen_edges, write_summary)
from common import records as load_records

# widened where the best rate fell on an edge (the first grid was 3 rates per method)
GRID = {"linear-probe": [3e-3, 1e-2, 3e-2, 1e-1], "lora": [1e-3, 3e-3, 1e-2],
        "liera-taylor": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2], "liera-exact": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
        "liera-rms": [1e-3, 3e-3, 1e-2], "full": [1e-4, 3e-4, 1e-3, 3e-3]}
TASKS = {"fashion": lambda: fashion_mnist_1k(2000), "digits": digits_1k, "textures": textures_1k, "elpv": elpv_1k}
MODEL, VAL_FRACTION = "efficientnet-lite0", 0.2  # the defaults: their runs keep the old record names and keys


def variant(model: str = MODEL, val_fraction: float = VAL_FRACTION) -> list[str]:
    """What tells runs apart beyond the original key: another network ("lite2") and another validation share
    ("val40"); empty for the defaults, so that the old records still resume."""
    out = [] if model == MODEL else [model.removeprefix("efficientnet-")]
    return out + ([] if val_fraction == VAL_FRACTION else [f"val{round(100 * val_fraction)}"])


def record_name(task: str, targets: str, model: str = MODEL, val_fraction: float = VAL_FRACTION) -> str:
    """Stem of a run's record files: "fashion" (all convs), "fashion-dw", "lite2-fashion-dw", "fashion-dw-val40"."""
    name = task if targets == "all" else f"{task}-{targets}"
    return "-".join(variant(model) + [name] + variant(val_fraction=val_fraction))


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
    return [(key, weights[key].detach().double(), delta) for key, delta in model.weight_changes(dtype=torch.float64).items()]


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
    add_common_arguments(p, tasks=TASKS, default_task="fashion", methods=GRID, seeds="0,1", epochs=5, out="runs/vision",
                         stages=("select", "test", "test-grid"))
    p.add_argument("--model", choices=sorted(MODELS), default=MODEL)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--val-fraction", type=float, default=VAL_FRACTION,
                   help="select (and test, which reads its choice): the validation share of the training images")
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
    if args.stage == "test-grid":
        args.val_fraction = VAL_FRACTION  # one test set for the rates of every validation split
    name = record_name(args.task, args.targets, args.model, args.val_fraction)
    records = out / f"{name}-{args.stage}.jsonl"
    if args.summarise_only:
        summarise(records, out, name, args.stage)
        return 0
    template = load_efficientnet(task.num_classes, name=args.model)
    check_targets(template, args.targets)
    if args.channels_last:
        template = template.to(memory_format=torch.channels_last)
    grid = {**GRID, **parse_lrs(args.grid)}
    shard, shards = (int(v) for v in args.shard.split("/"))
    run_plan = lambda plan, data: execute(plan, data, args, template, records, shard, shards)  # noqa: E731
    if args.stage == "select":
        data = tensors(task.validation_split(args.val_fraction, seed=0), args.resolution, limit, args.channels_last)
        grids = {m: (grid[m][:1] if args.smoke else list(grid[m])) for m in methods}
        for extra in range(args.widen + 1):
            plan = [(m, r, lr, s) for m in methods for r in (ranks[:1] if m in RANK_FREE else ranks)
                    for lr in grids[m] for s in seeds]
            run_plan(plan, data)
            if extra == args.widen or shards > 1 and not wait_for(
                    records, {tuple(run_key(args, *run)) for run in plan}):
                break
            tried = {k: v for k, v in read(records).items() if k[1] in ranks and k[2] in grids.get(k[0], [])}
            grids = widen_edges(grids, choose_rates(tried))
    elif args.stage == "test-grid":
        tried = tried_rates(out, name)
        plan = [(m, r, lr, s) for m in methods for r in (ranks[:1] if m in RANK_FREE else ranks)
                for lr in tried.get((m, r), tried.get(m, grid[m][:2] if args.smoke else grid[m])) for s in seeds]
        run_plan(plan, tensors(task, args.resolution, limit, args.channels_last))
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


def check_targets(model: nn.Module, targets: str) -> None:
    """The "dw" set must be the stem and every depthwise conv, on whichever network (Lite0: 16, Lite2: 21)."""
    if targets != "dw":
        return
    adapted = {t.path for t in find_targets(model, method_free_config(1, TARGETS[targets], HEAD))}
    depthwise = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
    if adapted != depthwise | {"_conv_stem"}:
        raise RuntimeError(f"the dw target set adapts {sorted(adapted)}, not the stem and the depthwise convs")


def tried_rates(out: Path, name: str) -> dict:
    """The rates the select stage tried (every validation split), by (method, rank) and by method."""
    tried: dict = {}
    for path in [out / f"{name}-select.jsonl", *sorted(out.glob(f"{name}-val*-select.jsonl"))]:
        for method, r, lr in read(path) if path.exists() else {}:
            for key in ((method, r), method):
                tried[key] = sorted(set(tried.get(key, [])) | {lr})
    return tried


def run_key(args, method, r, lr, seed) -> list:
    key = [args.task, args.stage, method, r, lr, seed, args.epochs, args.resolution]
    key = key if args.targets == "all" else key + [args.targets]
    return (key + ["cl"] if args.channels_last else key) + variant(args.model, args.val_fraction)


def earlier_runs(args, records: Path) -> dict:
    """Recorded runs that a planned run would repeat (the runs are deterministic), by key: those of --reuse's
    file, and for test-grid the test stage's runs (same training, same test set)."""
    rows = load_records(Path(args.reuse)) if args.reuse else []
    test = records.with_name(records.name.replace("-test-grid.", "-test."))
    if args.stage == "test-grid" and test.exists():
        rows += [{**row, "key": [row["key"][0], args.stage, *row["key"][2:]]} for row in load_records(test)]
    return {tuple(row["key"]): row for row in rows}


@torch.no_grad()
def mean_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Cross-entropy on the evaluation split (selection rules may rank rates by validation loss)."""
    model.eval()
    return sum(float(F.cross_entropy(model(x[i:i + batch_size]), y[i:i + batch_size], reduction="sum"))
               for i in range(0, len(y), batch_size)) / len(y)


def execute(plan, data, args, template, records: Path, shard: int, shards: int) -> None:
    finished = done(records)
    earlier = earlier_runs(args, records)
    for i, (method, r, lr, seed) in enumerate(plan):
        key = run_key(args, method, r, lr, seed)
        if i % shards != shard or tuple(key) in finished:
            continue
        if tuple(key) in earlier:
            log(records, earlier[tuple(key)])
            print(f"[{i + 1}/{len(plan)}] {key}: copied from an earlier record", flush=True)
            continue
        t = time.time()
        result, model = run_arm(method, lambda: copy.deepcopy(template), data, head=HEAD, r=r, alpha=float(r),
                                target_modules=TARGETS[args.targets], lr=lr, epochs=args.epochs,
                                batch_size=args.batch_size, seed=seed, show_progress=False)
        rec = {"key": key, **result.to_dict(), "r": r, "targets": args.targets, "model": args.model}
        if args.stage == "select":
            rec["loss"] = mean_loss(model, data[2], data[3])
        if args.stage == "test":
            updates = learned_updates(model)
            rec["update_rank"] = update_ranks(updates, r)
            rec["update_stats"] = update_stats(updates)
        rec["losses"] = rec["losses"][:: max(1, len(rec["losses"]) // 100)]
        log(records, rec)
        print(f"[{i + 1}/{len(plan)}] {args.model} {args.task}/{args.targets} {args.stage} {method} r={r} lr={lr:g} "
              f"seed={seed}: acc {result.test_accuracy:.4f} ({time.time() - t:.0f} s)", flush=True)


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
    test = stage.startswith("test")
    lines = [f"| method | r | lr | {'test' if test else 'val'} accuracy (mean ± sd) | seeds |"
             + (" train time (s) | trainable params | rank of W_eff - W (mean / full) |" if test else ""),
             "| --- | ---: | ---: | ---: | ---: |" + (" ---: | ---: | ---: |" if test else "")]
    for (method, r, lr), group in sorted(groups.items()):
        accs = [g["test_accuracy"] for g in group]
        line = f"| {method} | {'-' if method in RANK_FREE else r} | {lr:g} | {mean_sd(accs)} | {len(accs)} |"
        if test:
            ranks = [g["update_rank"] for g in group if g.get("update_rank")]
            rank = f"{statistics.mean(x['mean_rank'] for x in ranks):.1f} / {ranks[0]['mean_full_rank']:.1f}" if ranks else "-"
            # memory: experiments/memory.py counts it exactly (it does not depend on the seed)
            line += f" {statistics.median(g['train_time_s'] for g in group):.0f} | {group[0]['trainable_params']:,} | {rank} |"
        lines.append(line)
    write_summary(out, task, stage, lines, groups)


if __name__ == "__main__":
    sys.exit(main())
