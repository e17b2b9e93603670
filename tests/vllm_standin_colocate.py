"""A CPU stand-in for the `vllm` package, just enough of vLLM 0.31 for TRL 1.16's colocate path.

`install()` puts a `vllm` module tree into `sys.modules` before TRL is imported, so TRL's own
`is_vllm_available()` finds it and `trl.generation.vllm_generation` binds `LLM`/`SamplingParams` from it
exactly as it would bind vLLM's. What it implements, read from the vLLM 0.31.0 wheel:

- `LLM(model=..., **engine_kwargs)` keeps the kwargs; `llm_engine.model_config.max_model_len`;
  `llm_engine.model_executor.driver_worker.model_runner.model.load_weights([(name, tensor)])` (what TRL's
  colocate weight sync calls); `sleep(level)`, `wake_up(tags)`, `reset_prefix_cache()`.
- `LLM.generate(prompts, sampling_params, use_tqdm=...)` with prompts `{"prompt_token_ids": ids,
  "multi_modal_data": {"image": img | [imgs]}}`. Images go through the model folder's own image processor
  (vLLM loads the HF processor from the model path, not the trainer's in-memory one), and the Qwen2.5-VL
  prompt update is applied to the token ids as `vllm/multimodal/processing/processor.py` does it
  (`_apply_token_matches_with_placeholders` with `Qwen2VLMultiModalProcessor._get_prompt_updates`): image
  i replaces the first single `<|image_pad|>` at or after the end of image i-1's replacement with
  grid_thw.prod() // merge_size**2 pads; too few pads raise like `_validate_mm_placeholders`.
- `SamplingParams(bad_words=[...])`, applied by the rule of `vllm_standin.py` (vLLM 0.31's tokenization of the
  words and its -inf on their last token): the scripted completion's forbidden tokens are skipped.
- Outputs are `RequestOutput`s (`prompt_token_ids` = the expanded ids, `outputs[0].token_ids`,
  `outputs[0].logprobs` as `{token_id: Logprob}` per token), one per prompt (TRL uses n=1 in colocate).

The completions come from a scripted policy (`POLICY`), and every request is recorded in `REQUESTS`
(expanded ids, generated ids, image placeholder ranges, image fingerprints) for the test to compare with
what the trainer scores.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from dataclasses import dataclass, field
from typing import Any

from vllm_standin import bad_words_token_ids, without_banned

VERSION = "0.31.0"
REQUESTS: list[dict[str, Any]] = []
WEIGHT_LOADS: list[tuple[str, str]] = []
EVENTS: list[str] = []  # sleep / wake_up / generate, in order
POLICY: dict[str, Any] = {"fn": None}


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class SamplingParams:
    n: int = 1
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    logprobs: int | None = None
    structured_outputs: Any = None
    bad_words: list[str] | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class StructuredOutputsParams:
    regex: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = "stop"


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: Any
    outputs: list[CompletionOutput]
    finished: bool = True


def image_key(img: Any) -> str:
    """A fingerprint of a PIL image's pixels (the same crop object can be re-created by TRL)."""
    import hashlib

    return hashlib.sha1(img.tobytes() + repr((img.size, img.mode)).encode()).hexdigest()[:16]


def apply_prompt_updates(ids: list[int], pad: int, n_tokens: list[int]) -> tuple[list[int], list[dict]]:
    """vLLM 0.31's token-id prompt update for Qwen2.5-VL images (see the module docstring)."""
    out: list[int] = []
    placeholders = []
    prev_end = 0
    for item, n in enumerate(n_tokens):
        try:
            start = ids.index(pad, prev_end)
        except ValueError:
            raise RuntimeError(f"Expected there to be {len(n_tokens)} prompt placeholders corresponding to "
                               f"{len(n_tokens)} image items, but instead found {item} prompt placeholders!") from None
        out.extend(ids[prev_end:start])
        placeholders.append({"item": item, "offset": len(out), "length": n})
        out.extend([pad] * n)
        prev_end = start + 1
    out.extend(ids[prev_end:])
    return out, placeholders


class _Model:
    def load_weights(self, weights: Any) -> set:
        names = set()
        for name, tensor in weights:
            WEIGHT_LOADS.append((name, str(tensor.dtype)))
            names.add(name)
        return names


