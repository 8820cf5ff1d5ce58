"""Bad input raises a clear error naming the problem and the fix, and leaves the model untouched."""
import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import liera


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def assert_untouched(model, snap, x, y0):
    state, types = snap
    assert set(model.state_dict()) == set(state)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert [type(m) for m in model.modules()] == types
    assert not any(m._forward_pre_hooks for m in model.modules())
    torch.testing.assert_close(model(x), y0, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, message", [
    ({"r": 0}, "r must be a positive integer"),
    ({"r": -2}, "r must be a positive integer"),
    ({"r": 2.5}, "r must be a positive integer"),
    ({"alpha": 0}, "alpha must be a positive number"),
    ({"alpha": -1.0}, "alpha must be a positive number"),
    ({"exp_map": "cayley"}, r"unknown exp_map 'cayley'; use one of \['taylor', 'exact'\]"),
    ({"update": "sideways"}, "unknown update"),
    ({"dropout": 1.5}, "dropout must be in"),
    ({"update_branch": "fp32"}, r"update_branch must be one of \['merged', 'float32'\]"),
    ({"generator": "nope"}, r"unknown generator 'nope'; known generators: \[.*'lora'"),
    ({"target_modules": None}, "nothing to adapt"),
    ({"target_modules": "(unclosed"}, "not a valid regex"),
])
def test_config_errors(kwargs, message):
    base = {"target_modules": ["0"]}
    base.update(kwargs)
    with pytest.raises(ValueError, match=message):
        liera.LieRAConfig(**base)


@pytest.mark.parametrize("config, message", [
    (dict(target_modules=["conv_nope"]), r"matches no supported module .*Closest module names"),
    (dict(target_modules=["1"]), r"is a ReLU, which liera cannot adapt.*Supported module types.*target_parameters"),
    (dict(target_modules=".*"), r"is a Sequential|is a ReLU|is a Flatten"),
    (dict(target_parameters=["0.bias"]), r"has order 1 .*order >= 2"),
    (dict(target_parameters=["nope_weight"]), r"matches no parameter.*closest parameter names"),
    (dict(target_modules=["0"], modules_to_save=["head_nope"]), r"modules_to_save entry 'head_nope' matches no module"),
])
def test_targeting_errors_leave_model_untouched(config, message):
    model = small_model()
    x = torch.randn(2, 3, 6, 6)
    y0 = model(x).detach()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=message):
        liera.get_liera_model(model, liera.LieRAConfig(**config))
    assert_untouched(model, snap, x, y0)


def test_closest_names_are_listed():
    model = nn.Sequential()
    model.add_module("query_proj", nn.Linear(3, 3))
    with pytest.raises(ValueError, match="query_proj"):
        liera.get_liera_model(model, liera.LieRAConfig(target_modules=["querry_proj"]))


def test_wrapping_twice_is_refused():
    model = small_model()
    x = torch.randn(2, 3, 6, 6)
    lm = liera.get_liera_model(model, liera.LieRAConfig(target_modules=["0"]))
    y0 = lm(x).detach()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="already carries liera adapters"):
        liera.get_liera_model(model, liera.LieRAConfig(target_modules=["0"]))
    with pytest.raises(ValueError, match="already a LieRAModel"):
        liera.get_liera_model(lm, liera.LieRAConfig(target_modules=["0"]))
    with pytest.raises(ValueError, match="already exists"):
        lm.add_adapter("default", liera.LieRAConfig(target_modules=["0"]))
    state, types = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    torch.testing.assert_close(lm(x), y0, rtol=0, atol=0)


def test_failed_add_adapter_leaves_existing_adapter_alone():
    model = small_model()
    lm = liera.get_liera_model(model, liera.LieRAConfig(target_modules=["0"]))
    before = copy.deepcopy(lm.state_dict())
    with pytest.raises(ValueError):
        lm.add_adapter("second", liera.LieRAConfig(target_modules=["0", "1"]))  # "1" is a ReLU
    assert "second" not in lm.peft_config
    assert set(lm.state_dict()) == set(before)


def test_shortcut_targets_skip_modules_trained_in_full():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Linear(4, 2))
    model.get_output_embeddings = lambda: None  # a transformers encoder: nothing counts as output embeddings
    lm = liera.get_liera_model(model, liera.LieRAConfig(target_modules="all-linear", modules_to_save=["3"]))
    assert [k for k, _, _ in lm.adapted_weights()] == ["0.weight", "2.weight"]


def test_a_target_entry_that_matches_nothing_warns_with_the_closest_names():
    model = small_model()
    with pytest.warns(UserWarning, match=r"entries \['conv_typo'\] match no module.*closest module names"):
        lm = liera.get_liera_model(model, liera.LieRAConfig(target_modules=["0", "conv_typo"]))
    assert [k for k, _, _ in lm.adapted_weights()] == ["0.weight"]


def test_strict_makes_an_unmatched_target_entry_an_error_and_changes_nothing():
    model = small_model()
    x = torch.randn(2, 3, 6, 6)
    snap, y0 = snapshot(model), model(x)
    with pytest.raises(ValueError, match=r"entries \['conv_typo'\] match no module"):
        liera.get_liera_model(model, liera.LieRAConfig(target_modules=["0", "conv_typo"]), strict=True)
    assert_untouched(model, snap, x, y0)


def test_unmatched_target_and_pattern_warnings_point_at_the_users_line():
    with pytest.warns(UserWarning) as record:
        liera.get_liera_model(small_model(), liera.LieRAConfig(target_modules=["0", "typo"], rank_pattern={"nope": 2}))
    assert {Path(w.filename).name for w in record if "match" in str(w.message)} == {Path(__file__).name}


def test_zero_entry_and_merge_warnings_point_at_the_users_line():
    model = small_model()
    with torch.no_grad():
        model[0].weight[0, 0] = 0.0
    with pytest.warns(UserWarning) as record:
        lm = liera.get_liera_model(model, liera.LieRAConfig(target_modules=["0"]))
        lm.merge_adapter()
        lm.merge_adapter()  # again: nothing changes, and it says so
    got = {("zero" if "exactly zero" in str(w.message) else "merge"): Path(w.filename).name for w in record
           if "exactly zero" in str(w.message) or "already merged" in str(w.message)}
    assert got == {"zero": Path(__file__).name, "merge": Path(__file__).name}
