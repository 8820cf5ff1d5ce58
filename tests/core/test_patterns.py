"""rank_pattern / alpha_pattern name module paths (PEFT's convention), and a mixed-rank adapter agrees across the
model, its files, the model-free tools (`liera merge`, `liera inspect`) and PEFT export/import."""
import copy
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import liera
from liera.integrations.statedict import merge_file
from liera.integrations.statedict import inspect_adapter
from zoo import perturb


def two_linears():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def ranks(lm):
    return {key: adapted["default"].r for key, _, adapted in lm.adapted_weights()}


def scalings(lm):
    return {key: float(adapted["default"].scaling) for key, _, adapted in lm.adapted_weights()}


def test_patterns_match_module_paths():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a matching module-path key warns about nothing
        lm = liera.get_liera_model(two_linears(), liera.LieRAConfig(r=2, alpha=2, target_modules=["0", "2"],
                                                                    rank_pattern={"2": 3}, alpha_pattern={"2": 6}))
    assert ranks(lm) == {"0.weight": 2, "2.weight": 3}
    assert scalings(lm) == {"0.weight": 1.0, "2.weight": 2.0}
    regex = liera.get_liera_model(two_linears(), liera.LieRAConfig(r=2, target_modules=["0", "2"], rank_pattern={r"\d": 4}))
    assert set(ranks(regex).values()) == {4}


def test_old_weight_key_form_still_works_with_a_deprecation_warning():
    with pytest.warns(FutureWarning, match=r"names the weight .*use '2'"):
        lm = liera.get_liera_model(two_linears(), liera.LieRAConfig(r=2, target_modules=["0", "2"],
                                                                    rank_pattern={"2.weight": 3}))
    assert ranks(lm) == {"0.weight": 2, "2.weight": 3}


def test_a_pattern_that_matches_nothing_warns():
    with pytest.warns(UserWarning, match=r"rank_pattern keys \['conv'\] match none of the 2 adapted layers"):
        lm = liera.get_liera_model(two_linears(), liera.LieRAConfig(r=2, target_modules=["0", "2"], rank_pattern={"conv": 3}))
    assert set(ranks(lm).values()) == {2}


def test_target_parameters_may_be_named_by_their_own_name():
    class MHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lm = liera.get_liera_model(MHA(), liera.LieRAConfig(r=2, target_parameters=["attn.in_proj_weight"],
                                                            rank_pattern={"attn.in_proj_weight": 5}))
    assert ranks(lm) == {"attn.in_proj_weight": 5}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 4 * 4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(torch.tanh(self.conv(x)).flatten(1))))


def make():
    torch.manual_seed(0)
    return Net()


def test_mixed_ranks_round_trip_through_every_tool(tmp_path):
    cfg = liera.LieRAConfig(r=2, alpha=2, target_modules=["conv", "fc"], rank_pattern={"conv": 3},
                            alpha_pattern={"conv": 6}, modules_to_save=["head"])
    lm = liera.get_liera_model(make(), cfg)
    assert ranks(lm) == {"conv.weight": 3, "fc.weight": 2}
    perturb(lm)
    lm.eval()
    x = torch.randn(2, 3, 6, 6)
    expected = lm(x).detach()
    # files
    lm.save_pretrained(tmp_path / "ad")
    again = liera.LieRAModel.from_pretrained(make(), tmp_path / "ad")
    assert ranks(again) == ranks(lm)
    torch.testing.assert_close(again(x), expected, rtol=0, atol=0)
    # the model-free merge and inspect build the same generators
    save_file(make().state_dict(), str(tmp_path / "base.safetensors"))
    stats = merge_file(tmp_path / "base.safetensors", tmp_path / "ad", tmp_path / "merged.safetensors")
    assert stats["merged"] > 0
    merged = make()
    merged.load_state_dict(load_file(str(tmp_path / "merged.safetensors")))
    torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-6)
    report = inspect_adapter(tmp_path / "ad")
    assert "| conv.weight | (4, 3, 3, 3) | 93 |" in report  # B 4x3 + A 3x27
    assert "| fc.weight | (6, 64) | 140 |" in report  # B 6x2 + A 2x64
    # PEFT HiRA: export loads in PEFT with equal outputs, import restores the ranks
    peft = pytest.importorskip("peft")
    liera.export_peft(lm, tmp_path / "hira")
    loaded = peft.PeftModel.from_pretrained(make(), tmp_path / "hira")
    loaded.eval()
    torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-6)
    imported = liera.import_peft(make(), tmp_path / "hira")
    assert ranks(imported) == ranks(lm)
    torch.testing.assert_close(imported(x), expected, rtol=1e-5, atol=1e-6)
    # a merge of the imported adapter equals the original's
    plain = copy.deepcopy(imported).merge_and_unload()
    torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-6)
