"""Run by tests/integrations/test_distributed.py under torchrun: LieRATrainer on a tiny LLaMA, 2 processes (gloo)."""
import json
import os
import sys

import torch
import transformers

import liera
from liera.integrations import LieRATrainer


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=16, length=8, vocab=64):
        self.ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


def main(out):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=64, max_position_embeddings=16)
    lm = liera.get_liera_model(transformers.LlamaForCausalLM(cfg), liera.LieRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    args = transformers.TrainingArguments(output_dir=out, per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2,
                                          logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                                          disable_tqdm=True, ddp_backend="gloo")
    trainer = LieRATrainer(model=lm, args=args, train_dataset=Tokens())
    trainer.train()
    trainer.save_model(os.path.join(out, "final"))
    if trainer.args.process_index == 0:
        with open(os.path.join(out, "world.json"), "w") as fh:
            json.dump({"world_size": trainer.args.world_size,
                       "wrapped": type(trainer.model_wrapped).__name__}, fh)


if __name__ == "__main__":
    main(sys.argv[1])
    from dist_workers import teardown  # this script's folder is on sys.path

    teardown()  # the Trainer's process group: both ranks meet, then exit without gloo's abort at interpreter exit
