"""layer_scaling="rms": D scaled by 1 / rms(W) per layer. Identity at init, the independent reference and gradcheck
for every layer kind and both maps are in test_core.py (parametrized over layer_scaling); here: scale invariance
of the step, save/load, merge, the model-free tools, PEFT export, bad values."""
import copy

import pytest
import torch
from torch import nn

import liera
from liera.integrations.statedict import merge_file
from zoo import perturb


@pytest.mark.parametrize("scaling", ["none", "rms"])
def test_rms_scaling_makes_the_update_independent_of_the_weight_scale(scaling):
    """W_eff - W for k * W: k times that for W under the plain map, the same under rms scaling (as for LoRA)."""
    deltas = []
    for k in (1.0, 10.0):
        torch.manual_seed(0)
        layer = nn.Linear(6, 5)
        with torch.no_grad():
            layer.weight.mul_(k)
        lm = liera.get_liera_model(nn.Sequential(layer), liera.LieRAConfig(r=2, target_modules=["0"], layer_scaling=scaling))
        perturb(lm)
        _, owner, adapted = next(lm.adapted_weights())
        w = adapted.owner_weight(owner)
        deltas.append((adapted.effective(w) - w).detach())
    expected = deltas[0] if scaling == "rms" else 10.0 * deltas[0]
    torch.testing.assert_close(deltas[1], expected, rtol=1e-5, atol=1e-6)


def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Conv2d(4, 4, 3, groups=4), nn.Flatten(), nn.Linear(4 * 2 * 2, 3))
    with torch.no_grad():
        model[2].weight.mul_(0.05)  # layers of very different weight scale
    return model


def test_save_load_merge_keep_the_scale_made_at_creation(tmp_path):
    cfg = liera.LieRAConfig(r=2, target_modules=["0", "2"], layer_scaling="rms", rank_pattern={"2": 3})
    lm = liera.get_liera_model(mlp(), cfg)
    perturb(lm)
    x = torch.randn(2, 3, 6, 6)
    lm.eval()
    expected = lm(x).detach()
    lm.save_pretrained(tmp_path / "ad")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert {k for k in saved if k.endswith("layer_scale")} == {"0.weight.layer_scale", "2.weight.layer_scale"}
    assert float(saved["2.weight.layer_scale"]) == pytest.approx(1 / mlp()[2].weight.pow(2).mean().sqrt().item(), rel=1e-6)
    again = liera.LieRAModel.from_pretrained(mlp(), tmp_path / "ad")
    torch.testing.assert_close(again(x), expected, rtol=1e-6, atol=1e-6)
    # merged base, then load: the saved scale is used, not one recomputed from the changed weight
    merged = copy.deepcopy(again).merge_and_unload()
    torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-6)
    on_merged = liera.LieRAModel.from_pretrained(copy.deepcopy(merged), tmp_path / "ad")
    gen = on_merged.base_model[2].liera_weight["default"]
    assert float(gen.layer_scale) == float(saved["2.weight.layer_scale"])
    # merge and unmerge through the group inverse
    w0 = again.base_model[2].weight.detach().clone()
    again.merge_adapter()
    with again.disable_adapter():
        torch.testing.assert_close(again(x), expected, rtol=1e-5, atol=1e-6)
    again.unmerge_adapter()
    torch.testing.assert_close(again.base_model[2].weight, w0, rtol=1e-5, atol=1e-7)
    # the model-free merge and inspect read the same scale
    from safetensors.torch import save_file

    save_file(mlp().state_dict(), str(tmp_path / "base.safetensors"))
    stats = merge_file(tmp_path / "base.safetensors", tmp_path / "ad", tmp_path / "merged.safetensors")
    assert stats["merged"] > 0
    file_merged = load_file(str(tmp_path / "merged.safetensors"))
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(file_merged[k], v, rtol=1e-6, atol=1e-7)
    from liera.integrations.statedict import inspect_adapter

    report = inspect_adapter(tmp_path / "ad")
    assert "layer_scaling='rms'" in report and "| 2.weight | (4, 1, 3, 3) | 39 |" in report


def test_peft_export_folds_the_scale(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))  # noqa: E731
    torch.manual_seed(0)
    base = make()
    lm = liera.get_liera_model(copy.deepcopy(base), liera.LieRAConfig(r=2, target_modules=["0", "2"],
                                                                      layer_scaling="rms", rank_pattern={"2": 3}))
    perturb(lm)
    lm.eval()
    x = torch.randn(4, 5)
    expected = lm(x).detach()
    liera.export_peft(lm, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    loaded.eval()
    torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(liera.import_peft(copy.deepcopy(base), tmp_path)(x), expected, rtol=1e-5, atol=1e-6)


def test_bad_values_are_refused_without_changing_the_model():
    with pytest.raises(ValueError, match="^LieRAConfig: layer_scaling must be one of"):
        liera.LieRAConfig(target_modules=["0"], layer_scaling="l2")
    with pytest.raises(ValueError, match="^LoRAGenerator: layer_scaling must be one of"):  # the same check
        liera.generators.get_generator("lora")(torch.ones(3, 3), r=1, alpha=1.0, layer_scaling="l2")
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    with torch.no_grad():
        model[1].weight.zero_()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"^1\.weight: layer_scaling='rms' needs a weight with a finite, non-zero rms"):
        liera.get_liera_model(model, liera.LieRAConfig(target_modules=["0", "1"], layer_scaling="rms"))
    assert not any("liera" in n for n, _ in model.named_modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    cfg = liera.LieRAConfig(target_modules=["0"], layer_scaling="rms")
    assert liera.LieRAConfig.from_json(cfg.to_json()).layer_scaling == "rms"
