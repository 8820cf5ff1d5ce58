"""`liera finetune --data wordnet-isa|drug-reviews`: a causal language model (the built-in SmolLM2-135M or a local
transformers folder) fine-tuned on an answer-choice task, the loss on the answer token (liera.apps.lm); the adapter
and results.json (test and validation accuracy, zero-shot accuracy of the base model) go to ``out``."""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ...version import __version__
from .. import lm
from ..lmtasks import SMOLLM2, get_lm_task
from ..methods import Method
from ..training import prepare_arm, trainable_count
from .outputs import RESULTS, FinetuneResult, keep_interrupted, save_trained, write_results
from .pruning import check_prune, deployed, prune_causal_lm


def run_causal_lm(opts: dict[str, Any], method: Method, out: Path) -> FinetuneResult:
    task = get_lm_task(opts["data"])
    name = opts["model"] or SMOLLM2
    if method.family not in ("liera", "peft", "full"):
        raise ValueError(
            f"--method {method.name} has no meaning for a language model (it has no classification head); "
            f"use an adapter method or full."
        )
    precision = opts["precision"] or lm.default_precision()
    amp = lm.autocast_dtype_of(precision)
    base, tokenizer = lm.load_causal_lm(
        name, dtype=torch.bfloat16 if precision == "bf16" else torch.float32, quantize=opts["quantize"]
    )
    r = opts["r"]
    alpha = float(opts["alpha"] if opts["alpha"] is not None else 2 * r)
    targets = opts["target_modules"] or list(lm.LLAMA_TARGETS)
    lr = opts["lr"] if opts["lr"] is not None else method.rate("lm", task=task.name)  # the study's choice
    if opts["train_examples"] is not None:
        task = dataclasses.replace(
            task, splits={**task.splits, "train": task.splits["train"][: opts["train_examples"]]}
        )
    splits = {s: lm.encode(task, s, tokenizer) for s in ("train", "validation", "test")}
    payload: dict[str, Any] = {
        "method": method.name,
        "model": name,
        "data": task.name,
        "data_kind": "lm",
        "classes": task.options,
        "n_train": len(splits["train"]),
        "n_test": len(splits["test"]),
        "options": {
            **opts,
            "method": method.name,
            "alpha": alpha,
            "lr": lr,
            "target_modules": targets,
            "precision": precision,
        },
        "zero_shot_test_accuracy": None,
        "test_accuracy": None,
        "validation_accuracy": None,
        "trainable_params": None,
        "train_time_s": None,
        "tokens_per_s": None,
        "losses": [],
        "interrupted": False,
        "saved": None,
        "note": "",
        "liera_version": __version__,
    }
    length = f"{opts['epochs']} epochs" + (f", at most {opts['max_steps']} steps" if opts["max_steps"] else "")
    print(
        f"liera finetune: {method.name} on {task.name} ({len(splits['train'])} train / {len(splits['test'])} test "
        f"questions, answers {task.options}) with {name}; {targets} at r={r}, alpha={alpha:g}; {length} at "
        f"lr={lr:g}"
    )
    chosen = "" if opts["precision"] else " (this machine's default; --precision fp32 for float32)"
    print(
        f"  precision {precision}{chosen}"
        + (
            f", base quantized {opts['quantize']} by bitsandbytes (the adapter stays unmerged)"
            if opts["quantize"]
            else ""
        )
    )
    show = opts["progress"]
    if opts["prune"]:  # before the zero-shot score, which is then the pruned model's without recovery
        payload["pruned"] = prune_causal_lm(base, check_prune(opts["prune"], method), targets, splits["train"].prompts)
    payload["zero_shot_test_accuracy"] = lm.score(
        base, splits["test"], desc="zero-shot test", show_progress=show, autocast=amp
    )["accuracy"]
    if method.multiplicative and not opts["prune"]:
        note = lm.zero_entries_note(base, targets, lm.ZERO_SOURCE.get(name, ""))
        if note:
            print(note)
    out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*exactly zero.*")
        model, note = prepare_arm(
            method,
            base,
            r=r,
            alpha=alpha,
            target_modules=targets,
            generator=opts["generator"],
            full_scope="targets",
            keep_zeros=bool(opts["prune"]),
        )
    payload.update(trainable_params=trainable_count(model), note=note)
    fit = lm.FitResult()
    started = time.perf_counter()
    try:
        lm.fit_lm(
            model,
            splits["train"],
            epochs=opts["epochs"],
            lr=lr,
            batch_size=opts["batch_size"],
            seed=opts["seed"],
            desc=f"{method.name} lr={lr:g}",
            show_progress=show,
            into=fit,
            max_steps=opts["max_steps"],
            autocast=amp,
        )
    except KeyboardInterrupt:
        keep_interrupted(out, payload, model, method, fit.losses, started)
        raise
    payload.update(
        train_time_s=round(fit.seconds, 1),
        tokens_per_s=round(fit.tokens_per_s, 1),
        losses=fit.losses,
        test_accuracy=lm.score(model, splits["test"], desc="test", show_progress=show, autocast=amp)["accuracy"],
        validation_accuracy=lm.score(model, splits["validation"], desc="validation", show_progress=show, autocast=amp)[
            "accuracy"
        ],
    )
    if opts["prune"]:
        payload["deployed"] = deployed(model)  # the zeros the merged model keeps
    payload["saved"] = save_trained(model, method, out)
    write_results(out, payload)
    print(
        f"  test accuracy {payload['test_accuracy']:.4f} (zero-shot {payload['zero_shot_test_accuracy']:.4f}, "
        f"majority answer {task.majority_accuracy('test'):.4f})  trainable {payload['trainable_params']:,}  "
        f"{payload['train_time_s']:.0f} s"
    )
    print(f"wrote {payload['saved']} and {out / RESULTS}")
    return FinetuneResult(payload, model, lambda m, batch: lm.answer_logits(m, *batch))
