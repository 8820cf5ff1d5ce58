"""keep_zeros: the zeros of a pruned weight survive every step (forward, training, merge, unmerge, merge_and_unload)
bit for bit, on every layer kind x exp map x generator x update; the masked additive update is W + D * (W != 0);
N:M validity and the sparsity report."""
import logging
import warnings

import pytest
import torch
from torch import nn
from zoo import cases, get_weight, perturb

import liera
from liera import group
from liera.sparsity import (
    layer_sparsity,
    nm_valid,
    nm_violations,
    parse_nm,
    same_zeros,
    sparsity_report,
    total_fraction,
)

GENERATORS = ["lora", "dora", "pissa", "milora", "loha", "lokr", "tucker"]
MAPS = ["taylor", "exact"]
UPDATES = ["multiplicative", "additive"]
CASES = cases()


def prune_half(weight: torch.Tensor) -> torch.Tensor:
    """Every other entry zeroed in place (no row left empty), half of the zeros as -0.0 (what w * mask gives for a
    negative w): the bits a keep_zeros adapter must keep."""
    with torch.no_grad():
        flat = torch.arange(weight.numel()).reshape(weight.shape)
        zero = flat % 2 == 0
        weight.copy_(torch.where(zero, torch.where(flat % 4 == 0, 0.0, -0.0), weight))
    return weight.detach().clone()


def build(case, generator, exp_map, update, **kw):
    torch.manual_seed(0)
    model = case.make()
    pruned = prune_half(get_weight(model, case))
    torch.manual_seed(123)
    x = case.make_input()
    cfg = liera.LieRAConfig(r=2, alpha=2.0, exp_map=exp_map, generator=generator, update=update, keep_zeros=True,
                            **case.targets, **kw)
    lm = liera.get_liera_model(model, cfg)
    perturb(lm)  # off the identity: every D entry is non-zero, so an unmasked update would fill the zeros
    return model, lm, x, pruned


MATRIX = [(c, g, m, u) for c in CASES for g in GENERATORS for m in MAPS for u in UPDATES]
IDS = [f"{c.name}-{g}-{m}-{u}" for c, g, m, u in MATRIX]


@pytest.mark.parametrize("case,generator,exp_map,update", MATRIX, ids=IDS)
def test_zeros_survive_training_merge_unmerge_and_unload(case, generator, exp_map, update):
    model, lm, x, pruned = build(case, generator, exp_map, update)
    weight = get_weight(model, case)
    adapted = next(a for _, _, a in lm.adapted_weights())
    eff = adapted.effective(weight).detach()
    assert same_zeros(pruned, eff), "the effective weight keeps every zero"
    assert not torch.equal(eff, pruned), "the adapter moved the weight"
    gen = adapted["default"]
    with torch.no_grad():
        reference = (pruned + gen.delta() * (pruned != 0)) if update == "additive" and generator != "dora" else None
    if reference is not None:  # the masked additive update, written out
        torch.testing.assert_close(eff, reference, rtol=1e-6, atol=1e-6)

    lm.train()
    opt = torch.optim.SGD([p for p in lm.parameters() if p.requires_grad], lr=0.1)
    out = lm(x)
    (out.float() ** 2).mean().backward()
    opt.step()
    assert torch.equal(weight, pruned) or same_zeros(pruned, weight), "training never writes W"
    lm.eval()
    before = lm(x).detach()
    eff = adapted.effective(weight).detach()
    assert same_zeros(pruned, eff)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "cannot be unmerged" warning: zeros are not singular entries
        lm.merge_adapter()
    assert same_zeros(pruned, weight), "merge keeps every zero bit-exact"
    torch.testing.assert_close(weight.detach(), eff, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lm(x), before, rtol=1e-4, atol=1e-4)
    lm.unmerge_adapter()
    assert same_zeros(pruned, weight), "unmerge keeps every zero bit-exact"
    torch.testing.assert_close(weight.detach(), pruned, rtol=1e-4, atol=1e-5)
    plain = lm.merge_and_unload()
    assert same_zeros(pruned, get_weight(plain, case)), "merge_and_unload keeps every zero bit-exact"
    torch.testing.assert_close(plain(x), before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("exp_map", MAPS)
def test_masked_additive_is_sqft_and_plain_additive_fills_zeros(exp_map):
    torch.manual_seed(0)
    w = torch.randn(6, 8)
    w[w.abs() < 0.7] = 0.0
    d = torch.randn(6, 8)
    terms = [(d, exp_map)]
    masked = group.apply(w, terms, "additive", keep_zeros=True)
    torch.testing.assert_close(masked, w + d * (w != 0), rtol=0, atol=0)
    assert not same_zeros(w, group.apply(w, terms, "additive")), "the unmasked update fills the zeros"
    torch.testing.assert_close(group.delta_weight(w, terms, "additive", keep_zeros=True), d * (w != 0), rtol=0, atol=0)
    back = group.unapply(masked, terms, "additive", keep_zeros=True)
    assert same_zeros(w, back)
    torch.testing.assert_close(back, w, rtol=0, atol=1e-6)
    mult = group.apply(w, terms, "multiplicative", keep_zeros=True)
    torch.testing.assert_close(mult, group.apply(w, terms, "multiplicative"), rtol=0, atol=0)


def test_negative_zero_keeps_its_sign_and_exp_overflow_stays_zero():
    w = torch.tensor([[-0.0, 0.0, 1.0, -2.0]])
    d = torch.tensor([[-3.0, -3.0, 0.5, 0.5]])  # 1 + D < 0 flips a zero's sign without keep_zeros
    plain = group.unapply(group.apply(w, [(d, "taylor")]), [(d, "taylor")])
    assert not same_zeros(w, plain), "the test must be able to fail"
    for update in UPDATES:
        out = group.apply(w, [(d, "taylor")], update, keep_zeros=True)
        assert same_zeros(w, out) and same_zeros(w, group.unapply(out, [(d, "taylor")], update, keep_zeros=True))
    huge = torch.tensor([[200.0, 200.0, 0.0, 0.0]])  # exp(200) = inf: 0 * inf would be NaN
    assert same_zeros(w, group.apply(w, [(huge, "exact")], keep_zeros=True))


def test_a_merge_that_makes_a_new_zero_is_counted_and_refused_by_safe_merge():
    model = nn.Sequential(nn.Linear(4, 3, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0, 2.0, 0.0]] * 3))
    lm = liera.get_liera_model(model, liera.LieRAConfig(r=1, alpha=1.0, target_modules=["0"], update="additive",
                                                       keep_zeros=True))
    gen = next(a for _, _, a in lm.adapted_weights())["default"]
    with torch.no_grad():  # D = -1 everywhere: W + D hits 0 exactly at the entries equal to 1
        gen.lora_B.fill_(1.0)
        gen.lora_A.fill_(-1.0)
    before = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match="non-zero entries of 0.weight into exact zeros"):
        lm.merge_adapter(safe_merge=True)
    assert torch.equal(model[0].weight, before) and lm.merged_adapters == []
    with pytest.warns(UserWarning, match="became exact zeros"):
        lm.merge_adapter()
    lm.unmerge_adapter()
    assert (model[0].weight[:, 0] == 0).all(), "what the warning said: those entries are lost"
    with torch.no_grad():
        model[0].weight.copy_(before)
    lm.merge_adapter(keep_merge_copy=True)
    lm.unmerge_adapter()
    assert torch.equal(model[0].weight, before), "keep_merge_copy unmerges exactly"


