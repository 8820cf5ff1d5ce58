"""Sparse recovery (issue 32): is LieRA the better way to recover a pruned model, or only as good as a masked
additive adapter? Design, budget and commands: docs/results-sparse.md (results and the answer there).

Settings: SmolLM2-135M pruned with Wanda (50% per row, or 2:4) on its q/k/v/up/down projections and recovered on
wordnet-isa (r = 16, alpha = 32, the dense LLM study's recipe); EfficientNet-Lite0 with its dense (non-depthwise)
convolutions magnitude-pruned to 50% per layer, recovered on fashion and digits (r = 4, all 49 convs adapted, the
head trained in full, 40% validation split). Arms, each trained on the pruned model:
  lora          plain LoRA (liera's additive update, no mask): scored unmerged (the dense-compute reference) and
                merged then re-masked (the common practice; what it deploys);
  lora-masked   masked LoRA, W + BA * (W != 0) (SQFT; keep_zeros=True);
  liera-taylor  LieRA-Taylor, W + W * D (keep_zeros=True);
  liera-rms     LieRA-Taylor with layer_scaling="rms" (keep_zeros=True);
  liera-exact   W * exp(D), on one setting only (--methods).
Baselines (stage "baselines", once each): the dense and the pruned model without recovery (language model: zero-shot;
CNN: only the head trained). Every recovered model is merged (merge_and_unload) and scored as deployed; its record
holds the sparsity of the pruned weights, whether every zero survived bit for bit, and the N:M validity.

    python experiments/sparse.py --setting lm-wanda50 --stage baselines
    python experiments/sparse.py --setting lm-wanda50 --stage select            # 2 seeds, 3 rates, widened once
    python experiments/sparse.py --setting lm-wanda50 --stage test              # 3 seeds at the chosen rates
    python experiments/sparse.py --setting lm-wanda24 --stage select --seeds 0   # 2:4: its own rates
    python experiments/sparse.py --setting lm-wanda24 --stage test
    python experiments/sparse.py --report                                       # tables with paired 95% intervals
    python experiments/sparse.py --smoke --out /tmp/sparse-smoke                # tiny models, under a minute
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import choose_rates, done, ladder_step, log, mean_sd, records, select_widened  # noqa: E402

from liera.apps import lm  # noqa: E402
from liera.apps.lmtasks import get_lm_task  # noqa: E402
from liera.apps.prune import apply_zero_masks, parse_prune, prune_model, zero_masks  # noqa: E402
from liera.apps.training import accuracy, fit, prepare_arm, trainable_count  # noqa: E402
from liera.sparsity import layer_sparsity, same_zeros  # noqa: E402

ROOT = Path(__file__).resolve().parent
SETTINGS = {
    "lm-wanda50": dict(family="lm", task="wordnet-isa", prune="wanda:0.5"),
    "lm-wanda24": dict(family="lm", task="wordnet-isa", prune="wanda:2:4"),
    "lm-magnitude50": dict(family="lm", task="wordnet-isa", prune="magnitude:0.5"),  # if time allows
    "lm-drug-wanda50": dict(family="lm", task="drug-reviews", prune="wanda:0.5"),  # if time allows
    "lite0-fashion": dict(family="vision", task="fashion", prune="magnitude:0.5"),
    "lite0-digits": dict(family="vision", task="digits", prune="magnitude:0.5"),
}
ARMS = ("lora", "lora-masked", "liera-taylor", "liera-rms")
METHOD = {"lora-masked": "lora"}  # arm -> method of liera's table (the arm adds keep_zeros)
KEEP_ZEROS = {"lora": False}  # every other arm keeps the zeros
RATE_AS = {"lora-masked": "lora", "liera-exact": "liera-taylor"}  # where the dense study has no rate of its own
LM_RECIPE = dict(r=16, alpha=32.0, epochs={"wordnet-isa": 3, "drug-reviews": 2}, batch_size=16)
VISION_RECIPE = dict(r=4, epochs=5, batch_size=32, resolution=64, val_fraction=0.4, probe_lr=3e-2)
VISION_PRUNED = r"_blocks\.\d+\._depthwise_conv"  # excluded from pruning: depthwise convs stay dense
CALIBRATION = 64  # Wanda: the first 64 training prompts, one at a time (no padding enters the norms)
HELDOUT_TEXTS = 200  # WordNet glosses of wordnet_lex_1k's test split: held-out perplexity (carried in the package)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}  # Student t, two-sided 95%, by degrees of freedom


# ====================================================================== the models, pruned once per process
class Setup:
    """The setting's base model (dense), its pruned copy with the zero masks, and the data."""

    def __init__(self, args):
        self.args, self.spec = args, parse_prune(args.prune)
        if args.family == "lm":
            self.task = get_lm_task(args.task)
            if args.smoke:
                for split in self.task.splits:
                    self.task.splits[split] = self.task.splits[split][:16]
            self.dense, self.tokenizer = lm.tiny_llama(self.task) if args.smoke else lm.load_causal_lm(lm.SMOLLM2)
            self.splits = {s: lm.encode(self.task, s, self.tokenizer) for s in ("train", "validation", "test")}
            self.targets = list(lm.LLAMA_TARGETS)
            self.pruned = copy.deepcopy(self.dense)
            calibration = [torch.tensor([p]) for p in self.splits["train"].prompts[:CALIBRATION]]
            self.pruning = prune_model(self.pruned, self.spec, target_modules=self.targets,
                                       calibration=calibration if self.spec.method == "wanda" else None,
                                       run=lambda m, ids: m(input_ids=ids, use_cache=False),
                                       stage_pattern=r".*\.layers\.\d+\.")
            from liera.apps.textdata import wordnet_lex_1k

            self.heldout = wordnet_lex_1k().test_text[:HELDOUT_TEXTS // (10 if args.smoke else 1)]
        else:
            from vision import TASKS, tensors

            from liera.apps.efficientnet import HEAD, load_efficientnet

            task = TASKS[args.task]()
            limit = 48 if args.smoke else None
            res = 32 if args.smoke else VISION_RECIPE["resolution"]
            val = task.validation_split(VISION_RECIPE["val_fraction"], seed=0)
            self.data = {"validation": tensors(val, res, limit), "test": tensors(task, res, limit)}
            self.head, self.targets = HEAD, "all-conv"
            self.dense = load_efficientnet(task.num_classes)
            self.pruned = copy.deepcopy(self.dense)
            self.pruning = prune_model(self.pruned, self.spec, target_modules="all-conv",
                                       exclude_modules=VISION_PRUNED)
        self.keys = [r.key for r in self.pruning.rows]
        self.masks = zero_masks(self.pruned, self.keys)
        self.zeros = {k: self.pruned.get_parameter(k).detach().clone() for k in self.keys}


def heldout_perplexity(model, tokenizer, texts: list[str], batch_size: int = 16) -> float:
    """exp(mean next-token loss) over held-out real text (WordNet glosses): how much of the language model the
    pruning and the recovery kept, beyond the task."""
    causal = lm.causal_lm_of(model)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[i:i + batch_size]), return_tensors="pt", padding=True)
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            logits = causal(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), reduction="sum",
                                   ignore_index=-100)
            total += float(loss)
            count += int((labels[:, 1:] != -100).sum())
    return math.exp(total / max(count, 1))


