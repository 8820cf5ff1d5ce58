"""liera: LieRA, Lie-group parameter-efficient fine-tuning for weight tensors of any order.

W_eff = W * exp(D) (exact) or W + W * D (Taylor), with D = s * reshape(B @ A, W.shape) from a LoRA-style
generator (or any registered generator). See README.md and docs/.
"""
__version__ = "0.1.0"

from .config import LieRAConfig
from .generators import GENERATORS, Generator, get_generator, register_generator
from .model import LieRAModel, get_liera_model
from . import group

__all__ = ["LieRAConfig", "LieRAModel", "get_liera_model", "Generator", "register_generator", "get_generator",
           "GENERATORS", "group", "export_peft", "import_peft", "__version__"]


def __getattr__(name: str):
    """export_peft / import_peft live in liera.integrations.peft; imported on first use so that the core
    never imports an integration."""
    if name in ("export_peft", "import_peft"):
        from .integrations import peft

        return getattr(peft, name)
    raise AttributeError(f"module 'liera' has no attribute {name!r}")
