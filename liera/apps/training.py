"""The method arms and a small training loop shared by `liera demo`, `liera finetune` and the experiments.

Every arm of a classifier trains the same head; the arms differ only in what else trains, as the method table
(liera.apps.methods) says: nothing (linear-probe), one of liera's adapters (lora, liera-taylor, liera-exact,
liera-rms), every weight (full), or PEFT's own adapter (peft-lora, peft-dora, peft-hira) as an outside reference.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LieRAConfig
from ..model import get_liera_model
from ..targeting import find_targets
from .errors import UserError
from .memory import TensorMemory
from .methods import FULL, LIERA, PEFT, PROBE, Method, get_method
from .progress import progress


@dataclass
class ArmResult:
    method: str
    trainable_params: int
    test_accuracy: float
    train_time_s: float
    peak_memory_mb: float  # tensor memory at the peak of the first training steps (liera.apps.memory)
    lr: float
    epochs: int
    losses: list[float] = field(default_factory=list)
    note: str = ""
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def prepare_arm(
    method: str | Method,
    model: nn.Module,
    *,
    r: int,
    alpha: float,
    target_modules,
    head: str | None = None,
    generator: str = "lora",
    dropout: float = 0.0,
    full_scope: str = "all",
    keep_zeros: bool = False,
) -> tuple[nn.Module, str]:
    """Set up `model` (in place) for one method; return the module to train and a note.

    head: a module trained in full by every arm (None: no head, as for a language model's own output layer).
    full_scope: what the full arm trains, "all" parameters or only the "targets" weights (as a cost reference).
    keep_zeros: liera's arms keep the zeros of a pruned model (LieRAConfig.keep_zeros; lora becomes masked LoRA).
    """
    method = get_method(method) if isinstance(method, str) else method
    if method.family == FULL:
        if full_scope == "targets":
            for p in model.parameters():
                p.requires_grad_(False)
            cfg = method_free_config(r, target_modules, head)
            for t in find_targets(model, cfg):
                t.weight.requires_grad_(True)
        else:
            for p in model.parameters():
                p.requires_grad_(True)
        return model, ""
    if method.family == PROBE:
        if head is None:
            raise ValueError("the linear probe needs a head to train")
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.get_submodule(head).parameters():
            p.requires_grad_(True)
        return model, ""
    if method.family == PEFT:
        try:
            from .peft_arms import peft_arm
        except ImportError as exc:
            raise UserError("PEFT's arms need peft: pip install peft") from exc
        return peft_arm(model, method, head=head, r=r, alpha=alpha, target_modules=target_modules, dropout=dropout)
    assert method.family == LIERA
    cfg = method.liera_config(
        r=r,
        alpha=alpha,
        target_modules=target_modules,
        generator=generator,
        dropout=dropout,
        exclude_modules=[head] if head else None,
        modules_to_save=[head] if head else None,
        keep_zeros=keep_zeros,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*exactly zero.*")
        return get_liera_model(model, cfg), ""


def method_free_config(r: int, target_modules, head: str | None = None) -> LieRAConfig:
    """A LieRAConfig that only says which weights `target_modules` names (the head left out)."""
    return LieRAConfig(r=r, target_modules=target_modules, exclude_modules=[head] if head else None)


PROC_STAT = Path("/proc/stat")  # Linux's per-CPU time counters (user, nice, system, idle, iowait, irq, ...)
BUSY_WINDOW_S = 0.25  # how long pick_threads watches the CPUs: long enough to average a scheduler tick or two


def cpu_times(path: Path | None = None) -> tuple[int, int, int] | None:
    """(busy ticks, all ticks, CPUs) summed over the machine since boot, from /proc/stat; None where it cannot be
    read (not Linux). Busy is everything but idle and iowait (steal counts: another guest holds the core)."""
    try:
        lines = (path or PROC_STAT).read_text().splitlines()
    except OSError:
        return None
    total_line = next((ln for ln in lines if ln.startswith("cpu ")), None)
    cpus = sum(1 for ln in lines if ln.startswith("cpu") and ln[3:4].isdigit())
    if total_line is None or not cpus:
        return None
    ticks = [int(v) for v in total_line.split()[1:9]]  # guest time is already inside user time
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return sum(ticks) - idle, sum(ticks), cpus


def busy_cores(window: float = BUSY_WINDOW_S) -> float | None:
    """How many cores other processes keep busy now: the busy share of all CPU time over the next ``window``
    seconds, times the CPUs (this process sleeps meanwhile). None where /proc/stat cannot be read. A decaying
    load average would still count a job that ended a minute ago and halve a new job's speed."""
    first = cpu_times()
    if first is None:
        return None
    time.sleep(window)
    second = cpu_times()
    if second is None or second[1] <= first[1]:
        return None
    return (second[0] - first[0]) / (second[1] - first[1]) * second[2]


def pick_threads(requested: int | None = None) -> int:
    """Torch threads for a long CPU job: the requested number, else the cores other processes leave free now
    (per-CPU busy time over a quarter second from /proc/stat; where that is missing, the 1-minute load average),
    at least 1. OpenMP threads that compete with another process for the same cores thrash: a demo that takes
    minutes alone took over an hour beside another job with all cores requested."""
    if requested:
        return int(requested)
    cores = os.cpu_count() or 1
    busy_now = busy_cores()
    source = "now"
    if busy_now is None:
        source = "over the last minute"
        try:
            busy_now = os.getloadavg()[0]
        except (OSError, AttributeError):  # no load average on this platform
            busy_now = 0.0
    busy = int(busy_now + 0.5)
    chosen = max(1, cores - busy)
    if chosen < cores:
        print(
            f"(using {chosen} of {cores} CPU threads: other processes keep about {busy} busy {source}; "
            f"--threads N to choose)"
        )
    return chosen


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    desc: str = "train",
    show_progress: bool = True,
    weight_decay: float = 0.0,
    forward: Callable | None = None,
    memory: TensorMemory | None = None,
    memory_steps: int = 3,
) -> list[float]:
    """AdamW with a cosine schedule over all steps; BatchNorm statistics stay frozen (model.eval()).

    With `memory`, the first `memory_steps` steps (the optimizer state appears in the first) run under it."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(y) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps_per_epoch))
    gen = torch.Generator().manual_seed(seed)
    forward = forward or (lambda m, xb: m(xb))
    model.eval()  # frozen BN statistics: 1,000 examples are too few to re-estimate them
    losses: list[float] = []
    bar = progress(range(epochs * steps_per_epoch), desc=desc, enabled=show_progress)
    it = iter(bar)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), batch_size):
            idx = order[start : start + batch_size]
            with memory if memory is not None and len(losses) < memory_steps else contextlib.nullcontext():
                loss = F.cross_entropy(forward(model, x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
            losses.append(loss.item())
            next(it, None)
            if hasattr(bar, "set_postfix") and len(losses) % 5 == 0:
                bar.set_postfix(loss=f"{sum(losses[-5:]) / 5:.3f}")
    if hasattr(bar, "close"):
        bar.close()
    return losses


@torch.no_grad()
def accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256, forward: Callable | None = None
) -> float:
    forward = forward or (lambda m, xb: m(xb))
    model.eval()
    correct = 0
    for start in range(0, len(y), batch_size):
        correct += int(
            (forward(model, x[start : start + batch_size]).argmax(-1) == y[start : start + batch_size]).sum()
        )
    return correct / max(1, len(y))


def run_arm(
    method: str,
    make_model: Callable[[], nn.Module],
    data: tuple,
    *,
    head: str,
    r: int,
    alpha: float,
    target_modules,
    lr: float,
    epochs: int,
    batch_size: int,
    seed: int,
    generator: str = "lora",
    show_progress: bool = True,
    forward: Callable | None = None,
) -> tuple[ArmResult, nn.Module]:
    """Build, train and test one arm; returns its result and the trained model."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model, note = prepare_arm(
        method, make_model(), head=head, r=r, alpha=alpha, target_modules=target_modules, generator=generator
    )
    n_params = trainable_count(model)
    mem = TensorMemory([*model.parameters(), *model.buffers()])
    start = time.perf_counter()
    losses = fit(
        model,
        x_train,
        y_train,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        desc=f"{method:>12s} lr={lr:g}",
        show_progress=show_progress,
        forward=forward,
        memory=mem,
    )
    elapsed = time.perf_counter() - start
    acc = accuracy(model, x_test, y_test, forward=forward)
    return ArmResult(method, n_params, acc, elapsed, mem.peak_mb, lr, epochs, losses, note, seed), model
