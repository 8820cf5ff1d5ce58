"""Which learning-rate selection rule carries over from the validation split to the test set (issue 22)?

Reads experiments/vision.py's select records (validation accuracy and loss of every run, on the 20% split and on a
larger one where it was run, --val-fraction) and its test-grid records (test accuracy at every rate tried, 3 seeds),
and reports per network x task x target set x rank x method:

(a) the validation-test gap at the rate the current rule chose (validation accuracy minus test accuracy), and
    whether a LieRA variant's validation lead over LoRA is larger than its test lead (paired over task x rank cells);
(b) for each rule, the test accuracy at the rate it chose, its regret (the best test accuracy over the grid minus
    the rule's), and the paired LieRA − LoRA difference under it (over task x rank x seed pairs, as report.py).

Rules: validation accuracy, mean over seeds 0 and 1, ties to the lower rate (the current rule); the same with
validation loss as the tie-break; validation loss as the criterion; three seeds; the larger validation split;
the rate chosen at r = 4 used at every rank (the protocol of docs/results.md). A rule that lacks its records for a
method (no loss in old records, no seed 2, no larger split) is left out there. Last, as a diagnostic and not a rule
(it reads the test set), each method at its best test rate: how much of a difference is the methods' and how much
the luck of the selection.

    python experiments/selection.py --runs runs/replicate --out runs/replicate/selection.md
    python experiments/selection.py --runs runs/replicate --ranks 4     # the cells every rule has records for
    python experiments/selection.py --smoke --out /tmp/selection     # synthetic records, seconds
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

from common import choose_rates, mean_sd, records
from report import LABEL, LORA, ORDER, accuracy_index, interval, load, pair_diffs
from vision import MODEL, VAL_FRACTION, record_name

CURRENT = "val accuracy, seeds 0-1 (current)"
TEST_SEEDS = 3  # a test-grid rate counts once all its seeds are recorded
ORACLE = "best test rate (diagnostic, not a rule)"  # each method at its best rate on the test grid


def rules(large: float) -> dict:
    """label -> (validation share, seeds, how choose_rates ranks the rates, the rank whose choice is used)."""
    return {CURRENT: (VAL_FRACTION, (0, 1), {}, None),
            "+ val loss as tie-break": (VAL_FRACTION, (0, 1), {"tie_break": "loss"}, None),
            "val loss": (VAL_FRACTION, (0, 1), {"by": "loss"}, None),
            "val accuracy, seeds 0-2": (VAL_FRACTION, (0, 1, 2), {}, None),
            f"val accuracy, {round(100 * large)}% split": (large, (0, 1), {}, None),
            "r = 4's choice at every rank": (VAL_FRACTION, (0, 1), {}, 4)}


def choose(rows: list[dict], r: int, seeds: tuple, how: dict) -> dict:
    """Per method, the rate a rule picks at rank r; a method is left out where some rate lacks a seed or a loss."""
    groups: dict = {}
    for row in rows:
        if row["r"] == r and row["seed"] in seeds:
            groups.setdefault((row["method"], r, row["lr"]), []).append(row)
    needs_loss = "loss" in (how.get("by"), how.get("tie_break"))
    lacking = {m for (m, _, _), g in groups.items()
               if len(g) < len(seeds) or needs_loss and any("loss" not in x for x in g)}
    return choose_rates({k: g for k, g in groups.items() if k[0] not in lacking}, **how)


def mean_accuracy(rows: list[dict], method: str, r: int, lr: float, seeds=None) -> float | None:
    accs = [x["test_accuracy"] for x in rows if (x["method"], x["r"], x["lr"]) == (method, r, lr)
            and (seeds is None or x["seed"] in seeds)]
    return statistics.mean(accs) if accs else None


def outcomes(runs: Path, models: list[str], tasks: list[str], targets: list[str], large: float) -> list[dict]:
    """One row per network x task x target set x rank x method x rule: the chosen rate, its validation and test
    accuracy (means over the seeds; test per seed too, for pairing) and the regret against the grid's best rate."""
    out = []
    for model in models:
        for task in tasks:
            for tgt in targets:
                def load(stage: str, share: float = VAL_FRACTION) -> list[dict]:
                    path = runs / f"{record_name(task, tgt, model, share)}-{stage}.jsonl"
                    return records(path) if path.exists() else []

                grid, select = load("test-grid"), {share: load("select", share) for share in (VAL_FRACTION, large)}
                if grid and select[VAL_FRACTION]:
                    cell = {"net": model.removeprefix("efficientnet-"), "model": model, "task": task, "targets": tgt}
                    out += cell_outcomes(grid, select, rules(large), cell)
    return out


