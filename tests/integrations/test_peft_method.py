"""LieRA as a PEFT method (liera.integrations.peft): PEFT's tuner contract on every layer kind, the same numbers as
liera's own API, files (also in a fresh process), conversions both ways, the version guard."""
import copy
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import liera  # noqa: E402
from liera import io  # noqa: E402
from liera.integrations import peft as liera_peft  # noqa: E402
from liera.integrations.peft import (SUPPORTED_PEFT, LieraPeftConfig, LieraLayer, check_peft_version,  # noqa: E402
                                     liera_to_peft, peft_to_liera)
from zoo import EmbedProject, lifecycle_models  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
MODELS = lifecycle_models()
MAPS = ["taylor", "exact"]
GENERATORS = ["lora", "dora", "pissa"]


def close(a, b, rtol=1e-5):
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * max(1.0, float(b.detach().abs().max())))


def generators(model):
    return [m for m in model.modules() if isinstance(m, liera.Generator)]


def perturb(model, std=0.3, seed=1):
    """Move every adapter off the identity, in model order (the same for liera's and PEFT's wrapping)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gen in generators(model):
            for p in gen.parameters():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def base_weights(model):
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in model.state_dict().items()
            if ".liera_adapters." not in k}


def pair(case, exp_map="taylor", generator="lora", **extra):
    """(base model, input, liera's LieRAModel, PEFT model), both adapters built from the same seed."""
    torch.manual_seed(0)
    model = case.make()
    torch.manual_seed(123)
    x = case.make_input()
    options = dict(r=2, exp_map=exp_map, generator=generator, **case.targets, **extra)
    torch.manual_seed(1)
    lm = liera.get_liera_model(copy.deepcopy(model), liera.LieRAConfig(alpha=2.0, **options))
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(model), LieraPeftConfig(liera_alpha=2.0, **options))
    return model, x, lm, pm


MATRIX = [(c, m, g) for c in MODELS for m in MAPS for g in GENERATORS]
IDS = [f"{c.name}-{m}-{g}" for c, m, g in MATRIX]


@pytest.mark.parametrize("case,exp_map,generator", MATRIX, ids=IDS)
def test_same_forward_and_gradients_as_liera(case, exp_map, generator):
    model, x, lm, pm = pair(case, exp_map, generator)
    base_out = model(x).detach()
    close(pm(x), base_out, rtol=1e-6)  # identity at init
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all(".liera_adapters.default." in n for n in trainable)
    assert sum(p.numel() for p in pm.parameters() if p.requires_grad) == lm.get_nb_trainable_parameters()[0]
    perturb(lm)
    perturb(pm)
    out_l, out_p = lm(x), pm(x)
    assert not torch.allclose(out_p, base_out, atol=1e-4)
    torch.testing.assert_close(out_p, out_l, rtol=0, atol=0)  # one redirect: the same ops
    out_l.float().pow(2).sum().backward()
    out_p.float().pow(2).sum().backward()
    for gl, gp in zip(generators(lm), generators(pm), strict=True):
        for (name, a), b in zip(gl.named_parameters(), gp.parameters(), strict=True):
            torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("case,exp_map,generator", MATRIX, ids=IDS)
def test_disable_merge_unmerge_and_unload(case, exp_map, generator):
    model, x, _, pm = pair(case, exp_map, generator)
    base_out, before = model(x).detach(), base_weights(pm)
    perturb(pm)
    pm.eval()
    adapted = pm(x).detach()
    with pm.disable_adapter():
        torch.testing.assert_close(pm(x), base_out, rtol=0, atol=1e-6)
    torch.testing.assert_close(pm(x), adapted, rtol=0, atol=0)
    pm.merge_adapter()
    layers = [m for m in pm.modules() if isinstance(m, LieraLayer)]
    assert all(m.merged_adapters == ["default"] and m.liera_adapters.merged == ["default"] for m in layers)
    close(pm(x), adapted)
    assert any(not torch.equal(v, before[k]) for k, v in base_weights(pm).items())
    pm.unmerge_adapter()  # the group inverse: no copy of W was kept
    assert not any(m.merged for m in layers)
    for k, v in base_weights(pm).items():
        close(v, before[k], rtol=1e-6)
    close(pm(x), adapted)
    plain = pm.merge_and_unload()
    assert not any(isinstance(m, (LieraLayer, liera.Generator)) for m in plain.modules())
    assert type(plain) is type(model)
    close(plain(x), adapted)


