"""transformers integration: Trainer training, files, gradient checkpointing, compile; tiny random configs."""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import liera  # noqa: E402
from liera.integrations import LieRASaveCallback, LieRATrainer  # noqa: E402

pytestmark = pytest.mark.smoke  # long: CI runs it in its own step (python -m pytest -q -m smoke)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=32, length=12, vocab=64, seed=0, labels=None):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)
        self.labels = labels

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        item = {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i])}
        item["labels"] = self.ids[i] if self.labels is None else self.labels[i]
        return item


def tiny(name):
    torch.manual_seed(0)
    if name == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
        return transformers.GPT2LMHeadModel(cfg), ["c_attn", "c_proj", "c_fc"]
    if name == "llama":
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
        return transformers.LlamaForCausalLM(cfg), ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    if name == "deberta-v2":
        cfg = transformers.DebertaV2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=64, vocab_size=64, max_position_embeddings=32,
                                           num_labels=3)
        return transformers.DebertaV2ForSequenceClassification(cfg), "all-linear"
    raise ValueError(name)


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=3, learning_rate=1e-2,
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                dataloader_num_workers=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


@pytest.mark.parametrize("name", ["gpt2", "llama", "deberta-v2"])
def test_trainer_trains_only_adapters_and_saves_adapter_files(name, tmp_path):
    model, targets = tiny(name)
    modules_to_save = ["classifier", "pooler"] if name == "deberta-v2" else None
    lm = liera.get_liera_model(model, liera.LieRAConfig(r=4, alpha=8, target_modules=targets,
                                                       modules_to_save=modules_to_save))
    data = Tokens(labels=torch.arange(32) % 3 if name == "deberta-v2" else None)
    trainer = LieRATrainer(model=lm, args=args(tmp_path), train_dataset=data)
    trainer.create_optimizer()
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    trainable = {id(p) for p in lm.parameters() if p.requires_grad}
    assert in_optimizer == trainable and all(".liera_" in n or (modules_to_save and any(m in n for m in modules_to_save))
                                             for n, p in lm.named_parameters() if id(p) in in_optimizer)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    trainer.save_model(str(tmp_path / "final"))
    files = sorted(os.listdir(tmp_path / "final"))
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files and "model.safetensors" not in files
    fresh, _ = tiny(name)
    again = liera.LieRAModel.from_pretrained(fresh, tmp_path / "final")
    lm.eval()
    batch = {"input_ids": data.ids[:2], "attention_mask": torch.ones_like(data.ids[:2])}
    torch.testing.assert_close(again(**batch).logits, lm(**batch).logits, rtol=1e-5, atol=1e-5)


def test_plain_trainer_with_callback_writes_adapter_into_checkpoints(tmp_path):
    # LLaMA, not GPT-2: a plain Trainer also writes the whole state dict with safetensors, which refuses
    # GPT-2's tied embeddings for any model that is not a PreTrainedModel (use LieRATrainer there)
    model, targets = tiny("llama")
    lm = liera.get_liera_model(model, liera.LieRAConfig(r=2, target_modules=targets))
    trainer = transformers.Trainer(model=lm, args=args(tmp_path, save_strategy="steps", save_steps=4, max_steps=4),
                                   train_dataset=Tokens(), callbacks=[LieRASaveCallback()])
    trainer.train()
    ckpt = tmp_path / "checkpoint-4"
    assert (ckpt / "adapter_model.safetensors").is_file()
    assert json.loads((ckpt / "adapter_config.json").read_text())["library"] == "liera"


def test_resume_from_checkpoint_restores_adapter(tmp_path):
    model, targets = tiny("gpt2")
    lm = liera.get_liera_model(model, liera.LieRAConfig(r=2, target_modules=targets))
    trainer = LieRATrainer(model=lm, args=args(tmp_path, save_strategy="steps", save_steps=4, max_steps=4),
                           train_dataset=Tokens())
    trainer.train()
    saved = {k: v.clone() for k, v in lm.get_adapter_state_dict().items()}
    model2, _ = tiny("gpt2")
    lm2 = liera.get_liera_model(model2, liera.LieRAConfig(r=2, target_modules=targets))
    trainer2 = LieRATrainer(model=lm2, args=args(tmp_path, save_strategy="no", max_steps=4), train_dataset=Tokens())
    trainer2._load_from_checkpoint(str(tmp_path / "checkpoint-4"))
    assert all(torch.equal(lm2.get_adapter_state_dict()[k], v) for k, v in saved.items())


def test_trainer_gradient_checkpointing_and_compile(tmp_path):
    model, targets = tiny("llama")
    lm = liera.get_liera_model(model, liera.LieRAConfig(r=2, target_modules=targets))
    trainer = LieRATrainer(model=lm, args=args(tmp_path, gradient_checkpointing=True, max_steps=3,
                                               torch_compile=True, torch_compile_backend="aot_eager"),
                           train_dataset=Tokens())
    trainer.train()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in lm.parameters())
    assert any(".liera_" in n and not torch.equal(p, torch.zeros_like(p)) for n, p in lm.named_parameters()
               if n.endswith("lora_B"))


class Pixels(torch.utils.data.Dataset):
    def __init__(self, n=16, size=32, classes=3):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, size, size, generator=g)
        self.y = torch.arange(n) % classes

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def test_trainer_on_convnextv2_convolutions_incl_depthwise(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.ConvNextV2Config(num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3,
                                        image_size=32)
    model = transformers.ConvNextV2ForImageClassification(cfg)
    lm = liera.get_liera_model(model, liera.LieRAConfig(r=2, alpha=4, target_modules="all-conv",
                                                       modules_to_save=["classifier"]))
    depthwise = [k for k, o, _ in lm.adapted_weights() if getattr(o, "groups", 1) > 1]
    assert depthwise, "ConvNeXt's 7x7 depthwise convolutions are adapted"
    trainer = LieRATrainer(model=lm, args=args(tmp_path, num_train_epochs=4, learning_rate=3e-2), train_dataset=Pixels())
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < losses[0], losses
