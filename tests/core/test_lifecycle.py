"""Adapter lifecycle: a property matrix over small models x exp maps, adapters moved off the identity first."""
import copy
import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import liera
from liera import io
from zoo import lifecycle_models, perturb

MODELS = lifecycle_models()
MAPS = ["taylor", "exact"]


def build(case, exp_map, seed=0):
    torch.manual_seed(seed)
    model = case.make()
    torch.manual_seed(123)
    x = case.make_input()
    return model, x, liera.LieRAConfig(r=2, alpha=2.0, exp_map=exp_map, **case.targets)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".liera_" not in k}


def close(a, b, rtol=1e-5):
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * max(1.0, float(b.abs().max())))


@pytest.fixture(params=[(c, m) for c in MODELS for m in MAPS], ids=lambda p: f"{p[0].name}-{p[1]}")
def setup(request):
    case, exp_map = request.param
    model, x, cfg = build(case, exp_map)
    base_out = model(x).detach()
    base_weights = weights(model)
    lm = liera.get_liera_model(model, cfg)
    torch.testing.assert_close(lm(x), base_out, rtol=0, atol=1e-6)  # identity at init
    perturb(lm)
    lm.eval()
    return case, exp_map, lm, x, base_out, base_weights, cfg


def test_adapter_moves_output(setup):
    _, _, lm, x, base_out, _, _ = setup
    assert not torch.allclose(lm(x), base_out, atol=1e-4)


def test_disable_adapter_gives_base_and_restores(setup):
    _, _, lm, x, base_out, _, _ = setup
    adapted = lm(x).detach()
    with lm.disable_adapter():
        torch.testing.assert_close(lm(x), base_out, rtol=0, atol=1e-6)
    torch.testing.assert_close(lm(x), adapted, rtol=0, atol=0)


def test_merge_unmerge_and_merge_and_unload(setup):
    _, _, lm, x, base_out, base_weights, _ = setup
    unmerged = lm(x).detach()
    lm.merge_adapter()
    assert lm.merged_adapters == ["default"]
    assert not any(a.has_merge_copy for _, _, a in lm.adapted_weights()), "no stored copy of W"
    close(lm(x), unmerged)
    merged_weights = weights(lm.base_model)
    with pytest.warns(UserWarning, match="already merged"):
        lm.merge_adapter()
    for k, v in weights(lm.base_model).items():
        assert torch.equal(v, merged_weights[k]), "merging twice must change nothing"
    lm.unmerge_adapter()
    for k, v in weights(lm.base_model).items():
        close(v, base_weights[k], rtol=1e-6)
    close(lm(x), unmerged)
    plain = lm.merge_and_unload()
    assert not any(".liera_" in k for k in plain.state_dict())
    assert not any(m._forward_pre_hooks for m in plain.modules())
    close(plain(x), unmerged)


def test_two_adapters_sequential_equals_batch_merge(setup):
    case, exp_map, lm, x, base_out, base_weights, cfg = setup
    lm.add_adapter("other", liera.LieRAConfig(r=3, alpha=1.5, exp_map=exp_map, **case.targets))
    perturb(lm, seed=7)  # moves both adapters (again for default)
    out_default = lm(x).detach()
    lm.set_adapter("other")
    out_other = lm(x).detach()
    assert not torch.allclose(out_default, out_other, atol=1e-4)
    lm.set_adapter("default")
    torch.testing.assert_close(lm(x), out_default, rtol=0, atol=0)
    lm.set_adapter(["default", "other"])
    both = lm(x).detach()
    lm.merge_adapter(["default", "other"])
    batch = weights(lm.base_model)
    close(lm(x), both)
    lm.unmerge_adapter()
    lm.merge_adapter("other")
    lm.merge_adapter("default")
    for k, v in weights(lm.base_model).items():
        close(v, batch[k], rtol=1e-6)
    lm.unmerge_adapter("default")
    lm.unmerge_adapter("other")
    for k, v in weights(lm.base_model).items():
        close(v, base_weights[k], rtol=1e-6)


