"""Generation backends of the agent loop, one small interface (`rl.agent.Backend`):

- `TransformersBackend`: any HF image-text-to-text model + processor (CPU default; the tiny model), batched
  with left padding, stopped per row by a StoppingCriteria that reads the decoded text for the stop strings.
- `VLLMBackend`: the vLLM offline engine (`gpu` extra; `vllm` imported lazily). Prompts are rendered with the
  model's own chat template (the same one training used) and sent with `multi_modal_data`.
- `OpenAIBackend`: any OpenAI-compatible chat endpoint with image inputs (a vLLM server, an API model), over
  httpx; images as base64 PNG data URLs; our text tool protocol, so API models run the same tasks.

Every backend returns each text with the stop string that ended it, so `tools.protocol.parse_turn` sees
complete tags; engines that drop stop strings get them re-appended (`tools.protocol.close_stopped`).
"""

from __future__ import annotations

import base64
import io
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image

from rl.agent import BackendError
from tools.protocol import (
    close_stopped,
    parse_turn,
    raw_tool_call,
    strip_tool_calls,
    tool_call_text,
    trim_at_stop,
)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ transformers
def _stop_criteria_class() -> type:
    from transformers import StoppingCriteria

    class StopOnStrings(StoppingCriteria):
        """Per-row stop when the text generated so far contains a stop string (decoded, so a string split
        across tokens or merged into a larger token is still seen)."""

        def __init__(self, tokenizer: Any, stops: list[str], prompt_len: int, window: int = 24):
            self.tokenizer = tokenizer
            self.stops = [s for s in stops if s]
            self.prompt_len = prompt_len
            self.window = window

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            import torch

            new = input_ids[:, self.prompt_len:]
            tail = new[:, -self.window:]
            texts = self.tokenizer.batch_decode(tail, skip_special_tokens=False)
            return torch.tensor([any(s in t for s in self.stops) for t in texts], dtype=torch.bool,
                                device=input_ids.device)

    return StopOnStrings


PLACEHOLDER_TOKENS = ("<|image_pad|>", "<|video_pad|>")


def placeholder_tokens(tokenizer: Any) -> list[str]:
    """The image and video placeholder tokens of `tokenizer`'s vocabulary (Qwen2.5-VL's `<|image_pad|>` and
    `<|video_pad|>`), which no generation may write: a written one comes back in the next turn's prompt as a
    placeholder without its image, and the processor (transformers) or the prompt update (vLLM) fails on it.
    Every generation path bans them: `suppress_tokens` in transformers, `bad_words` in vLLM (rl.stage passes
    them to TRL's own generation)."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    if not hasattr(tok, "convert_tokens_to_ids"):
        return []  # a text-only renderer without a vocabulary (test doubles): nothing to ban
    unk = getattr(tok, "unk_token_id", None)
    return [t for t in PLACEHOLDER_TOKENS if (i := tok.convert_tokens_to_ids(t)) is not None and i != unk]


def placeholder_token_ids(tokenizer: Any) -> list[int]:
    """The ids of `placeholder_tokens(tokenizer)` (what transformers' `suppress_tokens` takes)."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    return [int(tok.convert_tokens_to_ids(t)) for t in placeholder_tokens(tok)]


class TransformersBackend:
    """Batched `model.generate` with the processor's chat template. Images must already be sized by the zoom
    tool; set the processor's pixel bounds to the tool's (pipeline.models.set_pixel_bounds) so they are
    not resized again."""

    def __init__(self, model: Any, processor: Any, *, seed: int | None = None):
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.seed = seed
        self._stop_cls = _stop_criteria_class()
        self._end_strings = [s for s in {self.tokenizer.eos_token, self.tokenizer.pad_token, "<|im_end|>",
                                         "<|endoftext|>"} if s]
        # a written image or video placeholder would come back in the next prompt as one image too many (the
        # processor raises StopIteration and the episode is lost): the model may not write them, as TRL's GRPO
        # generation may not write the image token (tests/test_rl_units.py)
        self._placeholder_ids = sorted(placeholder_token_ids(self.tokenizer))

    def render(self, conversation: list[dict]) -> str:
        return self.processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)

    def _clean(self, text: str, stop: list[str]) -> str:
        cut = len(text)
        for s in self._end_strings:
            i = text.find(s)
            if i >= 0:
                cut = min(cut, i)
        return trim_at_stop(text[:cut], stop)

    def generate(self, conversations: list[list[dict]], images: list[list[Image.Image]], *,
                 max_new_tokens: int, temperature: float, top_p: float, stop: list[str],
                 seeds: list[int] | None = None) -> list[str]:
        """Greedy turns run as one padded batch. Sampled turns with `seeds` run one conversation at a time,
        each from its own seed (torch's sampler draws from one global generator, so in a batch a row's
        tokens would depend on its batch-mates and a resumed run would sample differently)."""
        if temperature > 0 and seeds is not None:
            import torch

            if len(seeds) != len(conversations):
                raise BackendError(f"{len(seeds)} seeds for {len(conversations)} conversations")
            out = []
            devices = [self.model.device] if getattr(self.model, "device", None) is not None and \
                self.model.device.type == "cuda" else []
            for conv, ims, sd in zip(conversations, images, seeds, strict=True):
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(int(sd))
                    out += self._generate([conv], [ims], max_new_tokens=max_new_tokens, temperature=temperature,
                                          top_p=top_p, stop=stop, seed=None)
            return out
        return self._generate(conversations, images, max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p, stop=stop, seed=self.seed)

    def _generate(self, conversations: list[list[dict]], images: list[list[Image.Image]], *,
                  max_new_tokens: int, temperature: float, top_p: float, stop: list[str],
                  seed: int | None) -> list[str]:
        import torch

        texts = [self.render(c) for c in conversations]
        flat = [im for ims in images for im in ims]
        old_side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            inputs = self.processor(text=texts, images=flat or None, return_tensors="pt", padding=True)
        finally:
            self.tokenizer.padding_side = old_side
        device = getattr(self.model, "device", torch.device("cpu"))
        inputs = {k: v.to(device) if hasattr(v, "to") else v for k, v in inputs.items()}
        prompt_len = inputs["input_ids"].shape[1]
        do_sample = temperature > 0
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample,
                                  "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id}
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
            if seed is not None:  # no per-rollout seeds: one seed per call (batch-dependent; legacy callers)
                torch.manual_seed(seed)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if stop:
            kwargs["stopping_criteria"] = [self._stop_cls(self.tokenizer, stop, prompt_len)]
        if self._placeholder_ids:
            kwargs["suppress_tokens"] = self._placeholder_ids
        with torch.no_grad():
            out = self.model.generate(**inputs, **kwargs)
        new = out[:, prompt_len:]
        decoded = self.tokenizer.batch_decode(new, skip_special_tokens=False)
        return [self._clean(t, stop) for t in decoded]