def deployment(setup: Setup, merged) -> dict:
    """What the deployed (merged) model keeps of the pruning: sparsity, every zero bit for bit, N:M validity."""
    rows, kept = [], True
    nm = [setup.spec.nm] if setup.spec.nm else [(2, 4)]
    for key in setup.keys:
        w = merged.get_parameter(key).detach()
        kept &= same_zeros(setup.zeros[key], w)
        rows.append(layer_sparsity(key, w, nm))
    pattern = f"{nm[0][0]}:{nm[0][1]}"
    return {"sparsity": sum(r.zeros for r in rows) / sum(r.numel for r in rows), "every_zero_kept": bool(kept),
            f"layers_{pattern.replace(':', '_')}_valid": sum(1 for r in rows if r.nm[pattern]), "layers": len(rows)}


def score(setup: Setup, model, split: str) -> dict:
    if setup.args.family == "lm":
        out = lm.score(model, setup.splits[split])
        return {"accuracy": out["accuracy"], "loss": out["loss"],
                "perplexity": heldout_perplexity(model, setup.tokenizer, setup.heldout)}
    x, y = setup.data[split][2], setup.data[split][3]
    model.eval()
    with torch.no_grad():
        loss = sum(float(F.cross_entropy(model(x[i:i + 256]), y[i:i + 256], reduction="sum"))
                   for i in range(0, len(y), 256)) / len(y)
    return {"accuracy": accuracy(model, x, y), "loss": loss}


# ====================================================================== one run
def key(args, stage: str, arm: str, lr: float, seed: int) -> list:
    return [args.setting, stage, arm, args.r, lr, seed, args.epochs]


