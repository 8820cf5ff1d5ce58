"""Every generator x exp map x layer kind: identity at init (the PiSSA-collapse test), reference formulas,
gradcheck, parameter counts, fast path, merge/unmerge and save/load round trips, user generators."""
import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

import liera
from liera.generators.lokr import split
from zoo import cases, get_weight, lifecycle_models, perturb

GENERATORS = ["lora", "dora", "pissa", "milora", "loha", "lokr", "tucker"]
MAPS = ["taylor", "exact"]
CASES = cases()


def wrap(case, generator, exp_map, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    model = case.make().to(dtype)
    wrap.base = copy.deepcopy(model)  # the unadapted model, for references
    cfg = liera.LieRAConfig(r=2, alpha=2.0, exp_map=exp_map, generator=generator, **case.targets, **kw)
    return model, liera.get_liera_model(model, cfg)


@pytest.mark.parametrize("exp_map", MAPS)
@pytest.mark.parametrize("generator", GENERATORS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_identity_at_init(case, generator, exp_map):
    torch.manual_seed(0)
    model = case.make()
    x = case.make_input()
    y0 = model(x).detach()
    cfg = liera.LieRAConfig(r=2, alpha=2.0, exp_map=exp_map, generator=generator, **case.targets)
    lm = liera.get_liera_model(model, cfg)
    torch.testing.assert_close(lm(x), y0, rtol=0, atol=0)
    adapted = next(a for _, _, a in lm.adapted_weights())
    weight = get_weight(model, case)
    assert torch.equal(adapted.effective(weight), weight), "W_eff == W exactly at init"


def gen_of(lm):
    return next(a for _, _, a in lm.adapted_weights())["default"]


def reference_delta(gen):
    """Each generator's algebra element written out independently."""
    s = gen.scaling
    p = {k: v.detach().double() for k, v in gen.state_dict().items()}
    if gen.name in ("lora", "dora"):
        d = p["lora_B"] @ p["lora_A"]
    elif gen.name in ("pissa", "milora"):
        d = p["lora_B"] @ p["lora_A"] - p["lora_B0"] @ p["lora_A0"]
    elif gen.name == "loha":
        d = (p["hada_B1"] @ p["hada_A1"]) * (p["hada_B2"] @ p["hada_A2"])
    elif gen.name == "lokr":
        c, ba = p["lokr_C"], p["lokr_B"] @ p["lokr_A"]
        d = (c[:, None, :, None] * ba[None, :, None, :]).reshape(c.shape[0] * ba.shape[0], -1)
    elif gen.name == "tucker":
        core = p["tucker_core"]
        us = [p[f"tucker_factors.{k}"] for k in range(core.dim())]
        letters = "abcdef"[:core.dim()]
        spec = letters + "," + ",".join(f"{o}{i}" for o, i in zip("ijklmn", letters)) + "->" + "ijklmn"[:core.dim()]
        d = torch.einsum(spec, core, *us)
    return (s * d).reshape(gen.shape)


@pytest.mark.parametrize("exp_map", MAPS)
@pytest.mark.parametrize("generator", GENERATORS)
@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("linear", "conv2d_depthwise", "conv3d",
                                                                  "conv2d_strided_dilated_grouped")],
                         ids=lambda c: c.name)
def test_matches_reference_formula(case, generator, exp_map):
    model, lm = wrap(case, generator, exp_map)
    base = wrap.base
    perturb(lm)
    gen = gen_of(lm)
    torch.testing.assert_close(gen.delta().double(), reference_delta(gen), rtol=1e-5, atol=1e-6)
    w = get_weight(model, case).detach().double()
    d = reference_delta(gen)
    v = w * torch.exp(d) if exp_map == "exact" else w + w * d
    if generator == "dora":  # m * V / ||V|| with the norm over all axes but the first
        norm = v.reshape(v.shape[0], -1).norm(dim=1)
        v = v * (gen.magnitude.detach().double() / norm).reshape(-1, *([1] * (v.dim() - 1)))
    x = case.make_input()
    expected = functional_call(base, {".".join(case.weight_path): v.float()}, (x,))
    torch.testing.assert_close(lm(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("exp_map", MAPS)
@pytest.mark.parametrize("generator", GENERATORS)
@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("linear", "conv2d_depthwise", "embedding")],
                         ids=lambda c: c.name)
def test_gradcheck(case, generator, exp_map):
    # DoRA detaches ||V|| by default (as in its paper), which is deliberately not the true gradient:
    # gradcheck its exact variant; the detached one is checked against a formula below
    kw = {"generator_kwargs": {"detach_norm": False}} if generator == "dora" else {}
    model, lm = wrap(case, generator, exp_map, dtype=torch.float64, **kw)
    perturb(lm, std=0.2)
    names = [n for n, p in lm.named_parameters() if p.requires_grad]
    params = tuple(p.detach().clone().requires_grad_(True) for n, p in lm.named_parameters() if p.requires_grad)
    x = case.make_input()
    x = x.double() if x.is_floating_point() else x
    f = lambda *ts: functional_call(lm, dict(zip(names, ts)), (x,))  # noqa: E731
    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("exp_map", MAPS)