def cell_outcomes(grid: list[dict], select: dict, rule_set: dict, cell: dict) -> list[dict]:
    """outcomes' rows for one network x task x target set, every rank the test grid has complete: a rank where some
    rate a select stage tried lacks a test seed (a test grid still running) is left out, with a line on stderr."""
    out = []
    for r in sorted({x["r"] for x in grid}):
        tried = {(x["method"], x["lr"]) for rows in select.values() for x in rows if x["r"] == r}
        seeds_at = {(m, lr): {x["seed"] for x in grid if (x["method"], x["r"], x["lr"]) == (m, r, lr)} for m, lr in tried}
        if any(len(s) < TEST_SEEDS for s in seeds_at.values()):
            print(f"left out: {cell['net']} {cell['task']} r = {r} (its test grid is not complete)", file=sys.stderr)
            continue
        choices = {label: (choose(select[share], at or r, seeds, how), share, seeds, at)
                   for label, (share, seeds, how, at) in rule_set.items()}
        for method in sorted({x["method"] for x in grid}, key=ORDER.index):
            tested = {x["lr"] for x in grid if (x["method"], x["r"]) == (method, r)}
            means = {lr: mean_accuracy(grid, method, r, lr) for lr in tested}
            best = max(means, key=lambda lr: (means[lr], -lr))  # ties to the lower rate, as the rules
            oracle = {ORACLE: ({method: best}, VAL_FRACTION, (0, 1), None)}
            for label, (chosen, share, seeds, at) in {**choices, **oracle}.items():
                lr = chosen.get(method)
                if lr not in means:
                    continue
                out.append({**cell, "r": r, "method": method, "rule": label, "lr": lr, "test": means[lr],
                            "val": mean_accuracy(select[share], method, at or r, lr, seeds),
                            "best": max(means.values()), "regret": max(means.values()) - means[lr],
                            "seeds": {x["seed"]: x["test_accuracy"] for x in grid
                                      if (x["method"], x["r"], x["lr"]) == (method, r, lr)}})
    return out


def index(rows: list[dict]) -> dict:
    """report.py's accuracy index (task, targets, method, rank, seed) -> accuracy, the task named with its network."""
    return {(f"{x['net']}/{x['task']}", x["targets"], x["method"], x["r"], seed): acc
            for x in rows for seed, acc in x["seeds"].items()}


def networks(rows: list[dict]) -> list[str]:
    nets = sorted({x["net"] for x in rows})
    return nets + ["all"] if len(nets) > 1 else nets


