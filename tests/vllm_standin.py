"""A CPU stand-in for the parts of vLLM 0.31's offline API that `rl.backends.VLLMBackend` uses, written from the
wheel's `vllm/sampling_params.py`, `vllm/entrypoints/llm.py` and `vllm/entrypoints/offline_utils.py`:

- `SamplingParams`: the fields we set; `__post_init__` turns seed -1 into None, a string stop into a list,
  raises 0 < temperature < 1e-2 to 1e-2 and, below 1e-5 (greedy), resets top_p/top_k; `sampling_type` is GREEDY,
  RANDOM_SEED (a per-request generator seeded from `seed`) or RANDOM (the engine's shared generator).
- `LLM(model=..., **engine_args)`: a Hub id would be downloaded by vLLM; offline, only a local folder with a
  config.json works, so anything else raises here. `generate(prompts, sampling_params=None, *, use_tqdm=True,
  ...)`: one SamplingParams for all prompts, or a sequence of the same length (else ValueError, as
  `_params_to_seq`); returns one RequestOutput-like object per prompt, in order.

The "model" answers with an option letter drawn from the request's own generator (RANDOM_SEED), from the shared
engine generator (RANDOM: depends on what else ran) or the first letter (GREEDY), and records every request.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_SAMPLING_EPS = 1e-5
_MAX_TEMP = 1e-2


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    include_stop_str_in_output: bool = False
    max_tokens: int | None = 16

    def __post_init__(self) -> None:
        if 0 < self.temperature < _MAX_TEMP:
            self.temperature = max(self.temperature, _MAX_TEMP)
        if self.seed == -1:
            self.seed = None
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.temperature < _SAMPLING_EPS:
            self.top_p = 1.0
            self.top_k = 0

    @property
    def sampling_type(self) -> str:
        if self.temperature < _SAMPLING_EPS:
            return "GREEDY"
        return "RANDOM_SEED" if self.seed is not None else "RANDOM"


@dataclass
class _Completion:
    text: str
    finish_reason: str = "stop"


@dataclass
class RequestOutput:
    prompt: str
    outputs: list[_Completion] = field(default_factory=list)


class LLM:
    """Records the engine arguments and every (prompt, SamplingParams) it generated for."""

    instances: list[LLM] = []

    def __init__(self, model: str, **engine_args: Any):
        if not (Path(model) / "config.json").exists():
            raise OSError(f"vLLM would try to download {model!r} from the Hub (no local folder with config.json)")
        self.model = model
        self.engine_args = engine_args
        self.requests: list[tuple[str, SamplingParams]] = []
        self._shared = random.Random(engine_args.get("seed", 0))
        LLM.instances.append(self)

    def generate(self, prompts: Any, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 use_tqdm: Any = True, lora_request: Any = None, priority: Any = None,
                 tokenization_kwargs: Any = None, mm_processor_kwargs: Any = None) -> list[RequestOutput]:
        seq = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, Sequence):
            if len(sampling_params) != len(seq):
                raise ValueError(f"The lengths of prompts ({len(seq)}) and params ({len(sampling_params)}) "
                                 "must be the same.")
            params = list(sampling_params)
        else:
            params = [sampling_params] * len(seq)
        out = []
        for p, sp in zip(seq, params, strict=True):
            text = p["prompt"] if isinstance(p, dict) else p
            self.requests.append((text, sp))
            if sp.sampling_type == "GREEDY":
                letter = "A"
            else:
                rng = random.Random(sp.seed) if sp.sampling_type == "RANDOM_SEED" else self._shared
                letter = "ABCD"[rng.randrange(4)]
            out.append(RequestOutput(prompt=text, outputs=[_Completion(f"<answer>{letter}</answer>")]))
        return out
