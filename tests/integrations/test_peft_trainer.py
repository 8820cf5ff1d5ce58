"""A plain transformers.Trainer (no liera subclass, no callback) trains a PEFT LieRA model: adapter-only files,
resume_from_checkpoint, load_best_model_at_end, equal outputs after a reload. Tiny random LLaMA."""
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

from liera.integrations.peft import LieraPeftConfig  # noqa: E402

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
FULL_MODEL_FILES = {"model.safetensors", "pytorch_model.bin"}
EPOCHS = 2


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=16, length=8, vocab=64, seed=0):
        self.ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config)


def peft_llama():
    torch.manual_seed(1)
    return peft.get_peft_model(llama(), LieraPeftConfig(r=4, liera_alpha=8.0, layer_scaling="rms", task_type="CAUSAL_LM"))


def trainer(model, out):
    args = transformers.TrainingArguments(
        output_dir=str(out), num_train_epochs=EPOCHS, per_device_train_batch_size=8, per_device_eval_batch_size=8,
        learning_rate=5e-2, eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True,
        metric_for_best_model="loss", greater_is_better=True,  # the first epoch wins: loading the best is not a no-op
        report_to=[], use_cpu=True, seed=0, logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)
    return transformers.Trainer(model=model, args=args, train_dataset=Tokens(), eval_dataset=Tokens())  # eval on the training set: the loss falls clearly


def adapter_tensors(folder):
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def test_plain_trainer_saves_resumes_and_loads_the_best_adapter(tmp_path):
    model = peft_llama()
    names = {n for n, m in model.named_modules() if type(m).__name__ == "LieraLayer"}
    assert {n.rsplit(".", 1)[-1] for n in names} == {"q_proj", "k_proj", "v_proj", "up_proj", "down_proj"}
    run = trainer(model, tmp_path / "run")
    run.train()
    checkpoints = sorted((tmp_path / "run").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert len(checkpoints) == EPOCHS
    for folder in checkpoints:
        files = set(os.listdir(folder))
        assert ADAPTER_FILES <= files and not files & FULL_MODEL_FILES, files
    assert run.state.best_model_checkpoint == str(checkpoints[0])
    best, last = adapter_tensors(checkpoints[0]), adapter_tensors(checkpoints[-1])
    assert any(not torch.equal(best[k], last[k]) for k in best)
    state = peft.get_peft_model_state_dict(model)
    assert state.keys() == best.keys()
    assert all(torch.equal(state[k], best[k]) for k in best), "load_best_model_at_end loaded the best adapter"
    assert any(k.endswith("lora_B") and v.abs().sum() > 0 for k, v in best.items()), "training moved the adapter"

    run.save_model(tmp_path / "final")
    files = set(os.listdir(tmp_path / "final"))
    assert ADAPTER_FILES <= files and not files & FULL_MODEL_FILES, files
    ids = Tokens(n=2, seed=3).ids
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        reloaded = peft.PeftModel.from_pretrained(llama(), tmp_path / "final")
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=0)

    resumed = trainer(peft_llama(), tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoints[0]))
    assert resumed.state.global_step == run.state.global_step
    again = adapter_tensors(tmp_path / "resumed" / checkpoints[-1].name)
    for k in last:  # resuming after epoch 1 ends where the uninterrupted run did
        torch.testing.assert_close(again[k], last[k], rtol=1e-4, atol=1e-6)
