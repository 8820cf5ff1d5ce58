"""The `liera finetune` run: preparing the arm, training, and writing the adapter and results.json."""
from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ... import __version__
from .. import training
from ..methods import get_method
from ...config import LieRAConfig
from ..data import to_model_input
from ..memory import TensorMemory
from .distributed import _distributed, _leave_process_group
from .models import _logits, _resolution_hint, load_model
from .options import BUILTIN_DATA, IMAGE_CACHE_BYTES, IMAGE_LRS, LIERA_METHODS, TEXT_LRS, _coerce
from .sources import _check_task, load_data
from .targets import default_targets, find_head, parse_targets, resolve_targets


# ====================================================================== the run
@dataclass
class FinetuneResult:
    results: dict
    model: nn.Module = field(repr=False)
    forward: Callable = field(repr=False)


def _prepare(method: str, model: nn.Module, *, head: str, r: int, alpha: float, targets, found: list,
             generator: str, exp_map: Optional[str] = None) -> tuple[nn.Module, str]:
    if method in LIERA_METHODS:
        exp_map = exp_map or ("exact" if method == "liera-exact" else "taylor")
        cfg = LieRAConfig(r=r, alpha=alpha, target_modules=targets, exclude_modules=[head], modules_to_save=[head],
                          generator=generator, exp_map=exp_map,
                          update="additive" if method == "lora" else "multiplicative",
                          layer_scaling="rms" if method == "liera-rms" else "none")
        from ...model import get_liera_model

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*exactly zero.*")
            return get_liera_model(model, cfg), ""
    names = [t.path for t in found] if method == "peft-lora" else targets
    return training.prepare_arm(method, model, head=head, r=r, alpha=alpha, target_modules=names, generator=generator)


def _save_trained(model: nn.Module, method: str, out: Path) -> str:
    from ...io import atomic_write

    if method in LIERA_METHODS or method == "peft-lora":
        target = out / "adapter"
        if target.exists() and not target.is_dir():
            raise NotADirectoryError(f"{str(target)!r} is a file; remove it or pick another --out.")
        model.save_pretrained(str(target))
        return str(target)
    from safetensors.torch import save_file

    tensors = {n: p.detach().to("cpu").clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    target = out / "trainable.safetensors"
    atomic_write(target, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", "library": "liera",
                                                                        "method": method}))
    return str(target)


def _write_results(out: Path, payload: dict) -> None:
    from ...io import atomic_write

    text = json.dumps(payload, indent=2, default=str)
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(text))


def run_finetune(data: Optional[str] = None, model: Optional[str] = None, out: Union[str, Path] = "liera-finetune",
                 method: str = "liera-rms", r: int = 8, alpha: Optional[float] = None,
                 exp_map: Optional[str] = None, generator: str = "lora", target_modules=None,
                 head: Optional[str] = None, epochs: int = 5, lr: Optional[float] = None, batch_size: int = 32,
                 seed: int = 0, resolution: Optional[int] = None, max_length: int = 128,
                 text_column: str = "text", label_column: str = "label", threads: Optional[int] = None,
                 progress: bool = True) -> FinetuneResult:
    """Fine-tune ``model`` on ``data`` with ``method``; write the adapter and results.json to ``out``.

    See the module docstring for the accepted data and models. Raises ValueError / FileNotFoundError /
    NotADirectoryError with a message naming the problem and the fix before anything trains. On Ctrl-C the
    partial state (adapter and results.json with "interrupted": true) is saved and KeyboardInterrupt re-raised.
    """
    opts = _coerce(dict(data=data, model=model, out=str(out), method=method, r=r, alpha=alpha, exp_map=exp_map,
                        generator=generator, target_modules=target_modules, head=head, epochs=epochs, lr=lr,
                        batch_size=batch_size, seed=seed, resolution=resolution, max_length=max_length,
                        text_column=text_column, label_column=label_column, threads=threads, progress=progress))
    # ---------------------------------------------------------------- checks that need nothing loaded
    if not opts["data"]:
        raise ValueError(f"no data given: pass --data (an image folder, .npz, .csv or .jsonl, or "
                         f"{' / '.join(BUILTIN_DATA)}).")
    method = opts["method"]
    get_method(method)  # an unknown name: ValueError listing the methods
    if opts["exp_map"] is not None:
        if opts["exp_map"] not in ("taylor", "exact"):
            raise ValueError(f"unknown exp-map {opts['exp_map']!r}; use taylor or exact.")
        if method not in ("liera-taylor", "liera-exact", "liera-rms"):
            raise ValueError(f"--exp-map applies to the LieRA methods only, not --method {method}; use "
                             f"--method liera-rms, liera-taylor or liera-exact.")
        if method != "liera-rms":  # liera-rms keeps its scaling and takes the map
            method = f"liera-{opts['exp_map']}"
    for name, low in (("r", 1), ("epochs", 1), ("batch_size", 1), ("max_length", 2), ("resolution", 8),
                      ("threads", 1)):
        if opts[name] is not None and opts[name] < low:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {low}, got {opts[name]}.")
    for name in ("lr", "alpha"):
        if opts[name] is not None and not (math.isfinite(opts[name]) and opts[name] > 0):
            raise ValueError(f"--{name} must be a positive number, got {opts[name]}.")
    from ...generators import get_generator

    get_generator(opts["generator"])  # unknown generator: ValueError listing the known ones
    out = Path(opts["out"])
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {str(out)!r} is a file; give a directory for the adapter and results.json.")
    threads = torch.get_num_threads()
    if opts["threads"]:
        torch.set_num_threads(opts["threads"])
    try:
        return _run(opts, method, out)
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it
        _leave_process_group()


