"""The group math in liera.group against direct formulas."""
import pytest
import torch

from liera import group

torch.manual_seed(0)
W = torch.randn(5, 4, 3, dtype=torch.float64)
D1 = 0.3 * torch.randn(5, 4, 3, dtype=torch.float64)
D2 = 0.2 * torch.randn(5, 4, 3, dtype=torch.float64)


@pytest.mark.parametrize("exp_map", group.EXP_MAPS)
def test_factor_and_inverse(exp_map):
    f = group.factor(D1, exp_map)
    expected = torch.exp(D1) if exp_map == "exact" else 1 + D1
    torch.testing.assert_close(f, expected, rtol=0, atol=0)
    torch.testing.assert_close(f * group.inverse_factor(D1, exp_map), torch.ones_like(W), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("exp_map", group.EXP_MAPS)
def test_apply_unapply_roundtrip(exp_map):
    terms = [(D1, exp_map), (D2, exp_map)]
    w_eff = group.apply(W, terms)
    expected = W * group.factor(D1, exp_map) * group.factor(D2, exp_map)
    torch.testing.assert_close(w_eff, expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(group.unapply(w_eff, terms), W, rtol=1e-13, atol=1e-13)


def test_exact_composition_is_algebra_addition():
    a = group.apply(W, [(D1, "exact"), (D2, "exact")])
    torch.testing.assert_close(a, W * torch.exp(D1 + D2), rtol=1e-14, atol=1e-14)


def test_mixed_maps_multiply_factors():
    got = group.combined_factor_minus_one([(D1, "taylor"), (D2, "exact"), (D1, "exact")])
    expected = (1 + D1) * torch.exp(D2) * torch.exp(D1) - 1
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)


def test_expm1_keeps_tiny_updates():
    tiny = torch.full((3,), 1e-12, dtype=torch.float32)
    w = torch.ones(3, dtype=torch.float32)
    delta = group.delta_weight(w, [(tiny, "exact")])
    assert torch.allclose(delta, torch.full((3,), 1e-12), rtol=1e-6)  # exp(D) - 1 would round to 0 in float32
    assert (torch.exp(tiny) - 1).eq(0).all()


@pytest.mark.parametrize("exp_map", group.EXP_MAPS)
def test_log_inverts_apply(exp_map):
    torch.testing.assert_close(group.log(group.apply(W, [(D1, exp_map)]), W, exp_map), D1, rtol=1e-12, atol=1e-12)


def test_additive_update():
    torch.testing.assert_close(group.apply(W, [(D1, "taylor"), (D2, "taylor")], "additive"), W + D1 + D2)
    torch.testing.assert_close(group.unapply(W + D1, [(D1, "exact")], "additive"), W)


def test_near_singular_mask_and_errors():
    d = torch.tensor([-1.0, 0.5, -1.0 + 1e-9])
    assert group.near_singular([(d, "taylor")]).tolist() == [True, False, True]
    assert group.near_singular([(d, "exact")]) is None
    with pytest.raises(ValueError, match="unknown exp_map"):
        group.factor(d, "cayley")
    with pytest.raises(ValueError, match="unknown update"):
        group.apply(W, [(D1, "taylor")], "sideways")


def test_transformed_applies_in_order_and_pins_zeros_only_when_asked():
    w = torch.tensor([[0.0, 2.0], [-0.0, 3.0]])
    out = torch.tensor([[1.0, 2.0], [1.0, 3.0]])
    steps = [lambda v: v * 2.0, lambda v: v + 1.0]  # order matters: (v * 2) + 1, not (v + 1) * 2
    torch.testing.assert_close(group.transformed(w, out, steps, keep_zeros=False), out * 2.0 + 1.0)
    pinned = group.transformed(w, out, steps, keep_zeros=True)
    assert pinned[0, 0].item() == 0.0 and torch.signbit(pinned[1, 0])  # W's zeros, -0.0 included
    torch.testing.assert_close(pinned[:, 1], out[:, 1] * 2.0 + 1.0)
    assert group.transformed(w, out, [], keep_zeros=True) is out  # no transform: nothing to pin (apply did)
