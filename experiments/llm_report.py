"""Tables for docs/results-llm.md from the records of experiments/llm.py: zero-shot accuracy, the validation grid
with the chosen rates, test accuracy (mean ± sd over seeds), paired differences against LoRA with 95% t intervals
(per task and pooled), the paper's-rate rows, and the cost table (step time, tokens/s, exact peak memory).

    python experiments/llm_report.py --runs experiments/records/llm --out experiments/records/llm/report.md
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from common import mean_sd, records
from report import interval

from liera.apps.methods import label

TASKS = ("wordnet-isa", "drug-reviews")
ARMS = ("lora", "liera-taylor", "liera-rms", "liera-exact", "peft-lora", "peft-dora", "peft-hira")
BASES = ("lora", "peft-lora")  # paired differences are taken against both LoRA arms


def load(runs: Path, task: str, stage: str) -> list[dict]:
    path = runs / f"{task}-{stage}.jsonl"
    return records(path) if path.exists() else []


def zero_shot(runs: Path) -> list[str]:
    out = ["| task | split | zero-shot accuracy | majority answer |", "| --- | --- | ---: | ---: |"]
    for task in TASKS:
        for row in load(runs, task, "zero-shot"):
            out.append(f"| {task} | {row['split']} | {row['accuracy']:.4f} | {row['majority']:.4f} |")
    return out


def selection(runs: Path, task: str) -> list[str]:
    rows = load(runs, task, "select")
    if not rows:
        return []
    chosen_path = runs / f"{task}-chosen.json"
    chosen = json.loads(chosen_path.read_text()) if chosen_path.exists() else {}
    rates = sorted({r["lr"] for r in rows})
    out = [f"**{task}**: validation accuracy, mean of {len({r['seed'] for r in rows})} seeds (chosen rate in bold; "
           f"ties go to the lower mean validation loss)", "",
           "| arm | " + " | ".join(f"{lr:g}" for lr in rates) + " |", "| --- |" + " ---: |" * len(rates)]
    for arm in ARMS:
        cells = []
        for lr in rates:
            accs = [r["accuracy"] for r in rows if r["method"] == arm and r["lr"] == lr]
            cell = f"{statistics.mean(accs):.3f}" if accs else ""
            cells.append(f"**{cell}**" if accs and chosen.get(arm) == lr else cell)
        if any(cells):
            out.append(f"| {label(arm)} | " + " | ".join(cells) + " |")
    return out


def test_table(runs: Path, task: str, stage: str = "test") -> list[str]:
    rows = load(runs, task, stage)
    if not rows:
        return []
    out = ["| arm | lr | test accuracy (mean ± sd) | seeds | trainable params | train time (s, median) | tokens/s |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for arm in ARMS:
        mine = [r for r in rows if r["method"] == arm]
        if mine:
            out.append(f"| {label(arm)} | {mine[0]['lr']:g} | {mean_sd([r['accuracy'] for r in mine])} | {len(mine)} | "
                       f"{mine[0]['trainable_params']:,} | {statistics.median(r['train_time_s'] for r in mine):.0f} | "
                       f"{statistics.median(r['tokens_per_s'] for r in mine):.0f} |")
    return out


def pairs(rows: list[dict], arm: str, base: str) -> list[float]:
    """arm − base test accuracy on the same seed."""
    by = {(r["method"], r["seed"]): r["accuracy"] for r in rows}
    return [by[(arm, s)] - by[(base, s)] for (m, s) in by if m == arm and (base, s) in by]


def paired(runs: Path, stage: str = "test") -> list[str]:
    out = []
    for base in BASES:
        out += [f"Paired difference in test accuracy (points), arm − {label(base)}, same seed; 95% t interval:", "",
                "| arm | " + " | ".join(TASKS) + " | both tasks |", "| --- |" + " ---: |" * (len(TASKS) + 1)]
        for arm in ARMS:
            if arm == base:
                continue
            cells, every = [], []
            for task in TASKS:
                d = pairs(load(runs, task, stage), arm, base)
                every += d
                cells.append(interval(d))
            if every:
                out.append(f"| {label(arm)} | " + " | ".join(cells) + f" | {interval(every)} |")
        out.append("")
    return out


def paper_rate(runs: Path) -> list[str]:
    out = ["| task | arm | lr | test accuracy (mean ± sd) | LieRA-Taylor − LoRA, same seed |",
           "| --- | --- | ---: | ---: | ---: |"]
    for task in TASKS:
        rows = load(runs, task, "paper")
        for arm in ("lora", "liera-taylor"):
            mine = [r for r in rows if r["method"] == arm]
            if mine:
                diff = interval(pairs(rows, "liera-taylor", "lora")) if arm == "liera-taylor" else ""
                out.append(f"| {task} | {label(arm)} | {mine[0]['lr']:g} | {mean_sd([r['accuracy'] for r in mine])} | "
                           f"{diff} |")
    return out


def cost(runs: Path) -> list[str]:
    out = []
    for path in sorted(runs.glob("cost-*.json")):
        data = json.loads(path.read_text())
        out += [f"**{path.stem}**: batch {data['batch_size']}, dropout {data['dropout']}, {data['torch_threads']} "
                f"thread(s), median of {data['rounds']} interleaved rounds:", "",
                "| arm | step (s) | tokens/s | peak memory (MB) | time / PEFT LoRA | time / full | time / PEFT HiRA | "
                "memory / PEFT LoRA | memory / full |", "| --- |" + " ---: |" * 8]
        for arm, v in data["arms"].items():
            out.append(f"| {v['label']} | {v['step_s_median']:.2f} | {v['tokens_per_s']:.0f} | "
                       f"{v['peak_bytes'] / 2 ** 20:.0f} | {v.get('time_vs_peft-lora', float('nan')):.2f} | "
                       f"{v.get('time_vs_full', float('nan')):.2f} | {v.get('time_vs_peft-hira', float('nan')):.2f} | "
                       f"{v.get('memory_vs_peft-lora', float('nan')):.3f} | {v.get('memory_vs_full', float('nan')):.3f} |")
        out.append("")
    return out


def precision(runs: Path, task: str = "wordnet-isa") -> list[str]:
    """The precision check: each arm's test accuracy per precision / quantization (records <task>-test-<variant>.jsonl
    beside the float32 study's <task>-test.jsonl), paired against the same arm in float32 and, on a quantized base,
    liera against PEFT LoRA on the same base (QLoRA)."""
    variants = {"fp32": load(runs, task, "test")}
    for path in sorted(runs.glob(f"{task}-test-*.jsonl")):
        variants[path.stem.removeprefix(f"{task}-test-")] = records(path)
    if len(variants) < 2:
        return []
    arms = sorted({r["method"] for name, rows in variants.items() if name != "fp32" for r in rows})
    # no time column: these runs shared the cores with other jobs (benchmarks/precision.py measures the speed)
    out = ["| arm | precision | lr | test accuracy (mean ± sd) | − same arm in fp32, same seed |",
           "| --- | --- | ---: | ---: | ---: |"]
    for arm in arms:
        for name, rows in variants.items():
            mine = [r for r in rows if r["method"] == arm]
            if not mine:
                continue
            diff = ""
            if name != "fp32":
                fp32 = {r["seed"]: r["accuracy"] for r in variants["fp32"] if r["method"] == arm}
                diff = interval([r["accuracy"] - fp32[r["seed"]] for r in mine if r["seed"] in fp32])
            out.append(f"| {label(arm)} | {name} | {mine[0]['lr']:g} | {mean_sd([r['accuracy'] for r in mine])} | {diff} |")
    for name, rows in variants.items():
        if name.endswith("bit") and {"liera-rms", "peft-lora"} <= {r["method"] for r in rows}:
            out += ["", f"On the {name} base, rms-LieRA − PEFT LoRA (QLoRA), same seed: "
                        f"{interval(pairs(rows, 'liera-rms', 'peft-lora'))} points."]
    return out


def build(runs: Path) -> str:
    parts = ["## Zero-shot", "", *zero_shot(runs), "", "## Learning rates chosen on validation", ""]
    for task in TASKS:
        parts += [*selection(runs, task), ""]
    parts += ["## Test accuracy at the chosen rates", ""]
    for task in TASKS:
        table = test_table(runs, task)
        if table:
            parts += [f"**{task}**", "", *table, ""]
    parts += ["## Paired differences", "", *paired(runs), "## The paper's rate (2e-3), an extra row", "",
              *paper_rate(runs), "", "## Cost", "", *cost(runs)]
    check = precision(runs)
    if check:
        parts += ["## Precision and quantized bases (wordnet-isa, the chosen rates)", "", *check, ""]
    return "\n".join(parts) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="experiments/records/llm")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    text = build(Path(args.runs))
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