def test_save_load_roundtrip(setup, tmp_path):
    case, exp_map, lm, x, base_out, _, cfg = setup
    out = lm(x).detach()
    lm.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    fresh, _, _ = build(case, exp_map)
    again = liera.LieRAModel.from_pretrained(fresh, tmp_path)
    assert not again.training
    assert not any(p.requires_grad for p in again.parameters()), "inference mode after loading"
    # MultiheadAttention picks another attention kernel when nothing requires grad (~1e-7 apart)
    torch.testing.assert_close(again(x), out, rtol=0, atol=1e-6 if case.name.startswith("mha") else 0)
    a, b = lm.get_adapter_state_dict(), again.get_adapter_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all("default" not in k for k in a), "keys must not depend on the adapter's local name"
    trainable = liera.LieRAModel.from_pretrained(build(case, exp_map)[0], tmp_path, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def test_merged_model_saves_with_torch_and_safetensors(setup, tmp_path):
    _, _, lm, x, _, _, _ = setup
    lm.merge_adapter()
    out = lm(x).detach()
    torch.save(lm, tmp_path / "whole.pt")
    loaded = torch.load(tmp_path / "whole.pt", weights_only=False)
    torch.testing.assert_close(loaded(x), out, rtol=0, atol=0)
    from safetensors.torch import load_file, save_file

    plain = lm.merge_and_unload()
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(tmp_path / "merged.safetensors"))
    reloaded = load_file(str(tmp_path / "merged.safetensors"))
    assert all(torch.equal(reloaded[k], v) for k, v in plain.state_dict().items())


def test_safe_merge_refuses_nan_and_changes_nothing(setup):
    _, _, lm, x, _, _, _ = setup
    before = weights(lm.base_model)
    gen = next(a for _, _, a in lm.adapted_weights())["default"]
    with torch.no_grad():
        gen.lora_B[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        lm.merge_adapter(safe_merge=True)
    assert lm.merged_adapters == []
    for k, v in weights(lm.base_model).items():
        assert torch.equal(v, before[k])


def test_delete_adapter(setup):
    case, exp_map, lm, x, base_out, _, _ = setup
    lm.add_adapter("extra", liera.LieRAConfig(r=2, exp_map=exp_map, **case.targets))
    lm.delete_adapter("extra")
    assert "extra" not in lm.peft_config
    assert all("extra" not in a for _, _, a in lm.adapted_weights())
    lm.delete_adapter("default")
    torch.testing.assert_close(lm(x), base_out, rtol=0, atol=1e-6)
    assert not any(a for _, _, a in lm.adapted_weights())


# ---------------------------------------------------------------- errors on the lifecycle


def mlp_setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    lm = liera.get_liera_model(model, liera.LieRAConfig(r=2, target_modules=["0", "2"]))
    perturb(lm)
    return lm, torch.randn(3, 6)


def test_unknown_and_merged_adapter_errors():
    lm, x = mlp_setup()
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]; this model has \['default'\]"):
        lm.set_adapter("nope")
    with pytest.raises(ValueError, match="unknown adapter"):
        lm.delete_adapter("nope")
    with pytest.raises(ValueError, match="unknown adapter"):
        lm.merge_adapter("nope")
    lm.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        lm.delete_adapter("default")


def test_taylor_singular_factor_is_refused_by_safe_merge_and_warned_otherwise():
    lm, x = mlp_setup()
    gen = lm.base_model[0].liera_weight["default"]
    with torch.no_grad():  # make D[0, 0] == -1 exactly: factor 1 + D = 0
        gen.lora_B.zero_()
        gen.lora_A.zero_()
        gen.lora_B[0, 0] = 1.0
        gen.lora_A[0, 0] = -1.0 / gen.scaling
    before = weights(lm.base_model)
    with pytest.raises(ValueError, match="near 0"):
        lm.merge_adapter(safe_merge=True)
    assert all(torch.equal(v, before[k]) for k, v in weights(lm.base_model).items())
    with pytest.warns(UserWarning, match="1 weight entries have a Taylor factor"):
        lm.merge_adapter()


def saved_adapter(tmp_path):
    lm, x = mlp_setup()
    lm.save_pretrained(tmp_path)
    return lm, x


def fresh_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))


