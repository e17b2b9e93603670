"""`ZoomGRPOTrainer`: TRL's GRPOTrainer with one fix for environments on vision models (TRL 1.16).

With `environment_factory`, TRL tokenizes each prompt separately and merges the image fields as Python lists;
when a tool-calling turn then returns no image in the whole batch (every call was an error), its
`split_pixel_values_by_grid` calls `.prod()` on that list and the step crashes. The first-turn generation
already converts these fields to tensors, so converting them once here changes nothing else.
(Reproduced by tests/test_rl_scripted.py::test_step_fails_above_failure_rate before the fix.)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from trl import GRPOTrainer

_IMAGE_FIELDS = ("pixel_values", "image_grid_thw")


class ZoomGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose per-prompt image fields are tensors (see module docstring)."""

    def _tokenize_prompts(self, prompts: list) -> tuple[Any, Any, dict[str, Any]]:
        prompt_ids, images, fields = super()._tokenize_prompts(prompts)
        for k in _IMAGE_FIELDS:
            v = fields.get(k)
            if isinstance(v, list) and v:
                fields[k] = torch.as_tensor(np.asarray(v))
        return prompt_ids, images, fields
