"""`liera finetune --data wordnet-isa|drug-reviews`: a causal language model (the built-in SmolLM2-135M or a local
transformers folder) fine-tuned on an answer-choice task, the loss on the answer token (liera.apps.lm); the adapter
and results.json (test and validation accuracy, zero-shot accuracy of the base model) go to ``out``."""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

from ...version import __version__
from .. import lm
from ..lmtasks import SMOLLM2, get_lm_task
from ..methods import Method
from ..training import prepare_arm, trainable_count
from .outputs import RESULTS, FinetuneResult, keep_interrupted, save_trained, write_results


def run_causal_lm(opts: dict[str, Any], method: Method, out: Path) -> FinetuneResult:
    task = get_lm_task(opts["data"])
    name = opts["model"] or SMOLLM2
    if method.family not in ("liera", "peft", "full"):
        raise ValueError(f"--method {method.name} has no meaning for a language model (it has no classification head); "
                         f"use an adapter method or full.")
    base, tokenizer = lm.load_causal_lm(name)
    r = opts["r"]
    alpha = float(opts["alpha"] if opts["alpha"] is not None else 2 * r)
    targets = opts["target_modules"] or list(lm.LLAMA_TARGETS)
    lr = opts["lr"] if opts["lr"] is not None else method.rate("lm")
    splits = {s: lm.encode(task, s, tokenizer) for s in ("train", "validation", "test")}
    payload: dict[str, Any] = {
        "method": method.name, "model": name, "data": task.name, "data_kind": "lm", "classes": task.options,
        "n_train": len(splits["train"]), "n_test": len(splits["test"]),
        "options": {**opts, "method": method.name, "alpha": alpha, "lr": lr, "target_modules": targets},
        "zero_shot_test_accuracy": None, "test_accuracy": None, "validation_accuracy": None, "trainable_params": None,
        "train_time_s": None, "tokens_per_s": None, "losses": [], "interrupted": False, "saved": None, "note": "",
        "liera_version": __version__,
    }
    print(f"liera finetune: {method.name} on {task.name} ({len(splits['train'])} train / {len(splits['test'])} test "
          f"questions, answers {task.options}) with {name}; {targets} at r={r}, alpha={alpha:g}; {opts['epochs']} "
          f"epochs at lr={lr:g}")
    payload["zero_shot_test_accuracy"] = lm.score(base, splits["test"])["accuracy"]
    out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*exactly zero.*")
        model, note = prepare_arm(method, base, r=r, alpha=alpha, target_modules=targets, generator=opts["generator"],
                                  full_scope="targets")
    payload.update(trainable_params=trainable_count(model), note=note)
    fit = lm.FitResult()
    started = time.perf_counter()
    try:
        lm.fit_lm(model, splits["train"], epochs=opts["epochs"], lr=lr, batch_size=opts["batch_size"],
                  seed=opts["seed"], desc=f"{method.name} lr={lr:g}", show_progress=opts["progress"], into=fit)
    except KeyboardInterrupt:
        keep_interrupted(out, payload, model, method, fit.losses, started)
        raise
    payload.update(train_time_s=round(fit.seconds, 1), tokens_per_s=round(fit.tokens_per_s, 1), losses=fit.losses,
                   test_accuracy=lm.score(model, splits["test"])["accuracy"],
                   validation_accuracy=lm.score(model, splits["validation"])["accuracy"])
    payload["saved"] = save_trained(model, method, out)
    write_results(out, payload)
    print(f"  test accuracy {payload['test_accuracy']:.4f} (zero-shot {payload['zero_shot_test_accuracy']:.4f}, "
          f"majority answer {task.majority_accuracy('test'):.4f})  trainable {payload['trainable_params']:,}  "
          f"{payload['train_time_s']:.0f} s")
    print(f"wrote {payload['saved']} and {out / RESULTS}")
    return FinetuneResult(payload, model, lambda m, batch: lm.answer_logits(m, *batch))