# ------------------------------------------------------------------------------------------ vLLM
class VLLMBackend:
    """vLLM offline engine. `llm` is a `vllm.LLM` (or anything with the same `generate`); `processor` renders
    the chat template. Build one with `VLLMBackend.from_pretrained(path, ...)` (imports vllm lazily)."""

    def __init__(self, llm: Any, processor: Any, *, sampling_params_cls: Any = None, seed: int | None = None):
        self.llm = llm
        self.processor = processor
        self.seed = seed
        self._sp_cls = sampling_params_cls
        self._placeholders = placeholder_tokens(processor)  # never written: see placeholder_tokens

    @classmethod
    def from_pretrained(cls, path: str, *, max_images: int = 8, max_pixels: int = 1003520, min_pixels: int = 3136,
                        gpu_memory_utilization: float = 0.85, tensor_parallel_size: int = 1,
                        max_model_len: int = 32768, seed: int = 0, **engine_kwargs: Any) -> VLLMBackend:
        try:
            import vllm
        except ImportError as e:
            raise BackendError("vLLM is not installed: pip install 'knowzoom[gpu]' on a GPU host") from e
        return cls.from_engine_class(path, vllm.LLM, vllm.SamplingParams, max_images=max_images,
                                     max_pixels=max_pixels, min_pixels=min_pixels,
                                     gpu_memory_utilization=gpu_memory_utilization,
                                     tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len,
                                     seed=seed, **engine_kwargs)

    @classmethod
    def from_engine_class(cls, path: str, llm_cls: Any, sampling_params_cls: Any, *, max_images: int = 8,
                          max_pixels: int = 1003520, min_pixels: int = 3136, gpu_memory_utilization: float = 0.85,
                          tensor_parallel_size: int = 1, max_model_len: int = 32768, seed: int = 0,
                          **engine_kwargs: Any) -> VLLMBackend:
        """Build the engine from `llm_cls` (vllm.LLM, or a stand-in with its contract) on the *resolved local
        folder* of `path` ("tiny", a stage output, or an HF id already in the local cache), so vLLM never
        sees a Hub id and never goes online; the processor is loaded from the same folder."""
        from pipeline.models import load_processor, resolve_model_path

        local = resolve_model_path(str(path))
        llm = llm_cls(
            model=str(local), limit_mm_per_prompt={"image": max_images},
            mm_processor_kwargs={"max_pixels": max_pixels, "min_pixels": min_pixels},
            gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len, seed=seed, **engine_kwargs,
        )
        processor = load_processor(str(local), max_pixels=max_pixels, min_pixels=min_pixels)
        return cls(llm, processor, sampling_params_cls=sampling_params_cls, seed=seed)

    def build_requests(self, conversations: list[list[dict]], images: list[list[Image.Image]]) -> list[dict]:
        """One vLLM prompt dict per conversation: the rendered chat text and its images in order."""
        reqs = []
        for conv, ims in zip(conversations, images, strict=True):
            n_ph = sum(1 for m in conv if isinstance(m.get("content"), list)
                       for c in m["content"] if isinstance(c, dict) and c.get("type") == "image")
            if n_ph != len(ims):
                raise BackendError(f"conversation has {n_ph} image placeholders but {len(ims)} images")
            prompt = self.processor.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
            req: dict[str, Any] = {"prompt": prompt}
            if ims:
                req["multi_modal_data"] = {"image": list(ims) if len(ims) > 1 else ims[0]}
            reqs.append(req)
        return reqs

    def sampling_params(self, *, max_new_tokens: int, temperature: float, top_p: float, stop: list[str],
                        seed: int | None = None) -> Any:
        """One request's SamplingParams; `seed` is that rollout's own seed (vLLM seeds each request's
        generator from it, so one shared seed would make every rollout of an item identical)."""
        if self._sp_cls is None:
            from vllm import SamplingParams

            self._sp_cls = SamplingParams
        # vLLM 0.31 tokenizes each bad word without special tokens; a one-token word (a placeholder is a special
        # token) gets -inf at every step (SamplingParams.update_from_tokenizer, v1/sample/ops/bad_words.py)
        return self._sp_cls(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                            stop=list(stop), include_stop_str_in_output=True,
                            seed=int(seed) if seed is not None and temperature > 0 else None,
                            bad_words=list(self._placeholders) or None)

    def generate(self, conversations: list[list[dict]], images: list[list[Image.Image]], *,
                 max_new_tokens: int, temperature: float, top_p: float, stop: list[str],
                 seeds: list[int] | None = None) -> list[str]:
        reqs = self.build_requests(conversations, images)
        if seeds is not None and len(seeds) != len(reqs):
            raise BackendError(f"{len(seeds)} seeds for {len(reqs)} conversations")
        if seeds is None and temperature > 0 and self.seed is not None:
            log.warning("vLLM backend: no per-rollout seeds; sampling is not reproducible across batches")
        params = [self.sampling_params(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                       stop=stop, seed=None if seeds is None else seeds[i])
                  for i in range(len(reqs))]
        outs = self.llm.generate(reqs, params, use_tqdm=False)
        if len(outs) != len(reqs):
            raise BackendError(f"vLLM returned {len(outs)} outputs for {len(reqs)} prompts")
        return [trim_at_stop(close_stopped(o.outputs[0].text), stop) for o in outs]


