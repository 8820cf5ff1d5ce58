"""What the experiment scripts share: resumable jsonl records, the common options, the rate choice."""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

RANK_FREE = ("linear-probe", "full")  # no rank: run once, at the first rank given


def log(path: Path, record: dict) -> None:
    """Append one finished run (a crash or Ctrl-C keeps everything before it)."""
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def done(path: Path) -> set:
    """Keys of the runs already recorded, so that a re-run resumes instead of repeating them."""
    if not path.exists():
        return set()
    return {tuple(json.loads(line)["key"]) for line in path.read_text().splitlines() if line.strip()}


def records(path: Path) -> list[dict]:
    """The runs recorded in a jsonl file, one per key (a run recorded twice, e.g. by two processes that raced,
    counts once: the runs are deterministic, so the copies are equal)."""
    seen, out = set(), []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            key = tuple(row["key"]) if "key" in row else len(out)  # hand-written records have no key
            if key not in seen:
                seen.add(key)
                out.append(row)
    return out


def read(path: Path) -> dict:
    """Records grouped by (method, r, lr)."""
    groups: dict = {}
    for row in records(path):
        groups.setdefault((row["method"], row["r"], row["lr"]), []).append(row)
    return groups


def choose_rates(groups: dict, tie_break: str = "lower-rate", by: str = "accuracy") -> dict:
    """Per method, the rate with the best mean validation accuracy over seeds, or with by="loss" the lowest mean
    validation loss (rows need "loss"). A tie (to 1e-6) keeps the lower, more stable rate, or with tie_break="loss"
    the rate with the lower mean validation loss."""
    best: dict = {}
    for (method, _, lr), rows in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][2])):
        acc = round(statistics.mean(r["test_accuracy"] for r in rows), 6)
        loss = statistics.mean(r["loss"] for r in rows) if "loss" in (tie_break, by) else 0.0
        score = (-round(loss, 6), 0.0) if by == "loss" else (acc, -loss)
        if method not in best or score > best[method][1]:
            best[method] = (lr, score)
    return {m: lr for m, (lr, _) in best.items()}


def ladder_step(rate: float, up: bool) -> float:
    """The neighbour of a rate on the 1-3-10 ladder (1e-3 <-> 3e-3 <-> 1e-2 ...)."""
    ones = f"{rate:.0e}"[0] == "1"
    return float(f"{rate * (3.0 if ones else 10 / 3) if up else rate / (10 / 3 if ones else 3.0):.0e}")


def mean_sd(values: list[float], digits: int = 4) -> str:
    """'0.8123 ± 0.0045': mean and sample sd over seeds (sd 0 for one seed), as every table prints accuracy."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def widen_edges(grids: dict, chosen: dict) -> dict:
    """One x3 step past the edge where a method's chosen rate is its grid's lowest or highest (a rate the grid
    already holds is not added twice)."""
    out = {}
    for method, rates in grids.items():
        rates = sorted(rates)
        if chosen.get(method) == rates[-1]:
            rates.append(ladder_step(rates[-1], up=True))
        elif chosen.get(method) == rates[0]:
            rates.insert(0, ladder_step(rates[0], up=False))
        out[method] = rates
    return out


def wait_for(path: Path, keys: set, timeout_s: float = 3 * 3600, poll_s: float = 10.0) -> bool:
    """Wait until every run key is recorded in path (processes sharding one plan: the others' runs too), so that a
    widening step reads the whole plan's results; False if that takes longer than timeout_s."""
    start = time.time()
    while not keys <= done(path):
        if time.time() - start > timeout_s:
            return False
        time.sleep(poll_s)
    return True


def select_widened(grids: dict, seeds: list, widen: int, execute, path: Path, key_of, chosen_of) -> dict:
    """The select stage's plan, run with execute(plan) and widened up to `widen` times one x3 step past an edge of
    the rate chosen so far (chosen_of(path)); with several shards, every shard waits for the whole plan (keys from
    key_of(run)) before it widens, and before it returns, so that every shard returns the same choice (a shard
    that went on to its test stage with the others' last runs missing would test at other rates). Returns the
    final choice. Each round hands execute only the runs it adds, so that shards splitting the plan by position
    split the new runs evenly (indexed over the whole plan, a widening's few runs could all fall to one shard)."""
    planned: set = set()
    for extra in range(widen + 1):
        plan = [(m, lr, s) for m in grids for lr in grids[m] for s in seeds]
        execute([run for run in plan if run not in planned])
        planned.update(plan)
        if not wait_for(path, {tuple(key_of(run)) for run in plan}):
            break
        if extra < widen:
            grids = widen_edges(grids, chosen_of(path))
    return chosen_of(path)


def parse_lrs(text: str) -> dict:
    """'lora=1e-3/3e-3,full=1e-4' -> {"lora": [1e-3, 3e-3], "full": [1e-4]}."""
    out = {}
    for item in filter(None, text.split(",")):
        method, lr = item.split("=")
        out[method] = [float(v) for v in lr.split("/")]
    return out


def add_common_arguments(p: argparse.ArgumentParser, *, tasks, default_task: str, methods, seeds: str,
                         epochs: int, out: str, stages=("select", "test")) -> None:
    p.add_argument("--task", choices=sorted(tasks), default=default_task)
    p.add_argument("--stage", choices=list(stages), default="select")
    p.add_argument("--methods", default=",".join(methods))
    p.add_argument("--ranks", default="8")
    p.add_argument("--seeds", default=seeds)
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default=out)
    p.add_argument("--grid", default="", help="override learning rates, e.g. 'lora=1e-3/3e-3,full=1e-4' (select); "
                                              "in the test stage a single value overrides the chosen rate")
    p.add_argument("--smoke", action="store_true", help="tiny run in seconds (CI keeps the code alive)")


def write_summary(out: Path, name: str, stage: str, lines: list[str], groups: dict) -> None:
    """The stage's table as <name>-<stage>.md (printed too); after a select stage, the chosen rates as
    <name>-chosen.json."""
    (out / f"{name}-{stage}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if stage == "select":
        chosen = choose_rates(groups)
        (out / f"{name}-chosen.json").write_text(json.dumps(chosen, indent=2))
        print("chosen on validation:", chosen)