def test_liera_dropout_is_liera_dropout():
    case = MODELS[0]
    torch.manual_seed(0)
    model, x = case.make(), case.make_input()
    torch.manual_seed(1)
    lm = liera.get_liera_model(copy.deepcopy(model), liera.LieRAConfig(r=2, dropout=0.5, **case.targets))
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(model), LieraPeftConfig(r=2, liera_dropout=0.5, **case.targets))
    assert all(s.dropout == 0.5 for m in pm.modules() if isinstance(m, LieraLayer) for s in m.liera_adapters.settings.values())
    perturb(lm)
    perturb(pm)
    torch.manual_seed(5)
    out_l = lm(x)
    torch.manual_seed(5)
    torch.testing.assert_close(pm(x), out_l, rtol=0, atol=0)  # the same dropout masks on the update branch
    assert not torch.allclose(pm(x), out_l)  # other masks: dropout acts
    lm.eval(), pm.eval()
    torch.testing.assert_close(pm(x), lm(x), rtol=0, atol=0)


def test_adapted_model_restores_the_base_after_unload():
    case = MODELS[0]
    model, x, _, pm = pair(case, init_weights=False)
    plain = pm.unload()
    torch.testing.assert_close(plain(x), model(x), rtol=0, atol=0)


def test_several_adapters_set_adapter_and_delete_adapter():
    case = MODELS[0]  # two Linear layers
    model, x, lm, pm = pair(case)
    torch.manual_seed(2)
    lm.add_adapter("other", liera.LieRAConfig(r=3, alpha=1.5, **case.targets))
    torch.manual_seed(2)
    pm.add_adapter("other", LieraPeftConfig(r=3, liera_alpha=1.5, **case.targets))
    perturb(lm)
    perturb(pm)
    lm.eval(), pm.eval()
    default = pm(x).detach()
    torch.testing.assert_close(default, lm(x), rtol=0, atol=0)
    pm.set_adapter("other")
    lm.set_adapter("other")
    assert [n for n, p in pm.named_parameters() if p.requires_grad][0].split(".")[-2] == "other"
    torch.testing.assert_close(pm(x), lm(x), rtol=0, atol=0)
    assert not torch.allclose(pm(x), default, atol=1e-4)
    pm.base_model.set_adapter(["default", "other"])  # several adapters compose by the group product
    lm.set_adapter(["default", "other"])
    torch.testing.assert_close(pm(x), lm(x), rtol=0, atol=0)
    pm.add_adapter("additive", LieraPeftConfig(r=2, update="additive", **case.targets))
    with pytest.raises(ValueError, match="mix updates"):
        pm.base_model.set_adapter(["default", "additive"])
    torch.testing.assert_close(pm(x), lm(x), rtol=0, atol=0)  # nothing changed
    pm.base_model.set_adapter("default")
    pm.delete_adapter("other")
    pm.delete_adapter("additive")
    assert set(pm.peft_config) == {"default"} and pm.active_adapters == ["default"]
    assert all(list(m.liera_adapters) == ["default"] for m in pm.modules() if isinstance(m, LieraLayer))
    torch.testing.assert_close(pm(x), default, rtol=0, atol=0)


def test_rank_and_alpha_patterns_follow_peft_keys():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    options = dict(r=2, target_modules=["0", "2", "4"], rank_pattern={"2": 5, "^4$": 3}, alpha_pattern={"4": 6.0})
    lm = liera.get_liera_model(copy.deepcopy(model), liera.LieRAConfig(alpha=2.0, **options))
    pm = peft.get_peft_model(copy.deepcopy(model), LieraPeftConfig(liera_alpha=2.0, **options))
    got = [(g.r, g.scaling) for g in generators(pm)]
    assert got == [(g.r, g.scaling) for g in generators(lm)] == [(2, 1.0), (5, 0.4), (3, 2.0)]
    for key in options["rank_pattern"]:  # liera's rule is PEFT's: the same key picks the same layer
        for path in ("0", "2", "4"):
            hit = peft.utils.other.get_pattern_key(options["rank_pattern"], path) == key
            assert hit == liera.names.pattern_matches(key, path)


