"""The `liera finetune` run: checking the options, then inputs (data, model, arm), training, and writing the
adapter and results.json. A language-model task goes to liera.apps.finetune.causal instead."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ...generators import get_generator
from ...version import __version__
from .. import training
from ..data import ImageTask, to_model_input
from ..lm import PRECISIONS, QUANTIZATIONS
from ..memory import TensorMemory
from ..methods import Method, get_method, names
from .causal import run_causal_lm
from .constants import BUILTIN_DATA, IMAGE_CACHE_BYTES, LM_DATA
from .distributed import join_process_group, leave_process_group
from .models import load_model, logits_of, resolution_hint
from .options import coerce
from .outputs import RESULTS, FinetuneResult, keep_interrupted, save_trained, write_results
from .pruning import check_prune, deployed, prune_classifier
from .sources import check_task, load_data
from .targets import default_targets, find_head, parse_targets, resolve_targets


def run_finetune(
    data: str | None = None,
    model: str | None = None,
    out: str | Path = "liera-finetune",
    method: str = "liera-rms",
    r: int = 8,
    alpha: float | None = None,
    exp_map: str | None = None,
    generator: str = "lora",
    target_modules=None,
    head: str | None = None,
    epochs: int = 5,
    lr: float | None = None,
    batch_size: int = 32,
    seed: int = 0,
    resolution: int | None = None,
    max_length: int = 128,
    text_column: str = "text",
    label_column: str = "label",
    threads: int | None = None,
    progress: bool = True,
    train_examples: int | None = None,
    max_steps: int | None = None,
    prune: str | None = None,
    precision: str | None = None,
    quantize: str | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` on ``data`` with ``method``; write the adapter and results.json to ``out``.

    See the package docstring for the accepted data and models. Raises ValueError / FileNotFoundError /
    NotADirectoryError with a message naming the problem and the fix before anything trains. On Ctrl-C the
    partial state (adapter and results.json with "interrupted": true) is saved and KeyboardInterrupt re-raised.
    """
    opts = coerce(
        dict(
            data=data,
            model=model,
            out=str(out),
            method=method,
            r=r,
            alpha=alpha,
            exp_map=exp_map,
            generator=generator,
            target_modules=target_modules,
            head=head,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            seed=seed,
            resolution=resolution,
            max_length=max_length,
            text_column=text_column,
            label_column=label_column,
            threads=threads,
            progress=progress,
            train_examples=train_examples,
            max_steps=max_steps,
            prune=prune,
            precision=precision,
            quantize=quantize,
        )
    )
    # ---------------------------------------------------------------- checks that need nothing loaded
    if not opts["data"]:
        raise ValueError(
            f"no data given: pass --data (an image folder, .npz, .csv or .jsonl, or "
            f"{' / '.join(BUILTIN_DATA + LM_DATA)})."
        )
    chosen = get_method(opts["method"])  # an unknown name: ValueError listing the methods
    if opts["exp_map"] is not None and not chosen.multiplicative:
        raise ValueError(
            f"--exp-map applies to the LieRA methods only, not --method {chosen.name}; use --method "
            f"{', '.join(names(multiplicative=True))}."
        )
    chosen = chosen.with_exp_map(opts["exp_map"])  # liera-taylor <-> liera-exact; liera-rms keeps its scaling
    check_prune(opts["prune"], chosen)  # a bad spec, or a method that would fill the zeros: refused here
    for name, low in (
        ("r", 1),
        ("epochs", 1),
        ("batch_size", 1),
        ("max_length", 2),
        ("resolution", 8),
        ("threads", 1),
        ("train_examples", 1),
        ("max_steps", 1),
    ):
        if opts[name] is not None and opts[name] < low:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {low}, got {opts[name]}.")
    for name in ("lr", "alpha"):
        if opts[name] is not None and not (math.isfinite(opts[name]) and opts[name] > 0):
            raise ValueError(f"--{name} must be a positive number, got {opts[name]}.")
    lm_only = [
        f"--{n.replace('_', '-')}"
        for n in ("train_examples", "max_steps", "precision", "quantize")
        if opts[n] is not None
    ]
    for name, allowed in (("precision", PRECISIONS), ("quantize", QUANTIZATIONS)):
        if opts[name] is not None and opts[name] not in allowed:
            raise ValueError(f"--{name} must be one of {', '.join(allowed)}, got {opts[name]!r}.")
    if lm_only and opts["data"] not in LM_DATA:
        raise ValueError(
            f"{' and '.join(lm_only)} apply to the language-model tasks ({', '.join(LM_DATA)}); for "
            f"your own data, pass a smaller file or fewer --epochs."
        )
    get_generator(opts["generator"])  # unknown generator: ValueError listing the known ones
    out = Path(opts["out"])
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {str(out)!r} is a file; give a directory for the adapter and results.json.")
    threads = torch.get_num_threads()
    torch.set_num_threads(training.pick_threads(opts["threads"]))  # the cores other jobs leave free, or --threads
    try:
        if opts["data"] in LM_DATA:
            return run_causal_lm(opts, chosen, out)
        inputs = prepare_inputs(opts, chosen)
        return train_and_write(inputs, opts, out)
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it
        leave_process_group()


