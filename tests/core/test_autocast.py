"""Mixed precision: every layer kind x exp map x generator under torch.autocast (bfloat16 and float16).

Under autocast a plain layer runs its matmul or convolution in the autocast dtype. An adapted layer must do the
same (same output dtype, same speed class), form its effective weight from float32 pieces and cast it once, and
give the adapter tensors float32 gradients. The reference is the same adapter on the generic path (fast_path=False:
W_eff built with plain autograd, the layer's own call cast by autocast), whose float32 output is checked against an
independent formula in test_generators.py.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import liera
from zoo import DEVICES, cases, perturb

GENERATORS = ["lora", "dora", "pissa", "milora", "loha", "lokr", "tucker"]
MAPS = ["taylor", "exact"]
DTYPES = [torch.bfloat16, torch.float16]
CASES = cases()


def adapted_pair(case, generator, exp_map, device="cpu", **kw):
    """The same perturbed adapter on the fast path and on the generic path, and the unadapted model."""
    out = []
    for fast in (True, False):
        torch.manual_seed(0)
        model = case.make().to(device)
        base = copy.deepcopy(model)
        cfg = liera.LieRAConfig(r=2, alpha=2.0, exp_map=exp_map, generator=generator, fast_path=fast, **case.targets, **kw)
        lm = liera.get_liera_model(model, cfg)
        perturb(lm, std=0.2)
        out.append(lm)
    return out[0], out[1], base


def trainable(lm):
    return [p for p in lm.parameters() if p.requires_grad]


def run(lm, x, dtype):
    for p in trainable(lm):
        p.grad = None
    with torch.autocast(x.device.type, dtype=dtype):
        y = lm(x)
    y.float().square().mean().backward()
    return y, [p.grad for p in trainable(lm)]


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("exp_map", MAPS)
@pytest.mark.parametrize("generator", GENERATORS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_autocast_matches_generic_path(case, generator, exp_map, dtype, device):
    fast, generic, base = adapted_pair(case, generator, exp_map, device)
    x = case.make_input().to(device)
    with torch.autocast(device, dtype=dtype):
        plain = base(x)
    y, grads = run(fast, x, dtype)
    y_ref, grads_ref = run(generic, x, dtype)
    assert y.dtype == plain.dtype == y_ref.dtype, "an adapted layer runs in the dtype a plain one does"
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    assert rel_err(y, y_ref) < tol
    assert not torch.equal(y.float(), plain.float()), "the perturbed adapter changes the output"
    for g, g_ref, p in zip(grads, grads_ref, trainable(fast)):
        assert g is not None and g.dtype == p.dtype == torch.float32, "adapter gradients arrive in float32"
        assert torch.isfinite(g).all()
        assert rel_err(g, g_ref) < 5 * tol


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("linear", "conv2d_depthwise", "conv_transpose2d",
                                                                  "gpt2_conv1d")], ids=lambda c: c.name)
def test_autocast_gradients_close_to_float32(case, dtype, device):
    fast, _, _ = adapted_pair(case, "lora", "taylor", device)
    x = case.make_input().to(device)
    _, low = run(fast, x, dtype)
    for p in trainable(fast):
        p.grad = None
    fast(x).float().square().mean().backward()
    for g, p in zip(low, trainable(fast)):
        assert rel_err(g, p.grad) < (5e-2 if dtype == torch.bfloat16 else 1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_small_update_survives_the_cast(device):
    """|D| ~ 1e-4 < 2^-8: 1 + D rounds to 1 in bf16, but W + W*D formed in float32 and cast once does not."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 32).to(device)
    base = copy.deepcopy(layer)
    lm = liera.get_liera_model(nn.Sequential(layer), liera.LieRAConfig(r=4, alpha=4.0, target_modules=["0"]))
    gen = next(a for _, _, a in lm.adapted_weights())["default"]
    with torch.no_grad():
        gen.lora_B.fill_(1e-2)
        gen.lora_A.copy_(torch.randn_like(gen.lora_A) * 1e-2)
    d = gen.delta().detach()
    assert d.abs().max() < 2 ** -8
    w = base.weight.detach()
    x = torch.randn(16, 64, device=device, requires_grad=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = lm(x)
    expected = F.linear(x.detach().bfloat16(), (w + w * d).bfloat16(), base.bias.detach().bfloat16())
    lossy = F.linear(x.detach().bfloat16(), (w.bfloat16() * (1 + d.bfloat16())), base.bias.detach().bfloat16())
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    assert torch.equal(w.bfloat16() * (1 + d.bfloat16()), w.bfloat16()), "the lossy form loses the update"
    assert not torch.equal(y, lossy)
    y.float().sum().backward()
    assert gen.lora_A.grad.abs().sum() > 0 and x.grad.dtype == torch.float32


@pytest.mark.parametrize("branch_kw", [{"update_branch": "float32"}, {"dropout": 0.1}], ids=["float32-branch", "dropout"])
def test_autocast_update_branch_paths(branch_kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    lm = liera.get_liera_model(model, liera.LieRAConfig(r=2, target_modules=["0"], **branch_kw))
    perturb(lm)
    x = torch.randn(4, 8)
    lm.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_eval = lm(x)
    lm.train()
    torch.manual_seed(1)
    y, grads = run(lm, x, torch.bfloat16)
    assert y.dtype == y_eval.dtype == torch.bfloat16
    assert all(g is not None and torch.isfinite(g).all() and g.dtype == torch.float32 for g in grads)
    if "dropout" not in branch_kw:  # the float32 branch: base in bf16, update in float32, one rounding of the sum
        w = model[0].weight.detach()
        adapted = next(a for _, _, a in lm.adapted_weights())
        diff = adapted.effective(w).detach() - w
        expected = (F.linear(x.bfloat16(), w.bfloat16(), model[0].bias.detach().bfloat16()).float()
                    + F.linear(x, diff)).bfloat16()
        torch.testing.assert_close(y_eval, expected, rtol=0, atol=0)


def test_bf16_weights_with_float32_adapters_under_autocast():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).to(torch.bfloat16)
    lm = liera.get_liera_model(model, liera.LieRAConfig(r=2, target_modules=["0", "2"]))
    assert all(p.dtype == torch.float32 for p in trainable(lm))
    perturb(lm)
    x = torch.randn(4, 8)
    y, grads = run(lm, x, torch.bfloat16)
    assert y.dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in grads)
    y2 = lm(x.bfloat16())  # bf16 weights without autocast still run
    assert y2.dtype == torch.bfloat16


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_training_with_grad_scaler(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).to(device)
    lm = liera.get_liera_model(model, liera.LieRAConfig(r=4, alpha=8, target_modules=["0", "3"], exp_map="exact",
                                                        layer_scaling="rms"))
    opt = torch.optim.AdamW(trainable(lm), lr=1e-2)
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 12)
    x, y = torch.randn(16, 3, 8, 8, device=device), torch.randint(0, 4, (16,), device=device)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        with torch.autocast(device, dtype=torch.float16):
            loss = F.cross_entropy(lm(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(float(loss))
    assert all(torch.isfinite(p).all() for p in trainable(lm))
    assert losses[-1] < 0.8 * losses[0]


def test_autocast_merge_equals_unmerged():
    torch.manual_seed(0)
    lm = liera.get_liera_model(nn.Sequential(nn.Linear(8, 8)), liera.LieRAConfig(r=2, target_modules=["0"]))
    perturb(lm)
    x = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = lm(x)
        lm.merge_adapter()
        after = lm(x)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
