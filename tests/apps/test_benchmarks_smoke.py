"""Benchmark scripts stay runnable (tiny sizes); their numbers are measured by running them, not here."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bf16_update_smoke(tmp_path, capsys):
    import json

    bench = load("bf16_update")
    out = tmp_path / "rows.json"
    assert bench.main(["--size", "64", "--batch", "16", "--rank", "2", "--scales", "1e-3,1e-1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4 and "| bfloat16 |" in capsys.readouterr().out
    f32 = [r for r in rows if r["dtype"] == "float32"]
    assert all(r["liera"] < 1e-2 for r in f32)  # a float32 layer keeps the update (independent float64 reference)
    if "peft_hira" in f32[0]:
        assert all(r["peft_hira"] < 1e-2 for r in f32)
    assert all(r["liera_float32_branch"] < 1e-2 for r in f32)
    big = next(r for r in rows if r["dtype"] == "bfloat16" and r["mean_abs_D"] == 0.1)
    assert big["liera"] < 0.1 and big["liera_float32_branch"] < 0.1  # a 10% update survives bf16 rounding


@pytest.mark.parametrize("extra", [[], ["--memory-only"]], ids=["timed", "memory-only"])
def test_train_step_quick(tmp_path, extra):
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "quick.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--quick", *extra,
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert out.exists() and json.loads(out.read_text())
    assert "peak MB" in proc.stdout


def test_peft_method_quick(tmp_path, capsys):
    import json

    pytest.importorskip("peft")
    bench = load("peft_method")
    out = tmp_path / "quick.json"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    shapes = json.loads(out.read_text())["shapes"]
    assert [s["key"] for s in shapes] == ["linear", "conv"]
    assert all(set(s["variants"]) == {"liera", "peft-liera", "peft-lora", "liera-2"} for s in shapes)
    assert all(s["ratios"]["peft-liera / liera"]["peak"] == 1.0 for s in shapes)  # the same tensors, exactly
    assert "| peft-liera / liera |" in capsys.readouterr().out


def test_profile_llm_step_smoke(tmp_path):
    import json

    pytest.importorskip("transformers")
    out = tmp_path / "profile.json"
    assert load("profile_llm_step").main(["--smoke", "--arms", "peft-lora,liera-taylor", "--out", str(out)]) == 0
    arms = json.loads(out.read_text())["arms"]
    assert set(arms) == {"peft-lora", "liera-taylor"}
    assert all(a["matmul_s"] > 0 and abs(sum(v for k, v in a.items() if k != "total_s") - a["total_s"]) < 1e-6
               for a in arms.values())


def test_precision_quick(tmp_path, capsys, monkeypatch):
    """The precision benchmark on a tiny random LLaMA: every setting runs (the quantized ones where bitsandbytes is
    installed) and the table has a row per variant."""
    import json

    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    monkeypatch.setenv("LIERA_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # it reads the CPU's name through train_step
    bench = load("precision")
    settings = "fp32,bf16-autocast,bf16" + (",4bit,8bit" if importlib.util.find_spec("bitsandbytes") else "")
    out = tmp_path / "precision.json"
    assert bench.main(["--model", "tiny", "--quick", "--settings", settings, "--variants", "liera-taylor,peft-lora",
                       "--batch", "2", "--seq", "16", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["setting"] for r in results] == settings.split(",")
    for r in results:
        assert set(r["variants"]) == {"liera-taylor", "peft-lora"}, r
        assert all("error" not in v and v["step_s"] > 0 and v["peak_bytes"] > 0 for v in r["variants"].values()), r
    assert "| fp32 | liera-taylor |" in capsys.readouterr().out


def test_autocast_layer_quick(capsys):
    pytest.importorskip("peft")
    assert load("autocast_layer").main(["--tokens", "16,32", "--repeats", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 16 |") or line.startswith("| 32 |")]
    assert len(rows) == 2