# ------------------------------------------------------------------------------------------ OpenAI-compatible
OPENAI_TOOL_MODES = ("text", "native")


def image_data_url(image: Image.Image) -> str:
    """A PNG data URL (lossless: the model sees exactly the pixels the tool produced)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _parts(content: Any, it: Any) -> list[dict]:
    """OpenAI content parts of one HF message's content; image placeholders take the next image."""
    parts: list[dict] = []
    if isinstance(content, list):
        for c in content:
            if c.get("type") == "image":
                try:
                    parts.append({"type": "image_url", "image_url": {"url": image_data_url(next(it))}})
                except StopIteration:
                    raise BackendError("more image placeholders than images") from None
            elif c.get("type") == "text":
                parts.append({"type": "text", "text": str(c.get("text", ""))})
    else:
        parts.append({"type": "text", "text": "" if content is None else str(content)})
    return parts


def _plain(role: str, parts: list[dict]) -> dict:
    if role in ("system", "assistant") and all(p["type"] == "text" for p in parts):
        return {"role": role, "content": "".join(p["text"] for p in parts)}
    return {"role": role, "content": parts}


def to_openai_messages(conversation: list[dict], images: list[Image.Image]) -> list[dict]:
    """HF multimodal chat messages → OpenAI chat messages for the *text* tool protocol. Tool observations
    become user turns wrapped in `<tool_response>` (how the Qwen template renders them), so any chat endpoint
    runs the text protocol."""
    it = iter(images)
    out = []
    for m in conversation:
        role, parts = m["role"], _parts(m.get("content"), it)
        if role == "tool":
            parts = [{"type": "text", "text": "<tool_response>\n"}] + parts + [{"type": "text", "text": "\n</tool_response>"}]
            role = "user"
        out.append(_plain(role, parts))
    if next(it, None) is not None:
        raise BackendError("more images than image placeholders")
    return out


