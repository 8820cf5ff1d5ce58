"""The fast training path: what autograd keeps, how many full ops run, equality with the generic path,
the eval-mode weight cache, torch.compile and gradient checkpointing. Deterministic, not timed."""
import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

import liera
from liera.layers.conv import depthwise_weight_grad
from zoo import cases, get_weight, perturb

MAPS = ["taylor", "exact"]
FAST_KINDS = [c for c in cases() if c.name in (
    "linear", "conv1d", "conv2d_strided_dilated_grouped", "conv2d_depthwise", "conv2d_same_reflect",
    "conv2d_static_same_subclass", "conv3d", "conv_transpose2d", "conv_transpose1d_grouped", "gpt2_conv1d")]


def make(case, exp_map, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    model = case.make().to(dtype)
    lm = liera.get_liera_model(model, liera.LieRAConfig(r=2, alpha=2.0, exp_map=exp_map, **case.targets, **kw))
    perturb(lm, std=0.2)
    return model, lm


def saved_sizes(fn):
    sizes = []

    def pack(t):
        sizes.append((tuple(t.shape), t.untyped_storage().data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sizes


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("exp_map", MAPS)
@pytest.mark.parametrize("case", FAST_KINDS, ids=lambda c: c.name)
def test_no_weight_sized_tensor_is_saved(case, exp_map, dropout):
    model, lm = make(case, exp_map, dropout=dropout)
    weight = get_weight(model, case)
    x = case.make_input().requires_grad_(True)
    out, sizes = saved_sizes(lambda: lm(x))
    assert sizes, "something must be saved"
    param_storages = {p.untyped_storage().data_ptr() for p in lm.parameters()}
    new_weight_sized = [s for s, ptr in sizes if ptr not in param_storages and (
        s in (tuple(weight.shape), tuple(weight.shape)[::-1]) or (len(s) == 2 and weight[0].numel() in s
                                                                  and weight.shape[0] in s))]
    assert new_weight_sized == [], f"weight-sized tensors kept for backward: {new_weight_sized}"
    out.float().pow(2).sum().backward()
    assert all(p.grad is not None for p in lm.parameters() if p.requires_grad)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("case", [c for c in FAST_KINDS if c.name != "conv2d_static_same_subclass"],
                         ids=lambda c: c.name)
def test_layer_input_is_freed_after_backward(case, dropout):
    """The graph (and its ctx objects) lives until the loss is dropped, which in a training loop is after the
    next forward; the layer input must not live that long (it did: the op held it, doubling peak memory)."""
    import weakref

    model, lm = make(case, "taylor", dropout=dropout)
    h = case.make_input() * 1.0  # a non-leaf activation only the graph could keep alive
    loss = lm(h).float().pow(2).sum()
    loss.backward()
    ref = weakref.ref(h)
    del h
    assert ref() is None, "the adapted layer's input outlived backward"
    assert loss.grad_fn is not None  # the graph itself is still there


@pytest.mark.parametrize("exp_map", MAPS)
def test_generic_path_would_keep_weight_sized_tensors(exp_map):
    """Control for the test above: with the fast path off, plain autograd does keep them."""
    case = FAST_KINDS[0]
    model, lm = make(case, exp_map, fast_path=False)
    weight = get_weight(model, case)
    _, sizes = saved_sizes(lambda: lm(case.make_input()))
    kept = [s for s, _ in sizes if s == tuple(weight.shape)]
    assert len(kept) >= 1


def flops(fn):
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return out, counter.get_total_flops()


@pytest.mark.parametrize("exp_map", MAPS)
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_one_full_op_forward_two_backward(kind, exp_map):
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = nn.Linear(64, 64, bias=False), torch.randn(512, 64, requires_grad=True)
        full = 2 * 512 * 64 * 64
    else:
        layer, x = nn.Conv2d(16, 16, 3, padding=1, bias=False), torch.randn(8, 16, 16, 16, requires_grad=True)
        full = 2 * 8 * 16 * 16 * 16 * 16 * 9
    lm = liera.get_liera_model(nn.Sequential(layer), liera.LieRAConfig(r=1, target_modules=["0"], exp_map=exp_map))
    perturb(lm)
    out, forward = flops(lambda: lm(x))
    _, backward = flops(lambda: out.sum().backward())
    # the low-rank product B @ A (rank 1) is counted too; it is < 1% of a full op here
    assert full <= forward < 1.05 * full, forward / full
    assert 2 * full <= backward < 2.1 * full, backward / full


@pytest.mark.parametrize("exp_map", MAPS)
@pytest.mark.parametrize("case", FAST_KINDS + [c for c in cases() if c.name == "embedding"], ids=lambda c: c.name)
def test_fast_path_equals_generic_path_float64(case, exp_map):
    results = []
    for fast in (True, False):
        model, lm = make(case, exp_map, dtype=torch.float64, fast_path=fast)
        torch.manual_seed(5)
        x = case.make_input()
        if x.is_floating_point():
            x = x.double().requires_grad_(True)
        out = lm(x)
        out.pow(2).sum().backward()
        grads = [p.grad for p in lm.parameters() if p.requires_grad] + ([x.grad] if x.requires_grad else [])
        results.append((out.detach(), grads))
    (o1, g1), (o2, g2) = results
    torch.testing.assert_close(o1, o2, rtol=1e-10, atol=1e-10)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("stride, padding, dilation", [(1, 3, 1), (2, 1, 1), (1, 2, 2), (2, 0, 3)])
def test_depthwise_weight_grad_matches_aten(stride, padding, dilation):
    torch.manual_seed(0)
    x, w = torch.randn(3, 5, 13, 11, dtype=torch.float64), torch.randn(5, 1, 3, 3, dtype=torch.float64)
    y = nn.functional.conv2d(x, w, None, stride, padding, dilation, 5)
    g = torch.randn_like(y)
    expected = torch.ops.aten.convolution_backward(g, x, w, None, [stride] * 2, [padding] * 2, [dilation] * 2, False,
                                                   [0, 0], 5, [False, True, False])[1]
    got = depthwise_weight_grad(g, x, w.shape, (stride,) * 2, (padding,) * 2, (dilation,) * 2)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_embedding_updates_only_gathered_rows():
    """The embedding path never forms the vocabulary x dim effective weight in training."""
    torch.manual_seed(0)
    emb = nn.Embedding(1000, 16)
    lm = liera.get_liera_model(nn.Sequential(emb), liera.LieRAConfig(r=2, target_modules=["0"]))
    perturb(lm)
    idx = torch.randint(0, 1000, (4, 3))
    _, sizes = saved_sizes(lambda: lm(idx))
    assert all(s[0] != 1000 for s, _ in sizes if s)
    gen = emb.liera_weight["default"]
    expected = emb.weight[idx] * (1 + gen.delta()[idx])
    torch.testing.assert_close(lm(idx), expected)


# ------------------------------------------------------------------ eval-mode cache


@pytest.fixture
def cached():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6))
    lm = liera.get_liera_model(model, liera.LieRAConfig(r=2, target_modules=["0"]))
    perturb(lm)
    lm.eval()
    x = torch.randn(3, 6)
    adapted = model[0].liera_weight

    def reference():
        w = model[0].weight
        names = adapted.live()
        if not names:
            return nn.functional.linear(x, w, model[0].bias)
        return nn.functional.linear(x, adapted.effective(w, names), model[0].bias)

    with torch.no_grad():
        y = lm(x)
        first = adapted._cache[1]
        lm(x)
        assert adapted._cache[1] is first, "unchanged state reuses the cached weight"
    return lm, model, x, adapted, y, reference


def check_fresh(lm, x, reference, old):
    with torch.no_grad():
        y = lm(x)
        torch.testing.assert_close(y, reference(), rtol=0, atol=0)
    assert not torch.allclose(y, old)


def test_cache_invalidated_by_optimizer_step(cached):
    lm, model, x, adapted, y, reference = cached
    opt = torch.optim.SGD([p for p in lm.parameters() if p.requires_grad], lr=0.5)
    lm(x).sum().backward()
    opt.step()
    check_fresh(lm, x, reference, y)


def test_cache_invalidated_by_in_place_parameter_change(cached):
    lm, model, x, adapted, y, reference = cached
    with torch.no_grad():
        adapted["default"].lora_B.mul_(2)
    check_fresh(lm, x, reference, y)


def test_cache_invalidated_by_load_state(cached):
    lm, model, x, adapted, y, reference = cached
    lm.set_adapter_state_dict({k: v * 0.5 for k, v in lm.get_adapter_state_dict().items()})
    check_fresh(lm, x, reference, y)


def test_cache_invalidated_by_adapter_switch(cached):
    lm, model, x, adapted, y, reference = cached
    lm.add_adapter("b", liera.LieRAConfig(r=2, target_modules=["0"], init_weights=False))
    lm.set_adapter("b")
    lm.eval()
    check_fresh(lm, x, reference, y)
    lm.set_adapter("default")
    with torch.no_grad():
        torch.testing.assert_close(lm(x), y, rtol=0, atol=0)


def test_cache_invalidated_by_train(cached):
    lm, model, x, adapted, y, reference = cached
    lm.train()
    assert adapted._cache is None
    lm.eval()
    with torch.no_grad():
        torch.testing.assert_close(lm(x), y, rtol=0, atol=0)


def test_cache_respects_disable_and_merge(cached):
    lm, model, x, adapted, y, reference = cached
    with lm.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(lm(x), reference(), rtol=0, atol=0)
    lm.merge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(lm(x), y, rtol=1e-6, atol=1e-6)
    lm.unmerge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(lm(x), y, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ compile and checkpointing


def train_grads(module, x, wrap=lambda m, x: m(x)):
    for p in module.parameters():
        p.grad = None
    out = wrap(module, x)
    out.pow(2).sum().backward()
    return out.detach(), [p.grad.clone() for p in module.parameters() if p.requires_grad]


def small_net(exp_map):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, groups=4), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3))
    lm = liera.get_liera_model(model, liera.LieRAConfig(r=2, target_modules=["0", "2", "4"], exp_map=exp_map))
    perturb(lm)
    return lm, torch.randn(2, 3, 6, 6)


