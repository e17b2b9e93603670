"""The fields and checks shared by every stage that runs the zoom agent over a VQA set (eval, mine-hard):
which model and backend generate, which dataset and image store, the agent's turn budget and the zoom tool's
limits. One dataclass, so a field means the same thing, with the same default and check, in each stage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.core.config import hfield
from pipeline.core.zoom_settings import ZoomSettings

DATASETS = ("vqa_jsonl", "xlrs", "lrs_vqa", "mme_rs")
BACKENDS = ("transformers", "vllm", "openai")
PROTOCOLS = ("zoom", "direct")


@dataclass
class RolloutStageConfig(ZoomSettings):
    """Model, backend, dataset, agent and zoom settings of a stage that rolls the agent out."""

    model: str = hfield("tiny", help="Model: 'tiny', a local folder (a stage's output_dir or its model/), a cached HF id, "
                                     "or the served model name for backend openai.")
    backend: str = hfield("transformers", help="Generation backend: transformers (CPU) | vllm (GPU) | openai (HTTP).")
    base_url: str = hfield("", help="backend openai: the server's /v1 URL, e.g. http://localhost:8000/v1.")
    api_key_env: str = hfield("OPENAI_API_KEY", help="backend openai: environment variable holding the API key.")
    device: str = hfield("cpu", help="backend transformers: torch device.")
    dtype: str = hfield("auto", help="backend transformers: auto | float32 | bfloat16 | float16.")
    dataset: str = hfield("vqa_jsonl", help="vqa_jsonl (our VQASample JSONL) | xlrs (XLRS-Bench-lite local copy) | "
                                            "lrs_vqa | mme_rs (MME-RealWorld remote sensing): pipeline/eval/benchmarks.py.")
    dataset_path: str = hfield("runs/tiny/scenes/vqa_test.jsonl", help="vqa_jsonl: the JSONL file; xlrs: the local "
                                                                       "XLRS-Bench-lite folder (parquet or JSON per question).")
    images_manifest: str = hfield("runs/tiny/scenes/images.jsonl", help="vqa_jsonl: images.jsonl of the image store "
                                                                         "({id, path} per line).")
    xlrs_images_dir: str = hfield("", help="xlrs: where images are extracted and converted by prepare-images once "
                                           "(default <output_dir>/xlrs_images).")
    categories: list[str] = hfield([], help="Keep only these sub-tasks (\"Task/Subtask\" or short names like OCL).")
    limit: int | None = hfield(None, help="Use only the first N items (eval marks such a result not reportable).")
    protocol: str = hfield("zoom", help="zoom (our zoom-agent tool protocol) | direct (official lmms-eval xlrs-lite "
                                        "prompt, one turn, no tools).")
    max_new_tokens: int = hfield(256, help="New tokens per turn (the official direct protocol uses 64).")
    batch_size: int = hfield(8, help="Conversations per generate call.")
    chunk_size: int = hfield(32, help="Items per durable chunk (progress is saved after each finished episode).")
    max_answer_chars: int = hfield(1000, help="Answers this long or longer get no credit (verifier).")
    openai_concurrency: int = hfield(8, help="backend openai: concurrent requests.")
    openai_timeout_s: float = hfield(120.0, help="backend openai: per-request timeout (seconds).")
    openai_tool_mode: str = hfield("text", help="backend openai: text (our <tool_call> text protocol in the "
                                                "messages) | native (zoom_in sent as an OpenAI tool; calls "
                                                "come back in message.tool_calls, crops as images).")
    openai_extra_body: dict = hfield({}, help="backend openai: fields added to every request body, for what the "
                                              "server accepts beyond OpenAI's API; against a vLLM server "
                                              "{bad_words: ['<|image_pad|>', '<|video_pad|>']} keeps the model "
                                              "from writing an image placeholder, which comes back in the next "
                                              "turn without its image (the vllm and transformers backends ban "
                                              "them themselves).")

    def validate(self) -> list[str]:
        p = super().validate()
        if self.dataset not in DATASETS:
            p.append(f"dataset: {self.dataset!r} unknown; use one of {DATASETS}")
        if self.backend not in BACKENDS:
            p.append(f"backend: {self.backend!r} unknown; use one of {BACKENDS}")
        if self.backend == "openai" and not self.base_url:
            p.append("base_url: backend openai needs the server URL, e.g. http://localhost:8000/v1")
        if self.protocol not in PROTOCOLS:
            p.append(f"protocol: {self.protocol!r} unknown; use one of {PROTOCOLS}")
        if self.limit is not None and self.limit < 1:
            p.append("limit: must be >= 1 (or null for the full set)")
        if self.max_zooms < 0:
            p.append("max_zooms: must be >= 0 (0 = answer without zooming)")
        for name in ("max_new_tokens", "batch_size", "chunk_size", "max_answer_chars", "openai_concurrency"):
            if getattr(self, name) < 1:
                p.append(f"{name}: must be >= 1")
        p += [f"zoom_{x}" for x in self.zoom_config().validate()]  # the tool's own checks, one copy
        if self.openai_timeout_s <= 0:
            p.append("openai_timeout_s: must be > 0")
        if self.openai_tool_mode not in ("text", "native"):
            p.append(f"openai_tool_mode: {self.openai_tool_mode!r} unknown; use text or native")
        return p

    def zoom_config(self) -> Any:
        """The zoom tool's ZoomConfig from the zoom_* fields."""
        from tools.zoom import ZoomConfig

        return ZoomConfig(**self.zoom_tool_kwargs())

    def agent_config(self, *, temperature: float, top_p: float) -> Any:
        """The rl.agent.AgentConfig of these settings at the given sampling temperature and nucleus p."""
        from rl.agent import AgentConfig
        from tools.protocol import turn_budget

        return AgentConfig(max_turns=turn_budget(self.max_zooms) if self.protocol == "zoom" else 1,
                           max_new_tokens=self.max_new_tokens, temperature=temperature, top_p=top_p,
                           protocol=self.protocol, batch_size=self.batch_size,
                           max_answer_chars=self.max_answer_chars, seed=self.seed, zoom=self.zoom_config())

    def make_backend(self) -> Any:
        """The generation backend these settings name (loads the model)."""
        from rl.backends import make_backend

        kw: dict[str, Any] = {}
        if self.backend == "transformers":
            kw = {"device": self.device, "dtype": self.dtype}
        elif self.backend == "openai":
            kw = {"concurrency": self.openai_concurrency, "timeout_s": self.openai_timeout_s,
                  "tool_mode": self.openai_tool_mode if self.protocol == "zoom" else "text",  # direct: no tools
                  "frame": self.zoom_frame, "extra_body": dict(self.openai_extra_body)}
        return make_backend(self.backend, self.model, base_url=self.base_url, api_key_env=self.api_key_env,
                            agent_max_pixels=self.zoom_max_pixels, agent_min_pixels=self.zoom_min_pixels,
                            seed=self.seed, **kw)