def to_openai_native_messages(conversation: list[dict], images: list[Image.Image], *,
                              system: str | None = None) -> list[dict]:
    """HF multimodal chat messages → OpenAI chat messages for *native* tool calling: an assistant turn holding
    a tool call becomes `tool_calls` (arguments as a JSON string, ids call_0, call_1, …), its observation a
    `tool` message with that `tool_call_id` and the observation text; the crop follows as a user message with
    the image (tool messages carry text only in the chat-completions API). A malformed call stays assistant
    text and its error observation a user message. `system` replaces the text-protocol system prompt."""
    it = iter(images)
    out: list[dict] = []
    pending: str | None = None
    n_calls = 0
    for i, m in enumerate(conversation):
        role, content = m.get("role"), m.get("content")
        if role == "assistant":
            text = content if isinstance(content, str) else "".join(p.get("text", "") for p in _parts(content, it))
            parsed = parse_turn(text)
            call = None
            if parsed.tool_call is not None:
                call = (parsed.tool_call.name, json.dumps(parsed.tool_call.arguments))
            elif parsed.error is not None:
                call = raw_tool_call(text)  # arguments that were not JSON go back as the string the server sent
            if call is not None:
                pending = f"call_{n_calls}"
                n_calls += 1
                prose = strip_tool_calls(text).strip()
                out.append({"role": "assistant", "content": prose or None, "tool_calls": [{
                    "id": pending, "type": "function", "function": {"name": call[0], "arguments": call[1]}}]})
            else:
                pending = None
                out.append({"role": "assistant", "content": text})
            continue
        parts = _parts(content, it)
        if role == "tool":
            texts = "\n".join(p["text"] for p in parts if p["type"] == "text")
            pics = [p for p in parts if p["type"] == "image_url"]
            if pending is not None:
                out.append({"role": "tool", "tool_call_id": pending, "content": texts})
            else:
                out.append({"role": "user", "content": [{"type": "text", "text": texts}]})
            if pics:
                out.append({"role": "user", "content": [{"type": "text", "text": texts}] + pics})
            pending = None
            continue
        pending = None
        if role == "system" and i == 0 and system is not None:
            parts = [{"type": "text", "text": system}]
        out.append(_plain(str(role), parts))
    if next(it, None) is not None:
        raise BackendError("more images than image placeholders")
    return out


def message_text(message: dict) -> str:
    """The text of a chat-completions `message`: its content followed by each of its `tool_calls` (vLLM's and
    transformers' servers and API models return calls there, not in the content)."""
    content = message.get("content") or ""
    if isinstance(content, list):
        content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise BackendError(f"tool_calls is not a list: {str(calls)[:80]!r}")
    if calls:  # a server that parsed the calls may also leave their raw text in the content: count them once
        content = strip_tool_calls(str(content))
    out = [str(content)]
    for c in calls:
        fn = (c or {}).get("function") or {}
        out.append(tool_call_text(fn.get("name"), fn.get("arguments", "{}")))
    return "".join(out)