def assert_load_fails(path, match, base=None):
    base = base or fresh_mlp()
    before = copy.deepcopy(base.state_dict())
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        liera.LieRAModel.from_pretrained(base, path)
    assert re.search(match, str(info.value)), str(info.value)
    assert base.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    assert not any(m._forward_pre_hooks for m in base.modules())


def test_load_missing_directory_and_files(tmp_path):
    assert_load_fails(tmp_path / "nope", "does not exist")
    (tmp_path / "empty").mkdir()
    assert_load_fails(tmp_path / "empty", r"lacks \['adapter_config.json', 'adapter_model.safetensors'\]")


def test_load_foreign_and_future_configs(tmp_path):
    saved_adapter(tmp_path)
    cfg = (tmp_path / io.CONFIG_NAME)
    text = cfg.read_text()
    cfg.write_text(text.replace('"library": "liera"', '"library": "peft", "peft_type": "LORA"'))
    assert_load_fails(tmp_path, "belongs to 'LORA', not liera")
    cfg.write_text(text.replace('"liera_version": "0.', '"liera_version": "7.'))
    assert_load_fails(tmp_path, "saved by liera 7")
    cfg.write_text("{not json")
    assert_load_fails(tmp_path, "not valid JSON")


def test_load_tensors_that_do_not_fit(tmp_path):
    from safetensors.torch import load_file, save_file

    saved_adapter(tmp_path)
    weights_path = tmp_path / io.WEIGHTS_NAME
    good = load_file(str(weights_path))
    missing = dict(good)
    missing.pop(sorted(missing)[0])
    save_file(missing, str(weights_path))
    assert_load_fails(tmp_path, "1 missing")
    save_file({**good, "extra.weight.lora_A": torch.zeros(1)}, str(weights_path))
    assert_load_fails(tmp_path, r"1 unexpected \(e.g. \['extra.weight.lora_A'\]\)")
    bad = dict(good)
    key = sorted(bad)[0]
    bad[key] = torch.zeros(7, 7)
    save_file(bad, str(weights_path))
    assert_load_fails(tmp_path, "other shapes")
    save_file(good, str(weights_path))
    other = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 4))
    assert_load_fails(tmp_path, "other shapes", base=other)
    assert_load_fails(tmp_path, "is a Tanh, which liera cannot adapt", base=nn.Sequential(nn.Tanh()))
    assert_load_fails(tmp_path, "other shapes", base=nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5)))


def test_load_truncated_file(tmp_path):
    saved_adapter(tmp_path)
    path = tmp_path / io.WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_load_fails(tmp_path, "truncated or corrupted")
    path.write_bytes(b"\x00" * 40)
    assert_load_fails(tmp_path, "truncated or corrupted")


