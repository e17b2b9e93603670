"""A CPU stand-in for the parts of vLLM 0.31's offline API that `rl.backends.VLLMBackend` uses, written from the
wheel's `vllm/sampling_params.py`, `vllm/entrypoints/llm.py` and `vllm/entrypoints/offline_utils.py`:

- `SamplingParams`: the fields we set; `__post_init__` turns seed -1 into None, a string stop into a list,
  raises 0 < temperature < 1e-2 to 1e-2 and, below 1e-5 (greedy), resets top_p/top_k; `sampling_type` is GREEDY,
  RANDOM_SEED (a per-request generator seeded from `seed`) or RANDOM (the engine's shared generator).
- `LLM(model=..., **engine_args)`: a Hub id would be downloaded by vLLM; offline, only a local folder with a
  config.json works, so anything else raises here. `generate(prompts, sampling_params=None, *, use_tqdm=True,
  ...)`: one SamplingParams for all prompts, or a sequence of the same length (else ValueError, as
  `_params_to_seq`); returns one RequestOutput-like object per prompt, in order.

- `SamplingParams.bad_words`: vLLM tokenizes each word with the model folder's tokenizer, without special
  tokens, as it is and with a leading space (the spaced form kept only when it is as long and starts with
  another token: `update_from_tokenizer`), and the sampler sets the word's last token to -inf whenever the
  tokens before it were just generated (`v1/sample/ops/bad_words.py`): a one-token word is never generated.

The "model" answers with an option letter drawn from the request's own generator (RANDOM_SEED), from the shared
engine generator (RANDOM: depends on what else ran) or the first letter (GREEDY), and records every request.
`LLM.prefix` (class attribute) is text the model writes before that answer, token by token: a token a bad word
forbids at that point is skipped, as a -inf logit leaves it unsampled (the scripted model's next choice is
simply its next token).
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
    bad_words: list[str] | None = None
    _bad_words_token_ids: list[list[int]] | None = None

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
        self.bad_words = list(dict.fromkeys(self.bad_words or []))

    def update_from_tokenizer(self, tokenizer: Any) -> None:
        """vLLM 0.31's `SamplingParams.update_from_tokenizer` (called by the engine on each request)."""
        if self.bad_words:
            self._bad_words_token_ids = bad_words_token_ids(tokenizer, self.bad_words)

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
    prefix: str = ""  # text the scripted model writes before its answer (see the module docstring)

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
            out.append(RequestOutput(prompt=text, outputs=[_Completion(self._write(sp) + f"<answer>{letter}</answer>")]))
        return out

    def _tokenizer(self) -> Any:
        if not hasattr(self, "_tok"):
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(self.model)
        return self._tok

    def _write(self, sp: SamplingParams) -> str:
        """`prefix`, token by token, without the tokens the request's bad words forbid where they stand."""
        if not self.prefix:
            return ""
        tok = self._tokenizer()
        sp.update_from_tokenizer(tok)
        written = without_banned(tok.encode(self.prefix, add_special_tokens=False), sp._bad_words_token_ids or [])
        return str(tok.decode(written, skip_special_tokens=False))


def bad_words_token_ids(tokenizer: Any, words: list[str]) -> list[list[int]]:
    """The token sequences vLLM 0.31 bans for `bad_words` (`SamplingParams.update_from_tokenizer`): each word
    without special tokens, and its space-prefixed form when that is as long and starts with another token."""
    out: list[list[int]] = []
    for word in words:
        for spaced in (False, True):
            ids = tokenizer.encode(text=(" " if spaced else "") + word.lstrip(), add_special_tokens=False)
            if not ids:
                if not spaced:
                    raise ValueError("bad_words entries must tokenize to at least one token.")
                continue
            if not spaced or (out and ids[0] != out[-1][0] and len(ids) == len(out[-1])):
                out.append(ids)
    return out


def without_banned(tokens: list[int], banned: list[list[int]]) -> list[int]:
    """`tokens` as a scripted model writes them under vLLM's bad-words sampler (`v1/sample/ops/bad_words.py`:
    a word's last token gets -inf when the tokens before it were just generated): forbidden tokens are
    skipped."""
    written: list[int] = []
    for t in tokens:
        if not any(w[-1] == t and (len(w) == 1 or written[-(len(w) - 1):] == w[:-1]) for w in banned):
            written.append(t)
    return written
