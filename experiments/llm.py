"""LieRA on a real LLaMA-architecture language model: SmolLM2-135M-Instruct (liera.apps.lm), the paper's LLaMA
recipe (r = 16, alpha = 32, targets Q, K, V, Up, Down, AdamW, linear schedule with warm-up, batch 16), measured
against LoRA, PEFT LoRA, PEFT DoRA and PEFT HiRA on two answer-choice tasks (liera.apps.lmtasks).

Protocol: the learning rate of each arm is chosen on the validation split (mean accuracy over seeds, ties to the
lower mean validation loss), then the arm is trained at that rate with 3 seeds and scored on the test split.
LieRA-exact takes LieRA-Taylor's rate. The paper's own rate (2e-3) for LieRA-Taylor and LoRA is an extra,
labelled stage. Runs are recorded one per line (jsonl) as they finish; a rerun skips what is recorded.

    python experiments/llm.py --stage zero-shot --task wordnet-isa
    python experiments/llm.py --stage select --task wordnet-isa --widen 1
    python experiments/llm.py --stage test --task wordnet-isa
    python experiments/llm.py --stage paper --task wordnet-isa
    python experiments/llm.py --stage cost --task wordnet-isa           # tokens/s and exact peak memory, all arms
    python experiments/llm.py --report                                  # tables for docs/results-llm.md
    python experiments/llm.py --smoke --out /tmp/llm-smoke              # a tiny random LLaMA, seconds
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from liera.apps import lm  # noqa: E402
from liera.apps.lmtasks import LM_TASKS, get_lm_task  # noqa: E402
from liera.apps.memory import TensorMemory  # noqa: E402
from liera.apps.methods import get_method, label  # noqa: E402
from liera.apps.training import prepare_arm, trainable_count  # noqa: E402

from common import choose_rates, done, log, records, select_widened  # noqa: E402

ARMS = ("lora", "liera-taylor", "liera-rms", "liera-exact", "peft-lora", "peft-dora", "peft-hira")
RATE_AS = {"liera-exact": "liera-taylor"}  # arms that take another arm's chosen rate
GRID = {"lora": [3e-4, 1e-3, 3e-3], "peft-lora": [3e-4, 1e-3, 3e-3], "peft-dora": [3e-4, 1e-3, 3e-3],
        "liera-rms": [3e-4, 1e-3, 3e-3], "liera-taylor": [1e-3, 3e-3, 1e-2], "peft-hira": [1e-3, 3e-3, 1e-2]}
PAPER_RATE, PAPER_ARMS = 2e-3, ("lora", "liera-taylor")
EPOCHS = {"wordnet-isa": 3, "drug-reviews": 2}
COST_ARMS = ARMS + ("full",)


def load_base(args):
    if args.smoke and not args.quantize:
        return lm.tiny_llama(get_lm_task(args.task))
    name = args.model
    if args.smoke:  # a quantized smoke run loads a saved tiny LLaMA as the real model loads (bitsandbytes wants 64+ inputs)
        tiny, tokenizer = lm.tiny_llama(get_lm_task(args.task), hidden=128)
        name = str(Path(args.out) / "tiny-base")
        tiny.save_pretrained(name)
        tokenizer.save_pretrained(name)
    return lm.load_causal_lm(name, dtype=torch.bfloat16 if args.precision == "bf16" else torch.float32,
                             quantize=args.quantize)


def variant(args) -> str:
    """'' for the study's float32 runs (their keys and files as before), else e.g. '-bf16-autocast-4bit'."""
    return "" if args.precision == "fp32" and not args.quantize else (
        f"-{args.precision}" + (f"-{args.quantize}" if args.quantize else ""))


def build(method: str, base, args, dropout: float):
    model = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped, _ = prepare_arm(method, model, r=args.r, alpha=args.alpha, target_modules=list(lm.LLAMA_TARGETS),
                                 dropout=dropout, full_scope="targets")
    return wrapped


def key(args, stage: str, method: str, lr: float, seed: int) -> list:
    tag = [variant(args)] if variant(args) else []
    return [args.task, stage, method, args.r, lr, seed, args.epochs, args.dropout, args.limit, *tag]


