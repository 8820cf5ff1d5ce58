"""A plain transformers.Trainer with bf16=True / fp16=True (torch.autocast under the hood) trains LieRA through both
front doors, the adapted layers really run in the low dtype, and only adapter files are written. Tiny random LLaMA."""
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import liera  # noqa: E402
from liera.integrations import LieRATrainer  # noqa: E402
from liera.integrations.peft import LieraPeftConfig  # noqa: E402
from test_peft_trainer import ADAPTER_FILES, FULL_MODEL_FILES, Tokens, llama  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def build(door):
    torch.manual_seed(1)
    if door == "peft":
        model = peft.get_peft_model(llama(), LieraPeftConfig(r=4, liera_alpha=8.0, layer_scaling="rms",
                                                         target_modules=TARGETS, task_type="CAUSAL_LM"))
        return model, transformers.Trainer
    model = liera.get_liera_model(llama(), liera.LieRAConfig(r=4, alpha=8.0, layer_scaling="rms", target_modules=TARGETS))
    return model, LieRATrainer


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("door", ["peft", "liera"])
def test_trainer_mixed_precision_trains_and_saves_adapters_only(door, precision, tmp_path):
    model, trainer_cls = build(door)
    seen: dict[str, set] = {"q_proj": set(), "o_proj": set()}  # adapted / plain Linear of the same block
    hooks = [next(m for n, m in model.named_modules() if n.endswith(f"layers.0.self_attn.{name}")).register_forward_hook(
        lambda m, a, out, name=name: seen[name].add(out.dtype) if m.training else None) for name in seen]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), num_train_epochs=2, per_device_train_batch_size=8, learning_rate=1e-2,
        report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0, dataloader_num_workers=0,
        **{precision: True})
    out = trainer_cls(model=model, args=args, train_dataset=Tokens()).train()
    for hook in hooks:
        hook.remove()
    assert seen["q_proj"] == seen["o_proj"], f"adapted and plain layers ran in {seen} under {precision}"
    if precision == "bf16":  # accelerate runs fp16 on CPU without autocast: there both are float32
        assert seen["q_proj"] == {torch.bfloat16}
    assert torch.isfinite(torch.tensor(out.training_loss))
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved and all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    model.save_pretrained(tmp_path / "adapter")
    files = set(os.listdir(tmp_path / "adapter"))
    assert ADAPTER_FILES & files and not files & FULL_MODEL_FILES, files