def gap_tables(rows: list[dict]) -> list[str]:
    mine = [x for x in rows if x["rule"] == CURRENT]
    lines = ["| network | task | targets | r | method | lr | validation | test | gap (points) |",
             "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {x['net']} | {x['task']} | {x['targets']} | {x['r']} | {LABEL[x['method']]} | {x['lr']:g} | "
              f"{x['val']:.4f} | {x['test']:.4f} | {100 * (x['val'] - x['test']):+.2f} |" for x in mine]
    lines += ["", "Lead over LoRA on validation and on test at the chosen rates (points; the last column paired over "
              "task x rank cells, mean and 95% t interval):", "",
              "| network | targets | LieRA variant | validation lead | test lead | validation lead − test lead |",
              "| --- | --- | --- | ---: | ---: | --- |"]
    cell = lambda x: (x["net"], x["task"], x["targets"], x["r"])  # noqa: E731
    lora = {cell(x): x for x in mine if x["method"] == LORA}
    for net in networks(mine):
        for tgt in sorted({x["targets"] for x in mine}):
            for method in [m for m in ORDER if m != LORA and any(x["method"] == m for x in mine)]:
                pairs = [(x, lora[cell(x)]) for x in mine if x["method"] == method and cell(x) in lora
                         and x["targets"] == tgt and net in ("all", x["net"])]
                if pairs:
                    val = [a["val"] - b["val"] for a, b in pairs]
                    test = [a["test"] - b["test"] for a, b in pairs]
                    excess = interval([v - t for v, t in zip(val, test)])
                    lines.append(f"| {net} | {tgt} | {LABEL[method]} | {100 * statistics.mean(val):+.2f} | "
                                 f"{100 * statistics.mean(test):+.2f} | {excess} |")
    return lines


def rule_tables(rows: list[dict], labels: list[str]) -> list[str]:
    lines = ["| network | task | targets | r | method | best over the grid | "
             + " | ".join(labels) + " |", "| --- | --- | --- | ---: | --- | ---: |" + " --- |" * len(labels)]
    cells: dict = {}
    for x in rows:
        cells.setdefault((x["net"], x["task"], x["targets"], x["r"], x["method"]), {})[x["rule"]] = x
    for (net, task, tgt, r, method), by_rule in cells.items():
        best = next(iter(by_rule.values()))["best"]
        lines.append(f"| {net} | {task} | {tgt} | {r} | {LABEL[method]} | {best:.4f} | " + " | ".join(
            f"{by_rule[k]['lr']:g}: {by_rule[k]['test']:.4f} ({100 * by_rule[k]['regret']:.1f})" if k in by_rule
            else "-" for k in labels) + " |")
    methods = [m for m in ORDER if any(x["method"] == m for x in rows)]
    lines += ["", "Per rule: mean regret (points) per method, and the paired difference LieRA − LoRA under the rule "
              "(points; mean and 95% t interval over task x rank x seed pairs):", "",
              "| rule | network | targets | " + " | ".join(f"regret {LABEL[m]}" for m in methods) + " | "
              + " | ".join(f"{LABEL[m]} − LoRA" for m in methods if m != LORA) + " |",
              "| --- | --- | --- |" + " ---: |" * len(methods) + " --- |" * (len(methods) - 1)]
    for label in labels:
        for net in networks(rows):
            for tgt in sorted({x["targets"] for x in rows}):
                mine = [x for x in rows if x["rule"] == label and x["targets"] == tgt and net in ("all", x["net"])]
                if not mine:
                    continue
                regrets = [[x["regret"] for x in mine if x["method"] == m] for m in methods]
                tasks = sorted({f"{x['net']}/{x['task']}" for x in mine})
                lines.append(f"| {label} | {net} | {tgt} | "
                             + " | ".join(f"{100 * statistics.mean(g):.2f} ({len(g)})" if g else "-" for g in regrets)
                             + " | " + " | ".join(interval(pair_diffs(index(mine), tasks, tgt, m))
                                                  for m in methods if m != LORA) + " |")
    return lines


