"""Core: every layer kind x both exp maps against an independent reference, gradcheck, training semantics."""
import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import liera
from zoo import gradcheck_trainable, Case, cases, get_weight, perturb

CASES = cases()
MAPS = ["taylor", "exact"]
SCALINGS = ["none", "rms"]  # layer_scaling: the paper's plain D, or D / rms(W) per layer


def wrap(case: Case, exp_map: str, **kw):
    torch.manual_seed(0)
    model = case.make()
    cfg = liera.LieRAConfig(r=2, alpha=3.0, exp_map=exp_map, **case.targets, **kw)
    return model, cfg


def reference_weight(weight, generator, exp_map, layer_scaling="none"):
    """Written independently of liera.group: W * exp(s BA) or W + W * s BA, with s = alpha / r, divided by
    sqrt(mean(W^2)) under layer_scaling="rms"."""
    w = weight.detach().double()
    s = generator.alpha / generator.r / (w.pow(2).mean().sqrt() if layer_scaling == "rms" else 1.0)
    d = (s * generator.lora_B.double() @ generator.lora_A.double()).reshape(weight.shape)
    return (w * torch.exp(d) if exp_map == "exact" else w + w * d).to(weight.dtype)


def reference_output(base_copy, case, w_eff, x):
    owner, pname = case.weight_path
    return functional_call(base_copy, {f"{owner}.{pname}": w_eff}, (x,))