def run_one(setup: Setup, stage: str, arm: str, lr: float, seed: int, split: str) -> dict:
    args = setup.args
    torch.manual_seed(seed)
    model = copy.deepcopy(setup.pruned)
    method = METHOD.get(arm, arm)
    keep = KEEP_ZEROS.get(arm, True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if args.family == "lm":
            wrapped, _ = prepare_arm(method, model, r=args.r, alpha=args.alpha, target_modules=setup.targets,
                                     full_scope="targets", keep_zeros=keep)
        else:
            wrapped, _ = prepare_arm(method, model, head=setup.head, r=args.r, alpha=float(args.r),
                                     target_modules=setup.targets, keep_zeros=keep)
    started = time.perf_counter()
    if args.family == "lm":
        fit_result = lm.fit_lm(wrapped, setup.splits["train"], epochs=args.epochs, lr=lr, batch_size=args.batch_size,
                               seed=seed, desc=f"{arm} lr={lr:g} s{seed}", show_progress=not args.no_progress)
        losses = fit_result.losses
    else:
        x, y = setup.data[split][0], setup.data[split][1]
        losses = fit(wrapped, x, y, epochs=args.epochs, lr=lr, batch_size=args.batch_size, seed=seed,
                     desc=f"{arm} lr={lr:g} s{seed}", show_progress=not args.no_progress)
    seconds = time.perf_counter() - started
    rec = {"key": key(args, stage, arm, lr, seed), "setting": args.setting, "stage": stage, "arm": arm,
           "method": arm, "r": args.r, "lr": lr, "seed": seed, "epochs": args.epochs, "split": split,
           "prune": str(setup.spec), "pruned_sparsity": setup.pruning.fraction, "keep_zeros": keep,
           "trainable_params": trainable_count(wrapped), "train_time_s": round(seconds, 1),
           "losses": losses[:: max(1, len(losses) // 60)], "torch_threads": torch.get_num_threads()}
    if not keep:  # plain LoRA: the dense-compute reference (unmerged), then merged and re-masked
        rec["unmerged"] = score(setup, wrapped, split)
    merged = wrapped.merge_and_unload()
    if not keep:
        rec["remasked_entries"] = apply_zero_masks(merged, setup.masks)
    rec["deployed"] = score(setup, merged, split)
    rec["deployment"] = deployment(setup, merged)
    rec["test_accuracy"] = rec["deployed"]["accuracy"]  # what choose_rates reads (the deployed model's accuracy)
    rec["loss"] = rec["deployed"]["loss"]
    del model, wrapped, merged
    gc.collect()
    return rec


def execute(setup: Setup, stage: str, plan: list, split: str, path: Path) -> None:
    args = setup.args
    shard, shards = (int(v) for v in args.shard.split("/"))
    for i, (arm, lr, seed) in enumerate(plan):
        if i % shards != shard or tuple(key(args, stage, arm, lr, seed)) in done(path):
            continue
        t = time.time()
        rec = run_one(setup, stage, arm, lr, seed, split)
        log(path, rec)
        extra = f", unmerged {rec['unmerged']['accuracy']:.4f}" if "unmerged" in rec else ""
        print(f"[{i + 1}/{len(plan)}] {args.setting} {stage} {arm} lr={lr:g} seed={seed}: deployed {split} accuracy "
              f"{rec['test_accuracy']:.4f}{extra}; sparsity {rec['deployment']['sparsity']:.4f}, every zero kept: "
              f"{rec['deployment']['every_zero_kept']} ({time.time() - t:.0f} s)", flush=True)


# ====================================================================== rates
def start_rates(args) -> dict:
    """The dense study's chosen rates for this task (liera-exact and masked LoRA take their relatives')."""
    source = ROOT / "records" / ("llm" if args.family == "lm" else "conditioning") / f"{args.task}-chosen.json"
    chosen = json.loads(source.read_text()) if source.exists() else {}
    for dst, src in RATE_AS.items():
        if src in chosen:
            chosen.setdefault(dst, chosen[src])
    return chosen


def grouped(rows: list[dict]) -> dict:
    out: dict = {}
    for row in rows:
        out.setdefault((row["arm"], row["r"], row["lr"]), []).append(row)
    return out


def chosen_rates(path: Path) -> dict:
    chosen = choose_rates(grouped(records(path)), tie_break="loss") if path.exists() else {}
    for dst, src in RATE_AS.items():
        if src in chosen and dst not in chosen:
            chosen[dst] = chosen[src]
    return chosen


# ====================================================================== the report
def paired_interval(a: list[float], b: list[float]) -> str:
    """mean(a - b) with a paired 95% t interval (seeds paired)."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    if len(diffs) < 2:
        return f"{100 * diffs[0]:+.1f}" if diffs else "-"
    half = T_975.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    m = statistics.mean(diffs)
    return f"{100 * m:+.1f} [{100 * (m - half):+.1f}, {100 * (m + half):+.1f}]"


def paired(seeds: dict, other: dict) -> str:
    """This arm against another on the seeds both have (deployed accuracy); "-" against itself or nothing."""
    common = sorted(s for s in seeds if s in other)
    if not common or other is seeds:
        return "-"
    return paired_interval([seeds[s]["test_accuracy"] for s in common], [other[s]["test_accuracy"] for s in common])


def report(out: Path) -> str:
    """The tables of every tested setting: each arm's deployed accuracy with paired intervals, the sparsity it kept;
    for a language model the held-out perplexity, for an N:M setting how many layers keep the pattern; the setting's
    baselines (dense and pruned, no recovery) below its arms."""
    lines = ["# Sparse recovery: measured tables (experiments/sparse.py --report)", ""]
    for setting in SETTINGS:
        path = out / f"{setting}-test.jsonl"
        if not path.exists():
            continue
        rows = records(path)
        by_arm: dict = {}
        for row in rows:
            by_arm.setdefault(row["arm"], {})[row["seed"]] = row
        lm_family = SETTINGS[setting]["family"] == "lm"
        nm = parse_prune(SETTINGS[setting]["prune"]).nm
        pattern = f"{nm[0]}:{nm[1]}" if nm else None
        extra = (["held-out perplexity"] if lm_family else []) + ([f"{pattern} valid layers"] if pattern else [])
        lines += [f"## {setting} ({SETTINGS[setting]['prune']})", "",
                  "| arm | lr | deployed accuracy | vs masked LoRA | vs re-masked LoRA | sparsity kept | "
                  "every zero kept | " + "".join(f"{e} | " for e in extra),
                  "| --- | ---: | ---: | ---: | ---: | ---: | :---: | " + "---: | " * len(extra)]

        def cells(seeds: dict, what: str = "deployed") -> str:
            """The extra columns (perplexity, N:M) of these runs, for the deployed or the unmerged model."""
            out_cells = []
            if lm_family:
                out_cells.append(f"{statistics.mean(s[what]['perplexity'] for s in seeds.values()):.1f}")
            if pattern:
                field_name = f"layers_{pattern.replace(':', '_')}_valid"
                out_cells.append("-" if what != "deployed" else
                                 f"{min(s['deployment'][field_name] for s in seeds.values())}/"
                                 f"{seeds[min(seeds)]['deployment']['layers']}")
            return "".join(f"{c} | " for c in out_cells)

        ref = {name: by_arm.get(name, {}) for name in ("lora-masked", "lora")}
        for arm, seeds in by_arm.items():
            accs = [seeds[s]["test_accuracy"] for s in sorted(seeds)]
            first = seeds[min(seeds)]
            lines.append(f"| {arm} | {first['lr']:g} | {mean_sd(accs)} | {paired(seeds, ref['lora-masked'])} | "
                         f"{paired(seeds, ref['lora'])} | "
                         f"{min(s['deployment']['sparsity'] for s in seeds.values()):.4f} | "
                         f"{all(s['deployment']['every_zero_kept'] for s in seeds.values())} | " + cells(seeds))
            if "unmerged" in first:
                unmerged = [seeds[s]["unmerged"]["accuracy"] for s in sorted(seeds)]
                lines.append(f"| {arm} (unmerged, dense compute) | {first['lr']:g} | {mean_sd(unmerged)} | | | - "
                             f"| - | " + cells(seeds, "unmerged"))
        base_path = out / f"{setting}-baselines.jsonl"
        for row in records(base_path) if base_path.exists() else []:
            if row["split"] != "test":
                continue
            ppl = [f"{row['perplexity']:.1f}"] if lm_family else []
            label = {"dense": "dense model", "pruned": "pruned, no recovery"}[row["model"]]
            label += " (zero-shot)" if lm_family else " (only the head trained)"
            lines.append(f"| {label} | - | {row['accuracy']:.4f} | | | {row['sparsity']:.4f} | - | "
                         + "".join(f"{c} | " for c in ppl + (["-"] if pattern else [])))
        lines.append("")
    text = "\n".join(line.rstrip() for line in lines)
    (out / "report.md").write_text(text + "\n")
    return text


# ====================================================================== main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=sorted(SETTINGS), default="lm-wanda50")
    p.add_argument("--stage", choices=["baselines", "select", "test"], default="select")
    p.add_argument("--methods", default=",".join(ARMS), help=f"arms (default {','.join(ARMS)}; add liera-exact on "
                                                              f"one setting)")
    p.add_argument("--seeds", default=None, help="default 0,1 (select) or 0,1,2 (test)")
    p.add_argument("--widen", type=int, default=1, help="select: extra x3 steps where the best rate is on an edge")
    p.add_argument("--rates-from", default=None, help="test: take the rates chosen on another setting")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shard", default="0/1", help="i/n: every n-th planned run (two lanes share one record file)")
    p.add_argument("--out", default="runs/sparse")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--report", action="store_true", help="print and write the tables of every tested setting")
    p.add_argument("--smoke", action="store_true", help="tiny models and data, one rate, one seed: under a minute")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        print(report(out))
        return 0
    args.family, args.task, args.prune = (SETTINGS[args.setting][k] for k in ("family", "task", "prune"))
    if args.family == "lm":
        args.r, args.alpha, args.batch_size = LM_RECIPE["r"], LM_RECIPE["alpha"], LM_RECIPE["batch_size"]
        args.epochs = LM_RECIPE["epochs"][args.task]
    else:
        args.r, args.alpha = VISION_RECIPE["r"], float(VISION_RECIPE["r"])
        args.epochs, args.batch_size = VISION_RECIPE["epochs"], VISION_RECIPE["batch_size"]
    arms = args.methods.split(",")
    if args.smoke:
        args.r, args.alpha, args.epochs, args.no_progress, args.widen = 2, 4.0, 1, True, 0
        arms = list(ARMS)
    setup = Setup(args)
    print(f"{args.setting}: pruned {len(setup.keys)} weights with {setup.spec} to sparsity "
          f"{setup.pruning.fraction:.4f} in {setup.pruning.seconds:.0f} s", flush=True)
    if args.stage == "baselines":
        path = out / f"{args.setting}-baselines.jsonl"
        for name, model in (("dense", setup.dense), ("pruned", setup.pruned)):
            for split in ("validation", "test"):
                k = [args.setting, "baselines", name, split]
                if tuple(k) in done(path):
                    continue
                if args.family == "lm":
                    result = score(setup, model, split)
                else:  # only the head trains: the network's features as they are
                    torch.manual_seed(0)
                    probe, _ = prepare_arm("linear-probe", copy.deepcopy(model), head=setup.head, r=1, alpha=1.0,
                                           target_modules=None)
                    x, y = setup.data[split][0], setup.data[split][1]
                    fit(probe, x, y, epochs=args.epochs, lr=VISION_RECIPE["probe_lr"], batch_size=args.batch_size,
                        seed=0, show_progress=False)
                    result = score(setup, probe, split)
                log(path, {"key": k, "setting": args.setting, "model": name, "split": split, **result,
                           "sparsity": setup.pruning.fraction if name == "pruned" else 0.0})
                print(f"{args.setting} {name} {split}: {result}", flush=True)
        return 0
    if args.stage == "select":
        seeds = [int(s) for s in (args.seeds or ("0" if args.smoke else "0,1")).split(",")]
        path = out / f"{args.setting}-select.jsonl"
        start = start_rates(args)
        grids = {a: ([start.get(a, 1e-3)] if args.smoke else
                     [ladder_step(start.get(a, 1e-3), up=False), start.get(a, 1e-3),
                      ladder_step(start.get(a, 1e-3), up=True)]) for a in arms}
        chosen = select_widened(grids, seeds, args.widen,
                                lambda plan: execute(setup, "select", plan, "validation", path),
                                path, lambda run: key(args, "select", *run), chosen_rates)
        (out / f"{args.setting}-chosen.json").write_text(json.dumps(chosen, indent=2))
        print("chosen on validation:", chosen)
        if not args.smoke:
            return 0
    seeds = [int(s) for s in (args.seeds or ("0" if args.smoke else "0,1,2")).split(",")] if args.stage == "test" \
        else [0]
    chosen = chosen_rates(out / f"{args.rates_from or args.setting}-select.jsonl")
    missing = [a for a in arms if a not in chosen]
    if missing:
        raise SystemExit(f"no chosen rate for {missing}: run --stage select first (or --rates-from a setting that did)")
    plan = [(a, chosen[a], s) for a in arms for s in seeds]
    execute(setup, "test", plan, "test", out / f"{args.setting}-test.jsonl")
    if args.smoke:
        print(report(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