# ====================================================================== inputs
@dataclass
class Inputs:
    """Everything a classification run trains on; the fit/accuracy "x" is an index into the split."""

    method: Method
    model: nn.Module
    call: Callable[[nn.Module, torch.Tensor, str], torch.Tensor]  # (model, indices, split) -> logits
    y_train: torch.Tensor
    y_test: torch.Tensor
    head: str
    targets: Any
    found: list
    lr: float
    alpha: float
    payload: dict  # what results.json starts from


def prepare_inputs(opts: dict[str, Any], method: Method) -> Inputs:
    """Load the data and the model, check they fit, and fix the head, targets and learning rate."""
    r = opts["r"]
    alpha = float(opts["alpha"] if opts["alpha"] is not None else r)
    res_for_folder = opts["resolution"] or resolution_hint(opts["model"]) or 64
    d = load_data(
        opts["data"], resolution=res_for_folder, text_column=opts["text_column"], label_column=opts["label_column"]
    )
    check_task(d)
    torch.manual_seed(opts["seed"])
    m = load_model(opts["model"], d.kind, d.task.classes, opts["seed"])
    base = m.module
    head = find_head(base, opts["head"])
    targets, found = None, []
    if method.adapts:
        targets = parse_targets(opts["target_modules"]) if opts["target_modules"] else default_targets(base, head)
        found = resolve_targets(base, targets, head, r)
    elif opts["target_modules"]:
        targets = parse_targets(opts["target_modules"])
    lr = opts["lr"] if opts["lr"] is not None else method.rate(d.kind)
    task = d.task
    y_train = torch.as_tensor(np.asarray(task.train_y)).long()
    y_test = torch.as_tensor(np.asarray(task.test_y)).long()
    resolution = None
    if isinstance(task, ImageTask):  # the same test as d.kind == "image"
        resolution = opts["resolution"] or m.resolution or 64
        family, mean, std = m.family, m.mean, m.std
        eager = (len(task.train_y) + len(task.test_y)) * 3 * resolution**2 * 4 <= IMAGE_CACHE_BYTES
        images = {"train": task.train_x, "test": task.test_x}
        cached = {k: to_model_input(v, resolution, mean, std) for k, v in images.items() if len(v)} if eager else {}

        def call(model, idx, split):
            xb = cached[split][idx] if eager else to_model_input(images[split][idx.numpy()], resolution, mean, std)
            return logits_of(model(pixel_values=xb) if family == "transformers" else model(xb))
    else:
        tok = m.tokenizer

        def enc(texts):
            return tok(list(texts), padding=True, truncation=True, max_length=opts["max_length"], return_tensors="pt")

        encoded = {"train": enc(task.train_text), "test": enc(task.test_text) if len(task.test_text) else None}
        trim = getattr(tok, "padding_side", "right") == "right"

        def call(model, idx, split):
            batch = {k: v[idx] for k, v in encoded[split].items()}
            if trim and "attention_mask" in batch:
                length = max(1, int(batch["attention_mask"].sum(1).max()))
                batch = {k: v[:, :length] for k, v in batch.items()}
            return logits_of(model(**batch))

    pruned = None
    if opts["prune"]:  # the adapter's targets, pruned before it is built (Wanda calibrates on training examples)
        pruned = prune_classifier(
            base,
            check_prune(opts["prune"], method),
            targets,
            head,
            lambda mdl, idx: call(mdl, idx, "train"),
            len(y_train),
        )
    with torch.no_grad():  # the model's output must match the classes before anything trains
        base.eval()
        probe = call(base, torch.arange(min(2, len(y_train))), "train")
    if probe.dim() != 2 or probe.shape[-1] != task.num_classes:
        raise ValueError(
            f"the model returns outputs of shape {tuple(probe.shape)} but the data have "
            f"{task.num_classes} classes; its head must give (batch, {task.num_classes}) logits "
            f"(a factory gets num_classes={task.num_classes})."
        )
    options = {
        **opts,
        "method": method.name,
        "alpha": alpha,
        "lr": lr,
        "resolution": resolution,
        "head": head,
        "target_modules": targets,
        "exp_map": method.options.get("exp_map"),
    }
    payload: dict[str, Any] = {
        "method": method.name,
        "model": m.name,
        "data": d.source,
        "data_kind": d.kind,
        "classes": list(task.classes),
        "n_train": int(len(y_train)),
        "n_test": int(len(y_test)),
        "options": options,
        "adapted_layers": len(found),
        "trainable_params": None,
        "total_params": None,
        "test_accuracy": None,
        "train_time_s": None,
        "peak_memory_mb": None,
        "losses": [],
        "interrupted": False,
        "saved": None,
        "note": "",
        "liera_version": __version__,
    }
    if pruned is not None:
        payload["pruned"] = pruned
    print(
        f"liera finetune: {method.name} on {d.source} ({d.kind}s, {len(y_train)} train / {len(y_test)} test, "
        f"{task.num_classes} classes) with {m.name}; head {head!r}"
        + (f", {len(found)} layers adapted ({targets}) at r={r}, alpha={alpha:g}" if found else "")
        + f"; {opts['epochs']} epochs at lr={lr:g}"
    )
    return Inputs(method, base, call, y_train, y_test, head, targets, found, lr, alpha, payload)