@pytest.mark.parametrize("layer_scaling", SCALINGS)
@pytest.mark.parametrize("exp_map", MAPS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_identity_at_init(case, exp_map, layer_scaling):
    model, cfg = wrap(case, exp_map, layer_scaling=layer_scaling)
    x = case.make_input()
    y0 = model(x).detach()
    lm = liera.get_liera_model(model, cfg)
    torch.testing.assert_close(lm(x), y0, rtol=0, atol=0)
    lm.eval()
    # eval-mode MultiheadAttention takes a native fused kernel when no torch-function mode is active;
    # under liera it runs its Python path, which rounds differently (~1e-7)
    tol = 1e-6 if case.name.startswith("mha") else 0.0
    with torch.no_grad():
        torch.testing.assert_close(lm(x), y0, rtol=0, atol=tol)


@pytest.mark.parametrize("layer_scaling", SCALINGS)
@pytest.mark.parametrize("exp_map", MAPS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_reference_formula(case, exp_map, layer_scaling):
    model, cfg = wrap(case, exp_map, layer_scaling=layer_scaling)
    base_copy = copy.deepcopy(model)
    x = case.make_input()
    lm = liera.get_liera_model(model, cfg)
    perturb(lm)
    adapted = next(a for _, _, a in lm.adapted_weights())
    w_ref = reference_weight(get_weight(model, case), adapted["default"], exp_map, layer_scaling)
    y_ref = reference_output(base_copy, case, w_ref, x)
    y_train = lm(x)  # training mode, grad enabled: the fast path where the kind has one
    torch.testing.assert_close(y_train, y_ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(y_ref, base_copy(x), atol=1e-4), "perturbed adapter must change the output"
    lm.eval()
    with torch.no_grad():
        torch.testing.assert_close(lm(x), y_ref, rtol=1e-4, atol=1e-5)  # cached effective weight
        torch.testing.assert_close(lm(x), y_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layer_scaling", SCALINGS)
@pytest.mark.parametrize("exp_map", MAPS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_gradcheck_float64(case, exp_map, layer_scaling):
    model, cfg = wrap(case, exp_map, layer_scaling=layer_scaling)
    model = model.double()
    lm = liera.get_liera_model(model, cfg)
    # with "rms", D carries 1 / rms(W) (50 for GPT-2's 0.02-std weights): a smaller push keeps exp(D) moderate
    perturb(lm, std=0.2 if layer_scaling == "none" else 0.02)
    assert gradcheck_trainable(lm, case.make_input())


@pytest.mark.parametrize("exp_map", MAPS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_float32_update_branch_matches_reference_and_gradcheck(case, exp_map):
    """update_branch="float32": op(x, W) + op(x, W_eff - W) in training (fast path) and eval, and its gradients
    (float64 here, where the branch runs in float64)."""
    model, cfg = wrap(case, exp_map, update_branch="float32")
    base_copy = copy.deepcopy(model)
    x = case.make_input()
    lm = liera.get_liera_model(model, cfg)
    perturb(lm)
    adapted = next(a for _, _, a in lm.adapted_weights())
    y_ref = reference_output(base_copy, case, reference_weight(get_weight(model, case), adapted["default"], exp_map), x)
    torch.testing.assert_close(lm(x), y_ref, rtol=1e-4, atol=1e-5)
    lm.eval()
    with torch.no_grad():
        torch.testing.assert_close(lm(x), y_ref, rtol=1e-4, atol=1e-5)
    lm.train()
    lm.double()
    names = [n for n, p in lm.named_parameters() if p.requires_grad]
    params = [p.detach().clone().requires_grad_(True) for n, p in lm.named_parameters() if p.requires_grad]
    floating = x.is_floating_point()
    inputs = (*params, x.double().requires_grad_(True)) if floating else tuple(params)

    def f(*tensors):
        return functional_call(lm, dict(zip(names, tensors[:len(names)])), (tensors[-1] if floating else x,))

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_float32_update_branch_keeps_small_updates_on_a_bfloat16_base():
    """bf16 Linear, relative update ~1e-3 (below bf16's rounding step): one merged op loses most of it; the
    float32 branch computes bf16(op(x, W) + op_fp32(x, W * D)), checked against that formula written out."""
    torch.manual_seed(0)
    base = nn.Linear(64, 32).to(torch.bfloat16)
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    a, b = torch.randn(2, 64), torch.randn(32, 2) * 1e-3
    models = {}
    for branch in ("merged", "float32"):
        lm = liera.get_liera_model(copy.deepcopy(base), liera.LieRAConfig(r=2, target_parameters=["weight"],
                                                                           update_branch=branch))
        gen = lm.base_model.liera_weight["default"]
        with torch.no_grad():
            gen.lora_A.copy_(a)
            gen.lora_B.copy_(b / gen.scaling)
        models[branch] = lm
    d = b @ a
    with torch.no_grad():
        base_out = base(x)
    expected = (base_out.float() + x.float() @ (base.weight.float() * d).T).to(torch.bfloat16)
    for train in (True, False):
        lm = models["float32"].train(train)
        with torch.set_grad_enabled(train):
            got = lm(x)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    w64 = base.weight.double()
    true_shift = x.double() @ (w64 * d.double()).T
    errors = {k: float(((m(x).detach().double() - base_out.double()) - true_shift).norm() / true_shift.norm())
              for k, m in models.items()}
    assert errors["float32"] < 0.8 * errors["merged"], errors


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_only_adapter_parameters_train(case):
    model, cfg = wrap(case, "taylor")
    lm = liera.get_liera_model(model, cfg)
    perturb(lm, std=0.1)
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trainable and all(".liera_" in n for n in trainable)
    opt = torch.optim.SGD([p for p in lm.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        out = lm(case.make_input())
        (out.float() ** 2).mean().backward()
        opt.step()
    for n, p in lm.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == (n in trainable), n
        if n not in trainable:
            assert p.grad is None, n


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("linear", "conv2d_depthwise", "gpt2_conv1d",
                                                                  "conv_transpose2d")], ids=lambda c: c.name)
def test_dropout_only_in_training(case):
    model, cfg = wrap(case, "taylor", dropout=0.5)
    lm = liera.get_liera_model(model, cfg)
    perturb(lm)
    x = case.make_input()
    torch.manual_seed(1)
    a = lm(x)
    b = lm(x)
    assert not torch.allclose(a, b), "dropout must act in training"
    lm.eval()
    c, d = lm(x), lm(x)
    torch.testing.assert_close(c, d, rtol=0, atol=0)
    with lm.disable_adapter():
        base = lm(x)
    assert not torch.allclose(c, base)


@pytest.mark.parametrize("exp_map", MAPS)
@pytest.mark.parametrize("shape", [(32, 24), (16, 8, 3, 3)])
def test_rank_capacity(shape, exp_map):
    """(W_eff - W) / W (Taylor) or log(W_eff / W) (exact) has rank <= r; W_eff - W is full rank."""
    torch.manual_seed(0)
    layer = nn.Linear(shape[1], shape[0]) if len(shape) == 2 else nn.Conv2d(shape[1], shape[0], shape[2])
    with torch.no_grad():
        layer.weight.copy_(torch.randn(shape, dtype=torch.float64).float())
    model = layer.double()
    lm = liera.get_liera_model(nn.Sequential(model), liera.LieRAConfig(r=2, target_modules=["0"], exp_map=exp_map))
    perturb(lm, std=0.5)
    adapted = next(a for _, _, a in lm.adapted_weights())
    w = model.weight.detach()
    w_eff = adapted.effective(w).detach()
    full = min(shape[0], math.prod(shape[1:]))
    diff = (w_eff - w).reshape(shape[0], -1)
    element = ((w_eff / w - 1) if exp_map == "taylor" else torch.log(w_eff / w)).reshape(shape[0], -1)
    assert torch.linalg.matrix_rank(diff, rtol=1e-9).item() == full
    assert torch.linalg.matrix_rank(element, rtol=1e-9).item() <= 2


def test_zero_entries_warn_once_with_count():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with torch.no_grad():
        model[0].weight[0, :3] = 0
    with pytest.warns(UserWarning, match=r"3 of 32 .* exactly zero.*0\.weight \(3\)"):
        lm = liera.get_liera_model(model, liera.LieRAConfig(target_modules=["0", "1"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lm.add_adapter("second", liera.LieRAConfig(target_modules=["0"]))


def test_quickstart_semantics():
    """The README quick-start: wrap, print, train a step, only adapters change."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 3))
    cfg = liera.LieRAConfig(r=4, alpha=8, target_modules=["0", "3"])
    lm = liera.get_liera_model(model, cfg)
    assert isinstance(lm, liera.LieRAModel) and lm.base_model is model
    x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 3, (16,))
    opt = torch.optim.Adam([p for p in lm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(lm(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_zero_warning_follows_the_added_adapters_update():
    model = nn.Sequential(nn.Linear(4, 4))
    with torch.no_grad():
        model[0].weight[0, 0] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an additive (LoRA) adapter moves zeros fine: no warning
        lm = liera.get_liera_model(model, liera.LieRAConfig(target_modules=["0"], update="additive"))
    with pytest.warns(UserWarning, match="1 of 16 .* exactly zero"):
        lm.add_adapter("lie", liera.LieRAConfig(target_modules=["0"]))
