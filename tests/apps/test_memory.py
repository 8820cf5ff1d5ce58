"""liera.apps.memory.TensorMemory counts tensor bytes exactly: checked against sizes known in closed form."""
import torch
from torch import nn

from liera.apps.memory import TensorMemory

MB = 2 ** 20


def test_counts_new_tensors_once_and_subtracts_freed_ones():
    mem = TensorMemory()
    with mem:
        a = torch.zeros(256, 1024)  # 1 MB
        b = a + 1  # 1 MB
        view = b[:10]  # a view shares storage: nothing new
        a.add_(1)  # in place: nothing new
        assert mem.live_bytes == 2 * MB
        del b
        assert mem.live_bytes == 2 * MB  # the view keeps the storage alive
        del view
        assert mem.live_bytes == 1 * MB
    assert mem.peak_bytes == 2 * MB
    assert mem.peak_mb == 2.0


def test_adamw_step_holds_gradient_and_two_moments():
    torch.manual_seed(0)
    layer = nn.Linear(512, 512, bias=False)  # 1 MB of weight
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3, foreach=False)
    x = torch.randn(8, 512)
    mem = TensorMemory(layer.parameters())
    assert mem.static_bytes == 1 * MB
    with mem:
        for _ in range(2):
            loss = layer(x).square().sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        del loss
        # after the steps: the gradient and AdamW's two moments (plus a scalar step count)
        assert 3 * MB <= mem.live_bytes < 3 * MB + 1024
    assert mem.peak_bytes >= 3 * MB
    # the parameter itself is static, in-place updates of it do not count again
    assert mem.peak_mb >= 4.0


def test_frozen_model_keeps_no_gradient_memory():
    layer = nn.Linear(512, 512).requires_grad_(False)
    mem = TensorMemory([*layer.parameters()])
    with mem:
        out = layer(torch.randn(8, 512))
        del out
    assert mem.live_bytes == 0  # input and output were freed; no gradient, no saved activation
    assert mem.peak_bytes == 2 * 8 * 512 * 4  # input and output at once


def test_views_of_tensors_made_before_the_context_are_not_new_memory():
    before = torch.zeros(256, 1024)  # 1 MB, made outside
    mem = TensorMemory()
    with mem:
        view = before.view(-1)[:10]
        again = before.reshape(1024, 256)
        fresh = before + 1
        assert mem.live_bytes == 1 * MB  # only `fresh`
    del view, again, fresh
    assert mem.live_bytes == 0
