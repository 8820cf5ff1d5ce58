"""What `liera finetune` knows by name (built-in data and models, head names, file kinds) and its defaults. Learning
rates come from the method table (liera.apps.methods): the "image" rates were chosen on Fashion-MNIST-1k with
EfficientNet-Lite0, the "text" rates are common transformer values, the "lm" rates were chosen with SmolLM2-135M."""

from __future__ import annotations

from typing import Any

from ..lmtasks import LM_TASKS, SMOLLM2

BUILTIN_DATA = ("fashion-1k", "digits-1k")  # image sets
LM_DATA = tuple(LM_TASKS)  # answer-choice tasks for a causal language model
BUILTIN_MODELS = {"efficientnet-lite0": "image", "minilm": "text", SMOLLM2: "lm"}
HEAD_NAMES = ("classifier", "_fc", "fc", "head", "score")
IMAGE_SUFFIXES = (".npz",)
IMAGE_CACHE_BYTES = 512 * 2**20  # larger image sets are converted batch by batch
TEXT_SUFFIXES = (".csv", ".jsonl", ".json")

DEFAULTS: dict[str, Any] = {
    "data": None,
    "model": None,
    "out": "liera-finetune",
    "method": "liera-rms",
    "r": 8,
    "alpha": None,
    "exp_map": None,
    "generator": "lora",
    "target_modules": None,
    "head": None,
    "epochs": 5,
    "lr": None,
    "batch_size": 32,
    "seed": 0,
    "resolution": None,
    "max_length": 128,
    "text_column": "text",
    "label_column": "label",
    "threads": None,
    "progress": True,
    "train_examples": None,
    "max_steps": None,
    "prune": None,
    "precision": None,
    "quantize": None,
}
