"""Commonsense reasoning with LLaMA and LieRA (commonsense table of the LieRA paper; targets of its Table 9).

Targets: the commonsense-reasoning results (LLaMA fine-tuned on commonsense_170k, evaluated on BoolQ, PIQA,
SIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OBQA) of "Generalized Tensor-based Parameter-Efficient Fine-Tuning
via Lie Group Transformations" (LieRA; Si et al., ICCV 2025, arXiv 2504.00851). Table 9 of the paper gives the
adapted modules: q_proj, k_proj, v_proj, up_proj, down_proj.

Method: LieRA (Taylor map, W + W*D) on q_proj, k_proj, v_proj, up_proj, down_proj of every decoder layer;
causal-LM loss on the answer tokens only (prompt tokens get label -100); training through
``liera.integrations.LieRATrainer``. Evaluation: greedy generation on each --test file and exact match of the
extracted answer (the LLM-Adapters protocol: the first "true/false", "solutionN", "answerN", "optionN" or
"endingN" in the response, compared with the record's "answer" field, or with the same pattern in "output").

Hyper-parameters (the DoRA / LLM-Adapters commonsense setting that LieRA's comparison follows; assumptions,
verify against the paper): r=32, alpha=64, dropout 0.05, lr 2e-4, batch 16 (micro-batch 4 x 4 accumulation),
3 epochs, 100 warm-up steps then linear decay, cut-off length 256 tokens. Every value has a flag.

Data: JSONL in the LLM-Adapters commonsense_170k format, one object a line:
    {"instruction": "...", "input": "", "output": "the correct answer is option1", "answer": "option1"}
(the "answer" field is optional). The prompt is the LLM-Adapters (Alpaca) template, see ``prompt()``.

    python examples/commonsense_llama.py --model /models/llama-7b --train commonsense_170k.jsonl \
        --test boolq/test.jsonl --test piqa/test.jsonl --bf16 --out runs/commonsense
    python examples/commonsense_llama.py --smoke --out /tmp/cs-smoke     # tiny random LLaMA, seconds

Writes ``<out>/metrics.json`` (accuracy per --test file and on average) and the adapter (``<out>/adapter``).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

import liera
from liera.integrations import LieRATrainer
from liera.apps.progress import progress

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]  # Table 9 of the paper
# DoRA / LLM-Adapters commonsense settings (assumed; verify against the paper)
RANK = 32
ALPHA = 64.0
DROPOUT = 0.05
LR = 2e-4
BATCH_SIZE = 16
MICRO_BATCH_SIZE = 4
EPOCHS = 3
WARMUP_STEPS = 100
CUTOFF_LEN = 256
ANSWER = re.compile(r"\b(true|false|solution[12]|answer[1-5]|option[12]|ending[1-4])\b", re.IGNORECASE)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local LLaMA folder (LlamaForCausalLM + tokenizer, from_pretrained)")
    p.add_argument("--train", help="JSONL of {instruction, input, output}")
    p.add_argument("--test", action="append", default=[], help="JSONL test file; repeat for several data sets")
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=float, default=EPOCHS)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--micro-batch-size", type=int, default=MICRO_BATCH_SIZE)
    p.add_argument("--warmup-steps", type=int, default=WARMUP_STEPS)
    p.add_argument("--cutoff-len", type=int, default=CUTOFF_LEN)
    p.add_argument("--r", type=int, default=RANK)
    p.add_argument("--alpha", type=float, default=ALPHA)
    p.add_argument("--dropout", type=float, default=DROPOUT)
    p.add_argument("--exp-map", choices=list(liera.group.EXP_MAPS), default=liera.group.TAYLOR)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--bf16", action="store_true", help="load the base model in bfloat16 (adapters stay float32)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N records of each test file")
    p.add_argument("--smoke", action="store_true", help="tiny random LLaMA, synthetic data; seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.max_steps, args.batch_size, args.micro_batch_size, args.warmup_steps = 2, 4, 2, 0
        args.r, args.alpha, args.cutoff_len, args.max_new_tokens, args.eval_batch_size = 2, 4.0, 64, 4, 4
        args.bf16 = False
    elif not (args.model and args.train):
        p.error("--model and --train are required (or --smoke)")
    if args.batch_size % args.micro_batch_size:
        p.error("--batch-size must be a multiple of --micro-batch-size")
    return args


# ---------------------------------------------------------------------------------------------- prompts and data
def prompt(instruction: str, inp: str = "") -> str:
    """The LLM-Adapters (Alpaca) template; the answer follows '### Response:\\n'."""
    if inp:
        return ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n"
                f"### Instruction:\n{instruction}\n\n### Input:\n{inp}\n\n### Response:\n")
    return ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            f"request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def read_jsonl(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8").strip()
    rows = json.loads(text) if text.startswith("[") else [json.loads(l) for l in text.splitlines() if l.strip()]
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or "instruction" not in r or "output" not in r:
            raise ValueError(f"record {i + 1} of {str(path)!r} needs 'instruction' and 'output' fields")
    return rows


class AnswerOnly(torch.utils.data.Dataset):
    """prompt + output + eos, with labels -100 on the prompt tokens (loss on the answer only)."""

    def __init__(self, rows, tokenizer, cutoff_len):
        self.items = []
        for r in rows:
            p = prompt(r["instruction"], r.get("input", "") or "")
            prompt_ids = tokenizer(p, truncation=True, max_length=cutoff_len)["input_ids"]
            ids = tokenizer(p + str(r["output"]), truncation=True, max_length=cutoff_len)["input_ids"]
            if len(ids) < cutoff_len and ids[-1] != tokenizer.eos_token_id:
                ids = ids + [tokenizer.eos_token_id]
            n = min(len(prompt_ids), len(ids))
            labels = [-100] * n + ids[n:]
            if all(v == -100 for v in labels):
                continue  # the answer was cut off entirely
            self.items.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate(pad_id):
    def fn(batch):
        n = max(len(b["input_ids"]) for b in batch)
        out = {k: torch.full((len(batch), n), fill, dtype=torch.long)
               for k, fill in (("input_ids", pad_id), ("attention_mask", 0), ("labels", -100))}
        for i, b in enumerate(batch):  # right padding for training
            for k in out:
                out[k][i, :len(b[k])] = torch.tensor(b[k])
        return out
    return fn


def extract(text: str) -> str:
    m = ANSWER.search(text)
    return m.group(1).lower() if m else text.strip().split("\n")[0].strip().lower()


@torch.no_grad()
def exact_match(model, tokenizer, rows, args, desc) -> tuple[float, list[dict]]:
    model.eval()
    tokenizer.padding_side = "left"  # generation continues from the right end
    device = next(p for p in model.parameters()).device
    records = []
    batches = range(0, len(rows), args.eval_batch_size)
    for start in progress(batches, desc=desc, total=len(batches)):
        chunk = rows[start:start + args.eval_batch_size]
        enc = tokenizer([prompt(r["instruction"], r.get("input", "") or "") for r in chunk], return_tensors="pt",
                        padding=True).to(device)
        gen = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        for r, seq in zip(chunk, gen[:, enc["input_ids"].shape[1]:]):
            response = tokenizer.decode(seq, skip_special_tokens=True)
            gold = str(r["answer"]).strip().lower() if r.get("answer") else extract(str(r["output"]))
            pred = extract(response)
            records.append({"gold": gold, "pred": pred, "response": response, "correct": pred == gold})
    tokenizer.padding_side = "right"
    return (sum(r["correct"] for r in records) / max(1, len(records))), records


# ---------------------------------------------------------------------------------------------- smoke inputs
def smoke_rows(n, seed):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        a, b = rng.choice(["red", "blue", "green", "cold", "hot", "wet"], 2)
        truth = "true" if i % 2 == 0 else "false"
        rows.append({"instruction": f"Please answer: is {a} the same as {b}? Answer format: true/false",
                     "input": "", "output": f"the correct answer is {truth}", "answer": truth})
    return rows


def smoke_tokenizer(texts):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    pre = pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t)})
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")


def build(args, texts):
    import transformers

    if args.smoke:
        tokenizer = smoke_tokenizer(texts)
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128,
                                       bos_token_id=1, eos_token_id=2, pad_token_id=0)
        torch.manual_seed(args.seed)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
        model = transformers.LlamaForCausalLM.from_pretrained(
            args.model, dtype=torch.bfloat16 if args.bf16 else torch.float32)
        if torch.cuda.is_available():
            model = model.to("cuda")
    if tokenizer.pad_token_id is None:  # LLaMA has none: pad with <unk> (id 0), as LLM-Adapters does
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    return model, tokenizer


def training_arguments(args, out: Path):
    import transformers

    params = inspect.signature(transformers.TrainingArguments.__init__).parameters
    kw = dict(output_dir=str(out / "trainer"), per_device_train_batch_size=args.micro_batch_size,
              gradient_accumulation_steps=args.batch_size // args.micro_batch_size, learning_rate=args.lr,
              num_train_epochs=args.epochs, max_steps=args.max_steps or -1, warmup_steps=args.warmup_steps,
              lr_scheduler_type="linear", logging_steps=1 if args.smoke else 10, save_strategy="no", report_to=[],
              seed=args.seed, dataloader_num_workers=0, disable_tqdm=args.smoke, bf16=args.bf16,
              use_cpu=args.smoke or not torch.cuda.is_available(), remove_unused_columns=False)
    kw["eval_strategy" if "eval_strategy" in params else "evaluation_strategy"] = "no"
    return transformers.TrainingArguments(**kw)


def main(argv=None) -> int:
    import transformers

    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    transformers.set_seed(args.seed)
    if args.smoke:
        train_rows, tests = smoke_rows(16, 0), {"smoke_test": smoke_rows(4, 1)}
    else:
        train_rows, tests = read_jsonl(args.train), {Path(t).stem if Path(t).stem != "test" else Path(t).parent.name:
                                                     read_jsonl(t) for t in args.test}
    if args.eval_limit:
        tests = {k: v[:args.eval_limit] for k, v in tests.items()}
    texts = [prompt(r["instruction"], r.get("input", "")) + r["output"] for r in train_rows + sum(tests.values(), [])
             ] if args.smoke else None  # the smoke tokenizer's vocabulary
    model, tokenizer = build(args, texts)
    config = liera.LieRAConfig(r=args.r, alpha=args.alpha, target_modules=TARGETS, exp_map=args.exp_map,
                               dropout=args.dropout)
    model = liera.get_liera_model(model, config)
    print(f"[liera] {sum(1 for _ in model.adapted_weights())} weights adapted ({', '.join(TARGETS)}); "
          f"r={args.r} alpha={args.alpha:g} lr={args.lr:g} batch={args.batch_size}")
    model.print_trainable_parameters()
    trainable, total = model.get_nb_trainable_parameters()

    train_ds = AnswerOnly(train_rows, tokenizer, args.cutoff_len)
    print(f"[data] {len(train_ds)} training examples (of {len(train_rows)}); tests: "
          f"{ {k: len(v) for k, v in tests.items()} }")
    trainer = LieRATrainer(model=model, args=training_arguments(args, out), train_dataset=train_ds,
                           data_collator=collate(tokenizer.pad_token_id))
    start = time.perf_counter()
    result = trainer.train()
    train_time = time.perf_counter() - start
    trainer.save_model(str(out / "adapter"))
    tokenizer.save_pretrained(str(out / "adapter"))

    accuracy, samples = {}, {}
    for name, rows in tests.items():
        accuracy[name], records = exact_match(model, tokenizer, rows, args, desc=f"eval {name}")
        samples[name] = records[:5]
        with open(out / f"predictions_{name}.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)
        print(f"[test] {name}: exact match {accuracy[name]:.4f} on {len(rows)} records")
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    metrics = {
        "recipe": "commonsense_llama", "accuracy": accuracy,
        "average_accuracy": float(np.mean(list(accuracy.values()))) if accuracy else None,
        "train_loss": result.training_loss, "final_logged_loss": losses[-1] if losses else None,
        "steps": trainer.state.global_step, "train_time_s": train_time, "trainable_params": trainable,
        "total_params": total, "n_train": len(train_ds), "targets": TARGETS, "samples": samples,
        "hparams": {k: v for k, v in vars(args).items()},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"[done] metrics -> {out / 'metrics.json'}, adapter -> {out / 'adapter'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
