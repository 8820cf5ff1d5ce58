"""Small seeded models, one per layer kind liera supports, with an input and the config targets."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

# the numerical tests run on every device torch sees; CUDA ones skip cleanly on a machine without a GPU
DEVICES = [pytest.param("cpu"),
           pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


class StaticSamePadConv2d(nn.Conv2d):
    """Like EfficientNet's Conv2dStaticSamePadding: pads in its own forward, then calls F.conv2d."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pad = nn.ZeroPad2d((1, 2, 1, 2))

    def forward(self, x):
        return F.conv2d(self.pad(x), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Experts(nn.Module):
    """A mixture-of-experts style 3-D parameter used through einsum."""

    def __init__(self, n=3, d_in=4, d_out=5):
        super().__init__()
        self.experts = nn.Parameter(torch.randn(n, d_in, d_out) * 0.5 + 1.0)

    def forward(self, x):  # x: (batch, n, d_in)
        return torch.einsum("bni,nio->bno", x, self.experts)


class Wrap(nn.Module):
    """Puts a layer under the name 'layer' and adds a head so outputs are plain tensors."""

    def __init__(self, layer, post=None):
        super().__init__()
        self.layer = layer
        self.post = post

    def forward(self, x):
        y = self.layer(x)
        if isinstance(y, tuple):
            y = y[0]
        return y if self.post is None else self.post(y)


class MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


@dataclass
class Case:
    name: str
    make: Callable[[], nn.Module]
    make_input: Callable[[], torch.Tensor]
    targets: dict = field(default_factory=lambda: {"target_modules": ["layer"]})
    weight_path: tuple = ("layer", "weight")  # owner path, parameter name


def _gpt2_conv1d():
    from transformers.pytorch_utils import Conv1D

    return Wrap(Conv1D(6, 5))


def cases(include_transformers: bool = True) -> list[Case]:
    out = [
        Case("linear", lambda: Wrap(nn.Linear(5, 4)), lambda: torch.randn(3, 2, 5)),
        Case("conv1d", lambda: Wrap(nn.Conv1d(4, 6, 3, stride=2, padding=1)), lambda: torch.randn(2, 4, 9)),
        Case("conv2d_strided_dilated_grouped", lambda: Wrap(nn.Conv2d(4, 6, 3, stride=2, dilation=2, groups=2, padding=2)),
             lambda: torch.randn(2, 4, 9, 9)),
        Case("conv2d_depthwise", lambda: Wrap(nn.Conv2d(4, 4, 3, groups=4, padding=1, stride=2)), lambda: torch.randn(2, 4, 7, 7)),
        Case("conv2d_same_reflect", lambda: Wrap(nn.Conv2d(3, 4, 3, padding="same", padding_mode="reflect")),
             lambda: torch.randn(2, 3, 6, 6)),
        Case("conv2d_same_even_kernel", lambda: Wrap(nn.Conv2d(3, 4, 2, padding="same")), lambda: torch.randn(2, 3, 5, 5)),
        Case("conv2d_static_same_subclass", lambda: Wrap(StaticSamePadConv2d(3, 4, 4, stride=2)), lambda: torch.randn(2, 3, 7, 7)),
        Case("conv3d", lambda: Wrap(nn.Conv3d(2, 3, (2, 3, 3), padding=1)), lambda: torch.randn(1, 2, 4, 5, 5)),
        Case("conv_transpose2d", lambda: Wrap(nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1)),
             lambda: torch.randn(2, 4, 4, 4)),
        Case("conv_transpose1d_grouped", lambda: Wrap(nn.ConvTranspose1d(4, 6, 3, stride=2, groups=2)), lambda: torch.randn(2, 4, 5)),
        Case("conv_transpose3d", lambda: Wrap(nn.ConvTranspose3d(2, 2, 2, stride=2)), lambda: torch.randn(1, 2, 2, 3, 3)),
        Case("embedding", lambda: Wrap(nn.Embedding(11, 4)), lambda: torch.randint(0, 11, (3, 5))),
        Case("mha_in_proj_weight", MHA, lambda: torch.randn(2, 3, 8),
             {"target_parameters": ["attn.in_proj_weight"]}, ("attn", "in_proj_weight")),
        Case("experts_3d_parameter", lambda: Wrap(Experts()), lambda: torch.randn(2, 3, 4),
             {"target_parameters": ["experts"]}, ("layer", "experts")),
    ]
    if include_transformers:
        try:
            import transformers  # noqa: F401

            out.append(Case("gpt2_conv1d", _gpt2_conv1d, lambda: torch.randn(3, 3, 5)))
        except ImportError:
            pass
    return out