def pooled_table(rows: list[dict], earlier: Path, tasks: list[str]) -> list[str]:
    """LieRA − LoRA pooled over both networks: the earlier Lite0 study's test pairs at its chosen rates (report.py's
    records, stem + depthwise) beside this study's pairs per network under the current rule (same rule: validation
    accuracy, seeds 0 and 1), and all of them pooled."""
    lite0 = accuracy_index(load(earlier, tasks, ["dw"]))
    mine = [x for x in rows if x["rule"] == CURRENT and x["targets"] == "dw"]
    nets, pairs = sorted({x["net"] for x in mine}), index(mine)
    lines = ["| LieRA variant | Lite0 (earlier study) | " + " | ".join(f"this study: {n}" for n in nets) + " | pooled |",
             "| --- | --- |" + " --- |" * len(nets) + " --- |"]
    for method in [m for m in ORDER if m != LORA and any(x["method"] == m for x in mine)]:
        old = pair_diffs(lite0, tasks, "dw", method)
        new = {n: pair_diffs(pairs, sorted({f"{n}/{x['task']}" for x in mine if x["net"] == n}), "dw", method)
               for n in nets}
        lines.append(f"| {LABEL[method]} | {interval(old)} | " + " | ".join(interval(new[n]) for n in nets)
                     + f" | {interval(old + sum(new.values(), []))} |")
    return lines


def task_table(rows: list[dict]) -> list[str]:
    """LieRA − LoRA per network x task x rank under the current rule (paired over the test seeds)."""
    mine = [x for x in rows if x["rule"] == CURRENT]
    methods = [m for m in ORDER if m != LORA and any(x["method"] == m for x in mine)]
    lines = ["| network | task | targets | r | " + " | ".join(f"{LABEL[m]} − LoRA" for m in methods) + " |",
             "| --- | --- | --- | ---: |" + " --- |" * len(methods)]
    for net, task, tgt, r in sorted({(x["net"], x["task"], x["targets"], x["r"]) for x in mine}):
        cell = [x for x in mine if (x["net"], x["task"], x["targets"], x["r"]) == (net, task, tgt, r)]
        lines.append(f"| {net} | {task} | {tgt} | {r} | " + " | ".join(
            interval(pair_diffs(index(cell), [f"{net}/{task}"], tgt, m, r)) for m in methods) + " |")
    return lines