def test_interrupted_save_keeps_previous_adapter(tmp_path, monkeypatch):
    lm, x = saved_adapter(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    def explode(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(liera.io, "save_file", explode)  # the writer liera.io calls
    perturb(lm, seed=3)
    with pytest.raises(KeyboardInterrupt):
        lm.save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before, "no partial or temporary file left"


def test_save_to_a_file_path_is_refused(tmp_path):
    lm, _ = mlp_setup()
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match="it is a file"):
        lm.save_pretrained(f)


def test_named_adapters_save_to_subfolders_and_load_adapter(tmp_path):
    lm, x = mlp_setup()
    lm.add_adapter("style", liera.LieRAConfig(r=3, target_modules=["2"], exp_map="exact"))
    perturb(lm, seed=5)
    lm.set_adapter("style")
    out_style = lm(x).detach()
    lm.save_pretrained(tmp_path)
    assert (tmp_path / "style" / io.WEIGHTS_NAME).is_file()
    again = liera.LieRAModel.from_pretrained(fresh_mlp(), tmp_path)
    again.load_adapter(tmp_path / "style", "style")
    again.set_adapter("style")
    torch.testing.assert_close(again(x), out_style, rtol=0, atol=0)


def test_state_dict_helpers_check_before_loading():
    lm, x = mlp_setup()
    sd = lm.get_adapter_state_dict()
    out = lm(x).detach()
    with pytest.raises(ValueError, match="unexpected"):
        lm.set_adapter_state_dict({**sd, "bogus": torch.zeros(1)})
    torch.testing.assert_close(lm(x), out, rtol=0, atol=0)
    zeroed = {k: torch.zeros_like(v) for k, v in sd.items()}
    lm.set_adapter_state_dict(zeroed)
    with lm.disable_adapter():
        base = lm(x).detach()
    torch.testing.assert_close(lm(x), base, rtol=0, atol=0)


def test_modules_to_save_are_trained_and_saved(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    lm = liera.get_liera_model(model, liera.LieRAConfig(r=2, target_modules=["0"], modules_to_save=["2"]))
    assert model[2].weight.requires_grad and not model[0].weight.requires_grad
    with torch.no_grad():
        model[2].weight.add_(1.0)
    x = torch.randn(3, 6)
    out = lm(x).detach()
    lm.save_pretrained(tmp_path)
    again = liera.LieRAModel.from_pretrained(fresh_mlp(), tmp_path)
    torch.testing.assert_close(again(x), out, rtol=0, atol=0)


@pytest.mark.parametrize("also_adapted", [False, True])
def test_modules_to_save_train_a_copy_so_disabling_gives_the_base_back(tmp_path, also_adapted):
    """As in PEFT: the adapter trains its own copy of a module in modules_to_save; the original stays the base's."""
    base = fresh_mlp()
    reference = copy.deepcopy(base)
    targets = ["0", "2"] if also_adapted else ["0"]
    lm = liera.get_liera_model(base, liera.LieRAConfig(r=2, target_modules=targets, modules_to_save=["2"]))
    x = torch.randn(5, 6)
    opt = torch.optim.SGD([p for p in lm.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        lm(x).pow(2).sum().backward()
        opt.step()
    expected = reference(x)
    with lm.disable_adapter():
        torch.testing.assert_close(lm(x), expected, rtol=0, atol=0)
        assert not base[2].weight.requires_grad
    trained = lm(x).detach()
    assert not torch.allclose(trained, expected)
    assert base[2].weight.requires_grad
    sd = lm.get_adapter_state_dict()
    assert {k for k in sd if k.startswith("modules_to_save.")} == {"modules_to_save.2.weight", "modules_to_save.2.bias"}
    lm.save_pretrained(tmp_path)
    again = liera.LieRAModel.from_pretrained(fresh_mlp(), tmp_path)
    torch.testing.assert_close(again(x), trained, rtol=0, atol=0)
    with again.disable_adapter():
        torch.testing.assert_close(again(x), expected, rtol=0, atol=0)
    plain = again.merge_and_unload()
    torch.testing.assert_close(plain(x), trained, rtol=1e-6, atol=1e-6)
    assert not any("liera_" in k for k in plain.state_dict())


def test_modules_to_save_copies_follow_the_active_adapter():
    base = fresh_mlp()
    reference = copy.deepcopy(base)
    lm = liera.get_liera_model(base, liera.LieRAConfig(r=2, target_modules=["0"], modules_to_save=["2"]))
    lm.add_adapter("other", liera.LieRAConfig(r=2, target_modules=["0"], modules_to_save=["2"]))
    lm.add_adapter("plain", liera.LieRAConfig(r=2, target_modules=["0"]))
    with torch.no_grad():
        base[2].bias.add_(1.0)  # the default adapter's copy
    x = torch.randn(3, 6)
    out_default = lm(x).detach()
    lm.set_adapter("other")
    torch.testing.assert_close(lm(x), reference(x), rtol=0, atol=0)  # a fresh copy of the original
    assert not lm.get_adapter_state_dict("default")["modules_to_save.2.bias"].requires_grad
    lm.set_adapter("plain")
    torch.testing.assert_close(lm(x), reference(x), rtol=0, atol=0)  # no copy of "2": the original
    with pytest.raises(ValueError, match=r"adapters \['default', 'other'\] each train their own copy"):
        lm.set_adapter(["default", "other"])
    assert lm.active_adapters == ["plain"]
    lm.set_adapter("default")
    torch.testing.assert_close(lm(x), out_default, rtol=0, atol=0)
    lm.delete_adapter("default")
    torch.testing.assert_close(base(x), reference(x), rtol=0, atol=0)  # its copy went out with it
    assert lm.unload() is base and not any("liera_" in k for k in base.state_dict())


# ---------------------------------------------------------------- low precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("exp_map", MAPS)
def test_low_precision_forward_and_merge(dtype, exp_map):
    torch.manual_seed(0)
    model32 = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Conv1d(16, 8, 1))
    low = copy.deepcopy(model32).to(dtype)
    cfg = liera.LieRAConfig(r=2, target_modules=["0", "2"], exp_map=exp_map)
    lm32 = liera.get_liera_model(model32, cfg)
    lm = liera.get_liera_model(low, cfg)
    assert all(p.dtype == torch.float32 for n, p in lm.named_parameters() if ".liera_" in n), "adapters stay float32"
    perturb(lm32, std=0.1)
    lm.set_adapter_state_dict(lm32.get_adapter_state_dict())
    x = torch.randn(4, 16, 16)
    f = lambda m, inp: m[2](m[1](m[0](inp)).transpose(1, 2))  # noqa: E731
    ref = f(model32, x)
    out = f(low, x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    original = {k: v.clone() for k, v in weights(low).items()}
    lm.merge_adapter()
    merged_out = f(low, x.to(dtype))
    assert torch.isfinite(merged_out).all()
    torch.testing.assert_close(merged_out.float(), ref, rtol=0.05, atol=0.05)
    lm.unmerge_adapter()
    for k, v in weights(low).items():  # within one rounding step of the original
        step = torch.finfo(dtype).eps * original[k].abs().float().clamp_min(torch.finfo(dtype).tiny)
        assert ((v.float() - original[k].float()).abs() <= 2 * step + 1e-30).all(), k
    before_keep = weights(low)
    lm.merge_adapter(keep_merge_copy=True)
    assert any(not torch.equal(v, before_keep[k]) for k, v in weights(low).items())
    lm.unmerge_adapter()
    for k, v in weights(low).items():
        assert torch.equal(v, before_keep[k]), "keep_merge_copy gives a bit-exact unmerge"


def test_low_precision_adapter_dtype_base():
    model = nn.Sequential(nn.Linear(4, 4)).to(torch.bfloat16)
    lm = liera.get_liera_model(model, liera.LieRAConfig(target_modules=["0"], adapter_dtype="base"))
    assert all(p.dtype == torch.bfloat16 for n, p in lm.named_parameters() if ".liera_" in n)


def test_module_both_adapted_and_saved_keeps_tensors_apart(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    lm = liera.get_liera_model(model, liera.LieRAConfig(r=2, target_modules=["0", "2"], modules_to_save=["2"]))
    lm.add_adapter("other", liera.LieRAConfig(r=2, target_modules=["2"]))
    keys = lm.get_adapter_state_dict().keys()
    assert not any(k.startswith("modules_to_save.") and "liera_" in k for k in keys)
    assert not model[2].liera_weight["other"].lora_A.requires_grad, "an inactive adapter must stay frozen"
    lm.save_pretrained(tmp_path)


def test_weight_changes_is_w_eff_minus_w_and_delta_weights_is_its_deprecated_name():
    base = fresh_mlp()
    lm = liera.get_liera_model(base, liera.LieRAConfig(r=2, target_modules=["0", "2"], init_weights=False))
    x = torch.randn(3, 6)
    changes = lm.weight_changes()
    plain = fresh_mlp()  # the same base weights, without liera
    with lm.disable_adapter():
        reference = lm(x)
    assert set(changes) == {"0.weight", "2.weight"} and all(c.abs().sum() > 0 for c in changes.values())
    with torch.no_grad():
        for key, change in changes.items():
            plain.get_parameter(key).add_(change)
    torch.testing.assert_close(plain(x), lm(x), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(lm(x), reference)
    with pytest.warns(DeprecationWarning, match=r"delta_weights\(\) is deprecated: it is weight_changes\(\)"):
        old = lm.delta_weights()
    assert all(torch.equal(old[k], v) for k, v in changes.items())
