"""QLoRA-style bases: bitsandbytes Linear4bit (nf4, fp4, double quantization) and Linear8bitLt through both doors.

The reference for every check is the float model whose weight is the dequantized one: liera must compute exactly
LieRA on that weight, keep no weight-sized float tensor for backward, refuse a merge without changing anything, give
the quantized base back on unload, and reload a saved adapter into a fresh quantized base with equal outputs.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

import liera  # noqa: E402
import liera.integrations.peft  # noqa: E402,F401
from liera.integrations.peft import LieraPeftConfig  # noqa: E402
from liera.layers.bnb import dequantize  # noqa: E402
from zoo import DEVICES  # noqa: E402

QUANTS = ["nf4", "fp4", "nf4-double", "int8"]
DOORS = ["liera", "peft"]


def quantized_mlp(quant, seed=0, device="cpu"):
    """Linear(32 -> 24) quantized by bitsandbytes itself, then a float head."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 24), nn.Tanh(), nn.Linear(24, 5))
    if quant == "int8":
        layer = bnb.nn.Linear8bitLt(32, 24, has_fp16_weights=False, threshold=0.0)
    else:
        layer = bnb.nn.Linear4bit(32, 24, compute_dtype=torch.float32, quant_type=quant.split("-")[0],
                                  compress_statistics=quant.endswith("double"))
    layer.load_state_dict(model[0].state_dict())
    model[0] = layer.to(device)  # bitsandbytes quantizes on the move to a device
    return model.to(device)


def wrap(model, door, **kw):
    if door == "liera":
        return liera.get_liera_model(model, liera.LieRAConfig(r=4, alpha=4.0, target_modules=["0"], **kw))
    kw = {("liera_alpha" if k == "alpha" else k): v for k, v in kw.items()}
    return peft.get_peft_model(model, LieraPeftConfig(r=4, liera_alpha=4.0, target_modules=["0"], **kw))


