"""Test-only: run accelerate's FSDP branch on CPU ranks.

accelerate 1.15 switches a run to FSDP only when its distributed type is a GPU-like one (MULTI_GPU, MULTI_XPU,
...; `AcceleratorState.__init__`, the `fsdp_plugin is not None` branch); on gloo CPU ranks it silently keeps
MULTI_CPU and DDP. This applies that same branch (type FSDP, the plugin's mixed precision, the plugin) when
the Accelerator is built with an FSDP plugin on CPU ranks, once, as accelerate does on GPUs. Everything after
it (FSDP2 `fully_shard` of the policy and of TRL's reference model, mixed precision, the full-state-dict
checkpoint) is the unchanged library code. Import before transformers builds the trainer.
"""

from __future__ import annotations

from typing import Any

import accelerate.state as _state
from accelerate.utils import DistributedType

_orig_init = _state.AcceleratorState.__init__


def _init(self: Any, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
    _orig_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = fsdp_plugin


_state.AcceleratorState.__init__ = _init
