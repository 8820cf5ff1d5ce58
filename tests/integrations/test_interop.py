"""PEFT HiRA interop: export gives PEFT outputs equal to liera's; import gives liera outputs equal to PEFT's."""
import copy

import pytest
import torch
from torch import nn

import liera
from zoo import perturb

peft = pytest.importorskip("peft")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(11, 6)
        self.fc = nn.Linear(6, 8)
        self.gpt = Conv1D(8, 8)
        self.conv = nn.Conv1d(8, 5, 3, padding=1)
        self.head = nn.Linear(5, 3)

    def forward(self, idx):
        h = self.gpt(torch.tanh(self.fc(self.emb(idx))))
        return self.head(self.conv(h.transpose(1, 2)).mean(-1))


def make():
    torch.manual_seed(0)
    return Net()


def test_export_loads_in_peft_with_equal_outputs(tmp_path):
    pytest.importorskip("transformers")
    lm = liera.get_liera_model(make(), liera.LieRAConfig(r=2, alpha=6, target_modules=["emb", "fc", "gpt", "conv"],
                                                         rank_pattern={"conv": 3}, modules_to_save=["head"]))
    perturb(lm)
    with torch.no_grad():
        lm.base_model.head.weight.add_(0.5)
    idx = torch.randint(0, 11, (2, 7))
    lm.eval()
    expected = lm(idx).detach()
    liera.export_peft(lm, tmp_path)
    loaded = peft.PeftModel.from_pretrained(make(), tmp_path)
    loaded.eval()
    torch.testing.assert_close(loaded(idx), expected, rtol=1e-5, atol=1e-6)
    again = liera.import_peft(make(), tmp_path)
    torch.testing.assert_close(again(idx), expected, rtol=1e-5, atol=1e-6)


def test_import_of_a_peft_trained_hira_adapter(tmp_path):
    pytest.importorskip("transformers")
    model = peft.get_peft_model(make(), peft.HiraConfig(r=2, target_modules=["fc", "conv", "gpt", "emb"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "hira_" in n:
                p.add_(torch.randn_like(p) * 0.3)
    model.eval()
    idx = torch.randint(0, 11, (2, 7))
    expected = model(idx).detach()
    model.save_pretrained(tmp_path)
    lm = liera.import_peft(make(), tmp_path)
    torch.testing.assert_close(lm(idx), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config, reason", [
    (dict(exp_map="exact"), "exp_map='exact'"),
    (dict(generator="dora"), "generator='dora'"),
    (dict(update="additive"), "update='additive'"),
])
def test_export_refuses_what_hira_cannot_express(tmp_path, config, reason):
    lm = liera.get_liera_model(make(), liera.LieRAConfig(target_modules=["fc"], **config))
    with pytest.raises(ValueError, match=f"no exact PEFT HiRA equivalent: .*{reason}"):
        liera.export_peft(lm, tmp_path)


@pytest.mark.parametrize("generator", sorted(liera.GENERATORS))
def test_every_generator_through_export(tmp_path, generator):
    """Each registered generator either exports (one plain B @ A, no transform) or is refused by name and reason
    before anything is read or written (lokr once failed with "'tuple' object is not callable")."""
    lm = liera.get_liera_model(make(), liera.LieRAConfig(r=2, target_modules=["fc", "conv"], generator=generator))
    cls = liera.GENERATORS[generator]
    out = tmp_path / "hira"
    if cls.single_product and not cls.transforms_weight():
        liera.export_peft(lm, out)
        assert (out / "adapter_model.safetensors").is_file()
        return
    with pytest.raises(ValueError, match=f"no exact PEFT HiRA equivalent: .*generator={generator!r} \\(.+\\)"):
        liera.export_peft(lm, out)
    assert not out.exists()


def test_lokr_keeps_the_factors_method():
    from liera.generators.lokr import LoKrGenerator

    gen = LoKrGenerator(torch.randn(6, 8), r=2, alpha=2)
    assert gen.split_dims == (2, 2, 3, 4)
    with pytest.raises(NotImplementedError, match="'lokr' has no single low-rank product"):
        gen.factors()


class Scaled(nn.Module):
    """A made-up linear-like module liera gets a layer kind for without a declared weight layout."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 6))

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight) * 2


def test_export_refuses_a_layer_kind_without_a_layout(tmp_path, monkeypatch):
    from liera import layers

    kind = layers.LayerKind("Scaled", "linear", lambda m: isinstance(m, Scaled))
    monkeypatch.setattr(layers, "LAYER_KINDS", [*layers.LAYER_KINDS, kind])
    lm = liera.get_liera_model(nn.Sequential(Scaled()), liera.LieRAConfig(target_modules=["0"]))
    with pytest.raises(ValueError, match="0.weight is a Scaled, whose LayerKind declares no weight layout"):
        liera.export_peft(lm, tmp_path / "hira")
    assert not (tmp_path / "hira").exists()


def test_export_refuses_grouped_conv_and_target_parameters(tmp_path):
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.MultiheadAttention(4, 1))
    lm = liera.get_liera_model(model, liera.LieRAConfig(target_modules=["0"], target_parameters=["in_proj_weight"]))
    with pytest.raises(ValueError, match="grouped/depthwise.*target parameter|target parameter.*grouped"):
        liera.export_peft(lm, tmp_path)


def test_import_refuses_other_adapter_types(tmp_path):
    model = peft.get_peft_model(make(), peft.LoraConfig(r=2, target_modules=["fc"]))
    model.save_pretrained(tmp_path)
    base = make()
    with pytest.raises(ValueError, match="PEFT 'LORA' adapter; liera.import_peft reads HiRA"):
        liera.import_peft(base, tmp_path)
    assert not any(m._forward_pre_hooks for m in base.modules())