def perturb(model, std=0.2, seed=1):
    """Move every adapter of either door away from the identity, so that no check passes vacuously."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gen in [m for m in model.modules() if isinstance(m, liera.generators.Generator)]:
            for p in gen.parameters():
                p.add_((torch.randn(p.shape, generator=g) * std).to(p.device))


def layer0(model):
    return next(m for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt"))


def generator(lm):
    return next(m for m in lm.modules() if isinstance(m, liera.generators.Generator))


def float_reference(model, lm, exp_map="taylor"):
    """The same network with the dequantized weight and the adapter's W_eff written out."""
    q = layer0(model)
    w = dequantize(q, q.weight).float()
    gen = generator(lm)
    d = gen.delta().detach()
    w_eff = w * torch.exp(d) if exp_map == "exact" else w + w * d
    return lambda x: model[2](torch.tanh(F.linear(x, w_eff, q.bias)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("quant", QUANTS)
def test_identity_then_reference_formula(quant, door, device):
    model = quantized_mlp(quant, device=device)
    x = torch.randn(6, 32, device=device)
    y0 = model(x).detach()
    lm = wrap(model, door)
    torch.testing.assert_close(lm(x), y0, rtol=1e-5, atol=1e-5)  # bnb's int8 kernel rounds differently: close
    perturb(lm, std=0.2)
    torch.testing.assert_close(lm(x), float_reference(model, lm)(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(lm(x), y0, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("exp_map", ["taylor", "exact"])
@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_gradients_match_the_float_model_and_nothing_weight_sized_is_kept(quant, exp_map, device):
    model = quantized_mlp(quant, device=device)
    lm = wrap(model, "liera", exp_map=exp_map)
    perturb(lm, std=0.2)
    x = torch.randn(6, 32, device=device, requires_grad=True)
    ref = float_reference(model, lm, exp_map)
    gen = generator(lm)
    out_features, in_features = 24, 32
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(tuple(t.shape)) or t, lambda t: t):
        y = lm(x)
    assert sizes and (out_features, in_features) not in sizes, f"weight-sized tensors kept: {sizes}"
    y.square().sum().backward()
    got = [p.grad.clone() for p in gen.parameters()] + [x.grad.clone()]
    for p in [*gen.parameters(), x]:
        p.grad = None
    # the reference: the same generator on a float copy of the dequantized weight, plain autograd
    q = layer0(model)
    w = dequantize(q, q.weight).float()
    d = gen.delta()
    w_eff = w * torch.exp(d) if exp_map == "exact" else w + w * d
    model[2](torch.tanh(F.linear(x, w_eff, q.bias))).square().sum().backward()
    want = [p.grad for p in gen.parameters()] + [x.grad]
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    assert ref is not None


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_merge_is_refused_unchanged_and_unload_gives_the_quantized_base(quant, door):
    model = quantized_mlp(quant)
    x = torch.randn(6, 32)
    y0 = model(x).detach()
    stored = layer0(model).weight.detach().clone()
    lm = wrap(model, door)
    perturb(lm, std=0.2)
    y1 = lm(x).detach()
    with pytest.raises(ValueError, match="merge into a bf16 copy"):
        lm.merge_and_unload()
    with pytest.raises(ValueError, match="stored quantized"):
        lm.merge_adapter()
    torch.testing.assert_close(lm(x), y1, rtol=0, atol=0)
    assert torch.equal(layer0(lm).weight, stored)
    base = lm.unload()
    q = layer0(base)
    assert type(q).__name__ in ("Linear4bit", "Linear8bitLt") and "forward" not in vars(q)
    torch.testing.assert_close(base(x), y0, rtol=0, atol=0)


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("quant", ["nf4-double", "int8"])
def test_adapter_round_trip_into_a_fresh_quantized_base(quant, door, tmp_path):
    lm = wrap(quantized_mlp(quant), door, layer_scaling="rms")
    perturb(lm, std=0.2)
    x = torch.randn(6, 32)
    y = lm(x).detach()
    lm.save_pretrained(tmp_path)
    fresh = quantized_mlp(quant)
    if door == "liera":
        back = liera.LieRAModel.from_pretrained(fresh, tmp_path)
    else:
        back = peft.PeftModel.from_pretrained(fresh, tmp_path)
    torch.testing.assert_close(back(x), y, rtol=0, atol=0)


def test_autocast_and_training_on_a_4bit_base():
    lm = wrap(quantized_mlp("nf4"), "liera", layer_scaling="rms")
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=3e-2)
    x, target = torch.randn(32, 32), torch.randn(32, 5)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = lm(x)
        assert y.dtype == torch.bfloat16
        loss = (y.float() - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    lm.eval()
    with torch.no_grad():
        assert torch.isfinite(lm(x)).all()


def test_dropout_branch_runs_the_quantized_kernel_for_the_base():
    model = quantized_mlp("nf4")
    lm = wrap(model, "liera", dropout=0.2)
    perturb(lm, std=0.2)
    x = torch.randn(6, 32, requires_grad=True)
    lm.train()
    y = lm(x)
    y.sum().backward()
    assert all(p.grad is not None for p in lm.parameters() if p.requires_grad)
    lm.eval()
    torch.testing.assert_close(lm(x), float_reference(model, lm)(x), rtol=1e-5, atol=1e-5)


transformers = pytest.importorskip("transformers")


def quantized_llama(folder, bits):
    """A tiny random LLaMA saved, then loaded by transformers with a BitsAndBytesConfig (what a QLoRA user does)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    if not (folder / "config.json").exists():
        transformers.LlamaForCausalLM(config).save_pretrained(folder)
    quant = (transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
             if bits == 4 else transformers.BitsAndBytesConfig(load_in_8bit=True))
    return transformers.LlamaForCausalLM.from_pretrained(folder, quantization_config=quant, device_map="cpu")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("door", DOORS)
def test_qlora_recipe_kbit_training_gradient_checkpointing_and_reload(door, bits, tmp_path):
    model = peft.prepare_model_for_kbit_training(quantized_llama(tmp_path / "base", bits),
                                                 use_gradient_checkpointing=True)
    targets = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    if door == "liera":
        lm = liera.get_liera_model(model, liera.LieRAConfig(r=4, alpha=8.0, layer_scaling="rms", target_modules=targets))
    else:
        lm = peft.get_peft_model(model, LieraPeftConfig(r=4, liera_alpha=8.0, layer_scaling="rms", target_modules=targets,
                                                    task_type="CAUSAL_LM"))
    kinds = {type(m).__name__ for n, m in lm.named_modules() if n.endswith("q_proj") or n.endswith("q_proj.base_layer")}
    assert kinds & {"Linear4bit", "Linear8bitLt"}, kinds
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    trainable = [p for p in lm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    lm.train()
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = lm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.grad is not None for p in trainable)
    assert losses[-1] < losses[0]
    lm.eval()
    with torch.no_grad():
        logits = lm(input_ids=ids).logits
    lm.save_pretrained(tmp_path / "adapter")
    fresh = quantized_llama(tmp_path / "base", bits)
    back = (liera.LieRAModel.from_pretrained(fresh, tmp_path / "adapter") if door == "liera"
            else peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter"))
    back.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quant", ["nf4", "nf4-double"])
def test_a_layer_repacked_for_the_cpu_kernel_is_read_without_being_changed(quant):
    """bitsandbytes repacks a 4-bit weight for its CPU kernel on the first eval call without gradients; reading it
    back (its inverse rewrites the state it is given) must not change the layer."""
    layer = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type=quant.split("-")[0],
                              compress_statistics=quant.endswith("double"))
    layer.load_state_dict(nn.Linear(128, 64).state_dict())
    layer = layer.to("cpu").eval()
    x = torch.randn(4, 128)
    with torch.no_grad():
        y = layer(x)
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no packed 4-bit kernel (bitsandbytes packs only with avx512_bf16)")
    w = dequantize(layer, layer.weight)
    assert getattr(layer.weight.quant_state, "packing_format_for_cpu", False), "the layer's state was rewritten"
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y, rtol=0, atol=0)
        ref = F.linear(x, w, layer.bias)  # its kernel runs in bf16: close in norm, not entry by entry
        assert float((ref - y).norm() / y.norm()) < 5e-2
    holder = nn.Sequential(layer)
    lm = liera.get_liera_model(holder, liera.LieRAConfig(r=2, target_modules=["0"]))
    with torch.no_grad():
        torch.testing.assert_close(lm(x), F.linear(x, w, layer.bias), rtol=1e-5, atol=1e-5)