def get_weight(model: nn.Module, case: Case) -> nn.Parameter:
    owner = model.get_submodule(case.weight_path[0])
    return owner._parameters[case.weight_path[1]]


def gradcheck_trainable(lm, x) -> bool:
    """torch.autograd.gradcheck of lm(x) w.r.t. every trainable tensor (and x when it is floating), float64."""
    from torch.func import functional_call

    names = [n for n, p in lm.named_parameters() if p.requires_grad]
    params = [p.detach().clone().requires_grad_(True) for n, p in lm.named_parameters() if p.requires_grad]
    inputs = list(params)
    if x.is_floating_point():
        x = x.double().requires_grad_(True)
        inputs.append(x)

    def f(*tensors):
        xx = tensors[-1] if x.is_floating_point() else x
        return functional_call(lm, dict(zip(names, tensors[:len(names)])), (xx,))

    return torch.autograd.gradcheck(f, tuple(inputs), eps=1e-6, atol=1e-5, rtol=1e-4)


def perturb(liera_model, std: float = 0.3, seed: int = 1) -> None:
    """Move every adapter away from the identity so that tests cannot pass vacuously."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, adapted in liera_model.adapted_weights():
            for gen in adapted.values():
                for p in gen.parameters():
                    p.add_((torch.randn(p.shape, generator=g, dtype=p.dtype) * std).to(p.device))


class EmbedProject(nn.Module):
    """Embedding followed by a GPT-2 Conv1D projection."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(13, 6)
        self.proj = Conv1D(5, 6)

    def forward(self, idx):
        return self.proj(self.emb(idx))


def lifecycle_models() -> list[Case]:
    """Small multi-layer models for the lifecycle property matrix."""
    out = [
        Case("mlp", lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)), lambda: torch.randn(5, 6),
             {"target_modules": ["0", "2"]}),
        Case("conv1d", lambda: nn.Sequential(nn.Conv1d(3, 4, 3), nn.Tanh(), nn.Conv1d(4, 4, 3, padding=1)),
             lambda: torch.randn(2, 3, 10), {"target_modules": "all-conv"}),
        Case("conv2d", lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Conv2d(4, 4, 3, stride=2)),
             lambda: torch.randn(2, 3, 9, 9), {"target_modules": "all-conv"}),
        Case("depthwise_conv2d", lambda: nn.Sequential(nn.Conv2d(4, 4, 3, groups=4, padding=1), nn.Conv2d(4, 6, 1)),
             lambda: torch.randn(2, 4, 7, 7), {"target_modules": "all-conv"}),
        Case("grouped_conv2d", lambda: nn.Sequential(nn.Conv2d(4, 6, 3, groups=2, dilation=2)),
             lambda: torch.randn(2, 4, 9, 9), {"target_modules": ["0"]}),
        Case("conv3d", lambda: nn.Sequential(nn.Conv3d(2, 3, 2), nn.Tanh(), nn.Conv3d(3, 3, 2)),
             lambda: torch.randn(1, 2, 5, 5, 5), {"target_modules": "all-conv"}),
        Case("conv_transpose2d", lambda: nn.Sequential(nn.ConvTranspose2d(3, 4, 3, stride=2)),
             lambda: torch.randn(2, 3, 4, 4), {"target_modules": ["0"]}),
        Case("mha_target_parameter", MHA, lambda: torch.randn(2, 3, 8), {"target_parameters": ["in_proj_weight"]}),
    ]
    try:
        import transformers  # noqa: F401

        out.append(Case("embedding_gpt2_conv1d", EmbedProject, lambda: torch.randint(0, 13, (2, 7)),
                        {"target_modules": ["emb", "proj"]}))
    except ImportError:
        pass
    return out
