"""The model-free tools behind `liera merge` and `liera inspect`: merge_file (streaming) and inspect_adapter."""
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import liera
from liera.integrations.statedict import inspect_adapter, merge_file
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
    merge_file(tmp_path / "base.safetensors", tmp_path / "adapter", tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    plain = lm.merge_and_unload()
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(merged[f"model.{k}"], v, rtol=0, atol=0)


def test_merge_errors_name_the_problem_and_write_nothing(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    base = tmp_path / "base.safetensors"
    save_file(model.state_dict(), str(base))
    lm = liera.get_liera_model(model, liera.LieRAConfig(target_modules=["0"]))
    lm.save_pretrained(tmp_path / "ad")
    out = tmp_path / "o.safetensors"
    with pytest.raises(ValueError, match="never overwrites its input"):
        merge_file(base, tmp_path / "ad", base)
    (tmp_path / "notsafe.bin").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="is not a safetensors file"):
        merge_file(tmp_path / "notsafe.bin", tmp_path / "ad", out)
    save_file({"other.weight": torch.zeros(4, 4)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="have no matching key"):
        merge_file(tmp_path / "other.safetensors", tmp_path / "ad", out)
    save_file({"0.weight": torch.zeros(5, 4), "0.bias": torch.zeros(5)}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ValueError, match="shape mismatch"):
        merge_file(tmp_path / "shape.safetensors", tmp_path / "ad", out)
    assert not out.exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        merge_file(base, tmp_path / "nope", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad", "base.safetensors", "notsafe.bin", "other.safetensors",
                                                          "shape.safetensors"], "no temporary file left behind"


def test_inspect_reports_layers_counts_and_taylor_error(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(5, 6))
    lm = liera.get_liera_model(model, liera.LieRAConfig(r=2, target_modules=["0", "1"]))
    perturb(lm, std=0.1)
    lm.save_pretrained(tmp_path)
    out = inspect_adapter(tmp_path)
    assert "adapted weights: 2; adapter parameters: 84" in out
    assert "| 0.weight | (4, 3, 3, 3) | 62 |" in out and "Taylor vs exact" in out
    gen = model[1].liera_weight["default"]
    d = gen.delta().detach().double()
    err = (((1 + d) - d.exp()).abs() / d.exp()).max().item()
    assert f"{err:.3g}" in out