def run_one(args, stage: str, method: str, lr: float, seed: int, base, train, scored, split: str) -> dict:
    torch.manual_seed(seed)
    model = build(method, base, args, args.dropout)
    amp = lm.autocast_dtype_of(args.precision)
    fit = lm.fit_lm(model, train, epochs=args.epochs, lr=lr, batch_size=args.batch_size, seed=seed,
                    desc=f"{method} lr={lr:g} s{seed}", show_progress=not args.no_progress, autocast=amp)
    result = lm.score(model, scored, autocast=amp)
    rec = {"key": key(args, stage, method, lr, seed), "task": args.task, "stage": stage, "method": method,
           "r": args.r, "alpha": args.alpha, "lr": lr, "seed": seed, "epochs": args.epochs, "dropout": args.dropout,
           "split": split, "precision": args.precision, "quantize": args.quantize,
           "accuracy": result["accuracy"], "loss": result["loss"],
           "trainable_params": trainable_count(model), "train_time_s": round(fit.seconds, 1),
           "tokens_per_s": round(fit.tokens_per_s, 1), "steps": fit.steps,
           "losses": fit.losses[:: max(1, len(fit.losses) // 60)], "torch_threads": torch.get_num_threads()}
    del model
    gc.collect()
    return rec


def execute(args, stage: str, plan: list, base, train, scored, split: str, path: Path) -> None:
    shard, shards = (int(v) for v in args.shard.split("/"))
    for i, (method, lr, seed) in enumerate(plan):
        if i % shards != shard or tuple(key(args, stage, method, lr, seed)) in done(path):  # another shard may log it
            continue
        t = time.time()
        rec = run_one(args, stage, method, lr, seed, base, train, scored, split)
        log(path, rec)
        print(f"[{i + 1}/{len(plan)}] {args.task} {stage} {method} lr={lr:g} seed={seed}: {split} accuracy "
              f"{rec['accuracy']:.4f} loss {rec['loss']:.3f} ({time.time() - t:.0f} s, {rec['tokens_per_s']:.0f} tok/s)",
              flush=True)


def grouped(rows: list[dict]) -> dict:
    out: dict = {}
    for row in rows:
        out.setdefault((row["method"], row["r"], row["lr"]), []).append(
            {"test_accuracy": row["accuracy"], "loss": row["loss"]})
    return out


def chosen_rates(path: Path) -> dict:
    chosen = choose_rates(grouped(records(path)), tie_break="loss") if path.exists() else {}
    for dst, src in RATE_AS.items():
        if src in chosen:
            chosen.setdefault(dst, chosen[src])
    return chosen


def cost(args, base, tokenizer, task) -> dict:
    """Step time (interleaved rounds, medians) and exact peak tensor memory of every arm on the same batches."""
    data = lm.encode(task, "train", tokenizer)
    rows = [[(k * args.batch_size + j) % len(data) for j in range(args.batch_size)] for k in range(args.rounds + 2)]
    batches = [data.batch(r) for r in rows]
    targets = data.option_ids[data.labels]
    arms = {m: build(m, base, args, args.dropout) for m in args.methods.split(",")}
    opts = {m: torch.optim.AdamW([p for p in a.parameters() if p.requires_grad], lr=1e-5) for m, a in arms.items()}

    def step(method, batch_index):
        model, opt = arms[method], opts[method]
        ids, mask, last = batches[batch_index]
        loss = torch.nn.functional.cross_entropy(lm.answer_logits(model, ids, mask, last).float(),
                                                 targets[rows[batch_index]])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return int(mask.sum())

    times: dict = {m: [] for m in arms}
    tokens: dict = {m: [] for m in arms}
    for m, model in arms.items():
        model.train()
        step(m, 0)  # warm-up; the optimizer state appears here
    for k in range(args.rounds):
        order = list(arms)[k % len(arms):] + list(arms)[:k % len(arms)]  # rotate: drift hits every arm alike
        for m in order:
            t = time.perf_counter()
            tokens[m].append(step(m, 1 + k))
            times[m].append(time.perf_counter() - t)
    peak = {}
    for m, model in arms.items():
        mem = TensorMemory([*model.parameters(), *model.buffers()])
        with mem:
            for k in range(2):  # the second step runs with the first's graph alive, as a training loop does
                loss_tokens = step(m, k)  # noqa: F841
        peak[m] = mem.peak_bytes + mem.static_bytes
    out = {"task": args.task, "batch_size": args.batch_size, "rounds": args.rounds, "dropout": args.dropout,
           "torch_threads": torch.get_num_threads(), "arms": {}}
    for m in arms:
        med = statistics.median(times[m])
        out["arms"][m] = {"label": label(m), "step_s_median": med, "tokens_per_s": statistics.median(tokens[m]) / med,
                          "peak_bytes": peak[m], "trainable_params": trainable_count(arms[m]),
                          "step_s_all": [round(t, 3) for t in times[m]]}
    for m, v in out["arms"].items():
        for ref in ("peft-lora", "full", "peft-hira"):
            if ref in out["arms"]:
                v[f"time_vs_{ref}"] = v["step_s_median"] / out["arms"][ref]["step_s_median"]
                v[f"memory_vs_{ref}"] = v["peak_bytes"] / out["arms"][ref]["peak_bytes"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(LM_TASKS), default="wordnet-isa")
    p.add_argument("--stage", choices=["zero-shot", "select", "test", "paper", "cost"], default="select")
    p.add_argument("--model", default=lm.SMOLLM2)
    p.add_argument("--methods", default=None, help="comma-separated arms (default: all seven; cost adds full)")
    p.add_argument("--seeds", default=None, help="default 0,1 (select) or 0,1,2 (test, paper)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--epochs", type=int, default=None, help="default per task")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=0, help="use only the first N training examples (0: all)")
    p.add_argument("--widen", type=int, default=1, help="select: extra x3 steps where the best rate is on an edge")
    p.add_argument("--grid", default="", help="override rates, e.g. 'lora=1e-4/3e-4'")
    p.add_argument("--rounds", type=int, default=5, help="cost: timed rounds")
    p.add_argument("--precision", choices=lm.PRECISIONS, default="fp32",
                   help="fp32 (the study's), bf16 weights, or bf16-autocast; records of another precision go to "
                        "<task>-<stage>-<precision>[-<quantize>].jsonl")
    p.add_argument("--quantize", choices=lm.QUANTIZATIONS, default=None, help="a bitsandbytes 4-bit / 8-bit base")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shard", default="0/1", help="i/n: run every n-th planned run, starting at i (processes that "
                                                  "share the cores and one record file)")
    p.add_argument("--out", default="runs/llm")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--smoke", action="store_true", help="a tiny random LLaMA and a few examples, seconds")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    task = get_lm_task(args.task)
    args.epochs = args.epochs or EPOCHS[args.task]
    if args.smoke:
        args.limit, args.epochs, args.r, args.rounds, args.no_progress = 16, 1, 2, 1, True
        for split in task.splits:
            task.splits[split] = task.splits[split][:16]
    elif args.limit:
        task.splits["train"] = task.splits["train"][:args.limit]
    methods = args.methods.split(",") if args.methods else list(COST_ARMS if args.stage == "cost" else ARMS)
    for m in methods:
        get_method(m)
    base, tokenizer = load_base(args)
    if args.stage == "cost":
        args.methods = ",".join(methods)
        result = cost(args, base, tokenizer, task)
        path = out / f"cost-{args.task}{'-dropout' if args.dropout else ''}.json"
        path.write_text(json.dumps(result, indent=2))
        for m, v in result["arms"].items():
            print(f"{m:>13s}: {v['step_s_median']:.2f} s/step  {v['tokens_per_s']:.0f} tok/s  "
                  f"peak {v['peak_bytes'] / 2 ** 20:.0f} MB  time vs PEFT LoRA {v.get('time_vs_peft-lora', float('nan')):.2f}")
        return 0
    if args.stage == "zero-shot":
        path = out / f"{args.task}-zero-shot.jsonl"
        for split in ("validation", "test"):
            if tuple([args.task, "zero-shot", split]) in done(path):
                continue
            result = lm.score(base, lm.encode(task, split, tokenizer))
            log(path, {"key": [args.task, "zero-shot", split], "task": args.task, "split": split, **result,
                       "majority": task.majority_accuracy(split)})
            print(f"{args.task} zero-shot {split}: accuracy {result['accuracy']:.4f} (majority class "
                  f"{task.majority_accuracy(split):.4f})", flush=True)
        return 0
    train = lm.encode(task, "train", tokenizer)
    if args.stage == "select":
        seeds = [int(s) for s in (args.seeds or "0,1").split(",")]
        scored = lm.encode(task, "validation", tokenizer)
        path = out / f"{args.task}-select.jsonl"
        grids = {m: list(GRID[m]) for m in methods if m in GRID}
        grids.update({m: [float(v) for v in lrs.split("/")] for m, lrs in
                      (item.split("=") for item in filter(None, args.grid.split(",")))})
        if args.smoke:
            grids = {m: g[:1] for m, g in grids.items()}
        chosen = select_widened(grids, seeds, args.widen,
                                lambda plan: execute(args, "select", plan, base, train, scored, "validation", path),
                                path, lambda run: key(args, "select", *run), chosen_rates)
        (out / f"{args.task}-chosen.json").write_text(json.dumps(chosen, indent=2))
        print("chosen on validation:", chosen)
        return 0
    seeds = [int(s) for s in (args.seeds or "0,1,2").split(",")]
    scored = lm.encode(task, "test", tokenizer)
    path = out / f"{args.task}-{args.stage}{variant(args)}.jsonl"
    if args.stage == "paper":
        plan = [(m, PAPER_RATE, s) for m in methods if m in PAPER_ARMS for s in seeds]
    else:
        chosen = chosen_rates(out / f"{args.task}-select.jsonl")
        missing = [m for m in methods if m not in chosen]
        if missing and not args.smoke:
            raise SystemExit(f"no chosen rate for {missing}: run --stage select first")
        plan = [(m, chosen.get(m, GRID.get(m, [1e-3])[0]), s) for m in methods for s in seeds]
    execute(args, args.stage, plan, base, train, scored, "test", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
