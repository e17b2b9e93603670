"""`ZoomGRPOTrainer`: TRL's GRPOTrainer with two fixes found here (TRL 1.16, transformers 5.17).

1. Resume: `save_pretrained` writes Qwen2.5-VL weights under their legacy names (`visual.*`, `model.layers.*`)
   but `Trainer._load_from_checkpoint` loads the file with a plain `load_state_dict`, so every key misses and
   a resumed run silently continues from the *initial* weights (optimizer and scheduler restored). We reload
   the checkpoint through `from_pretrained` (which maps the names) and copy it in, strictly.
   (tests/test_rl_resume.py compares a killed-and-resumed run with an uninterrupted one.)
2. With `environment_factory`, TRL tokenizes each prompt separately and merges the image fields as Python lists;
   when a tool-calling turn then returns no image in the whole batch (every call was an error), its
   `split_pixel_values_by_grid` calls `.prod()` on that list and the step crashes. The first-turn generation
   already converts these fields to tensors, so converting them once here changes nothing else.
   (Reproduced by tests/test_rl_scripted.py::test_step_fails_above_failure_rate before the fix.)
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
from trl import GRPOTrainer

_IMAGE_FIELDS = ("pixel_values", "image_grid_thw")
log = logging.getLogger(__name__)


class ZoomGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose per-prompt image fields are tensors (see module docstring)."""

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        model = model if model is not None else self.model
        has_full_weights = any(os.path.exists(os.path.join(resume_from_checkpoint, f)) for f in
                               ("model.safetensors", "model.safetensors.index.json"))
        if not has_full_weights or not hasattr(model, "config"):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        unwrapped = self.accelerator.unwrap_model(model)
        dtype = next(unwrapped.parameters()).dtype
        fresh = type(unwrapped).from_pretrained(resume_from_checkpoint, dtype=dtype)
        missing, unexpected = unwrapped.load_state_dict(fresh.state_dict(), strict=False)
        if missing or unexpected:
            raise RuntimeError(f"checkpoint {resume_from_checkpoint} does not match the model: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        del fresh
        log.info("resumed model weights from %s", resume_from_checkpoint)

    def _tokenize_prompts(self, prompts: list) -> tuple[Any, Any, dict[str, Any]]:
        prompt_ids, images, fields = super()._tokenize_prompts(prompts)
        for k in _IMAGE_FIELDS:
            v = fields.get(k)
            if isinstance(v, list) and v:
                fields[k] = torch.as_tensor(np.asarray(v))
        return prompt_ids, images, fields