def test_mixed_masked_and_plain_additive_adapters_are_refused():
    model = nn.Sequential(nn.Linear(4, 3))
    lm = liera.get_liera_model(model, liera.LieRAConfig(target_modules=["0"], update="additive", keep_zeros=True))
    lm.add_adapter("plain", liera.LieRAConfig(target_modules=["0"], update="additive"))
    with pytest.raises(ValueError, match="mix a masked additive update"):
        lm.set_adapter(["default", "plain"])
    assert lm.active_adapters == ["default"]


def test_keep_zeros_reports_instead_of_warning(caplog):
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 4))
    with torch.no_grad():
        model[0].weight[:, 1::2] = 0  # 2:4 valid
        model[1].weight[0, :3] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level(logging.INFO, logger="liera"):
            lm = liera.get_liera_model(model, liera.LieRAConfig(target_modules=["0", "1"], keep_zeros=True))
    assert "19 of 48 entries are zero" in caplog.text and "2:4 valid in 1 of them" in caplog.text
    with pytest.warns(UserWarning, match="exactly zero"):  # without keep_zeros: the old warning
        liera.get_liera_model(_zeroed(), liera.LieRAConfig(target_modules=["0"]))
    rows = lm.sparsity()
    assert [r.key for r in rows] == ["0.weight", "1.weight"]
    assert rows[0].zeros == 16 and rows[0].nm["2:4"] is True and rows[1].nm["2:4"] is False
    assert abs(total_fraction(rows) - 19 / 48) < 1e-12
    assert "| 0.weight | (4, 8) | 16 | 50.00% | yes |" in sparsity_report(rows)


def _zeroed() -> nn.Module:
    model = nn.Sequential(nn.Linear(8, 4))
    with torch.no_grad():
        model[0].weight[0, 0] = 0
    return model


def test_keep_zeros_must_be_a_bool_and_round_trips():
    with pytest.raises(ValueError, match="keep_zeros must be True or False"):
        liera.LieRAConfig(target_modules=["0"], keep_zeros="yes")
    cfg = liera.LieRAConfig(target_modules=["0"], keep_zeros=True, update="additive")
    assert liera.LieRAConfig.from_json(cfg.to_json()).keep_zeros is True


def test_nm_valid_counts_groups_along_the_input_axis():
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 3.0, 4.0, 0.0],
                      [0.0, 0.0, 0.0, 5.0, 6.0, 0.0, 0.0, 0.0]])
    assert nm_valid(w, 2, 4) and nm_valid(w, 4, 8) and not nm_valid(w, 1, 4)
    assert nm_violations(w, 1, 4) == 2
    w[0, 1] = 7.0  # three non-zeros in the first group of 4
    assert not nm_valid(w, 2, 4) and nm_violations(w, 2, 4) == 1
    assert not nm_valid(torch.zeros(2, 6), 2, 4), "6 inputs hold no whole groups of 4"
    conv = torch.zeros(3, 8, 3, 3)
    conv[:, ::2] = 1.0  # every other input channel: 2:4 along dim 1, not along the kernel axis
    assert nm_valid(conv, 2, 4) and not nm_valid(conv, 2, 3, dim=-1)
    assert nm_valid(conv.transpose(0, 1), 2, 4, dim=0)
    with pytest.raises(ValueError, match="0 < n < m"):
        nm_valid(w, 4, 4)
    assert parse_nm("2:4") == (2, 4)
    for bad in ("2-4", "4:2", "0:4", "a:b"):
        with pytest.raises(ValueError, match="N:M pattern"):
            parse_nm(bad)
    row = layer_sparsity("w", torch.zeros(3, 6))
    assert row.nm == {"2:4": None, "4:8": None} and row.fraction == 1.0
