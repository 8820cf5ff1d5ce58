"""The `liera` command line: exit codes, messages on stderr, and what each command prints."""
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import liera
from liera.apps import cli


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    base = tmp_path / "base.safetensors"
    save_file(model.state_dict(), str(base))
    lm = liera.get_liera_model(model, liera.LieRAConfig(target_modules=["0"], init_weights=False))
    lm.save_pretrained(tmp_path / "ad")
    return tmp_path, base, lm


def test_merge_writes_the_merged_file_and_a_summary(saved, capsys):
    tmp_path, base, lm = saved
    assert cli.main(["merge", "--base", str(base), "--adapter", str(tmp_path / "ad"), "--out",
                     str(tmp_path / "m.safetensors"), "--no-progress"]) == 0
    assert "1 weights merged" in capsys.readouterr().out
    merged = load_file(str(tmp_path / "m.safetensors"))
    torch.testing.assert_close(merged["0.weight"], lm.merge_and_unload()[0].weight, rtol=0, atol=0)


def test_merge_errors_exit_2_with_the_message_on_stderr(saved, capsys):
    tmp_path, base, _ = saved
    args = ["merge", "--adapter", str(tmp_path / "ad"), "--no-progress"]
    assert cli.main(args + ["--base", str(base), "--out", str(base)]) == 2
    assert "liera merge: error:" in capsys.readouterr().err
    assert cli.main(["merge", "--adapter", str(tmp_path / "nope"), "--base", str(base), "--out",
                     str(tmp_path / "o.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_inspect_prints_the_report(saved, capsys):
    tmp_path, _, _ = saved
    assert cli.main(["inspect", str(tmp_path / "ad")]) == 0
    assert "adapted weights: 1" in capsys.readouterr().out


def test_help_lists_every_command_without_importing_torch():
    import subprocess
    import sys

    code = ("import sys; from liera.apps import cli; import contextlib, io\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    try: cli.main(['--help'])\n"
            "    except SystemExit: pass\n"
            "print('torch' in sys.modules); print(out.getvalue())")
    lines = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert lines.startswith("False"), "liera --help must not import torch (it is what makes the CLI slow to start)"
    for command in cli.COMMANDS:
        assert command in lines
    assert "full fine-tuning" not in lines.split("demo", 1)[1].split("\n")[0]


def test_inspect_accepts_the_safetensors_file_inside_the_folder(saved, capsys):
    tmp_path, _, _ = saved
    assert cli.main(["inspect", str(tmp_path / "ad" / "adapter_model.safetensors")]) == 0
    assert "adapted weights: 1" in capsys.readouterr().out
    (tmp_path / "other.txt").write_text("x")
    assert cli.main(["inspect", str(tmp_path / "other.txt")]) == 2
    assert "pass the folder that save_pretrained wrote" in capsys.readouterr().err


def test_merge_writes_a_new_head_the_base_file_lacks(tmp_path, capsys):
    """A base file without the head (an encoder's own weights) and an adapter whose new head trained in full:
    the head is added to the output, and the summary says so."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
    save_file({"0.weight": model[0].weight.detach(), "0.bias": model[0].bias.detach()}, str(tmp_path / "enc.safetensors"))
    lm = liera.get_liera_model(model, liera.LieRAConfig(target_modules=["0"], modules_to_save=["1"], init_weights=False))
    lm.save_pretrained(tmp_path / "ad")
    assert cli.main(["merge", "--base", str(tmp_path / "enc.safetensors"), "--adapter", str(tmp_path / "ad"),
                     "--out", str(tmp_path / "m.safetensors"), "--no-progress"]) == 0
    assert "2 added" in capsys.readouterr().out
    merged = load_file(str(tmp_path / "m.safetensors"))
    plain = lm.merge_and_unload()
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(merged[k], v, rtol=0, atol=0)


def test_merge_shape_mismatch_says_what_to_do(saved, capsys):
    tmp_path, _, _ = saved
    save_file({"0.weight": torch.zeros(5, 4), "0.bias": torch.zeros(5)}, str(tmp_path / "other.safetensors"))
    assert cli.main(["merge", "--base", str(tmp_path / "other.safetensors"), "--adapter", str(tmp_path / "ad"),
                     "--out", str(tmp_path / "o.safetensors"), "--no-progress"]) == 2
    assert "pass the base weights of that model" in capsys.readouterr().err


def _proc_stat(cpu0: tuple[int, int], cpu1: tuple[int, int]) -> str:
    """A /proc/stat text whose two CPUs have spent (busy, idle) ticks (busy as user time)."""
    rows = [f"cpu{i} {b} 0 0 {i_} 0 0 0 0 0 0" for i, (b, i_) in enumerate((cpu0, cpu1))]
    total = f"cpu  {cpu0[0] + cpu1[0]} 0 0 {cpu0[1] + cpu1[1]} 0 0 0 0 0 0"
    return "\n".join([total, *rows, "intr 0", ""])


@pytest.fixture
def fake_cpus(tmp_path, monkeypatch):
    """/proc/stat read twice by pick_threads: the test sets what the CPUs did during the window."""
    from liera.apps import training

    stat = tmp_path / "stat"
    monkeypatch.setattr(training, "PROC_STAT", stat)
    monkeypatch.setattr(training.os, "cpu_count", lambda: 2)

    def watch(during: tuple[tuple[int, int], tuple[int, int]]) -> None:
        stat.write_text(_proc_stat((5000, 5000), (5000, 5000)))  # since boot: busy half the time
        after = _proc_stat(*((5000 + b, 5000 + i) for b, i in during))
        monkeypatch.setattr(training.time, "sleep", lambda s: stat.write_text(after))
    return training, watch


def test_threads_look_at_what_runs_now_not_at_the_load_average(fake_cpus, monkeypatch, capsys):
    training, watch = fake_cpus
    # a job just ended: the 1-minute load average still says 1.2, but both cores sat idle during the window
    monkeypatch.setattr(training.os, "getloadavg", lambda: (1.2, 1.0, 1.0))
    watch(((1, 24), (0, 25)))
    assert training.pick_threads() == 2 and capsys.readouterr().out == ""
    # another process keeps one core busy now, while the load average has not caught up yet
    monkeypatch.setattr(training.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    watch(((25, 0), (1, 24)))
    assert training.pick_threads() == 1 and "--threads N" in capsys.readouterr().out
    watch(((25, 0), (25, 0)))
    assert training.pick_threads() == 1  # at least one
    assert training.pick_threads(3) == 3


def test_threads_fall_back_to_the_load_average_without_proc_stat(tmp_path, monkeypatch, capsys):
    from liera.apps import training

    monkeypatch.setattr(training, "PROC_STAT", tmp_path / "absent")
    monkeypatch.setattr(training.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(training.os, "getloadavg", lambda: (1.2, 1.0, 1.0))
    assert training.pick_threads() == 1 and "over the last minute" in capsys.readouterr().out
    monkeypatch.setattr(training.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert training.pick_threads() == 2


def test_busy_cores_reads_this_machine():
    from liera.apps import training

    if training.cpu_times() is None:
        pytest.skip("no /proc/stat on this platform")
    busy = training.busy_cores(0.05)
    assert busy is not None and 0.0 <= busy <= (os.cpu_count() or 1) + 1e-6


@pytest.mark.parametrize("to", ["peft", "liera"])
def test_convert_refuses_to_write_over_its_input(saved, capsys, monkeypatch, to):
    tmp_path, _, _ = saved
    pytest.importorskip("peft")
    folder = tmp_path / "ad"
    before = {f.name: f.read_bytes() for f in folder.iterdir()}
    monkeypatch.chdir(tmp_path)
    for source, out in (("ad", "ad"), (str(folder), "./ad/"), (str(folder / "adapter_config.json"), "ad")):
        assert cli.main(["convert", source, "--to", to, "--out", out]) == 2
        err = capsys.readouterr().err
        assert "never overwrites its input" in err and "ad-converted" in err
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == before


def test_convert_round_trip_keeps_the_outputs(saved, capsys):
    pytest.importorskip("peft")
    tmp_path, _, lm = saved
    assert cli.main(["convert", str(tmp_path / "ad"), "--to", "peft", "--out", str(tmp_path / "p")]) == 0
    assert cli.main(["convert", str(tmp_path / "p"), "--to", "liera", "--out", str(tmp_path / "back")]) == 0
    assert "liera format" in capsys.readouterr().out
    x = torch.randn(3, 4)
    torch.manual_seed(0)
    again = liera.LieRAModel.from_pretrained(nn.Sequential(nn.Linear(4, 4)), tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(again(x), lm(x), rtol=0, atol=0)


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path, capsys):
    """A RuntimeError from inside torch is a bug, not the user's error: it propagates (a traceback, exit 1)."""
    def broken(args):
        return int((torch.zeros(2, 3) @ torch.zeros(2, 3)).sum())  # a shape bug: torch raises RuntimeError

    monkeypatch.setattr(cli, "_inspect", broken)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        cli.main(["inspect", str(tmp_path)])
    assert "error:" not in capsys.readouterr().err


def test_a_user_error_is_one_line_and_exit_2(monkeypatch, tmp_path, capsys):
    from liera.apps.errors import UserError

    def needs_a_package(args):
        raise UserError("this needs the package gguf: pip install gguf")

    monkeypatch.setattr(cli, "_inspect", needs_a_package)
    assert cli.main(["inspect", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "liera inspect: error: this needs the package gguf: pip install gguf\n"


def test_inspect_and_merge_read_a_peft_native_folder(tmp_path, capsys):
    """Both doors' folders: a PEFT-native LieRA adapter is inspected and merged as its liera twin is."""
    peft = pytest.importorskip("peft")
    import liera.integrations.peft as peft_method

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    base = tmp_path / "base.safetensors"
    save_file(model.state_dict(), str(base))
    pm = peft.get_peft_model(model, peft_method.LieraPeftConfig(r=2, target_modules=["0"], init_weights=False))
    pm.save_pretrained(tmp_path / "peft")
    peft_method.peft_to_liera(tmp_path / "peft", tmp_path / "liera")
    reports = []
    for folder in ("peft", "liera"):
        assert cli.main(["inspect", str(tmp_path / folder)]) == 0
        reports.append(capsys.readouterr().out)
        assert cli.main(["merge", "--base", str(base), "--adapter", str(tmp_path / folder), "--out",
                         str(tmp_path / f"{folder}.safetensors"), "--no-progress"]) == 0
        capsys.readouterr()
    assert "PEFT-native" in reports[0] and str(tmp_path / "peft") in reports[0].split("\n")[1]
    assert reports[0].split("\n")[2:] == reports[1].split("\n")[1:]  # the same report after the folder's name
    merged = [load_file(str(tmp_path / f"{f}.safetensors")) for f in ("peft", "liera")]
    assert merged[0].keys() == merged[1].keys() and all(torch.equal(merged[0][k], merged[1][k]) for k in merged[0])
    torch.testing.assert_close(merged[0]["0.weight"], pm.merge_and_unload()[0].weight, rtol=0, atol=0)
