"""experiments/sparse.py stays runnable: --smoke prunes a tiny LLaMA (and the real EfficientNet-Lite0), runs every
arm's select and test stage, merges, and records that every pruned zero survived (the re-masked LoRA by re-masking,
the others by keep_zeros)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.smoke

ROOT = Path(__file__).resolve().parents[2]
ARMS = {"lora", "lora-masked", "liera-taylor", "liera-rms"}


def run(out: Path, *extra: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "sparse.py"), "--smoke", "--out", str(out),
                           *extra], cwd=ROOT / "experiments", env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("setting,needs", [("lm-wanda24", "transformers"),
                                           ("lite0-fashion", "efficientnet_lite_pytorch")])
def test_sparse_smoke(tmp_path, setting, needs):
    pytest.importorskip(needs)
    run(tmp_path, "--setting", setting)
    rows = [json.loads(line) for line in (tmp_path / f"{setting}-test.jsonl").read_text().splitlines()]
    assert {r["arm"] for r in rows} == ARMS
    for r in rows:
        assert r["deployment"]["every_zero_kept"] and abs(r["deployment"]["sparsity"] - 0.5) < 0.01
        assert ("unmerged" in r) == (r["arm"] == "lora") and r["keep_zeros"] == (r["arm"] != "lora")
    assert "| liera-rms |" in (tmp_path / "report.md").read_text()
    if setting == "lm-wanda24":
        assert all(r["deployment"]["layers_2_4_valid"] == r["deployment"]["layers"] for r in rows)
        run(tmp_path, "--setting", setting, "--stage", "baselines")
        base = [json.loads(line) for line in (tmp_path / f"{setting}-baselines.jsonl").read_text().splitlines()]
        assert {(b["model"], b["split"]) for b in base} == {(m, s) for m in ("dense", "pruned")
                                                          for s in ("validation", "test")}
        run(tmp_path, "--report")  # the table now has the baselines, the held-out perplexity and the 2:4 column
        report = (tmp_path / "report.md").read_text()
        header = next(line for line in report.splitlines() if line.startswith("| arm |"))
        assert header.endswith("| held-out perplexity | 2:4 valid layers |")
        assert "| pruned, no recovery (zero-shot) |" in report and "| dense model (zero-shot) |" in report
        layers = rows[0]["deployment"]["layers"]
        assert f"| {layers}/{layers} |" in report
