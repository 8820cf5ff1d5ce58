"""liera: LieRA, Lie-group parameter-efficient fine-tuning for weight tensors of any order.

W_eff = W * exp(D) (exact) or W + W * D (Taylor), with D = s * reshape(B @ A, W.shape) from a LoRA-style
generator (or any registered generator). See README.md and docs/.
"""
from . import group
from .config import LieRAConfig
from .generators import GENERATORS, Generator, get_generator, register_generator
from .model import LieRAModel, get_liera_model
from .targeting import Target, find_targets
from .version import __version__

__all__ = ["LieRAConfig", "LieRAModel", "get_liera_model", "find_targets", "Target", "Generator",
           "register_generator", "get_generator", "GENERATORS", "group", "export_peft", "import_peft", "__version__"]


def __getattr__(name: str):
    """export_peft / import_peft (PEFT HiRA files) live in liera.integrations.hira, an integration: the core never
    imports one, so they are looked up on first use."""
    if name in ("export_peft", "import_peft"):
        from .integrations import hira

        return getattr(hira, name)
    raise AttributeError(f"module 'liera' has no attribute {name!r}")
