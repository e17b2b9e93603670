"""`knowzoom mine-hard`: k sampled rollouts per VQA item with the current model (rl.agent.run_episodes, the
same loop as eval); items whose pass rate is <= `max_pass_rate` (and >= `min_pass_rate`) form the hard set
that both the pre-warm SFT (sft/data.py) and RL read. Resumable: rollouts are cached durably per item and
rollout index (pipeline.evaluate.run_cached), so a killed run continues where it stopped."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import StageConfig, hfield
from pipeline.records import write_jsonl

log = logging.getLogger(__name__)


@dataclass
class MineHardConfig(StageConfig):
    """Pass-rate mining of hard VQA samples."""

    output_dir: str = hfield("runs/tiny/hard", help="Folder for hard.jsonl, stats.json and the rollout cache.")
    model: str = hfield("tiny", help="Model: 'tiny', a local folder, a cached HF id, or the served name (openai).")
    backend: str = hfield("transformers", help="transformers (CPU) | vllm (GPU) | openai (HTTP).")
    base_url: str = hfield("", help="backend openai: the server's /v1 URL.")
    api_key_env: str = hfield("OPENAI_API_KEY", help="backend openai: environment variable holding the API key.")
    device: str = hfield("cpu", help="backend transformers: torch device.")
    dtype: str = hfield("auto", help="backend transformers: auto | float32 | bfloat16 | float16.")
    dataset_path: str = hfield("runs/tiny/scenes/vqa_train.jsonl", help="VQASample JSONL to mine.")
    images_manifest: str = hfield("runs/tiny/scenes/images.jsonl", help="images.jsonl of the image store.")
    limit: int | None = hfield(None, help="Mine only the first N items.")
    protocol: str = hfield("zoom", help="zoom | direct (see knowzoom eval).")
    k: int = hfield(4, help="Sampled rollouts per item.")
    max_pass_rate: float = hfield(0.5, help="Keep items whose pass rate (correct/k) is <= this.")
    min_pass_rate: float = hfield(0.0, help="... and >= this (raise above 0 to drop items the model never solves).")
    temperature: float = hfield(1.0, help="Sampling temperature of the rollouts (> 0).")
    top_p: float = hfield(1.0, help="Nucleus p of the rollouts.")
    max_turns: int = hfield(5, help="Assistant turns per episode.")
    max_new_tokens: int = hfield(256, help="New tokens per turn.")
    batch_size: int = hfield(8, help="Conversations per generate call.")
    chunk_size: int = hfield(32, help="Episodes per durable chunk.")
    max_answer_chars: int = hfield(1000, help="Answers this long or longer get no credit (verifier).")
    zoom_max_pixels: int = hfield(50176, help="Pixel cap of every image shown.")
    zoom_min_pixels: int = hfield(3136, help="Pixel floor of every image shown.")
    zoom_frame: str = hfield("shown_pixels", help="Box frame: shown_pixels | norm1000.")
    zoom_max_calls: int = hfield(5, help="Zoom calls allowed per episode.")
    zoom_read_timeout_s: float = hfield(10.0, help="Per-read time limit of the zoom tool (seconds).")
    openai_concurrency: int = hfield(8, help="backend openai: concurrent requests.")
    openai_timeout_s: float = hfield(120.0, help="backend openai: per-request timeout (seconds).")

    def validate(self) -> list[str]:
        p = super().validate()
        if self.k < 1:
            p.append("k: must be >= 1 rollouts per item")
        if self.temperature <= 0:
            p.append("temperature: pass-rate mining needs sampling; set it > 0 (e.g. 1.0)")
        if not 0 <= self.min_pass_rate <= self.max_pass_rate <= 1:
            p.append("min_pass_rate/max_pass_rate: need 0 <= min_pass_rate <= max_pass_rate <= 1")
        if self.backend not in ("transformers", "vllm", "openai"):
            p.append("backend: use transformers, vllm or openai")
        if self.backend == "openai" and not self.base_url:
            p.append("base_url: backend openai needs the server URL")
        if self.protocol not in ("zoom", "direct"):
            p.append("protocol: use zoom or direct")
        if not 0 < self.top_p <= 1:
            p.append("top_p: must be in (0, 1]")
        for name in ("max_turns", "max_new_tokens", "batch_size", "chunk_size", "max_answer_chars"):
            if getattr(self, name) < 1:
                p.append(f"{name}: must be >= 1")
        if self.limit is not None and self.limit < 1:
            p.append("limit: must be >= 1 or null")
        return p


def run(cfg: MineHardConfig, backend: Any = None) -> dict[str, Any]:
    """Mine and write hard.jsonl (VQASample, meta.pass_rate set) and stats.json; returns the stats."""
    from pipeline.evaluate import agent_config, cache_key, load_eval_data, run_cached

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ecfg = _as_eval_view(cfg)
    samples, store = load_eval_data(ecfg)
    agent = agent_config(ecfg, temperature=cfg.temperature, top_p=cfg.top_p)
    if backend is None:
        from rl.backends import make_backend

        kw: dict[str, Any] = {}
        if cfg.backend == "transformers":
            kw = {"device": cfg.device, "dtype": cfg.dtype}
        elif cfg.backend == "openai":
            kw = {"concurrency": cfg.openai_concurrency, "timeout_s": cfg.openai_timeout_s}
        backend = make_backend(cfg.backend, cfg.model, base_url=cfg.base_url, api_key_env=cfg.api_key_env,
                               agent_max_pixels=cfg.zoom_max_pixels, agent_min_pixels=cfg.zoom_min_pixels,
                               seed=cfg.seed, **kw)
    key = cache_key(ecfg, agent, f"mine{cfg.k}")
    runs = run_cached(backend, samples, store, agent, cfg.k, out / "rollouts" / f"{key}.jsonl", cfg.chunk_size,
                      f"mine-hard (k={cfg.k})")
    hard, rates, unscored = [], {}, []
    per_task: dict[str, list[float]] = defaultdict(list)
    for s in samples:
        ok = [t for t in runs.get(s.id, []) if t.error is None]
        if len(ok) < cfg.k:
            unscored.append(s.id)  # some rollouts failed: rerun to retry them, never guess
            continue
        rate = sum(1 for t in ok if t.correct) / len(ok)
        rates[s.id] = rate
        per_task[s.category or "all"].append(rate)
        if cfg.min_pass_rate <= rate <= cfg.max_pass_rate:
            meta = dict(s.meta, pass_rate=rate, mined_k=cfg.k, mined_model=cfg.model)
            hard.append(dataclasses.replace(s, meta=meta))
    write_jsonl(out / "hard.jsonl", hard)
    hist = Counter(round(r * cfg.k) for r in rates.values())
    stats = {
        "n_items": len(samples), "n_scored": len(rates), "n_unscored": len(unscored), "n_hard": len(hard),
        "hard_fraction": len(hard) / len(rates) if rates else 0.0,
        "mean_pass_rate": sum(rates.values()) / len(rates) if rates else None,
        "pass_count_histogram": {f"{c}/{cfg.k}": hist.get(c, 0) for c in range(cfg.k + 1)},
        "per_category_mean_pass_rate": {c: sum(v) / len(v) for c, v in sorted(per_task.items())},
        "k": cfg.k, "max_pass_rate": cfg.max_pass_rate, "min_pass_rate": cfg.min_pass_rate,
        "cache": key, "hard_path": str(out / "hard.jsonl"), "unscored_ids": unscored[:50],
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2), encoding="utf-8")
    log.info("mine-hard: %d/%d items kept (pass rate <= %.2f)", len(hard), len(rates), cfg.max_pass_rate)
    return stats


def _as_eval_view(cfg: MineHardConfig) -> Any:
    """The fields the shared eval helpers read (dataset loading, agent config, cache key)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        dataset="vqa_jsonl", dataset_path=cfg.dataset_path, images_manifest=cfg.images_manifest, categories=[],
        limit=cfg.limit, xlrs_images_dir="", output_dir=cfg.output_dir, model=cfg.model, backend=cfg.backend,
        seed=cfg.seed, protocol=cfg.protocol, max_turns=cfg.max_turns, max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size, max_answer_chars=cfg.max_answer_chars, zoom_max_pixels=cfg.zoom_max_pixels,
        zoom_min_pixels=cfg.zoom_min_pixels, zoom_frame=cfg.zoom_frame, zoom_max_calls=cfg.zoom_max_calls,
        zoom_read_timeout_s=cfg.zoom_read_timeout_s,
    )


__all__ = ["MineHardConfig", "run"]