class OpenAIBackend:
    """POST /chat/completions on an OpenAI-compatible server; conversations of a batch run concurrently.

    `tool_mode` "text": our text protocol in the messages (any chat endpoint); "native": `zoom_in` is sent as
    an OpenAI tool (`tools`, schema from `tools.protocol.zoom_tool_schema(frame)`), the history carries
    `tool_calls` / `tool` messages, and the crop comes back as an image in a user message. In both modes calls
    the server returns in `message.tool_calls` are read."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout_s: float = 120.0,
                 max_retries: int = 3, concurrency: int = 8, include_stop_str: bool = False,
                 extra_body: dict | None = None, client: Any = None, tool_mode: str = "text",
                 frame: str = "shown_pixels"):
        import httpx

        from tools.protocol import system_prompt, zoom_tool_schema

        if tool_mode not in OPENAI_TOOL_MODES:
            raise BackendError(f"tool_mode {tool_mode!r} unknown; use one of {OPENAI_TOOL_MODES}")
        self.model = model
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.max_retries = max_retries
        self.concurrency = max(1, concurrency)
        self.include_stop_str = include_stop_str  # vLLM servers accept include_stop_str_in_output
        self.extra_body = dict(extra_body or {})
        self.tool_mode = tool_mode
        self.tools = [zoom_tool_schema(frame)]
        self._text_system = system_prompt(frame)
        self._native_system = system_prompt(frame, native_tools=True)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = client or httpx.Client(timeout=timeout_s, headers=headers)

    def _payload(self, conversation: list[dict], images: list[Image.Image], *, max_new_tokens: int,
                 temperature: float, top_p: float, stop: list[str]) -> dict:
        if self.tool_mode == "native":
            first = conversation[0] if conversation else {}
            swap = first.get("role") == "system" and first.get("content") == self._text_system
            messages = to_openai_native_messages(conversation, images,
                                                 system=self._native_system if swap else None)
            stop = [s for s in stop if s != "</tool_call>"]  # the server's tool parser needs the whole call
        else:
            messages = to_openai_messages(conversation, images)
        body: dict[str, Any] = {"model": self.model, "messages": messages,
                                "max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                                "stop": list(stop)[:4]}
        if self.tool_mode == "native":
            body["tools"] = self.tools
            body["tool_choice"] = "auto"
        if self.include_stop_str:
            body["include_stop_str_in_output"] = True
        body.update(self.extra_body)
        return body

    def _read(self, r: Any) -> str:
        """The text of a 2xx reply; a body that is no chat completion is a BackendError (not retried)."""
        try:
            return message_text(r.json()["choices"][0]["message"])
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            raise BackendError(f"bad response from {self.url}: {r.text[:200]!r}") from e

    def _post(self, body: dict, stop: list[str]) -> str:
        from pipeline.core.http import HTTPRetryError, RetryPolicy, post_json

        try:
            text, _ = post_json(self.client, self.url, body, self._read, RetryPolicy(self.max_retries, 0.5, 8.0))
        except HTTPRetryError as e:
            raise BackendError(str(e)) from None
        return trim_at_stop(close_stopped(text), stop)

    def generate(self, conversations: list[list[dict]], images: list[list[Image.Image]], *,
                 max_new_tokens: int, temperature: float, top_p: float, stop: list[str],
                 seeds: list[int] | None = None) -> list[str]:
        bodies = [self._payload(c, ims, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                stop=stop) for c, ims in zip(conversations, images, strict=True)]
        if seeds is not None and temperature > 0:
            for b, sd in zip(bodies, seeds, strict=True):
                b["seed"] = int(sd) % (1 << 31)  # OpenAI's `seed`: best-effort reproducibility, per request
        if len(bodies) == 1 or self.concurrency == 1:
            return [self._post(b, stop) for b in bodies]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(bodies))) as pool:
            return list(pool.map(lambda b: self._post(b, stop), bodies))


def make_backend(kind: str, model: str, *, base_url: str = "", api_key_env: str = "OPENAI_API_KEY",
                 agent_max_pixels: int = 50176, agent_min_pixels: int = 3136, seed: int = 0,
                 **kw: Any) -> Any:
    """Backend by name: "transformers" (loads `model` with pipeline.models.load_model), "vllm", "openai"."""
    import os

    if kind == "transformers":
        from pipeline.models import load_model, set_pixel_bounds

        m, proc = load_model(model, device=kw.pop("device", "cpu"), dtype=kw.pop("dtype", "auto"))
        m.eval()
        set_pixel_bounds(proc, min_pixels=agent_min_pixels, max_pixels=agent_max_pixels)
        return TransformersBackend(m, proc, seed=seed)
    if kind == "vllm":
        return VLLMBackend.from_pretrained(model, max_pixels=agent_max_pixels, min_pixels=agent_min_pixels,
                                           seed=seed, **kw)
    if kind == "openai":
        if not base_url:
            raise BackendError("backend openai needs base_url (e.g. http://localhost:8000/v1)")
        return OpenAIBackend(base_url, model, api_key=os.environ.get(api_key_env), **kw)
    raise BackendError(f"unknown backend {kind!r}; use transformers, vllm or openai")


__all__ = ["PLACEHOLDER_TOKENS", "placeholder_tokens", "placeholder_token_ids", "TransformersBackend", "VLLMBackend",
           "OpenAIBackend", "make_backend", "image_data_url", "to_openai_messages", "to_openai_native_messages", "message_text",
           "OPENAI_TOOL_MODES"]
