"""keep_zeros outside LieRAModel: `liera merge` on a safetensors state dict and PEFT's native path keep every zero
of a pruned weight bit-exact (every layer kind x exp map x update, and every generator on two kinds); `liera inspect`
reports a weights file's sparsity and N:M validity."""
import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from zoo import cases, get_weight, perturb

import liera
from liera.apps.cli import main
from liera.integrations.statedict import file_sparsity, inspect_sparsity, merge_file
from liera.sparsity import same_zeros

peft = pytest.importorskip("peft")
from liera.integrations.peft import LieraPeftConfig  # noqa: E402

MAPS = ["taylor", "exact"]
UPDATES = ["multiplicative", "additive"]
GENERATORS = ["lora", "dora", "pissa", "milora", "loha", "lokr", "tucker"]
CASES = cases()
MATRIX = [(c, m, u, "lora") for c in CASES for m in MAPS for u in UPDATES] + \
    [(c, "taylor", u, g) for c in CASES if c.name in ("linear", "conv2d_strided_dilated_grouped")
     for u in UPDATES for g in GENERATORS if g != "lora"]
IDS = [f"{c.name}-{m}-{u}-{g}" for c, m, u, g in MATRIX]


def pruned_model(case):
    torch.manual_seed(0)
    model = case.make()
    weight = get_weight(model, case)
    with torch.no_grad():
        flat = torch.arange(weight.numel()).reshape(weight.shape)
        weight.copy_(torch.where(flat % 2 == 0, torch.where(flat % 4 == 0, 0.0, -0.0), weight))
    return model, weight.detach().clone()


@pytest.mark.parametrize("case,exp_map,update,generator", MATRIX, ids=IDS)
def test_liera_merge_of_a_state_dict_keeps_every_zero(tmp_path, case, exp_map, update, generator):
    model, pruned = pruned_model(case)
    key = ".".join(case.weight_path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "base.safetensors"))
    lm = liera.get_liera_model(model, liera.LieRAConfig(r=2, exp_map=exp_map, update=update, generator=generator,
                                                       keep_zeros=True, **case.targets))
    perturb(lm)
    lm.save_pretrained(tmp_path / "adapter")
    merge_file(tmp_path / "base.safetensors", tmp_path / "adapter", tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))[key]
    assert same_zeros(pruned, merged) and not torch.equal(merged, pruned)
    plain = lm.merge_and_unload()
    torch.testing.assert_close(merged, get_weight(plain, case).detach(), rtol=0, atol=0)
    rows = {r.key: r for r in file_sparsity(tmp_path / "merged.safetensors")}
    assert rows[key].zeros == int((pruned == 0).sum())


@pytest.mark.parametrize("case,exp_map,update,generator", MATRIX, ids=IDS)
def test_peft_native_path_keeps_every_zero(case, exp_map, update, generator):
    model, pruned = pruned_model(case)
    torch.manual_seed(123)
    x = case.make_input()
    pm = peft.get_peft_model(copy.deepcopy(model), LieraPeftConfig(r=2, exp_map=exp_map, update=update,
                                                                generator=generator, keep_zeros=True, **case.targets))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the identity (zoo.perturb walks a LieRAModel; this is PEFT's model)
        for gen in [m for m in pm.modules() if isinstance(m, liera.Generator)]:
            for p in gen.parameters():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    layer = next(m for m in pm.modules() if hasattr(m, "liera_adapters") and m.liera_adapters)
    weight = layer.base_weight()
    pm.eval()
    before = pm(x).detach()
    eff = layer.liera_adapters.effective(weight).detach()
    assert same_zeros(pruned, eff) and not torch.equal(eff, pruned)
    layer.merge(safe_merge=True)
    assert same_zeros(pruned, weight)
    layer.unmerge()
    assert same_zeros(pruned, weight)
    plain = pm.merge_and_unload()
    assert same_zeros(pruned, get_weight(plain, case))
    torch.testing.assert_close(plain(x), before, rtol=1e-4, atol=1e-4)


def test_liera_inspect_reports_a_weights_file(tmp_path, capsys):
    w = torch.zeros(4, 8)
    w[:, ::2] = 1.0  # 2:4
    v = torch.ones(3, 6)
    v[0, 0] = 0.0
    save_file({"a.weight": w, "b.weight": v, "a.bias": torch.zeros(4)}, str(tmp_path / "model.safetensors"))
    text = inspect_sparsity(tmp_path / "model.safetensors")
    assert "17 of 50 entries are zero (34.00%) in 2 weights; 2:4 valid in 1 of them" in text
    assert "| a.weight | (4, 8) | 16 | 50.00% | yes | yes |" in text
    assert "| b.weight | (3, 6) | 1 | 5.56% | - | - |" in text
    assert main(["inspect", str(tmp_path), "--nm", "2:4"]) == 0  # a folder of safetensors files
    out = capsys.readouterr().out
    assert "| a.weight | (4, 8) | 16 | 50.00% | yes |" in out and "4:8" not in out
    with pytest.raises(FileNotFoundError, match="neither a liera adapter folder nor a .safetensors file"):
        inspect_sparsity(tmp_path / "missing")


def test_liera_inspect_finds_n_m_along_the_inputs_of_a_transposed_weight(tmp_path):
    """GPT-2's Conv1D stores (in, out): its 2:4 groups run along dim 0. A file does not name the module, so the
    report checks the other axis of a 2-D tensor and says which one holds the pattern."""
    w = torch.zeros(8, 4)
    w[::2, :] = 1.0  # 2:4 along dim 0 (every column: 1, 0, 1, 0, ...), dense along dim 1
    dense = torch.ones(8, 4)
    save_file({"h.0.mlp.c_fc.weight": w, "h.0.ln.weight": dense}, str(tmp_path / "model.safetensors"))
    rows = {r.key: r for r in file_sparsity(tmp_path / "model.safetensors")}
    assert rows["h.0.mlp.c_fc.weight"].dim == 0 and rows["h.0.mlp.c_fc.weight"].nm == {"2:4": True, "4:8": True}
    assert rows["h.0.ln.weight"].dim == 1 and rows["h.0.ln.weight"].nm == {"2:4": False, "4:8": None}
    text = inspect_sparsity(tmp_path / "model.safetensors")
    assert "| h.0.mlp.c_fc.weight | (8, 4) | 16 | 50.00% | yes (dim 0) | yes (dim 0) |" in text
