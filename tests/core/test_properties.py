"""Property tests (hypothesis) over random convolution shapes, groups, strides, dilations and paddings."""
import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

import liera
from zoo import perturb


@st.composite
def conv_setups(draw):
    dims = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.sampled_from([1, 2, 3]))
    depthwise = draw(st.booleans())
    in_ch = groups * draw(st.integers(1, 2))
    out_ch = in_ch if depthwise else groups * draw(st.integers(1, 3))
    if depthwise:
        groups = in_ch
    transposed = draw(st.booleans())
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.sampled_from([0, 1, "same"])) if not transposed and stride == 1 else draw(st.sampled_from([0, 1]))
    padding_mode = draw(st.sampled_from(["zeros", "reflect", "circular"])) if not transposed else "zeros"
    size = draw(st.integers(4, 7)) if dims < 3 else 4
    exp_map = draw(st.sampled_from(["taylor", "exact"]))
    return dict(dims=dims, in_ch=in_ch, out_ch=out_ch, groups=groups, transposed=transposed, kernel=kernel,
                stride=stride, dilation=dilation, padding=padding, padding_mode=padding_mode, size=size,
                exp_map=exp_map, batch=draw(st.integers(1, 3)))


def build(s):
    cls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[s["dims"]] if s["transposed"] else \
        {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[s["dims"]]
    kwargs = dict(stride=s["stride"], dilation=s["dilation"], padding=s["padding"], groups=s["groups"])
    if not s["transposed"]:
        kwargs["padding_mode"] = s["padding_mode"]
    return cls(s["in_ch"], s["out_ch"], s["kernel"], **kwargs)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_setups())
def test_random_convs_match_reference_and_generic_path(s):
    torch.manual_seed(0)
    try:
        layer = build(s).double()
        x = torch.randn(s["batch"], s["in_ch"], *([s["size"]] * s["dims"]), dtype=torch.float64)
        layer(x)
    except (RuntimeError, ValueError, NotImplementedError):
        return  # a configuration torch itself rejects (e.g. reflect padding wider than the input)
    base = copy.deepcopy(layer)
    results = []
    for fast in (True, False):
        model = nn.Sequential(copy.deepcopy(layer))
        torch.manual_seed(1)
        lm = liera.get_liera_model(model, liera.LieRAConfig(r=2, target_modules=["0"], exp_map=s["exp_map"],
                                                           fast_path=fast))
        assert torch.equal(lm(x), base(x)), "identity at init"
        perturb(lm, std=0.3)
        xg = x.clone().requires_grad_(True)
        out = lm(xg)
        out.pow(2).sum().backward()
        gen = model[0].liera_weight["default"]
        results.append((out.detach(), xg.grad, gen.lora_A.grad, gen.lora_B.grad))
    gen_d = (gen.scaling * gen.lora_B @ gen.lora_A).reshape(layer.weight.shape).detach()
    w = layer.weight.detach()
    w_ref = w * torch.exp(gen_d) if s["exp_map"] == "exact" else w + w * gen_d
    reference = functional_call(base, {"weight": w_ref}, (x,))
    torch.testing.assert_close(results[0][0], reference, rtol=1e-9, atol=1e-9)
    for a, b in zip(results[0], results[1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
