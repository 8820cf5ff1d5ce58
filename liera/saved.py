"""modules_to_save on liera's own API: each adapter trains its own copy of the module's parameters, as PEFT's
ModulesToSaveWrapper does, so the original stays the base model's (``disable_adapter()`` runs it, and so does an
adapter without a copy of that module).

The module stays where it is and keeps its state-dict keys. What it holds in its parameter slots is swapped
between forwards, never during one: the active adapter's copy while that adapter is active and not disabled,
the original otherwise. Both live in a ``SavedCopies`` child (``liera_modules_to_save``), so ``.to()``, the
state dict and the optimizer see them like any other parameter. An adapter on a weight of the same module
(a module both adapted and saved) then acts on the copy, as it acted on the trained module before.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from torch import nn

from .targeting import MODULES_TO_SAVE
from .weight import ADAPTER_PREFIX

HOLDER = ADAPTER_PREFIX + "modules_to_save"  # the SavedCopies child of a module trained in full
_SEP = ":"  # stands for "." in a parameter path inside a ParameterDict ("0.weight" -> "0:weight")


def own_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """The module's parameters (its children's included) by dotted path, liera's own adapter tensors left out."""
    return {
        n: p
        for n, p in module.named_parameters(remove_duplicate=False)
        if not any(part.startswith(ADAPTER_PREFIX) for part in n.split("."))
    }


def _slot(module: nn.Module, path: str) -> tuple[nn.Module, str]:
    owner, _, leaf = path.rpartition(".")
    return (module.get_submodule(owner) if owner else module), leaf


class SavedCopies(nn.Module):
    """The original parameters of one module trained in full, one trained copy per adapter, and which is in place."""

    original: nn.ParameterDict
    copies: nn.ModuleDict  # adapter name -> nn.ParameterDict

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original = nn.ParameterDict({n.replace(".", _SEP): p for n, p in own_parameters(module).items()})
        self.copies = nn.ModuleDict()
        self.in_place: str | None = None  # the adapter whose copy fills the module's slots (None: the original)

    def names(self) -> list[str]:
        return list(self.copies.keys())

    def copy_of(self, adapter: str) -> dict[str, nn.Parameter]:
        """Parameter path -> this adapter's copy."""
        return {k.replace(_SEP, "."): p for k, p in self._copy(adapter).items()}

    def _copy(self, adapter: str) -> nn.ParameterDict:
        copy = self.copies[adapter]
        assert isinstance(copy, nn.ParameterDict)  # only add_copies fills self.copies
        return copy

    def place(self, module: nn.Module, adapter: str | None) -> None:
        """Put this adapter's copy (None: the original) into the module's parameter slots."""
        if adapter == self.in_place:
            return
        source = self.original if adapter is None else self._copy(adapter)
        for key, p in source.items():
            owner, leaf = _slot(module, key.replace(_SEP, "."))
            owner._parameters[leaf] = p
        self.in_place = adapter


def make_copies(module: nn.Module) -> dict[str, nn.Parameter]:
    """A fresh copy of the module's original parameters (the base model's, whatever copy is in place now)."""
    holder = holder_of(module)
    source = own_parameters(module) if holder is None else {k.replace(_SEP, "."): p for k, p in holder.original.items()}
    return {n: nn.Parameter(p.detach().clone(), requires_grad=False) for n, p in source.items()}


def holder_of(module: nn.Module) -> SavedCopies | None:
    holder = module._modules.get(HOLDER)
    return holder if isinstance(holder, SavedCopies) else None


def add_copies(module: nn.Module, adapter: str, copies: Mapping[str, nn.Parameter]) -> None:
    """Register an adapter's copy (from make_copies) on the module; the original stays in place."""
    holder = holder_of(module)
    if holder is None:
        holder = SavedCopies(module)
        module.add_module(HOLDER, holder)
    holder.copies[adapter] = nn.ParameterDict({n.replace(".", _SEP): p for n, p in copies.items()})


def remove_copies(module: nn.Module, adapter: str) -> None:
    """Drop an adapter's copy (the original goes back in place if the copy was); the holder goes with the last."""
    holder = holder_of(module)
    if holder is None or adapter not in holder.copies:
        return
    if holder.in_place == adapter:
        holder.place(module, None)
    del holder.copies[adapter]
    if not holder.copies:
        delattr(module, HOLDER)


def release(module: nn.Module) -> None:
    """Drop the holder and keep what is in place (the active adapter's copy, as PEFT's unload does)."""
    if holder_of(module) is not None:
        delattr(module, HOLDER)


def saved_holders(model: nn.Module) -> Iterator[tuple[str, nn.Module, SavedCopies]]:
    """(module path, module, its SavedCopies) for every module with trained copies."""
    for path, module in model.named_modules():
        holder = holder_of(module)
        if holder is not None and f".{ADAPTER_PREFIX}" not in f".{path}":
            yield path, module, holder


def file_keys(path: str, copies: Mapping[str, nn.Parameter]) -> dict[str, nn.Parameter]:
    """The adapter-file keys of one module's copies: modules_to_save.<path>.<parameter path> (as before copies)."""
    return {f"{MODULES_TO_SAVE}.{path}.{n}": p for n, p in copies.items()}


def choose(holders: list[SavedCopies], active: list[str], disabled: bool) -> list[str | None]:
    """Which copy each holder puts in place: the one active adapter that has a copy there, else the original.
    Raises (before anything changes) when two active adapters both have a copy of one module."""
    out: list[str | None] = []
    for holder in holders:
        mine = [n for n in active if n in holder.copies]
        if len(mine) > 1:
            raise ValueError(
                f"adapters {mine} each train their own copy of the same module (modules_to_save); only "
                f"one of them can be active at a time. Activate them one by one."
            )
        out.append(None if disabled or not mine else mine[0])
    return out
