"""Peak tensor memory of a few training steps, counted exactly from the tensors themselves.

Process RSS is a poor measure on CPU: freed memory stays with the allocator, so an arm that runs after a
bigger one shows no rise at all. This tracker sees every tensor an operator creates (a dispatch mode sits
below autograd, so it also sees the backward pass and the optimizer), adds its storage bytes once, and
subtracts them when the storage is freed. Parameters and buffers of the given module are counted as the
static part. It costs a Python call per operator, so track a few steps, not a whole run.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorMemory(TorchDispatchMode):
    """Use as a context manager around training steps; read `peak_mb` (static + peak of live new tensors).

    `static_mb` is the storage of `tensors` (typically the module's parameters and buffers) at entry;
    gradients, optimizer state, activations and temporaries are counted when they are created.
    """

    def __init__(self, tensors: Iterable[torch.Tensor] | None = None, device: str | None = None) -> None:
        super().__init__()
        self.device = device
        self._seen: dict[int, int] = {}
        self.static_bytes = 0
        for t in tensors or ():
            self.static_bytes += self._add(t, static=True)
        self.live_bytes = 0
        self.peak_bytes = 0

    def _storage(self, t) -> torch.UntypedStorage | None:
        """The storage behind `t`, or None (not a tensor, another device, a subclass or meta tensor)."""
        if not isinstance(t, torch.Tensor) or (self.device and t.device.type != self.device):
            return None
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return None
        return storage if storage.nbytes() else None

    def _add(self, t: torch.Tensor, static: bool = False) -> int:
        storage = self._storage(t)
        if storage is None or storage.data_ptr() in self._seen:
            return 0
        key, size = storage.data_ptr(), storage.nbytes()
        self._seen[key] = size
        if not static:
            self.live_bytes += size
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            weakref.finalize(storage, self._free, key, size)
        return size

    def _free(self, key: int, size: int) -> None:
        if self._seen.pop(key, None) is not None:
            self.live_bytes -= size

    def _note_existing(self, t: torch.Tensor) -> None:
        """A storage first met as an op's input was made before the context: not new memory (its views
        made inside must not count it either). Forgotten when freed, since its address may be reused."""
        storage = self._storage(t)
        if storage is not None and storage.data_ptr() not in self._seen:
            self._seen[storage.data_ptr()] = 0
            weakref.finalize(storage, self._free, storage.data_ptr(), 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_leaves((args, kwargs)):
            self._note_existing(t)
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            self._add(t)
        return out

    @property
    def peak_mb(self) -> float:
        return (self.static_bytes + self.peak_bytes) / 2**20

    @property
    def static_mb(self) -> float:
        return self.static_bytes / 2**20
