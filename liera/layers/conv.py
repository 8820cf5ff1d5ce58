"""nn.Conv1d/2d/3d and nn.ConvTranspose1d/2d/3d, any stride, padding, dilation and groups.

The module's own forward runs (padding_mode, static "same" padding of subclasses, output_size of
transposed convs all stay the module's business); only the final F.conv* call is intercepted. Backward
uses aten's convolution_backward, except for the weight gradient of a depthwise convolution on CPU,
which is formed as one grouped convolution with the batch folded into the groups (PyTorch's CPU
kernel for that gradient is several times slower than the forward).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Binder, LayerKind, WeightLayout, WeightOp, bind_arguments

_CONV = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_CONV_T = {F.conv_transpose1d: 1, F.conv_transpose2d: 2, F.conv_transpose3d: 3}
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _tuple(value: int | tuple[int, ...] | list[int], n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * n


class ConvOp(WeightOp):
    def __init__(
        self,
        x: Tensor,
        bias: Tensor | None,
        n: int,
        transposed: bool,
        stride: tuple[int, ...],
        padding: tuple[int, ...],
        dilation: tuple[int, ...],
        groups: int,
        output_padding: tuple[int, ...],
    ) -> None:
        self.input, self.bias, self.n, self.transposed = x, bias, n, transposed
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.groups, self.output_padding = groups, output_padding

    def forward(self, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        return torch.ops.aten.convolution(
            x, w, bias, self.stride, self.padding, self.dilation, self.transposed, self.output_padding, self.groups
        )

    def backward(
        self, grad: Tensor, x: Tensor, w: Tensor, need_x: bool, need_w: bool, need_bias: bool
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        fast_w = need_w and self._depthwise_cpu(x, w)
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad,
            x,
            w,
            [w.shape[1] * self.groups if self.transposed else w.shape[0]] if need_bias else None,
            self.stride,
            self.padding,
            self.dilation,
            self.transposed,
            self.output_padding,
            self.groups,
            [need_x, need_w and not fast_w, need_bias],
        )
        if fast_w:
            gw = depthwise_weight_grad(grad, x, w.shape, self.stride, self.padding, self.dilation)
        return gx, gw, gb

    def _depthwise_cpu(self, x: Tensor, w: Tensor) -> bool:
        return (
            not self.transposed
            and x.device.type == "cpu"
            and self.groups > 1
            and self.groups == x.shape[1] == w.shape[0]
            and w.shape[1] == 1
        )


def depthwise_weight_grad(
    grad: Tensor,
    x: Tensor,
    weight_shape: torch.Size | tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
) -> Tensor:
    """dL/dW of a depthwise conv as one grouped conv over (batch x channels) groups.

    dW[c, 0, a] = sum_n sum_i g[n, c, i] * x_pad[n, c, i * stride + a * dilation]: a correlation of x with
    g where the roles of stride and dilation swap. Folding the batch into the groups makes it one call.
    """
    n_batch, channels = x.shape[:2]
    spatial = weight_shape[2:]
    nd = len(spatial)
    out = _CONV_FN[nd](
        x.reshape(1, n_batch * channels, *x.shape[2:]),
        grad.reshape(n_batch * channels, 1, *grad.shape[2:]),
        None,
        dilation,
        padding,
        stride,
        n_batch * channels,
    )
    out = out[(0, slice(None)) + tuple(slice(0, k) for k in spatial)]
    return out.reshape(n_batch, channels, *spatial).sum(0).unsqueeze(1)


def _padding_numbers(
    padding: str | int | tuple[int, ...], w: Tensor, dilation: tuple[int, ...], n: int
) -> tuple[int, ...] | None:
    """Numeric padding for aten; None when 'same' needs asymmetric padding (then the generic path runs)."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0,) * n
        pads = []
        for k, d in zip(w.shape[2:], dilation, strict=True):
            total = d * (k - 1)
            if total % 2:
                return None
            pads.append(total // 2)
        return tuple(pads)
    return _tuple(padding, n)


def _bind_conv(func: Callable[..., Tensor]) -> Binder:
    n = _CONV[func]

    def bind(args: tuple, kwargs: dict[str, Any], weight: Tensor) -> ConvOp | None:
        a = bind_arguments(
            ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
            args,
            kwargs,
            {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1},
        )
        if a["weight"] is not weight or a["input"].dim() != n + 2:
            return None
        dilation = _tuple(a["dilation"], n)
        padding = _padding_numbers(a["padding"], weight, dilation, n)
        if padding is None:
            return None
        return ConvOp(
            a["input"], a["bias"], n, False, _tuple(a["stride"], n), padding, dilation, int(a["groups"]), (0,) * n
        )

    return bind


def _bind_conv_transpose(func: Callable[..., Tensor]) -> Binder:
    n = _CONV_T[func]

    def bind(args: tuple, kwargs: dict[str, Any], weight: Tensor) -> ConvOp | None:
        a = bind_arguments(
            ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"),
            args,
            kwargs,
            {"bias": None, "stride": 1, "padding": 0, "output_padding": 0, "groups": 1, "dilation": 1},
        )
        if a["weight"] is not weight or a["input"].dim() != n + 2:
            return None
        return ConvOp(
            a["input"],
            a["bias"],
            n,
            True,
            _tuple(a["stride"], n),
            _tuple(a["padding"], n),
            _tuple(a["dilation"], n),
            int(a["groups"]),
            _tuple(a["output_padding"], n),
        )

    return bind


KIND = LayerKind(
    "Conv1d/2d/3d, ConvTranspose1d/2d/3d",
    "conv",
    lambda m: isinstance(m, nn.modules.conv._ConvNd),
    {**{f: _bind_conv(f) for f in _CONV}, **{f: _bind_conv_transpose(f) for f in _CONV_T}},
    layout=WeightLayout.KERNEL,
)
