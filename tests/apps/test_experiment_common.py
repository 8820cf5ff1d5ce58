"""experiments/common.py: the rate ladder, the rate choice and the edge widening that vision.py and llm.py share."""
import json
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
try:
    from common import choose_rates, ladder_step, log, records, select_widened, wait_for, widen_edges
finally:
    sys.path.pop(0)


def test_ladder_steps_one_three_ten():
    assert [ladder_step(r, up=True) for r in (1e-3, 3e-3, 1e-2)] == [3e-3, 1e-2, 3e-2]
    assert [ladder_step(r, up=False) for r in (1e-3, 3e-3, 1e-2)] == [3e-4, 1e-3, 3e-3]


def test_choose_rates_ties_keep_the_lower_rate_or_the_lower_loss():
    groups = {("lora", 4, 1e-3): [{"test_accuracy": 0.8, "loss": 0.5}],
              ("lora", 4, 3e-3): [{"test_accuracy": 0.8, "loss": 0.4}],
              ("rms", 4, 1e-3): [{"test_accuracy": 0.7, "loss": 0.3}],
              ("rms", 4, 3e-3): [{"test_accuracy": 0.9, "loss": 0.6}]}
    assert choose_rates(groups) == {"lora": 1e-3, "rms": 3e-3}
    assert choose_rates(groups, tie_break="loss") == {"lora": 3e-3, "rms": 3e-3}
    assert choose_rates(groups, by="loss") == {"lora": 3e-3, "rms": 1e-3}


def test_widen_edges_steps_past_the_edge_the_choice_sits_on():
    grids = {"top": [3e-3, 1e-3], "bottom": [1e-3, 3e-3, 1e-2], "inside": [1e-3, 3e-3, 1e-2], "one": [1e-3],
             "unchosen": [1e-3, 3e-3]}
    got = widen_edges(grids, {"top": 3e-3, "bottom": 1e-3, "inside": 3e-3, "one": 1e-3})
    assert got == {"top": [1e-3, 3e-3, 1e-2], "bottom": [3e-4, 1e-3, 3e-3, 1e-2], "inside": [1e-3, 3e-3, 1e-2],
                   "one": [1e-3, 3e-3], "unchosen": [1e-3, 3e-3]}
    assert grids["top"] == [3e-3, 1e-3]  # the caller's grid is left as it was


def test_wait_for_sees_runs_another_process_records(tmp_path):
    path = tmp_path / "select.jsonl"
    log(path, {"key": ["a", 1]})
    assert wait_for(path, {("a", 1)}, timeout_s=0)
    assert not wait_for(path, {("a", 1), ("b", 2)}, timeout_s=0.05, poll_s=0.01)
    other = threading.Timer(0.05, log, args=(path, {"key": ["b", 2]}))  # the other shard finishes its run
    other.start()
    assert wait_for(path, {("a", 1), ("b", 2)}, timeout_s=5, poll_s=0.01)
    other.join()
    assert [json.loads(x)["key"] for x in path.read_text().splitlines()] == [["a", 1], ["b", 2]]


@pytest.mark.parametrize("rate", [1e-4, 3e-2])
def test_ladder_round_trip(rate):
    assert ladder_step(ladder_step(rate, up=True), up=False) == rate


def test_select_widened_runs_widens_past_the_edge_and_returns_the_choice(tmp_path):
    """The select loop of llm.py and sparse.py: the first plan, then one x3 step past the edge the choice sits on."""

    path = tmp_path / "select.jsonl"
    plans = []

    def execute(plan):
        plans.append(plan)
        for method, lr, seed in plan:
            log(path, {"key": [method, lr, seed], "method": method, "lr": lr, "seed": seed})

    def chosen_of(p):
        rows = records(p)
        return {"m": max(r["lr"] for r in rows)}  # the highest rate always wins: the upper edge

    chosen = select_widened({"m": [1e-3, 3e-3]}, [0], 1, execute, path, lambda run: list(run), chosen_of)
    assert [sorted({lr for _, lr, _ in plan}) for plan in plans] == [[1e-3, 3e-3], [1e-2]]  # only what it adds
    assert chosen == {"m": 1e-2}


def test_a_widening_splits_its_new_runs_over_the_shards(tmp_path, monkeypatch):
    """Two arms widened past their upper edge add two runs; two shards splitting each round by position get one
    each (indexed over the whole plan, both new runs sat at odd positions and fell to one shard)."""
    import common

    path = tmp_path / "select.jsonl"
    per_shard: dict = {0: [], 1: []}

    def execute(plan):  # both shards' parts of each round, as two lanes sharing the record file would run them
        for shard in (0, 1):
            for method, lr, seed in plan[shard::2]:
                per_shard[shard].append((method, lr))
                log(path, {"key": [method, lr, seed], "method": method, "lr": lr, "seed": seed})

    monkeypatch.setattr(common, "wait_for", lambda p, keys: True)
    select_widened({"a": [1e-3, 3e-3, 1e-2], "b": [1e-3, 3e-3, 1e-2]}, [0], 1, execute, path, lambda run: list(run),
                   lambda p: {m: max(r["lr"] for r in records(p) if r["method"] == m) for m in ("a", "b")})
    widened = [[run for run in per_shard[shard] if run[1] > 1e-2] for shard in (0, 1)]
    assert [len(runs) for runs in widened] == [1, 1], widened
    assert len(per_shard[0]) + len(per_shard[1]) == 8  # every run once


def test_select_widened_waits_for_every_shard_before_it_returns(tmp_path, monkeypatch):
    """A shard that finished its part of the last plan waits for the others' runs before it reads the choice (else a
    shard that goes on to its test stage would test at rates chosen without them)."""
    import common

    path = tmp_path / "select.jsonl"
    waited = []

    def wait_for(p, keys):
        waited.append(keys)
        for method, lr, seed in sorted(keys):  # the other shard's runs arrive while this one waits
            if (method, lr, seed) not in common.done(p):
                log(p, {"key": [method, lr, seed], "method": method, "lr": lr, "seed": seed})
        return True

    def execute(plan):  # this shard runs shard 1/2 of the plan: the middle rate only
        for method, lr, seed in plan[1::2]:
            log(path, {"key": [method, lr, seed], "method": method, "lr": lr, "seed": seed})

    monkeypatch.setattr(common, "wait_for", wait_for)
    chosen = select_widened({"m": [1e-3, 3e-3, 1e-2]}, [0], 0, execute, path, lambda run: list(run),
                            lambda p: {"m": max(r["lr"] for r in records(p))})
    assert waited == [{("m", 1e-3, 0), ("m", 3e-3, 0), ("m", 1e-2, 0)}]
    assert chosen == {"m": 1e-2}  # the other shard's run (1e-2) counted
