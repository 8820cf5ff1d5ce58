"""The paper recipes under examples/ stay runnable: each ``main(["--smoke", "--out", tmp])`` builds a tiny
random-config model of the recipe's class, trains 2 steps on synthetic data, evaluates, and writes a
metrics.json with finite numbers and the adapter files. All five run in one process (the transformers and
diffusers imports are paid once)."""
import importlib.util
import json
import math
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
RECIPES = {
    "vtab1k_convnextv2": ("transformers", "test_accuracy"),
    "glue_debertav3": ("transformers", "accuracy"),
    "commonsense_llama": ("transformers", "average_accuracy"),
    "smollm2_liera": ("transformers", "test_accuracy"),
    "dreambooth_sd_unet": ("diffusers", "final_loss"),
}


def load(name):
    spec = importlib.util.spec_from_file_location(f"liera_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def numbers(value):
    """Every int/float inside a JSON value (bools excluded)."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from numbers(v)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_smoke(name, tmp_path):
    needs, headline = RECIPES[name]
    pytest.importorskip(needs)
    module = load(name)
    assert module.__doc__ and "2504.00851" in module.__doc__  # the header names the paper it targets
    assert module.main(["--smoke", "--out", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    values = list(numbers(metrics))
    assert values and all(math.isfinite(v) for v in values), metrics
    assert isinstance(metrics[headline], float) and math.isfinite(metrics[headline])
    assert metrics["trainable_params"] > 0 and metrics["steps"] == 2
    adapter = tmp_path / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["library"] == "liera"
