"""What a `liera finetune` run leaves behind: the trained adapter (or tensors), results.json, and on Ctrl-C what was
trained so far. Shared by the classifier run and the language-model run."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, cast

from safetensors.torch import save_file
from torch import nn

from ...io import atomic_write
from ..methods import Method

RESULTS = "results.json"


class _SavesPretrained(Protocol):
    def save_pretrained(self, save_directory: str) -> None: ...


@dataclass
class FinetuneResult:
    results: dict
    model: nn.Module = field(repr=False)
    forward: Callable = field(repr=False)


def save_trained(model: nn.Module, method: Method, out: Path) -> str:
    """An adapter folder for adapter methods (liera's or PEFT's format); the trained tensors otherwise."""
    if method.adapts:
        target = out / "adapter"
        if target.exists() and not target.is_dir():
            raise NotADirectoryError(f"{str(target)!r} is a file; remove it or pick another --out.")
        # an adapter method's model is liera's LieRAModel or PEFT's PeftModel (training.prepare_arm): both save
        cast(_SavesPretrained, model).save_pretrained(str(target))
        return str(target)
    tensors = {n: p.detach().to("cpu").clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    target = out / "trainable.safetensors"
    atomic_write(
        target,
        lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", "library": "liera", "method": method.name}),
    )
    return str(target)


def write_results(out: Path, payload: dict) -> None:
    text = json.dumps(payload, indent=2, default=str)
    atomic_write(out / RESULTS, lambda tmp: Path(tmp).write_text(text))


def keep_interrupted(
    out: Path, payload: dict, model: nn.Module | None, method: Method, losses: list, started: float
) -> None:
    """Ctrl-C: results.json with "interrupted": true and, when something trained, the partly trained weights."""
    payload.update(
        interrupted=True, losses=losses, steps_done=len(losses), train_time_s=round(time.perf_counter() - started, 3)
    )
    saved = ""
    if model is not None and losses:
        with contextlib.suppress(Exception):
            payload["saved"] = save_trained(model, method, out)
            saved = f" and the partly trained weights in {payload['saved']}"
    write_results(out, payload)
    print(f'\ninterrupted after {len(losses)} step(s): kept {out / RESULTS} ("interrupted": true){saved}', flush=True)
