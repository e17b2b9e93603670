"""`knowzoom mine-hard`: k sampled rollouts per VQA item with the current model (rl.agent.run_episodes, the
same loop as eval); items whose pass rate is <= `max_pass_rate` (and >= `min_pass_rate`) form the hard set
that both the pre-warm SFT (sft/data.py) and RL read. Resumable: rollouts are cached durably per item and
rollout index (pipeline.eval.evaluate.run_cached), so a killed run continues where it stopped."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.config import hfield
from pipeline.core.records import write_jsonl
from pipeline.eval.rollout_config import RolloutStageConfig

if TYPE_CHECKING:
    from rl.agent import Backend

log = logging.getLogger(__name__)


@dataclass
class MineHardConfig(RolloutStageConfig):
    """Pass-rate mining of hard VQA samples."""

    output_dir: str = hfield("runs/tiny/hard", help="Folder for hard.jsonl, stats.json and the rollout cache.")
    dataset_path: str = hfield("runs/tiny/scenes/vqa_train.jsonl", help="The VQA set to mine (vqa_jsonl: a VQASample "
                                                                        "JSONL; xlrs: a local XLRS-format folder).")
    k: int = hfield(4, help="Sampled rollouts per item.")
    max_pass_rate: float = hfield(0.5, help="Keep items whose pass rate (correct/k) is <= this.")
    min_pass_rate: float = hfield(0.0, help="... and >= this (raise above 0 to drop items the model never solves).")
    temperature: float = hfield(1.0, help="Sampling temperature of the rollouts (> 0).")
    top_p: float = hfield(1.0, help="Nucleus p of the rollouts.")
    sample: int | None = hfield(None, help="Mine a random N items of the set (drawn with `seed`, kept in the set's "
                                           "order) instead of all: a budget that still spans every scene and "
                                           "sub-task, where `limit` takes the first N (one scene's questions).")

    def validate(self) -> list[str]:
        p = super().validate()
        if self.k < 1:
            p.append("k: must be >= 1 rollouts per item")
        if self.temperature <= 0:
            p.append("temperature: pass-rate mining needs sampling; set it > 0 (e.g. 1.0)")
        if not 0 <= self.min_pass_rate <= self.max_pass_rate <= 1:
            p.append("min_pass_rate/max_pass_rate: need 0 <= min_pass_rate <= max_pass_rate <= 1")
        if not 0 < self.top_p <= 1:
            p.append("top_p: must be in (0, 1]")
        if self.sample is not None and self.sample < 1:
            p.append("sample: must be >= 1 (or null to mine every item)")
        return p


def run(cfg: MineHardConfig, backend: Backend | None = None) -> dict[str, Any]:
    """Mine and write hard.jsonl (VQASample, meta.pass_rate set) and stats.json; returns the stats."""
    from pipeline.eval.evaluate import cache_key, load_eval_data, run_cached

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples, store = load_eval_data(cfg)
    if cfg.sample is not None and cfg.sample < len(samples):
        keep = sorted(random.Random(cfg.seed).sample(range(len(samples)), cfg.sample))
        samples = [samples[i] for i in keep]
    agent = cfg.agent_config(temperature=cfg.temperature, top_p=cfg.top_p)
    if backend is None:
        backend = cfg.make_backend()
    key = cache_key(cfg, agent, f"mine{cfg.k}")
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


__all__ = ["MineHardConfig", "run"]
