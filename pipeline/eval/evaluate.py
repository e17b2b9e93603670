"""`knowzoom eval`: Pass@1 (greedy) and Pass@k (unbiased, from n sampled rollouts) on XLRS-Bench-lite or our
VQA JSONL, with the zoom-agent protocol or the official no-tool protocol.

Resumable: every finished episode is appended durably (fsync'd JSONL) to a predictions cache whose file name
is a hash of the model, the prompt and the generation settings, keyed per item and rollout; a killed run
resumes without recomputing or duplicating, and a change of model/prompt/settings starts a fresh cache.
Episodes that failed (backend or setup error) are not cached, so a rerun retries them. `--limit` runs are
marked not reportable. Outputs: results.json, results.md, per_task.png, viewer.html.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.config import hfield
from pipeline.core.datasets import DatasetFormatError
from pipeline.core.errors import DatasetNotFoundError
from pipeline.core.records import JsonlAppender, Trajectory, VQASample, from_dict, read_jsonl
from pipeline.eval.rollout_config import RolloutStageConfig

if TYPE_CHECKING:
    from rl.agent import AgentConfig, Backend
    from tools.store import ImageStore

log = logging.getLogger(__name__)

@dataclass
class EvalConfig(RolloutStageConfig):
    """Evaluate one model on one dataset with one protocol."""

    output_dir: str = hfield("runs/tiny/eval", help="Folder for results, predictions cache and viewer.")
    temperature: float = hfield(0.0, help="Pass@1 run temperature (0 = greedy, the reported protocol).")
    top_p: float = hfield(1.0, help="Pass@1 run nucleus sampling p.")
    n_samples: int = hfield(0, help="Sampled rollouts per item for Pass@k (0 = greedy Pass@1 only).")
    pass_k: list[int] = hfield([1], help="k values for Pass@k (each <= n_samples; 1 is the greedy Pass@1).")
    sample_temperature: float = hfield(1.0, help="Temperature of the n_samples rollouts.")
    sample_top_p: float = hfield(1.0, help="Nucleus p of the n_samples rollouts.")
    viewer_max_items: int = hfield(40, help="Trajectories shown in viewer.html (first wrong ones, then right ones).")
    benchmark_scoring: str = hfield("official", help="lrs_vqa / mme_rs: official (the benchmark's published rule, "
                                                     "pipeline/eval/benchmarks.py) | strict (our verifier).")

    def validate(self) -> list[str]:
        p = super().validate()
        if self.n_samples < 0:
            p.append("n_samples: must be >= 0")
        bad_k = [k for k in self.pass_k if k < 1 or (k > 1 and k > self.n_samples)]
        if bad_k:
            p.append(f"pass_k: {bad_k} need 1 <= k <= n_samples ({self.n_samples}); raise n_samples or drop them")
        if self.benchmark_scoring not in ("official", "strict"):
            p.append("benchmark_scoring: use official or strict")
        if self.viewer_max_items < 0:
            p.append("viewer_max_items: must be >= 0")
        if self.temperature < 0 or self.sample_temperature < 0:
            p.append("temperature/sample_temperature: must be >= 0")
        if self.n_samples > 0 and self.sample_temperature == 0:
            p.append("sample_temperature: Pass@k needs sampling; set it > 0 (e.g. 1.0)")
        if not 0 < self.top_p <= 1 or not 0 < self.sample_top_p <= 1:
            p.append("top_p/sample_top_p: must be in (0, 1]")
        return p


# ------------------------------------------------------------------------------------------ pieces
def model_fingerprint(spec: str, backend: str) -> str:
    """Identity of the weights: the resolved folder plus its config and weight file sizes/mtimes."""
    if backend == "openai":
        return f"openai:{spec}"
    try:
        from pipeline.models import resolve_model_path

        path = resolve_model_path(spec)
    except Exception:  # noqa: BLE001 — an unresolvable spec fails later with a clear error
        return f"{backend}:{spec}"
    parts = [str(path)]
    for f in sorted(path.glob("*")):
        if f.suffix in (".safetensors", ".bin", ".json", ".jinja") and f.is_file():
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{int(st.st_mtime)}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def prompt_fingerprint(protocol: str, frame: str) -> str:
    """Hash of everything the prompt renderer puts around a question."""
    if protocol == "direct":
        from pipeline.core import datasets as d
        from pipeline.eval.benchmarks import PROMPT_TEXT

        text = d._OPTION_PROMPT + d._POST_SINGLE + d._POST_MULTI + PROMPT_TEXT
    else:
        from tools import protocol as p

        text = p.system_prompt(frame) + p.DEFAULT_INSTRUCTION + json.dumps(p.zoom_tool_schema(frame), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_key(cfg: RolloutStageConfig, agent: AgentConfig, mode: str) -> str:
    d = {"model": model_fingerprint(cfg.model, cfg.backend), "backend": cfg.backend,
         "prompt": prompt_fingerprint(agent.protocol, agent.zoom.frame), "mode": mode,
         "gen": {k: getattr(agent, k) for k in ("max_turns", "max_new_tokens", "temperature", "top_p",
                                                "protocol", "max_answer_chars")},
         "zoom": {k: getattr(agent.zoom, k) for k in vars(agent.zoom)}, "seed": cfg.seed}
    if cfg.backend == "openai" and getattr(cfg, "openai_tool_mode", "text") != "text":
        d["openai_tool_mode"] = cfg.openai_tool_mode  # other messages reach the server
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_eval_data(cfg: RolloutStageConfig) -> tuple[list[VQASample], ImageStore]:
    """(samples, image store) for the configured dataset; XLRS images go through prepare-images once."""
    from tools.store import ImageStore

    if cfg.dataset == "vqa_jsonl":
        from pipeline.core.datasets import load_vqa_jsonl

        samples = load_vqa_jsonl(cfg.dataset_path)
        manifest = Path(cfg.images_manifest)
        if not manifest.exists():
            raise DatasetNotFoundError(f"images_manifest {manifest} does not exist; run make-scenes or point it at "
                                       "the images.jsonl of the dataset")
        store = ImageStore.from_manifest(manifest)
    elif cfg.dataset in ("lrs_vqa", "mme_rs"):
        from pipeline.eval.benchmarks import load_benchmark

        work = Path(cfg.xlrs_images_dir or Path(cfg.output_dir) / f"{cfg.dataset}_images")
        samples, raw = load_benchmark(cfg.dataset, cfg.dataset_path, work)
        manifest = prepare_images(raw, work / "prepared")
        store = ImageStore.from_manifest(manifest)
    else:
        from pipeline.core.datasets import load_xlrs, save_vqa_jsonl

        work = Path(cfg.xlrs_images_dir or Path(cfg.output_dir) / "xlrs_images")
        samples, raw = load_xlrs(cfg.dataset_path, work, categories=list(cfg.categories) or None)
        save_vqa_jsonl(work / "xlrs_questions.jsonl", samples)
        manifest = prepare_images(raw, work / "prepared")
        store = ImageStore.from_manifest(manifest)
    if cfg.categories:
        from pipeline.core.datasets import subtask_name

        keep = set(cfg.categories)
        samples = [s for s in samples if s.category in keep or subtask_name(s.category) in keep]
    if cfg.limit is not None:
        samples = samples[: cfg.limit]
    if not samples:
        raise DatasetNotFoundError(f"{cfg.dataset_path}: no samples left after the categories/limit filters")
    missing = sorted({i for s in samples for i in s.images if i not in store})
    if missing:
        raise DatasetNotFoundError(f"{len(missing)} image ids are not in the store, e.g. {missing[:3]}")
    return samples, store


def prepare_images(raw_dir: Path, out_dir: Path) -> Path:
    """Convert raw JPEG/PNG files to tiled COGs with overviews with the `prepare-images` stage's function and
    bookkeeping (it converts each file once and skips it on later runs). Returns the images.jsonl manifest."""
    from pipeline.core.config import load_config
    from pipeline.core.launch import run_recorded
    from tools.prepare import PrepareImagesConfig
    from tools.prepare import run as prepare_run

    pcfg = load_config(PrepareImagesConfig, None, {"input_dir": str(raw_dir), "output_dir": str(out_dir)})
    # prepare-images skips files it already converted, so running it again costs only the checks
    summary = run_recorded("prepare-images", pcfg, prepare_run) or {}
    if summary.get("failed"):
        raise DatasetFormatError(f"prepare-images failed on {summary['failed']} images under {raw_dir}: "
                                 f"{(summary.get('errors') or [])[:3]}")
    manifest = out_dir / "images.jsonl"
    if not manifest.exists():
        raise DatasetNotFoundError(f"prepare-images wrote no {manifest}")
    return manifest


def _traj_from(d: dict[str, Any]) -> Trajectory:
    return from_dict(Trajectory, d)


def run_cached(backend: Backend, samples: list[VQASample], store: ImageStore, agent: AgentConfig, n: int,
               cache: Path, chunk_size: int, desc: str) -> dict[str, list[Trajectory]]:
    """Run the rollouts not yet in `cache` and return all of them per sample id (rollout order).
    Each finished, error-free episode is appended durably as it finishes."""
    from tqdm import tqdm

    from pipeline.core.records import to_dict
    from rl.agent import run_episodes

    app = JsonlAppender(cache, key="key")
    done: dict[str, dict[str, Any]] = {}
    for d in read_jsonl(cache) if cache.exists() else []:
        done[d["key"]] = d
    wanted = {s.id for s in samples}
    # sample-major, so the rollouts of one item sit in the same batches
    pending = [(s, k) for s in samples for k in range(n) if f"{s.id}#{k}" not in done]
    fresh: dict[str, Trajectory] = {}
    bar = tqdm(total=len(samples) * n, initial=len(samples) * n - len(pending), desc=desc, unit="ep")

    def on_done(t: Trajectory) -> None:
        key = f"{t.sample_id}#{t.meta.get('rollout', 0)}"
        bar.update(1)
        if t.error is None:
            app.append({"key": key, "trajectory": to_dict(t)})
        fresh[key] = t

    try:
        for i in range(0, len(pending), chunk_size):
            chunk = pending[i:i + chunk_size]
            run_episodes(backend, [s for s, _ in chunk], store, agent, n=1, on_done=on_done,
                         rollout_ids=[k for _, k in chunk])
    finally:
        app.close()
        bar.close()
    out: dict[str, list[Trajectory]] = {s.id: [] for s in samples}
    for key, d in done.items():
        sid, k = key.rsplit("#", 1)
        if sid in wanted and int(k) < n:
            out[sid].append(_traj_from(d["trajectory"]))
    for key, t in fresh.items():
        out[key.rsplit("#", 1)[0]].append(t)
    for sid in out:
        out[sid].sort(key=lambda t: t.meta.get("rollout", 0))
    return out


def _viewer_items(samples: list[VQASample], greedy: dict[str, Trajectory], store: ImageStore,
                  agent: AgentConfig, max_items: int) -> list[tuple[Trajectory, VQASample, dict]]:
    from pipeline.eval.viewer import load_observation_images

    ordered = [s for s in samples if s.id in greedy and not greedy[s.id].correct]
    ordered += [s for s in samples if s.id in greedy and greedy[s.id].correct]
    items = []
    for s in ordered[:max_items]:
        t = greedy[s.id]
        try:
            ims = load_observation_images(t, store, agent.zoom)
        except Exception as e:  # noqa: BLE001 — the viewer must not sink the evaluation
            log.warning("viewer: cannot re-read observations of %s: %s", s.id, e)
            ims = {}
        items.append((t, s, ims))
    return items


def run(cfg: EvalConfig, backend: Backend | None = None) -> dict[str, Any]:
    """Evaluate and write results.json / results.md / per_task.png / viewer.html; returns the headline."""
    from pipeline.eval.report import compute_metrics, write_reports
    from pipeline.eval.viewer import write_viewer

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples, store = load_eval_data(cfg)
    greedy_agent = cfg.agent_config(temperature=cfg.temperature, top_p=cfg.top_p)
    if backend is None:
        backend = cfg.make_backend()
    pred_dir = out / "predictions"
    gkey = cache_key(cfg, greedy_agent, "pass1")
    greedy_runs = run_cached(backend, samples, store, greedy_agent, 1, pred_dir / f"{gkey}.jsonl",
                             cfg.chunk_size, "pass@1")
    greedy = {sid: ts[0] for sid, ts in greedy_runs.items() if ts}
    sampled: dict[str, list[Trajectory]] = {}
    skey = None
    if cfg.n_samples > 0:
        s_agent = cfg.agent_config(temperature=cfg.sample_temperature, top_p=cfg.sample_top_p)
        skey = cache_key(cfg, s_agent, f"sample{cfg.n_samples}")
        sampled = run_cached(backend, samples, store, s_agent, cfg.n_samples, pred_dir / f"{skey}.jsonl",
                             cfg.chunk_size, f"pass@k (n={cfg.n_samples})")
    official = None
    if cfg.dataset in ("lrs_vqa", "mme_rs"):
        from pipeline.eval.benchmarks import official_tables, rescore

        scoring = {"rule": "strict"}
        if cfg.benchmark_scoring == "official":
            scoring = rescore(cfg.dataset, samples, [greedy, sampled], cfg.protocol)
        official = {"scoring": scoring, **official_tables(cfg.dataset, samples, greedy)}
    metrics = compute_metrics(samples, greedy, sampled, [k for k in cfg.pass_k if k > 1] or None,
                              n_samples=cfg.n_samples or None)
    n_err = metrics["overall"]["errors"] + sum(1 for s in samples if s.id not in greedy)
    reasons = []
    if cfg.limit is not None:
        reasons.append(f"--limit {cfg.limit} evaluates a subset")
    if n_err:
        reasons.append(f"{n_err} items have no scored prediction (episode errors); rerun to retry them")
    missing = metrics["overall"].get("items_missing_rollouts", 0)
    if missing:
        reasons.append(f"{missing} items have fewer than {cfg.n_samples} scored rollouts "
                       f"({metrics['overall']['sampled_errors']} rollouts errored), so Pass@k is computed on "
                       "fewer items or rollouts; rerun to retry them")
    result = {
        "model": cfg.model, "backend": cfg.backend, "dataset": cfg.dataset, "dataset_path": cfg.dataset_path,
        "protocol": cfg.protocol, "reportable": not reasons, "not_reportable_reason": "; ".join(reasons),
        "limit": cfg.limit, "n_samples": cfg.n_samples, "pass_k": cfg.pass_k,
        "cache": {"pass1": gkey, "sampled": skey}, "metrics": metrics,
    }
    if official is not None:
        result["official"] = official
    paths = write_reports(result, out)
    if official is not None:
        from pipeline.eval.benchmarks import official_markdown

        with (out / "results.md").open("a", encoding="utf-8") as f:
            f.write(official_markdown(official))
    viewer = write_viewer(out / "viewer.html", _viewer_items(samples, greedy, store, greedy_agent,
                                                             cfg.viewer_max_items),
                          title=f"{cfg.model} · {cfg.dataset} · {cfg.protocol}",
                          note="" if result["reportable"] else f"NOT REPORTABLE: {result['not_reportable_reason']}")
    o = metrics["overall"]
    if o["n"] == 0:
        from pipeline.core.errors import EvalError

        errs = [greedy[s.id].error for s in samples if s.id in greedy and greedy[s.id].error][:2]
        raise EvalError(f"no episode could be scored ({n_err} of {len(samples)} items failed, e.g. {errs}); "
                        f"reports in {out} show every error")
    summary = {k: o[k] for k in o if k.endswith(("_micro", "_macro", "_items"))}
    if cfg.n_samples:
        summary.update(sampled_errors=o["sampled_errors"], items_missing_rollouts=o["items_missing_rollouts"])
    summary.update(n=o["n"], errors=o["errors"], parse_failure_rate=o["parse_failure_rate"],
                   tool_calls_per_question=o["tool_calls_per_question"], reportable=result["reportable"],
                   viewer=str(viewer), **paths)
    return summary


__all__ = ["EvalConfig", "run", "load_eval_data", "run_cached", "cache_key", "prepare_images"]