def test_dora_detached_norm_gradient_matches_formula(exp_map):
    case = next(c for c in CASES if c.name == "conv2d_depthwise")
    model, lm = wrap(case, "dora", exp_map, dtype=torch.float64)
    base = wrap.base
    perturb(lm, std=0.2)
    gen = gen_of(lm)
    x = case.make_input().double()
    lm(x).pow(2).sum().backward()
    a, b, m = (gen.lora_A.detach().clone().requires_grad_(True), gen.lora_B.detach().clone().requires_grad_(True),
               gen.magnitude.detach().clone().requires_grad_(True))
    w = get_weight(model, case).detach()
    d = (gen.scaling * b @ a).reshape(w.shape)
    v = w * torch.exp(d) if exp_map == "exact" else w + w * d
    v = v * (m / v.reshape(v.shape[0], -1).norm(dim=1).detach()).reshape(-1, 1, 1, 1)
    functional_call(base, {"layer.weight": v}, (x,)).pow(2).sum().backward()
    for mine, ref in ((gen.lora_A.grad, a.grad), (gen.lora_B.grad, b.grad), (gen.magnitude.grad, m.grad)):
        torch.testing.assert_close(mine, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("exp_map", MAPS)
@pytest.mark.parametrize("generator", GENERATORS)
def test_fast_path_equals_generic(generator, exp_map):
    case = next(c for c in CASES if c.name == "conv2d_depthwise")
    out = []
    for fast in (True, False):
        model, lm = wrap(case, generator, exp_map, dtype=torch.float64, fast_path=fast)
        perturb(lm, std=0.2)
        x = case.make_input().double().requires_grad_(True)
        y = lm(x)
        y.pow(2).sum().backward()
        out.append([y.detach(), x.grad] + [p.grad for p in lm.parameters() if p.requires_grad])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def closed_form_count(name, shape, r):
    out, inn = shape[0], math.prod(shape[1:])
    if name in ("lora", "pissa", "milora"):
        return r * (out + inn)
    if name == "dora":
        return r * (out + inn) + out
    if name == "loha":
        return 2 * r * (out + inn)
    if name == "lokr":
        (o1, o2), (i1, i2) = split(out), split(inn)
        return o1 * i1 + r * (o2 + i2)
    ranks = [min(r, d) for d in shape]
    return math.prod(ranks) + sum(d * k for d, k in zip(shape, ranks))


@pytest.mark.parametrize("generator", GENERATORS)
@pytest.mark.parametrize("layer", ["linear768", "conv256"])
def test_parameter_counts(generator, layer):
    module = nn.Linear(768, 768) if layer == "linear768" else nn.Conv2d(256, 256, 3)
    lm = liera.get_liera_model(nn.Sequential(module), liera.LieRAConfig(r=8, target_modules=["0"], generator=generator))
    trainable, _ = lm.get_nb_trainable_parameters()
    assert trainable == closed_form_count(generator, tuple(module.weight.shape), 8)


@pytest.mark.parametrize("exp_map", MAPS)
@pytest.mark.parametrize("generator", GENERATORS)
@pytest.mark.parametrize("case", [c for c in lifecycle_models() if c.name in ("mlp", "depthwise_conv2d",
                                                                             "embedding_gpt2_conv1d")],
                         ids=lambda c: c.name)
def test_merge_unmerge_save_load(case, generator, exp_map, tmp_path):
    torch.manual_seed(0)
    model = case.make()
    x = case.make_input()
    base_w = {k: v.clone() for k, v in model.state_dict().items()}
    lm = liera.get_liera_model(model, liera.LieRAConfig(r=2, exp_map=exp_map, generator=generator, **case.targets))
    perturb(lm, std=0.2)
    lm.eval()
    out = lm(x).detach()
    lm.merge_adapter()
    torch.testing.assert_close(lm(x), out, rtol=1e-5, atol=1e-5)
    lm.unmerge_adapter()
    for k, v in base_w.items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    lm.save_pretrained(tmp_path)
    torch.manual_seed(0)
    fresh = case.make()
    again = liera.LieRAModel.from_pretrained(fresh, tmp_path)
    torch.testing.assert_close(again(x), out, rtol=0, atol=0)


def test_pissa_starts_at_w_and_trains():
    """The PiSSA + LieRA collapse: B @ A starts at W's principal part; liera cancels it exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    ref = model(x).detach()
    lm = liera.get_liera_model(model, liera.LieRAConfig(r=4, alpha=4, target_modules=["0", "2"], generator="pissa"))
    torch.testing.assert_close(lm(x), ref, rtol=0, atol=0)
    gen = model[0].liera_weight["default"]
    u, s, vh = torch.linalg.svd(model[0].weight.detach())
    principal = (u[:, :4] * s[:4]) @ vh[:4]
    torch.testing.assert_close(gen.scaling * gen.lora_B0 @ gen.lora_A0, principal, rtol=1e-4, atol=1e-5)
    opt = torch.optim.Adam([p for p in lm.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(lm(x), y)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first
    assert not torch.equal(gen.lora_B, gen.lora_B0), "the frozen offset must stay where it started"
    assert gen.lora_B0.untyped_storage().data_ptr() != gen.lora_B.untyped_storage().data_ptr()


def test_pissa_randomised_svd_and_milora_minor_triplets():
    torch.manual_seed(0)
    layer = nn.Linear(32, 24)
    lm = liera.get_liera_model(nn.Sequential(layer), liera.LieRAConfig(r=3, target_modules=["0"], generator="pissa",
                                                                        generator_kwargs={"init_iters": 4}))
    gen = layer.liera_weight["default"]
    s = torch.linalg.svdvals(layer.weight.detach())
    got = torch.linalg.svdvals(gen.scaling * gen.lora_B0 @ gen.lora_A0)[:3]
    torch.testing.assert_close(got, s[:3], rtol=1e-3, atol=1e-4)
    layer2 = nn.Linear(32, 24)
    liera.get_liera_model(nn.Sequential(layer2), liera.LieRAConfig(r=3, target_modules=["0"], generator="milora"))
    gen2 = layer2.liera_weight["default"]
    s2 = torch.linalg.svdvals(layer2.weight.detach())
    torch.testing.assert_close(torch.linalg.svdvals(gen2.scaling * gen2.lora_B0 @ gen2.lora_A0)[:3], s2[-3:],
                               rtol=1e-3, atol=1e-4)


def test_generator_kwargs_are_validated():
    with pytest.raises(TypeError, match=r"unknown generator_kwargs \['bogus'\]"):
        liera.get_liera_model(nn.Sequential(nn.Linear(3, 3)),
                              liera.LieRAConfig(target_modules=["0"], generator="lora", generator_kwargs={"bogus": 1}))


def test_user_generator_registers_and_round_trips(tmp_path):
    @liera.register_generator
    class DiagonalScale(liera.Generator):
        """D = s * outer(u, v): a rank-one generator with its own parameter names."""

        name = "test-outer"

        def __init__(self, weight, **kwargs):
            super().__init__(weight, **kwargs)
            self.u = nn.Parameter(torch.zeros(self.out_dim))
            self.v = nn.Parameter(torch.ones(self.in_dim))

        def delta(self):
            return (self.scaling * self.u[:, None] * self.v[None, :]).reshape(self.shape)

    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3))
        x = torch.randn(2, 3, 5, 5)
        y0 = model(x).detach()
        lm = liera.get_liera_model(model, liera.LieRAConfig(r=1, target_modules=["0"], generator="test-outer"))
        torch.testing.assert_close(lm(x), y0, rtol=0, atol=0)
        perturb(lm)
        out = lm(x).detach()
        lm.save_pretrained(tmp_path)
        assert '"generator": "test-outer"' in (tmp_path / "adapter_config.json").read_text()
        torch.manual_seed(0)
        again = liera.LieRAModel.from_pretrained(nn.Sequential(nn.Conv2d(3, 4, 3)), tmp_path)
        torch.testing.assert_close(again(x), out, rtol=0, atol=0)
    finally:
        liera.GENERATORS.pop("test-outer", None)
    with pytest.raises(ValueError, match="unknown generator 'test-outer'"):
        liera.LieRAModel.from_pretrained(nn.Sequential(nn.Conv2d(3, 4, 3)), tmp_path)


def test_register_generator_rejects_bad_classes():
    with pytest.raises(TypeError, match="subclass of liera.Generator"):
        liera.register_generator(int)

    class NoName(liera.Generator):
        pass

    with pytest.raises(ValueError, match="needs a class attribute `name`"):
        liera.register_generator(NoName)


@pytest.mark.parametrize("update", ["multiplicative", "additive"])
@pytest.mark.parametrize("exp_map", ["taylor", "exact"])
def test_dora_on_a_weight_with_an_all_zero_row_stays_finite(update, exp_map):
    """A pruned channel (every weight of a row zero) has no direction: DoRA's m * V / ||V|| was 0 / 0 = NaN there, in
    forward, gradients, merge and unmerge. The row now stays zero (a multiplicative update keeps it zero anyway)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4))
    with torch.no_grad():
        model[0].weight[1].zero_()
    original = model[0].weight.detach().clone()
    x = torch.randn(5, 6)
    config = liera.LieRAConfig(
        r=2, target_modules=["0"], generator="dora", update=update, exp_map=exp_map, init_weights=False
    )
    wrapped = liera.get_liera_model(model, config)
    out = wrapped(x)
    assert torch.isfinite(out).all()
    out.pow(2).sum().backward()
    trainable = [(n, p) for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in trainable)
    wrapped.eval()
    expected = wrapped(x).detach()
    wrapped.merge_adapter()
    assert torch.isfinite(model[0].weight).all() and (model[0].weight[1] == 0).all()
    torch.testing.assert_close(wrapped(x), expected, rtol=1e-5, atol=1e-6)
    wrapped.unmerge_adapter()
    assert torch.isfinite(model[0].weight).all()
    if update == "multiplicative":  # the additive ablation's zero magnitude erased the row's update: not invertible
        torch.testing.assert_close(model[0].weight, original, rtol=1e-5, atol=1e-6)