# ====================================================================== training
def train_and_write(inputs: Inputs, opts: dict[str, Any], out: Path) -> FinetuneResult:
    """Set up the arm, train (DDP under torchrun), test, and write; on Ctrl-C keep what was trained."""
    method, payload, y_train, y_test = inputs.method, inputs.payload, inputs.y_train, inputs.y_test
    losses: list[float] = []

    def train_forward(model, idx):
        logits = inputs.call(model, idx, "train")
        losses.append(float(F.cross_entropy(logits.detach(), y_train[idx])))
        return logits

    def test_forward(model, idx):
        return inputs.call(model, idx, "test")

    out.mkdir(parents=True, exist_ok=True)
    wrapped: nn.Module | None = None
    started = time.perf_counter()
    rank = 0
    try:
        wrapped, note = training.prepare_arm(
            method,
            inputs.model,
            head=inputs.head,
            r=opts["r"],
            alpha=inputs.alpha,
            target_modules=inputs.targets,
            generator=opts["generator"],
            keep_zeros=bool(opts["prune"]),
        )
        payload.update(
            trainable_params=training.trainable_count(wrapped),
            note=note,
            total_params=sum(p.numel() for p in wrapped.parameters()),
        )
        rank, world = join_process_group()
        train_module, mine = wrapped, torch.arange(len(y_train))
        if world > 1:  # torchrun: DDP reduces the adapter gradients; each rank trains on its share of the examples
            train_module, mine = DistributedDataParallel(wrapped), mine[rank::world]
            payload["world_size"] = world
        mem = TensorMemory([*wrapped.parameters(), *wrapped.buffers()])
        start = time.perf_counter()
        fit_losses = training.fit(
            train_module,
            mine,
            y_train[mine],
            epochs=opts["epochs"],
            lr=inputs.lr,
            batch_size=opts["batch_size"],
            seed=opts["seed"],
            desc=f"{method.name} lr={inputs.lr:g}",
            show_progress=opts["progress"] and rank == 0,
            forward=train_forward,
            memory=mem,
        )
        payload.update(
            train_time_s=round(time.perf_counter() - start, 3), peak_memory_mb=round(mem.peak_mb, 1), losses=fit_losses
        )
        if len(y_test):
            payload["test_accuracy"] = training.accuracy(
                wrapped, torch.arange(len(y_test)), y_test, batch_size=max(64, opts["batch_size"]), forward=test_forward
            )
        else:
            payload["note"] = (payload["note"] + "; " if payload["note"] else "") + "no test examples: no accuracy"
        if opts["prune"]:
            payload["deployed"] = deployed(wrapped)  # the zeros the merged model keeps
        if rank == 0:
            payload["saved"] = save_trained(wrapped, method, out)
            write_results(out, payload)
    except KeyboardInterrupt:
        keep_interrupted(out, payload, wrapped, method, losses, started)
        raise
    if rank == 0:
        acc = payload["test_accuracy"]
        print(
            (f"  test accuracy {acc:.4f}" if acc is not None else "  no test examples")
            + f"  trainable {payload['trainable_params']:,}  {payload['train_time_s']:.1f} s"
        )
        print(f"wrote {payload['saved']} and {out / RESULTS}")
    return FinetuneResult(payload, wrapped, test_forward)