def _run(opts: dict[str, Any], method: str, out: Path) -> FinetuneResult:
    r = opts["r"]
    alpha = float(opts["alpha"] if opts["alpha"] is not None else r)

    # ---------------------------------------------------------------- data and model
    res_for_folder = opts["resolution"] or _resolution_hint(opts["model"]) or 64
    d = load_data(opts["data"], resolution=res_for_folder, text_column=opts["text_column"],
                  label_column=opts["label_column"])
    _check_task(d)
    torch.manual_seed(opts["seed"])
    m = load_model(opts["model"], d.kind, d.task.classes, opts["seed"])
    base = m.module
    head = find_head(base, opts["head"])
    targets = None
    found: list = []
    if method not in ("full", "linear-probe"):
        targets = parse_targets(opts["target_modules"]) if opts["target_modules"] else default_targets(base, head)
        found = resolve_targets(base, targets, head, r)
    elif opts["target_modules"]:
        targets = parse_targets(opts["target_modules"])
    lr = opts["lr"] if opts["lr"] is not None else (IMAGE_LRS if d.kind == "image" else TEXT_LRS)[method]

    # ---------------------------------------------------------------- inputs: the fit/accuracy "x" is an index
    task = d.task
    y_train = torch.as_tensor(np.asarray(task.train_y)).long()
    y_test = torch.as_tensor(np.asarray(task.test_y)).long()
    if d.kind == "image":
        resolution = opts["resolution"] or m.resolution or 64
        family, mean, std = m.family, m.mean, m.std
        eager = (len(task.train_y) + len(task.test_y)) * 3 * resolution ** 2 * 4 <= IMAGE_CACHE_BYTES
        images = {"train": task.train_x, "test": task.test_x}
        cached = {k: to_model_input(v, resolution, mean, std) for k, v in images.items() if len(v)} if eager else {}

        def call(model, idx, split):
            xb = cached[split][idx] if eager else to_model_input(images[split][idx.numpy()], resolution, mean, std)
            return _logits(model(pixel_values=xb) if family == "transformers" else model(xb))
    else:
        resolution = None
        tok = m.tokenizer
        enc = lambda texts: tok(list(texts), padding=True, truncation=True, max_length=opts["max_length"],  # noqa: E731
                                return_tensors="pt")
        enc_train = enc(task.train_text)
        enc_test = enc(task.test_text) if len(task.test_text) else None
        trim = getattr(tok, "padding_side", "right") == "right"

        def call(model, idx, split):
            batch = {k: v[idx] for k, v in (enc_train if split == "train" else enc_test).items()}
            if trim and "attention_mask" in batch:
                length = max(1, int(batch["attention_mask"].sum(1).max()))
                batch = {k: v[:, :length] for k, v in batch.items()}
            return _logits(model(**batch))

    with torch.no_grad():  # the model's output must match the classes before anything trains
        base.eval()
        probe = call(base, torch.arange(min(2, len(y_train))), "train")
    if probe.dim() != 2 or probe.shape[-1] != task.num_classes:
        raise ValueError(f"the model returns outputs of shape {tuple(probe.shape)} but the data have "
                         f"{task.num_classes} classes; its head must give (batch, {task.num_classes}) logits "
                         f"(a factory gets num_classes={task.num_classes}).")

    losses: list[float] = []

    def train_forward(model, idx):
        logits = call(model, idx, "train")
        losses.append(float(F.cross_entropy(logits.detach(), y_train[idx])))
        return logits

    def test_forward(model, idx):
        return call(model, idx, "test")

    options = {**opts, "method": method, "alpha": alpha, "lr": lr, "resolution": resolution, "head": head,
               "target_modules": targets}
    payload: dict[str, Any] = {
        "method": method, "model": m.name, "data": d.source, "data_kind": d.kind, "classes": list(task.classes),
        "n_train": int(len(y_train)), "n_test": int(len(y_test)), "options": options,
        "adapted_layers": len(found), "trainable_params": None, "total_params": None, "test_accuracy": None,
        "train_time_s": None, "peak_memory_mb": None, "losses": [], "interrupted": False, "saved": None,
        "note": "", "liera_version": __version__,
    }
    print(f"liera finetune: {method} on {d.source} ({d.kind}s, {len(y_train)} train / {len(y_test)} test, "
          f"{task.num_classes} classes) with {m.name}; head {head!r}"
          + (f", {len(found)} layers adapted ({targets}) at r={r}, alpha={alpha:g}" if found else "")
          + f"; {opts['epochs']} epochs at lr={lr:g}")
    out.mkdir(parents=True, exist_ok=True)
    wrapped: Optional[nn.Module] = None
    started = time.perf_counter()
    try:
        wrapped, note = _prepare(method, base, head=head, r=r, alpha=alpha, targets=targets, found=found,
                                 generator=opts["generator"], exp_map=opts["exp_map"])
        n_params = training.trainable_count(wrapped)
        payload.update(trainable_params=n_params, total_params=sum(p.numel() for p in wrapped.parameters()), note=note)
        rank, world = _distributed()
        train_module, mine = wrapped, torch.arange(len(y_train))
        if world > 1:  # torchrun: DDP reduces the adapter gradients; each rank trains on its share of the examples
            from torch.nn.parallel import DistributedDataParallel

            train_module, mine = DistributedDataParallel(wrapped), mine[rank::world]
            payload["world_size"] = world
        mem = TensorMemory([*wrapped.parameters(), *wrapped.buffers()])
        start = time.perf_counter()
        fit_losses = training.fit(train_module, mine, y_train[mine], epochs=opts["epochs"], lr=lr,
                                  batch_size=opts["batch_size"], seed=opts["seed"], desc=f"{method} lr={lr:g}",
                                  show_progress=opts["progress"] and rank == 0, forward=train_forward, memory=mem)
        elapsed = time.perf_counter() - start
        payload.update(train_time_s=round(elapsed, 3), peak_memory_mb=round(mem.peak_mb, 1), losses=fit_losses)
        if len(y_test):
            payload["test_accuracy"] = training.accuracy(wrapped, torch.arange(len(y_test)), y_test,
                                                         batch_size=max(64, opts["batch_size"]), forward=test_forward)
        else:
            payload["note"] = (payload["note"] + "; " if payload["note"] else "") + "no test examples: no accuracy"
        if rank == 0:
            payload["saved"] = _save_trained(wrapped, method, out)
            _write_results(out, payload)
    except KeyboardInterrupt:
        payload.update(interrupted=True, losses=losses, steps_done=len(losses),
                       train_time_s=round(time.perf_counter() - started, 3))
        saved = ""
        if wrapped is not None and losses:
            with contextlib.suppress(Exception):
                payload["saved"] = _save_trained(wrapped, method, out)
                saved = f" and the partly trained weights in {payload['saved']}"
        _write_results(out, payload)
        print(f"\ninterrupted after {len(losses)} step(s): kept {out / 'results.json'} (\"interrupted\": true){saved}",
              flush=True)
        raise
    acc = payload["test_accuracy"]
    if rank == 0:
        print((f"  test accuracy {acc:.4f}" if acc is not None else "  no test examples") +
              f"  trainable {payload['trainable_params']:,}  {payload['train_time_s']:.1f} s")
        print(f"wrote {payload['saved']} and {out / 'results.json'}")
    return FinetuneResult(payload, wrapped, test_forward)