@pytest.mark.parametrize("exp_map", MAPS)
def test_torch_compile_matches_eager(exp_map):
    lm, x = small_net(exp_map)
    eager = train_grads(lm, x)
    compiled = train_grads(torch.compile(lm, backend="aot_eager"), x)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(compiled[1], eager[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager():
    lm, x = small_net("exact")
    eager = train_grads(lm, x)
    compiled = train_grads(torch.compile(lm), x)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-4, atol=1e-5)
    for a, b in zip(compiled[1], eager[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("exp_map", MAPS)
def test_gradient_checkpointing(exp_map, reentrant):
    lm, x = small_net(exp_map)
    eager = train_grads(lm, x)
    x = x.requires_grad_(reentrant)  # reentrant checkpointing needs an input that requires grad (as in HF)
    ckpt = train_grads(lm, x, lambda m, inp: checkpoint(m, inp, use_reentrant=reentrant))
    torch.testing.assert_close(ckpt[0], eager[0], rtol=0, atol=0)
    for a, b in zip(ckpt[1], eager[1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_bf16_model_runs_its_op_in_bf16():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16)
    lm = liera.get_liera_model(model, liera.LieRAConfig(r=2, target_modules=["0"]))
    perturb(lm)
    seen = []

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.startswith(("addmm", "mm")):
                seen.append(tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
            return func(*args, **(kwargs or {}))

    x = torch.randn(4, 8, dtype=torch.bfloat16)
    with Spy():
        lm(x).float().sum().backward()
    full = [d for d in seen if len(d) >= 2 and torch.float32 not in d]
    assert full, seen
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lm.parameters() if p.requires_grad)