class LLM:
    def __init__(self, model: str, **kwargs: Any):
        import json
        from pathlib import Path

        from pipeline.models import load_processor

        self.model = model
        self.kwargs = kwargs
        cfg = json.loads((Path(model) / "config.json").read_text())
        text_cfg = cfg.get("text_config", cfg)
        max_len = kwargs.get("max_model_len") or text_cfg.get("max_position_embeddings", 32768)
        self.processor = load_processor(model)  # the model folder's processor, as vLLM loads it
        self.tokenizer = self.processor.tokenizer
        self.pad_id = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        runner = types.SimpleNamespace(model=_Model())
        self.llm_engine = types.SimpleNamespace(
            model_config=types.SimpleNamespace(max_model_len=int(max_len)),
            model_executor=types.SimpleNamespace(driver_worker=types.SimpleNamespace(model_runner=runner)))
        self.sleeping = False

    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        EVENTS.append(f"sleep{level}")
        self.sleeping = True

    def wake_up(self, tags: list[str] | None = None) -> None:
        EVENTS.append("wake:" + ",".join(tags or ["all"]))
        self.sleeping = False

    def reset_prefix_cache(self, *a: Any, **k: Any) -> bool:
        return True

    def _n_tokens(self, images: list) -> list[int]:
        ip = self.processor.image_processor
        grid = ip(images=images, return_tensors="pt")["image_grid_thw"]
        merge = int(getattr(ip, "merge_size", 2))
        return [int(g.prod()) // (merge * merge) for g in grid]

    def generate(self, prompts: Any, sampling_params: Any = None, *, use_tqdm: Any = True,
                 **kwargs: Any) -> list[RequestOutput]:
        prompts = prompts if isinstance(prompts, list) else [prompts]
        EVENTS.append("generate")
        outs = []
        for p in prompts:
            ids = list(p["prompt_token_ids"])
            images = (p.get("multi_modal_data") or {}).get("image")
            images = [] if images is None else (images if isinstance(images, list) else [images])
            n_tok = self._n_tokens(images) if images else []
            expanded, placeholders = apply_prompt_updates(ids, self.pad_id, n_tok)
            text = self.tokenizer.decode(expanded, skip_special_tokens=False)
            reply = POLICY["fn"](text, len(images))
            gen = self.tokenizer(reply, add_special_tokens=False)["input_ids"]
            bad = getattr(sampling_params, "bad_words", None)
            if bad:  # vLLM's bad-words rule, as the offline stand-in applies it
                gen = without_banned(gen, bad_words_token_ids(self.tokenizer, bad))
                reply = self.tokenizer.decode(gen, skip_special_tokens=False)
            if sampling_params is not None and sampling_params.max_tokens:
                gen = gen[: sampling_params.max_tokens]
            REQUESTS.append({"sent": ids, "expanded": expanded, "generated": gen, "placeholders": placeholders,
                             "bad_words": list(bad or []),
                             "images": [image_key(im) for im in images], "n_tokens": n_tok})
            lps = [{t: Logprob(-1.0, 1, None)} for t in gen]
            outs.append(RequestOutput(str(len(REQUESTS)), None, expanded, None,
                                      [CompletionOutput(0, reply, gen, -float(len(gen)), lps)]))
        return outs


def _module(name: str, **attrs: Any) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
    m.__path__ = []  # a package, so submodule lookups go through sys.modules
    for k, v in attrs.items():
        setattr(m, k, v)
    return m


def _unavailable(*a: Any, **k: Any) -> Any:
    raise RuntimeError("vLLM server-mode weight transfer is not part of the CPU stand-in")


def install() -> None:
    """Register the stand-in as `vllm` (call before importing trl)."""
    if "trl" in sys.modules:
        raise RuntimeError("install the vllm stand-in before importing trl")
    mods = {
        "vllm": _module("vllm", __version__=VERSION, LLM=LLM, SamplingParams=SamplingParams,
                        RequestOutput=RequestOutput),
        "vllm.sampling_params": _module("vllm.sampling_params", SamplingParams=SamplingParams,
                                        StructuredOutputsParams=StructuredOutputsParams),
        "vllm.outputs": _module("vllm.outputs", RequestOutput=RequestOutput, CompletionOutput=CompletionOutput),
        "vllm.logprobs": _module("vllm.logprobs", Logprob=Logprob),
        "vllm.utils": _module("vllm.utils"),
        "vllm.utils.network_utils": _module("vllm.utils.network_utils", get_ip=lambda: "127.0.0.1"),
        "vllm.distributed": _module("vllm.distributed"),
        "vllm.distributed.weight_transfer": _module("vllm.distributed.weight_transfer"),
        "vllm.distributed.weight_transfer.nccl_common": _module("vllm.distributed.weight_transfer.nccl_common",
                                                                trainer_init=_unavailable),
        "vllm.distributed.weight_transfer.packed_tensor": _module(
            "vllm.distributed.weight_transfer.packed_tensor", packed_nccl_broadcast_producer=_unavailable),
    }
    sys.modules.update(mods)