def rate_tables(runs: Path, rows: list[dict]) -> list[str]:
    """Per network x task x rank: every rate tried, validation accuracy (20% split, mean over the seeds run) and test
    accuracy (mean ± sd over the test-grid seeds); the current rule's rate in bold."""
    lines = []
    for net, model, task, tgt, r in sorted({(x["net"], x["model"], x["task"], x["targets"], x["r"]) for x in rows}):
        grid = records(runs / f"{record_name(task, tgt, model)}-test-grid.jsonl")
        select = records(runs / f"{record_name(task, tgt, model)}-select.jsonl")
        chosen = {x["method"]: x["lr"] for x in rows if x["rule"] == CURRENT
                  and (x["net"], x["task"], x["targets"], x["r"]) == (net, task, tgt, r)}
        rates = sorted({x["lr"] for x in grid if x["r"] == r})
        lines += [f"{net}, {task}, {tgt}, r = {r} (validation / test):", "",
                  "| method | " + " | ".join(f"{lr:g}" for lr in rates) + " |", "| --- |" + " ---: |" * len(rates)]
        for method in [m for m in ORDER if any(x["method"] == m for x in grid)]:
            cells = []
            for lr in rates:
                test = [x["test_accuracy"] for x in grid if (x["method"], x["r"], x["lr"]) == (method, r, lr)]
                val = mean_accuracy(select, method, r, lr)
                text = "" if not test else (f"{val:.3f} / " if val is not None else "- / ") + mean_sd(test)
                cells.append(f"**{text}**" if text and chosen.get(method) == lr else text)
            lines.append(f"| {LABEL[method]} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def synthetic(out: Path) -> None:
    """Records shaped like vision.py's (two tasks, ranks 2 and 4, three rates, three seeds, two validation splits)
    with made-up accuracies: --smoke exercises every table in seconds."""
    rng = random.Random(0)
    for task in ("fashion", "digits"):
        for stage, share in (("select", VAL_FRACTION), ("select", 0.4), ("test-grid", VAL_FRACTION)):
            rows = []
            for method, top in ((LORA, 3e-3), ("liera-rms", 1e-2)):
                for r in (2, 4):
                    for lr in (1e-3, 3e-3, 1e-2):
                        for seed in (0, 1, 2):
                            acc = 0.8 - 0.01 * abs(lr - top) / top + rng.gauss(0, 0.02 if stage == "select" else 0.01)
                            rows.append({"key": [task, stage, method, r, lr, seed], "method": method, "r": r, "lr": lr,
                                         "seed": seed, "test_accuracy": acc, "loss": 1.0 - acc + rng.gauss(0, 0.01)})
            (out / f"{record_name(task, 'dw', MODEL, share)}-{stage}.jsonl").write_text(
                "\n".join(json.dumps(x) for x in rows) + "\n")
        earlier = [x for x in rows if x["lr"] == 3e-3]  # an "earlier study" at one chosen rate, for table (c)
        (out / f"{task}-dw-test.jsonl").write_text("\n".join(json.dumps(x) for x in earlier) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs/replicate")
    p.add_argument("--models", default="efficientnet-lite0,efficientnet-lite2")
    p.add_argument("--tasks", default="fashion,digits,textures,elpv")
    p.add_argument("--targets", default="dw")
    p.add_argument("--val-fraction", type=float, default=0.4, help="the larger validation split's share")
    p.add_argument("--ranks", default="", help="only these ranks, e.g. '4' (every rule has its records at r = 4)")
    p.add_argument("--out", default=None, help="markdown file (with --smoke: a folder for the synthetic records)")
    p.add_argument("--earlier", default=str(Path(__file__).parent / "records" / "conditioning"),
                   help="the Lite0 study's records (report.py's), pooled with these; '' leaves them out")
    p.add_argument("--smoke", action="store_true", help="synthetic records in --out, then the tables (seconds)")
    args = p.parse_args(argv)
    runs, out = Path(args.runs), Path(args.out) if args.out else None
    if args.smoke:
        runs = out or Path("runs/selection-smoke")
        runs.mkdir(parents=True, exist_ok=True)
        synthetic(runs)
        args.models, args.tasks, out, args.earlier = MODEL, "fashion,digits", runs / "selection.md", str(runs)
    rows = outcomes(runs, args.models.split(","), args.tasks.split(","), args.targets.split(","), args.val_fraction)
    rows = [x for x in rows if not args.ranks or str(x["r"]) in args.ranks.split(",")]
    if not rows:
        print(f"no select + test-grid records under {runs}", file=sys.stderr)
        return 1
    labels = [k for k in [*rules(args.val_fraction), ORACLE] if any(x["rule"] == k for x in rows)]
    text = "\n".join(["(a) Validation-test gap at the rate the current rule chose (validation: mean over seeds 0 and "
                      "1 on the 20% split; test: mean over the test-grid seeds):", ""] + gap_tables(rows)
                     + ["", "(b) Test accuracy at each rule's rate (rate: accuracy (regret in points against the "
                        "best rate on the test grid)):", ""] + rule_tables(rows, labels)
                     + (["", "(c) Paired test difference LieRA − LoRA on stem + depthwise, points, mean and 95% t "
                         "interval, the earlier Lite0 study pooled with this one (current rule):", ""]
                        + pooled_table(rows, Path(args.earlier), ["fashion", "digits", "textures"])
                        if args.earlier else [])
                     + ["", "(d) Paired test difference LieRA − LoRA per task (points, current rule):", ""]
                     + task_table(rows)
                     + ["", "(e) Every rate tried: validation accuracy (20% split, mean over its seeds) / test accuracy "
                        "(mean ± sd over 3 seeds); the current rule's rate in bold:", ""]
                     + rate_tables(runs, rows)) + "\n"
    print(text)
    if out:
        out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
