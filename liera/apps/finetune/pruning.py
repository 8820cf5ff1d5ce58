"""`liera finetune --prune SPEC`: prune the base model before training (liera.apps.prune), train the adapter with
keep_zeros=True so that the merged model keeps every zero, and record the sparsity before and after in results.json.

The pruned weights are the weights the adapter targets (the head is left dense). Wanda calibrates on the first
training examples (``CALIBRATION_EXAMPLES``; language-model prompts one at a time, so no padding enters the norms).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, overload

import torch
from torch import nn

from ..methods import LIERA, Method
from ..prune import PruneResult, PruneSpec, deployed_sparsity, parse_prune, prune_model

CALIBRATION_EXAMPLES = 64
LLAMA_BLOCK = r".*\.layers\.\d+\."  # one Wanda pass per decoder block, as the reference code does


@overload
def check_prune(text: str, method: Method) -> PruneSpec: ...
@overload
def check_prune(text: None, method: Method) -> None: ...
def check_prune(text: str | None, method: Method) -> PruneSpec | None:
    """The parsed --prune (None without it); an error that names the fix for a method that would fill the zeros."""
    if text is None:
        return None
    spec = parse_prune(text)
    if method.family != LIERA:
        raise ValueError(
            f"--prune keeps the zeros only with liera's adapters (keep_zeros); --method {method.name} "
            f"would fill them when merged. Use liera-rms, liera-taylor, liera-exact or lora (trained as "
            f"the masked W + D * (W != 0))."
        )
    return spec


def summary(result: PruneResult) -> dict[str, Any]:
    """What results.json records of the pruning step."""
    return {
        "spec": str(result.spec),
        "layers": len(result.rows),
        "sparsity": round(result.fraction, 6),
        "skipped": result.skipped,
        "seconds": round(result.seconds, 1),
    }


def prune_classifier(
    model: nn.Module,
    spec: PruneSpec,
    targets,
    head: str | None,
    call: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    n_train: int,
) -> dict[str, Any]:
    """Prune a classifier's target weights; Wanda calibrates on up to CALIBRATION_EXAMPLES training examples."""
    idx = torch.arange(min(n_train, CALIBRATION_EXAMPLES))
    batches = [idx[i : i + 16] for i in range(0, len(idx), 16)]
    result = prune_model(
        model,
        spec,
        target_modules=targets,
        exclude_modules=[head] if head else None,
        calibration=batches if spec.method == "wanda" else None,
        run=call,
    )
    return report(result)


def prune_causal_lm(model: nn.Module, spec: PruneSpec, targets, prompts: list[list[int]]) -> dict[str, Any]:
    """Prune a causal LM's target projections, Wanda calibrating on training prompts one at a time."""
    batches = [torch.tensor([p]) for p in prompts[:CALIBRATION_EXAMPLES]]
    result = prune_model(
        model,
        spec,
        target_modules=list(targets),
        calibration=batches if spec.method == "wanda" else None,
        run=lambda m, ids: m(input_ids=ids, use_cache=False),
        stage_pattern=LLAMA_BLOCK,
    )
    return report(result)


def report(result: PruneResult) -> dict[str, Any]:
    print(
        f"  pruned {len(result.rows)} weights with {result.spec}: {100 * result.fraction:.2f}% zeros"
        + (f" ({len(result.skipped)} left dense: no whole groups)" if result.skipped else "")
        + f" in {result.seconds:.1f} s"
    )
    return summary(result)


def deployed(model: nn.Module) -> dict[str, Any]:
    """The sparsity the merged model will have (the adapter's effective weights), for results.json."""
    rows = deployed_sparsity(model)
    zeros, total = sum(r.zeros for r in rows), sum(r.numel for r in rows)
    return {
        "sparsity": round(zeros / max(total, 1), 6),
        "layers_2_4_valid": sum(1 for r in rows if r.nm.get("2:4")),
        "layers": len(rows),
    }
