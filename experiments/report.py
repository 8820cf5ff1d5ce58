"""Tables for docs/results.md from the test-stage records: accuracy (mean ± sd over seeds) per task, target set,
method and rank, and the paired difference LieRA − LoRA on the same (task, seed, rank) with a 95% t interval
over those pairs. Also how the learned update is spread over layers (relative update norm per layer kind,
share of the update on the largest 10% of weights).

    python experiments/report.py --runs runs/vision --tasks fashion,digits,textures --out runs/report.md
    python experiments/report.py --runs experiments/records/language --tasks wordnet --targets all \
        --target-label "all=MiniLM, 36 encoder linears"
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from common import mean_sd, records

from liera.apps.methods import LIERA as LIERA_FAMILY, METHODS, PEFT, label, names

LORA = "lora"
LIERA = names(multiplicative=True)
ORDER = ("linear-probe",) + names(family=LIERA_FAMILY) + ("full",) + names(family=PEFT)
LABEL = {m: label(m) for m in METHODS}
TARGET_LABEL = {"dw": "stem + depthwise (paper-faithful)", "all": "all convolutions"}


def load(runs: Path, tasks: list[str], targets: list[str]) -> list[dict]:
    rows = []
    for task in tasks:
        for tgt in targets:
            path = runs / (f"{task}-test.jsonl" if tgt == "all" else f"{task}-{tgt}-test.jsonl")
            if not path.exists():
                continue
            for rec in records(path):
                rec["task"], rec["targets"] = task, tgt
                rows.append(rec)
    return rows


def t95(n: int) -> float:
    """Two-sided 95% quantile of Student's t with n - 1 degrees of freedom."""
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, n - 1))
    except ImportError:  # normal approximation
        return 1.96


def interval(diffs: list[float]) -> str:
    if len(diffs) < 2:
        return f"{100 * diffs[0]:+.2f} (n = 1)" if diffs else "-"
    m, sd = statistics.mean(diffs), statistics.stdev(diffs)
    h = t95(len(diffs)) * sd / math.sqrt(len(diffs))
    return f"{100 * m:+.2f} [{100 * (m - h):+.2f}, {100 * (m + h):+.2f}] (n = {len(diffs)})"


def accuracy_tables(rows: list[dict], tasks: list[str], targets: list[str]) -> list[str]:
    out = []
    ranks = sorted({r["r"] for r in rows if r["method"] not in ("linear-probe", "full")})
    for tgt in targets:
        for task in tasks:
            sub = [r for r in rows if r["task"] == task and r["targets"] == tgt]
            if not sub:
                continue
            out += [f"**{task}, {TARGET_LABEL[tgt]}** (test accuracy, mean ± sd over seeds):", "",
                    "| method | lr | trainable params (r = " + ", ".join(map(str, ranks)) + ") | "
                    + " | ".join(f"r = {k}" for k in ranks) + " |",
                    "| --- | ---: | ---: | " + " | ".join("---:" for _ in ranks) + " |"]
            for method in ORDER:
                mine = [r for r in sub if r["method"] == method]
                if not mine:
                    continue
                cells, params = [], []
                for k in ranks:
                    accs = [r["test_accuracy"] for r in mine if r["r"] == k or method in ("linear-probe", "full")]
                    if method in ("linear-probe", "full") and k != ranks[0]:
                        cells.append("")
                        continue
                    params += [f"{r['trainable_params']:,}" for r in mine if r["r"] == k][:1]
                    cells.append(f"{mean_sd(accs)} ({len(accs)})" if accs else "-")
                lrs = sorted({r["lr"] for r in mine})
                out.append(f"| {LABEL[method]} | {'/'.join(f'{v:g}' for v in lrs)} | {' / '.join(params)} | "
                           + " | ".join(cells) + " |")
            out.append("")
    return out


def accuracy_index(rows: list[dict]) -> dict:
    return {(r["task"], r["targets"], r["method"], r["r"], r["seed"]): r["test_accuracy"] for r in rows}


def pair_diffs(index: dict, tasks: list[str], targets: str, method: str, rank=None, base: str = LORA) -> list[float]:
    """method − base (LoRA unless given) on the same (task, target set, rank, seed), over the given tasks (and one
    rank if given)."""
    return [v - index[(t, g, base, k, s)] for (t, g, m, k, s), v in index.items()
            if g == targets and m == method and t in tasks and rank in (None, k) and (t, g, base, k, s) in index]


