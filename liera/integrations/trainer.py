"""Hugging Face Trainer integration.

A LieRAModel trains with ``transformers.Trainer`` unchanged: only the adapter tensors require grad, so
only they reach the optimizer. Two small pieces make the *files* right as well:

* ``LieRATrainer``: a Trainer whose ``save_model`` / checkpoints write the liera adapter files
  (adapter_config.json + adapter_model.safetensors) instead of the whole model, and that reloads them
  when resuming or loading the best checkpoint;
* ``LieRASaveCallback``: for a plain Trainer, writes the adapter files into every checkpoint folder.
"""

from __future__ import annotations

import os

from .. import io
from ..model import LieRAModel


def _unwrap(model):
    while hasattr(model, "module") and not isinstance(model, LieRAModel):  # DDP / accelerate wrappers
        model = model.module
    return getattr(model, "_orig_mod", model)  # torch.compile


try:
    from transformers import Trainer, TrainerCallback
    from transformers.utils import find_labels

    HAVE_TRANSFORMERS = True
except ImportError:  # transformers is optional: then this module defines no classes
    HAVE_TRANSFORMERS = False


if HAVE_TRANSFORMERS:

    class LieRATrainer(Trainer):
        """transformers.Trainer that saves and loads liera adapter files (and reads label names from the base
        model's class, as it does for PEFT models)."""

        def __init__(self, model=None, args=None, *pargs, **kwargs):
            super().__init__(model, args, *pargs, **kwargs)
            base = _unwrap(self.model)
            if isinstance(base, LieRAModel) and not self.args.label_names:
                self.label_names = find_labels(type(base.base_model))

        def _save(self, output_dir: str | None = None, state_dict=None) -> None:
            model = _unwrap(self.model)
            if not isinstance(model, LieRAModel):
                return super()._save(output_dir, state_dict)
            output_dir = output_dir or self.args.output_dir
            assert output_dir is not None  # TrainingArguments always has an output_dir
            model.save_pretrained(output_dir, is_main_process=self.args.should_save)
            if self.args.should_save and self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
            target = _unwrap(model or self.model)
            if isinstance(target, LieRAModel) and os.path.isfile(
                os.path.join(resume_from_checkpoint, "adapter_config.json")
            ):
                _, tensors = io.read_adapter_files(resume_from_checkpoint)
                target.set_adapter_state_dict(tensors)
                return
            return super()._load_from_checkpoint(resume_from_checkpoint, model)

        def _load_best_model(self) -> None:
            best = self.state.best_model_checkpoint
            if best and isinstance(_unwrap(self.model), LieRAModel):
                self._load_from_checkpoint(best)
                return
            return super()._load_best_model()

    class LieRASaveCallback(TrainerCallback):
        """Writes the liera adapter files into each checkpoint folder of a plain Trainer."""

        def on_save(self, args, state, control, model=None, **kwargs):
            model = _unwrap(model)
            if isinstance(model, LieRAModel) and state.is_world_process_zero:
                folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
                model.save_pretrained(folder)
            return control
