"""The `liera` command line: exit codes, messages on stderr, and what each command prints."""
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