def scaling_effect(rows: list[dict], tasks: list[str], targets: list[str]) -> list[str]:
    """LieRA-Taylor + rms scaling − plain LieRA-Taylor, paired like the LoRA comparison: what the scaling buys."""
    index = accuracy_index(rows)
    out = ["| target set | " + " | ".join(tasks) + " | all tasks |", "| --- | " + " | ".join("---" for _ in tasks) + " | --- |"]
    for tgt in targets:
        cells = [interval(pair_diffs(index, [t], tgt, "liera-rms", base="liera-taylor")) for t in tasks]
        every = pair_diffs(index, tasks, tgt, "liera-rms", base="liera-taylor")
        if every:
            out.append(f"| {TARGET_LABEL[tgt]} | " + " | ".join(cells) + f" | {interval(every)} |")
    return out if len(out) > 2 else []


def paired(rows: list[dict], tasks: list[str], targets: list[str]) -> tuple[list[str], dict]:
    index = accuracy_index(rows)
    ranks = sorted({r["r"] for r in rows if r["method"] in LIERA + (LORA,)})
    summary: dict = {}
    out = ["| target set | LieRA variant | " + " | ".join(f"r = {k}" for k in ranks) + " | all ranks |",
           "| --- | --- | " + " | ".join("---" for _ in ranks) + " | --- |"]
    for tgt in targets:
        for method in LIERA:
            cells, every = [], []
            for k in ranks:
                diffs = pair_diffs(index, tasks, tgt, method, k)
                every += diffs
                cells.append(interval(diffs))
            if every:
                summary[(tgt, method)] = every
                out.append(f"| {TARGET_LABEL[tgt]} | {LABEL[method]} | " + " | ".join(cells) + f" | {interval(every)} |")
    per_task = ["", "Per task (all ranks pooled; points, 95% t interval over rank x seed pairs):", "",
                "| target set | LieRA variant | " + " | ".join(tasks) + " |", "| --- | --- | " + " | ".join("---" for _ in tasks) + " |"]
    for tgt in targets:
        for method in LIERA:
            cells = []
            for task in tasks:
                cells.append(interval(pair_diffs(index, [task], tgt, method)))
            if any(c != "-" for c in cells):
                per_task.append(f"| {TARGET_LABEL[tgt]} | {LABEL[method]} | " + " | ".join(cells) + " |")
    return out + per_task, summary


def selection_tables(runs: Path, tasks: list[str], targets: list[str]) -> list[str]:
    """Validation accuracy (mean ± sd over seeds) at every rate tried, the chosen rate in bold."""
    out = ["| target set | task | method | r | validation accuracy by rate (chosen in bold) |", "| --- | --- | --- | ---: | --- |"]
    for tgt in targets:
        for task in tasks:
            path = runs / (f"{task}-select.jsonl" if tgt == "all" else f"{task}-{tgt}-select.jsonl")
            chosen_path = runs / (f"{task}-chosen.json" if tgt == "all" else f"{task}-{tgt}-chosen.json")
            if not path.exists():
                continue
            chosen = json.loads(chosen_path.read_text()) if chosen_path.exists() else {}
            groups: dict = {}
            for rec in records(path):
                groups.setdefault((rec["method"], rec["r"]), {}).setdefault(rec["lr"], []).append(rec["test_accuracy"])
            for (method, r), by_lr in sorted(groups.items(), key=lambda kv: ORDER.index(kv[0][0])):
                cells = []
                for lr, accs in sorted(by_lr.items()):
                    cell = f"{lr:g}: {mean_sd(accs, 3)}"
                    cells.append(f"**{cell}**" if chosen.get(method) == lr else cell)
                out.append(f"| {tgt} | {task} | {LABEL[method]} | {r} | {' · '.join(cells)} |")
    return out