class Net(nn.Module):
    """Every module kind in one model, and a head trained in full."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(11, 6)
        self.fc = nn.Linear(6, 8)
        self.gpt = Conv1D(8, 8)
        self.conv = nn.Conv1d(8, 6, 3, padding=1, groups=2)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, idx):
        h = self.gpt(torch.tanh(self.fc(self.emb(idx))))
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))


NET_TARGETS = dict(target_modules=["emb", "fc", "gpt", "conv"], target_parameters=["in_proj_weight"],
                   modules_to_save=["head"], rank_pattern={"conv": 3})


def net(dtype=torch.float32):
    torch.manual_seed(0)
    return Net().to(dtype), torch.randint(0, 11, (2, 7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_and_load_with_modules_to_save(tmp_path, dtype):
    model, idx = net(dtype)
    pm = peft.get_peft_model(model, LieraPeftConfig(r=2, **NET_TARGETS))
    assert all(p.dtype == torch.float32 for g in generators(pm) for p in g.parameters())  # adapter_dtype="float32"
    perturb(pm)
    with torch.no_grad():
        pm.base_model.model.head.modules_to_save["default"].weight.add_(0.5)
    pm.eval()
    with torch.no_grad():  # the inference path, as in the loaded model (adapters frozen)
        out = pm(idx)
    pm.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {io.CONFIG_NAME, io.WEIGHTS_NAME} <= files and not files & {"model.safetensors", "pytorch_model.bin"}
    data = json.loads((tmp_path / io.CONFIG_NAME).read_text())
    assert data["peft_type"] == "LIERA" and data["requires"] == "import liera.integrations.peft"
    keys = set(load_file(str(tmp_path / io.WEIGHTS_NAME)))
    assert "base_model.model.fc.liera_adapters.lora_A" in keys and "base_model.model.head.weight" in keys
    loaded = peft.PeftModel.from_pretrained(net(dtype)[0], tmp_path)
    assert not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(loaded(idx), out, rtol=0, atol=0)


@pytest.mark.parametrize("exp_map", MAPS)
def test_bf16_model_same_numbers_as_liera(exp_map):
    model, idx = net(torch.bfloat16)
    options = dict(r=2, exp_map=exp_map, **NET_TARGETS)
    torch.manual_seed(1)
    lm = liera.get_liera_model(copy.deepcopy(model), liera.LieRAConfig(**options))
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(model), LieraPeftConfig(**options))
    perturb(lm)
    perturb(pm)
    out_l, out_p = lm(idx), pm(idx)
    assert out_p.dtype == torch.bfloat16
    torch.testing.assert_close(out_p, out_l, rtol=0, atol=0)
    out_l.float().pow(2).sum().backward()
    out_p.float().pow(2).sum().backward()
    for gl, gp in zip(generators(lm), generators(pm), strict=True):
        for a, b in zip(gl.parameters(), gp.parameters(), strict=True):
            assert b.dtype == torch.float32
            torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0)


def test_adapter_dtype_base_is_kept_on_a_bf16_model():
    model, idx = net(torch.bfloat16)
    pm = peft.get_peft_model(model, LieraPeftConfig(r=2, adapter_dtype="base", **NET_TARGETS))
    assert all(p.dtype == torch.bfloat16 for g in generators(pm) for p in g.parameters())
    assert pm(idx).dtype == torch.bfloat16


def _load_in_fresh_process(folder, data, register: bool) -> subprocess.CompletedProcess:
    code = "\n".join([
        "import sys, torch",
        f"sys.path.insert(0, {str(TESTS)!r})",
        "import liera, liera.integrations",
        "assert 'peft' not in sys.modules, 'import liera must not import peft'",
        *(["import liera.integrations.peft"] if register else []),
        "import peft",
        "from zoo import EmbedProject",
        "torch.manual_seed(0)",
        f"model = peft.PeftModel.from_pretrained(EmbedProject(), {str(folder)!r})",
        f"idx, expected = torch.load({str(data)!r})",
        "torch.testing.assert_close(model(idx), expected, rtol=0, atol=0)",
        "print('equal outputs')",
    ])
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_a_fresh_process_loads_the_adapter_after_the_import(tmp_path):
    torch.manual_seed(0)
    pm = peft.get_peft_model(EmbedProject(), LieraPeftConfig(r=2, target_modules=["emb", "proj"], exp_map="exact"))
    perturb(pm)
    pm.eval()
    idx = torch.randint(0, 13, (2, 7))
    with torch.no_grad():
        torch.save((idx, pm(idx)), tmp_path / "expected.pt")
    pm.save_pretrained(tmp_path / "adapter")
    ok = _load_in_fresh_process(tmp_path / "adapter", tmp_path / "expected.pt", register=True)
    assert ok.returncode == 0 and "equal outputs" in ok.stdout, ok.stderr[-2000:]
    refused = _load_in_fresh_process(tmp_path / "adapter", tmp_path / "expected.pt", register=False)
    assert refused.returncode != 0 and "KeyError: 'LIERA'" in refused.stderr, refused.stderr[-2000:]


def test_liera_loaders_point_a_peft_native_folder_to_peft(tmp_path):
    model, _ = net()
    peft.get_peft_model(model, LieraPeftConfig(r=2, **NET_TARGETS)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"PEFT-native LieRA adapter.*import liera\.integrations\.peft.*peft_to_liera"):
        liera.LieRAModel.from_pretrained(net()[0], tmp_path)


@pytest.mark.parametrize("generator", ["lora", "tucker"])  # tucker: tensor names with dots (tucker_factors.0)
def test_conversion_both_ways_gives_equal_outputs(tmp_path, generator):
    model, idx = net()
    lm = liera.get_liera_model(model, liera.LieRAConfig(r=2, alpha=4.0, generator=generator, layer_scaling="rms",
                                                        **NET_TARGETS))
    perturb(lm)
    with torch.no_grad():
        lm.base_model.head.weight.add_(0.5)
    lm.save_pretrained(tmp_path / "liera")
    out = liera.LieRAModel.from_pretrained(net()[0], tmp_path / "liera")(idx)  # inference, as the loads below
    liera_to_peft(tmp_path / "liera", tmp_path / "peft")
    pm = peft.PeftModel.from_pretrained(net()[0], tmp_path / "peft")
    torch.testing.assert_close(pm(idx), out, rtol=0, atol=0)
    pm.save_pretrained(tmp_path / "peft-again")  # what PEFT itself writes converts back
    peft_to_liera(tmp_path / "peft-again", tmp_path / "liera-again")
    again = liera.LieRAModel.from_pretrained(net()[0], tmp_path / "liera-again")
    torch.testing.assert_close(again(idx), out, rtol=0, atol=0)
    first, second = io.read_adapter_files(tmp_path / "liera"), io.read_adapter_files(tmp_path / "liera-again")
    assert first[0] == second[0] and first[1].keys() == second[1].keys()
    assert all(torch.equal(first[1][k], second[1][k]) for k in first[1])
    assert io.read_weight_shapes(tmp_path / "liera") == io.read_weight_shapes(tmp_path / "liera-again")


class TwoExpertTensors(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Parameter(torch.randn(3, 4, 5) * 0.3 + 1.0)
        self.down = nn.Parameter(torch.randn(3, 5, 4) * 0.3 + 1.0)

    def forward(self, x):  # (batch, experts, 4)
        return torch.einsum("bnh,nho->bno", torch.tanh(torch.einsum("bni,nih->bnh", x, self.up)), self.down)


def test_several_parameters_of_one_module_nest_and_convert(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(TwoExpertTensors())
    x = torch.randn(2, 3, 4)
    cfg = dict(r=2, target_parameters=["0.down", "0.up"])
    torch.manual_seed(1)
    lm = liera.get_liera_model(copy.deepcopy(model), liera.LieRAConfig(alpha=2.0, **cfg))
    perturb(lm)
    lm.eval()
    lm.save_pretrained(tmp_path / "liera")
    with pytest.raises(ValueError, match="pass base_model="):
        liera_to_peft(tmp_path / "liera", tmp_path / "peft")
    liera_to_peft(tmp_path / "liera", tmp_path / "peft", base_model=model)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "peft")
    assert isinstance(pm.base_model.model[0].base_layer, LieraLayer)  # one wrapper per parameter
    close(pm(x), lm(x))
    pm.merge_adapter()
    close(pm(x), lm(x))
    pm.unmerge_adapter()
    plain = pm.merge_and_unload()
    assert isinstance(plain[0], TwoExpertTensors)
    close(plain(x), lm(x))


def test_layers_to_transform_selects_layers_by_index():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.layers = nn.ModuleList([nn.Sequential(nn.Linear(4, 4)) for _ in range(3)])
    cfg = LieraPeftConfig(r=2, target_modules=["0"], layers_to_transform=[1], layers_pattern="layers")
    pm = peft.get_peft_model(model, cfg)
    assert [n for n, m in pm.named_modules() if isinstance(m, LieraLayer)] == ["base_model.model.layers.1.0"]
    with pytest.raises(ValueError, match="no equivalent in liera"):
        cfg.to_liera_config()


def test_config_translation_and_validation():
    cfg = liera.LieRAConfig(r=4, alpha=3.0, dropout=0.1, target_modules=["q", "v"], exp_map="exact",
                            generator="dora", rank_pattern={"q": 8}, layer_scaling="rms", adapter_dtype="base")
    peft_cfg = LieraPeftConfig.from_liera_config(cfg, task_type="CAUSAL_LM")
    assert (peft_cfg.liera_alpha, peft_cfg.liera_dropout, peft_cfg.peft_type) == (3.0, 0.1, "LIERA")
    assert peft_cfg.to_liera_config() == cfg
    with pytest.raises(ValueError, match="exp_map"):
        LieraPeftConfig(target_modules=["q"], exp_map="pade")
    with pytest.raises(ValueError, match="unknown generator"):
        LieraPeftConfig(target_modules=["q"], generator="nope")
    defaults = LieraPeftConfig(target_modules=["q"]).to_liera_config()
    assert defaults == liera.LieRAConfig(target_modules=["q"])  # the same defaults in both worlds


def test_version_guard_text_and_declared_range():
    with pytest.raises(ImportError, match=r"supports peft>=0\.21,<0\.22, but peft 0\.13\.0 is installed"):
        check_peft_version("0.13.0")
    check_peft_version(peft.__version__)
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["hf"]
    declared = [e for e in extra if e.startswith("peft")]
    assert declared == [f"peft{SUPPORTED_PEFT}"]


def test_registration_is_idempotent():
    assert liera_peft._add_peft_type("LIERA") is liera_peft.LIERA is peft.utils.PeftType.LIERA
    assert peft.utils.PeftType("LIERA") is liera_peft.LIERA and "LIERA" in list(peft.utils.PeftType)
    liera_peft._register()  # what a second import (a reload) does
    from liera.integrations import LieraPeftConfig as lazy, peft_to_liera as lazy_convert

    assert lazy is LieraPeftConfig and lazy_convert is peft_to_liera
    assert peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING["LIERA"] is liera_peft.LieraTuner
    model, idx = net()
    assert peft.get_peft_model(model, LieraPeftConfig(r=2, **NET_TARGETS))(idx).shape == (2, 3)


@pytest.mark.parametrize("old,new", [("LieraConfig", "LieraPeftConfig"), ("LieraModel", "LieraTuner")])
def test_the_old_door_names_still_work_with_a_deprecation_warning(old, new):
    """The PEFT door's classes were renamed so that they no longer differ from liera's own LieRAConfig / LieRAModel by
    capitals only; the old names still import, from the module and from liera.integrations."""
    import liera.integrations as integrations
    from liera.integrations import peft as peft_method

    for module in (peft_method, integrations):
        with pytest.warns(DeprecationWarning, match=f"{old} is now {new}"):
            assert getattr(module, old) is getattr(peft_method, new)
    with pytest.raises(AttributeError):
        peft_method.NoSuchName  # noqa: B018
