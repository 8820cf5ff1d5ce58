"""`liera merge` (streaming, model-free) and `liera inspect`."""
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import liera
from liera.apps import cli
from zoo import perturb


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("generator", ["lora", "dora", "tucker"])
@pytest.mark.parametrize("exp_map", ["taylor", "exact"])
def test_merge_file_equals_merge_and_unload(tmp_path, dtype, generator, exp_map):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).to(dtype)
    save_file({f"model.{k}": v for k, v in model.state_dict().items()}, str(tmp_path / "base.safetensors"))
    lm = liera.get_liera_model(model, liera.LieRAConfig(r=2, target_modules=["0", "3"], exp_map=exp_map,
                                                       generator=generator, modules_to_save=["3"]))
    perturb(lm)
    with torch.no_grad():
        model[3].bias.add_(1.0)
    lm.save_pretrained(tmp_path / "adapter")
    assert cli.main(["merge", "--base", str(tmp_path / "base.safetensors"), "--adapter", str(tmp_path / "adapter"),
                     "--out", str(tmp_path / "merged.safetensors"), "--no-progress"]) == 0
    merged = load_file(str(tmp_path / "merged.safetensors"))
    plain = lm.merge_and_unload()
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(merged[f"model.{k}"], v, rtol=0, atol=0)


def test_merge_errors(tmp_path, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    base = tmp_path / "base.safetensors"
    save_file(model.state_dict(), str(base))
    lm = liera.get_liera_model(model, liera.LieRAConfig(target_modules=["0"]))
    lm.save_pretrained(tmp_path / "ad")
    args = ["merge", "--adapter", str(tmp_path / "ad"), "--no-progress"]
    assert cli.main(args + ["--base", str(base), "--out", str(base)]) == 2
    assert "never overwrites its input" in capsys.readouterr().err
    (tmp_path / "notsafe.bin").write_bytes(b"\xff" * 64)
    assert cli.main(args + ["--base", str(tmp_path / "notsafe.bin"), "--out", str(tmp_path / "o.safetensors")]) == 2
    assert "is not a safetensors file" in capsys.readouterr().err
    save_file({"other.weight": torch.zeros(4, 4)}, str(tmp_path / "other.safetensors"))
    assert cli.main(args + ["--base", str(tmp_path / "other.safetensors"), "--out", str(tmp_path / "o.safetensors")]) == 2
    assert "have no matching key" in capsys.readouterr().err
    save_file({"0.weight": torch.zeros(5, 4), "0.bias": torch.zeros(5)}, str(tmp_path / "shape.safetensors"))
    assert cli.main(args + ["--base", str(tmp_path / "shape.safetensors"), "--out", str(tmp_path / "o.safetensors")]) == 2
    assert "shape mismatch" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()
    assert cli.main(["merge", "--adapter", str(tmp_path / "nope"), "--base", str(base), "--out",
                     str(tmp_path / "o.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_inspect_prints_layers_counts_and_taylor_error(tmp_path, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(5, 6))
    lm = liera.get_liera_model(model, liera.LieRAConfig(r=2, target_modules=["0", "1"]))
    perturb(lm, std=0.1)
    lm.save_pretrained(tmp_path)
    assert cli.main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "adapted weights: 2; adapter parameters: 84" in out
    assert "| 0.weight | (4, 3, 3, 3) | 62 |" in out and "Taylor vs exact" in out
    gen = model[1].liera_weight["default"]
    d = gen.delta().detach().double()
    err = (((1 + d) - d.exp()).abs() / d.exp()).max().item()
    assert f"{err:.3g}" in out