def longer_training(runs: Path, tasks: list[str], targets: list[str]) -> list[str]:
    """Validation accuracy at each method's chosen rate after 5 epochs (the selection runs) and after more epochs
    (the runs under runs/epochs-N), same seeds: does the 5-epoch budget hold a method back?"""
    out = ["| target set | task | method | lr | epochs | validation accuracy (5 epochs) | same, longer | "
           "longer − 5 |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for folder in sorted(runs.glob("epochs-*")):
        for tgt in targets:
            for task in tasks:
                name = f"{task}-select.jsonl" if tgt == "all" else f"{task}-{tgt}-select.jsonl"
                if not (folder / name).exists() or not (runs / name).exists():
                    continue
                short = {(r["method"], r["r"], r["lr"], r["seed"]): r["test_accuracy"] for r in records(runs / name)}
                groups: dict = {}
                for rec in records(folder / name):
                    key = (rec["method"], rec["r"], rec["lr"], rec["seed"])
                    if key in short:
                        groups.setdefault(key[:3], []).append((short[key], rec["test_accuracy"], rec["epochs"]))
                for (method, _, lr), pairs in sorted(groups.items(), key=lambda kv: ORDER.index(kv[0][0])):
                    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
                    out.append(f"| {tgt} | {task} | {LABEL[method]} | {lr:g} | {pairs[0][2]} | "
                               f"{statistics.mean(a):.3f} ({len(a)}) | {statistics.mean(b):.3f} | "
                               f"{100 * (statistics.mean(b) - statistics.mean(a)):+.1f} |")
    return out if len(out) > 2 else []


def layer_kind(name: str) -> str:
    if "_depthwise_conv" in name:
        return "depthwise"
    if "_conv_stem" in name:
        return "stem"
    return "pointwise"


def update_spread(rows: list[dict], targets: list[str]) -> list[str]:
    out = ["| target set | method | layer kind | mean rms(W) | relative update ‖ΔW‖/‖W‖ (median over layers) | "
           "share of ‖ΔW‖² on the largest 10% of |W| |", "| --- | --- | --- | ---: | ---: | ---: |"]
    for tgt in targets:
        for method in (LORA,) + LIERA:
            stats = [s for r in rows if r["targets"] == tgt and r["method"] == method and r.get("update_stats")
                     for s in r["update_stats"]]
            for kind in ("stem", "depthwise", "pointwise"):
                mine = [s for s in stats if layer_kind(s["layer"]) == kind]
                if mine:
                    out.append(f"| {tgt} | {LABEL[method]} | {kind} | {statistics.mean(s['rms_w'] for s in mine):.3f} | "
                               f"{statistics.median(s['rel_update'] for s in mine):.4f} | "
                               f"{statistics.mean(s['top10_share'] for s in mine):.2f} |")
    return out if len(out) > 2 else []  # records without update statistics (language.py) get no table


def plot(rows: list[dict], tasks: list[str], targets: list[str], path: Path) -> None:
    """LieRA − LoRA (points) per rank with 95% t intervals over task x seed pairs, one panel per target set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = accuracy_index(rows)
    ranks = sorted({k[3] for k in index if k[2] == LORA})
    fig, axes = plt.subplots(1, len(targets), figsize=(5.5 * len(targets), 4), squeeze=False, sharey=True)
    for ax, tgt in zip(axes[0], targets):
        for j, method in enumerate(LIERA):
            xs, ms, hs = [], [], []
            for k in ranks:
                d = [100 * v for v in pair_diffs(index, tasks, tgt, method, k)]
                if len(d) >= 2:
                    xs.append(ranks.index(k) + (j - 1) * 0.08)
                    ms.append(statistics.mean(d))
                    hs.append(t95(len(d)) * statistics.stdev(d) / math.sqrt(len(d)))
            if xs:
                ax.errorbar(xs, ms, yerr=hs, marker="o", capsize=3, label=LABEL[method], color=f"C{j}")
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xticks(range(len(ranks)), [f"r = {k}" for k in ranks])
        ax.set_title(TARGET_LABEL[tgt])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy, LieRA − LoRA (points)")
    for ax in axes[0]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
            break
    fig.suptitle(f"paired by task and seed ({', '.join(tasks)}); bars: 95% t interval", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs/vision")
    p.add_argument("--tasks", default="fashion,digits,textures")
    p.add_argument("--targets", default="dw,all")
    p.add_argument("--out", default=None)
    p.add_argument("--plot", default=None, help="PNG of the paired differences per rank and target set")
    p.add_argument("--target-label", action="append", default=[], metavar="SET=TEXT",
                   help="how a target set is named in the tables, e.g. all='the 36 encoder linears' for "
                        "experiments/language.py's records (same file names as the vision 'all' set)")
    args = p.parse_args(argv)
    TARGET_LABEL.update(item.split("=", 1) for item in args.target_label)
    tasks, targets = args.tasks.split(","), args.targets.split(",")
    rows = load(Path(args.runs), tasks, targets)
    if not rows:
        print(f"no test records under {args.runs}", file=sys.stderr)
        return 1
    pair_lines, _ = paired(rows, tasks, targets)
    longer = longer_training(Path(args.runs), tasks, targets)
    spread, effect = update_spread(rows, targets), scaling_effect(rows, tasks, targets)
    text = "\n".join(["Learning-rate selection (validation split, seeds 0 and 1):", ""]
                     + selection_tables(Path(args.runs), tasks, targets) + [""]
                     + accuracy_tables(rows, tasks, targets)
                     + (["Longer training (validation split, the chosen rates, seeds 0 and 1):", ""]
                        + longer + [""] if longer else [])
                     + ["Paired difference LieRA − LoRA (points; mean and 95% t interval over task x seed pairs):", ""]
                     + pair_lines
                     + (["", "What the scaling buys: LieRA-Taylor + rms scaling − LieRA-Taylor (points; "
                         "paired by task, rank and seed, all ranks pooled):", ""] + effect if effect else [])
                     + (["", "How the update is spread (test runs, all ranks and seeds):", ""] + spread if spread else [])
                     ) + "\n"
    print(text)
    if args.plot:
        plot(rows, tasks, targets, Path(args.plot))
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
