"""`knowzoom build-qa`: knowledge graph → verified text QA JSONL (+ TRL / LLaMA-Factory exports, stats).

Steps: build and validate the graph; split its facts (triples) into train/val/test by a seeded hash;
generate template QA inside each split's facts (so no test fact appears in training); optionally ask a
teacher LLM for QA from split-local subgraphs; verify everything on the graph (reasons kept in
rejections.jsonl); dedup (normalised + near-duplicate); check leakage loudly; write outputs.
"""

from __future__ import annotations

import gc
import itertools
import json
import multiprocessing as mp
import os
import time
from collections import Counter, deque
from collections.abc import Generator as GeneratorT
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kg_qa_builder.dataset import (
    SPLITS,
    NearDupIndex,
    check_leakage,
    entity_split,
    export_sharegpt,
    export_trl,
    norm_question,
    partition,
    qa_row,
    write_stats,
)
from kg_qa_builder.errors import GenerationError
from kg_qa_builder.generate import Generator
from kg_qa_builder.importers import build_graph
from kg_qa_builder.quality import answer_leak
from kg_qa_builder.scenarios import PRINCIPLE_HEADS, ScenarioGenerator
from kg_qa_builder.verdict import Verdict
from kg_qa_builder.verify import Verifier
from pipeline.core.config import StageConfig, hfield
from pipeline.core.records import TextQA, read_jsonl, write_jsonl

if TYPE_CHECKING:
    from kg_qa_builder.graph import KnowledgeGraph

QTYPES = ("mcq", "tf", "fill", "free")


@dataclass
class BuildQAConfig(StageConfig):
    """Config of `knowzoom build-qa`."""

    output_dir: str = hfield("runs/tiny/qa", help="Folder for qa_{train,val,test}.jsonl, exports, stats, rejections.")
    graph_sources: list[str] = hfield(["spyndex", "climaclass", "earthlib", "curated"],
                                      help="Graph sources to load: spyndex, climaclass, earthlib, curated.")
    curated_files: list[str] = hfield([], help="Curated fact YAML files; empty = the packaged kg_qa_builder/data/*.yaml.")
    max_spectra: int = hfield(-1, help="Cap on earthlib spectra imported (-1 = all 7k).")
    n_train: int = hfield(4000, help="Template QA to keep in the train split.")
    n_val: int = hfield(300, help="Template QA to keep in the val split.")
    n_test: int = hfield(600, help="Template QA to keep in the test split.")
    min_test: int = hfield(400, help="Fail when fewer test QA than this can be generated.")
    val_fraction: float = hfield(0.08, help="Fraction of facts (triples) assigned to val.")
    test_fraction: float = hfield(0.15, help="Fraction of facts (triples) assigned to test.")
    hop_weights: list[float] = hfield([0.6, 0.3, 0.1], help="Sampling weights of 1-, 2- and 3-hop questions.")
    qtype_weights: dict = hfield({"mcq": 0.35, "tf": 0.2, "fill": 0.15, "free": 0.3},
                                 help="Sampling weights of question types (mcq, tf, fill, free).")
    relation_weights: dict = hfield({}, help="Per-relation sampling weight overrides (0 disables a relation).")
    n_distractors: int = hfield(3, help="MCQ distractors (options = 1 + this).")
    max_attempts_factor: int = hfield(30, help="Give up a split after this many samples per wanted QA.")
    near_dup_threshold: float = hfield(0.9, help="Word-3-shingle Jaccard at or above which a QA is a near-duplicate.")
    scenario_share: float = hfield(0.7, help="Share of each split made of scenario QA (XLRS-Bench-lite sub-tasks in "
                                   "words, solved on the graph); the rest are template QA about single facts.")
    scenario_qtype_weights: dict = hfield({"free": 0.75, "mcq": 0.2, "tf": 0.05},
                                          help="Question types of scenario QA (free, mcq, tf).")
    scenario_kinds: dict = hfield({}, help="Per-scenario-kind weight overrides (0 disables), e.g. {occ-size: 2}.")
    workers: int = hfield(1, help="Processes that sample and verify QA in parallel (1 = this process only; the "
                          "paper-scale config uses 2, forked from a fresh CLI process); the "
                          "output is byte-identical for any number.")
    teacher_url: str = hfield("", help="OpenAI-compatible base URL (e.g. http://host:8000/v1); empty = no teacher.")
    teacher_model: str = hfield("teacher", help="Model name sent to the teacher endpoint.")
    teacher_api_key_env: str = hfield("OPENAI_API_KEY", help="Environment variable holding the teacher API key (optional).")
    teacher_requests: dict = hfield({"train": 0, "val": 0, "test": 0}, help="Teacher calls per split.")
    teacher_items_per_request: int = hfield(4, help="QA the teacher is asked to write per call.")
    teacher_context_triples: int = hfield(12, help="Facts shown to the teacher per call.")
    teacher_concurrency: int = hfield(8, help="Concurrent teacher calls.")
    teacher_timeout_s: float = hfield(60.0, help="Timeout of one teacher call in seconds.")
    teacher_max_retries: int = hfield(3, help="Retries per teacher call (exponential backoff).")
    teacher_temperature: float = hfield(0.7, help="Teacher sampling temperature.")
    teacher_max_tokens: int = hfield(1024, help="Teacher max new tokens per call.")

    def validate(self) -> list[str]:
        p = super().validate()
        bad = set(self.graph_sources) - {"spyndex", "climaclass", "earthlib", "curated"}
        if bad:
            p.append(f"graph_sources: unknown {sorted(bad)}; use spyndex, climaclass, earthlib, curated")
        for f in ("n_train", "n_val", "n_test", "min_test", "n_distractors"):
            if getattr(self, f) < 0:
                p.append(f"{f}: must be >= 0")
        if self.min_test > self.n_test:
            p.append(f"min_test: {self.min_test} exceeds n_test {self.n_test}; lower min_test or raise n_test")
        if not (0 <= self.val_fraction < 1 and 0 < self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            p.append("val_fraction/test_fraction: need 0 <= val, 0 < test and val + test < 1")
        if len(self.hop_weights) != 3 or min(self.hop_weights) < 0 or sum(self.hop_weights) <= 0:
            p.append("hop_weights: give 3 non-negative weights (1, 2, 3 hops) with a positive sum")
        if set(self.qtype_weights) - set(QTYPES) or sum(float(v) for v in self.qtype_weights.values()) <= 0:
            p.append(f"qtype_weights: keys must be among {QTYPES} with a positive sum")
        if not 0 <= self.scenario_share <= 1:
            p.append("scenario_share: must be in [0, 1]")
        if set(self.scenario_qtype_weights) - {"free", "mcq", "tf"} or sum(
                float(v) for v in self.scenario_qtype_weights.values()) <= 0:
            p.append("scenario_qtype_weights: keys among free, mcq, tf with a positive sum")
        from kg_qa_builder.scenarios import KINDS

        if set(self.scenario_kinds) - set(KINDS):
            p.append(f"scenario_kinds: unknown {sorted(set(self.scenario_kinds) - set(KINDS))}; use {sorted(KINDS)}")
        if not 0 < self.near_dup_threshold <= 1:
            p.append("near_dup_threshold: must be in (0, 1]")
        if self.workers < 1:
            p.append("workers: must be >= 1")
        if self.max_attempts_factor < 1:
            p.append("max_attempts_factor: must be >= 1")
        if set(self.teacher_requests) - set(SPLITS):
            p.append(f"teacher_requests: keys must be among {SPLITS}")
        if self.teacher_concurrency < 1 or self.teacher_timeout_s <= 0 or self.teacher_max_retries < 0:
            p.append("teacher_concurrency >= 1, teacher_timeout_s > 0, teacher_max_retries >= 0 required")
        return p


class KeepRules:
    """Per-split caps applied before an item is kept: at most `per_fact` items per (fact, question type),
    catalogue trivia at most `trivia_cap` of the split's target, and no item that states its answer."""

    def __init__(self, n: int, per_fact: int = 2, trivia_share: float = 0.08):
        self.per_fact = per_fact
        self.trivia_cap = int(trivia_share * n)
        self.fact_count: Counter = Counter()
        self.trivia = 0

    def check(self, q: TextQA) -> str:
        """'' when the item may be kept, else the rejection reason."""
        if answer_leak(q):
            return "answer_leak"
        if q.meta.get("trivia") and self.trivia >= self.trivia_cap:
            return "trivia_cap"
        key = (tuple(q.meta.get("fact_key") or (q.meta.get("evidence_ids") or [[q.id]])[-1]), q.qtype)
        if self.fact_count[key] >= self.per_fact:
            return "fact_cap"
        return ""

    def keep(self, q: TextQA) -> None:
        key = (tuple(q.meta.get("fact_key") or (q.meta.get("evidence_ids") or [[q.id]])[-1]), q.qtype)
        self.fact_count[key] += 1
        self.trivia += bool(q.meta.get("trivia"))


def generate_split(gen: Generator | ScenarioGenerator, ver: Verifier, split: str, n: int, max_attempts: int, near: NearDupIndex,
                   seen: set[str], rejections: Counter, rej_log: list[dict[str, Any]],
                   rules: KeepRules | None = None, *, stream: str | None = None,
                   workers: int | Workers = 1) -> list[TextQA]:
    """Sample, verify, apply the keep rules and dedup until n QA are kept or max_attempts samples were drawn.

    Sample k is drawn with the generator's RNG seeded by `stream` and k alone, so candidates do not depend on
    each other: `workers` processes (a number, or a started `Workers`) sample and verify them in parallel and the
    keep rules and dedup see them in index order, which makes the output byte-identical for any number of
    workers."""
    out: list[TextQA] = []
    if n <= 0:
        return out
    rules = rules or KeepRules(n)
    if isinstance(workers, int):  # a pool for this call alone
        with Workers(workers).add(gen, ver) as pool:
            return generate_split(gen, ver, split, n, max_attempts, near, seen, rejections, rej_log, rules,
                                  stream=stream, workers=pool)
    cands = workers.candidates(gen, ver, stream if stream is not None else f"{split}:{n}", max_attempts)
    try:
        for q, v in cands:
            if len(out) >= n:
                break
            if q is None or v is None:  # no question drawn (a drawn question always has its verdict)
                rejections["no_valid_question"] += 1
                continue
            if not v.ok:
                rejections[v.reason] += 1
                if len(rej_log) < 10000:
                    rej_log.append({"id": q.id, "source": q.source, "reason": v.reason, "detail": v.detail,
                                    "question": q.question})
                continue
            why = rules.check(q)
            if why:
                rejections[why] += 1
                continue
            key = norm_question(q)
            if key in seen:
                rejections["duplicate"] += 1
                continue
            if not near.add(q.question + " " + " ".join(q.choices),
                            q.answer if q.qtype != "mcq" else q.choices[ord(q.answer) - 65]):
                rejections["near_duplicate"] += 1
                continue
            seen.add(key)
            rules.keep(q)
            q.split = split
            out.append(q)
    finally:
        cands.close()
    return out


Candidate = tuple[TextQA | None, Verdict | None]
_JOBS: list[tuple[Any, Verifier]] = []  # (generator, verifier) pairs, inherited by the forked workers


def sample_range(gen: Any, ver: Verifier, stream: str, lo: int, hi: int) -> list[Candidate]:
    """Candidates lo..hi-1 of a stream: sample k (RNG seeded by stream and k) and its verdict on the graph."""
    out: list[Candidate] = []
    for k in range(lo, hi):
        gen.rng.seed(f"{stream}:{k}")
        q = gen.sample()
        out.append((q, None if q is None else ver.verify(q)))
    return out


def _sample_job(job: int, stream: str, lo: int, hi: int) -> list[Candidate]:
    gen, ver = _JOBS[job]
    return sample_range(gen, ver, stream, lo, hi)


class Workers:
    """Worker processes that sample and verify candidates, forked once per build with every generator of the
    build registered (`add`) beforehand, so nothing big is pickled and caches warm up once. With n <= 1 the
    candidates are computed in this process; the candidates are the same either way."""

    def __init__(self, n: int, chunk: int = 64):
        self.n, self.chunk = n, chunk
        self.jobs: list[tuple[Any, Verifier]] = []
        self.pool: Any = None

    def add(self, gen: Any, ver: Verifier) -> Workers:
        if self.pool is not None:
            raise RuntimeError("register generators before the workers start")
        self.jobs.append((gen, ver))
        return self

    def __enter__(self) -> Workers:
        global _JOBS
        if self.n > 1 and "fork" in mp.get_all_start_methods():  # elsewhere (Windows): in this process
            _JOBS = self.jobs
            gc.freeze()  # keep the collector from touching (and so copying) the parent's objects in every worker
            self.pool = mp.get_context("fork").Pool(self.n)
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        global _JOBS
        if self.pool is not None:
            # Never kill a worker that may be writing a result: one killed while holding the result queue's
            # write lock leaves it locked, and Pool.terminate then waits on it forever (seen in CI). Every chunk
            # a consumer started has finished (`candidates` waits for them), so close + join ends cleanly; only
            # a failure or an interrupt terminates.
            if exc_type is None:
                self.pool.close()
            else:
                self.pool.terminate()
            self.pool.join()
            self.pool = None
            gc.unfreeze()
        _JOBS = []

    def candidates(self, gen: Any, ver: Verifier, stream: str, max_attempts: int) -> GeneratorT[Candidate]:
        """Candidates 0..max_attempts-1 in index order; at most 2 chunks per worker run ahead of the consumer
        (the chunks still running when the consumer stops are waited for and dropped, so no worker is ever killed
        mid-write)."""
        starts = range(0, max_attempts, self.chunk)
        if self.pool is None or max_attempts <= self.chunk:
            for lo in starts:
                yield from sample_range(gen, ver, stream, lo, min(max_attempts, lo + self.chunk))
            return
        job = next((i for i, (g, v) in enumerate(self.jobs) if g is gen and v is ver), None)
        if job is None:
            raise RuntimeError("generator not registered with Workers.add before the workers started")
        todo = iter(starts)

        def submit(lo: int) -> Any:
            return self.pool.apply_async(_sample_job, (job, stream, lo, min(max_attempts, lo + self.chunk)))

        pending = deque(submit(lo) for lo in itertools.islice(todo, 2 * self.n))
        try:
            while pending:
                res = pending.popleft().get()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(submit(nxt))
                yield from res
        finally:  # the consumer stopped early: let the chunks still running finish (at most 2 per worker)
            for p in pending:
                p.wait()


def split_of(kg: KnowledgeGraph, entity: str, cfg: BuildQAConfig) -> str:
    """The split an entity belongs to: the seeded hash, except the general tools every split's scenarios
    reason with (lane width, construction signatures, sun-elevation cues), which are training knowledge."""
    if kg.name(entity) in PRINCIPLE_HEADS:
        return "train"
    return entity_split(entity, cfg.seed, cfg.val_fraction, cfg.test_fraction)


def split_facts(kg: KnowledgeGraph, cfg: BuildQAConfig) -> dict[str, set]:
    """Facts (triples) per split, by their subject entity (see `split_of`)."""
    parts = partition(kg.triples, cfg.seed, cfg.val_fraction, cfg.test_fraction)
    for s in ("val", "test"):
        tools = {t for t in parts[s] if kg.name(t[0]) in PRINCIPLE_HEADS}
        parts[s] -= tools
        parts["train"] |= tools
    return parts


def run(cfg: BuildQAConfig) -> dict[str, Any]:
    """Build the graph, generate + verify + dedup + split QA, write JSONL, exports, stats, rejections."""
    t0 = time.time()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    kg = build_graph(cfg.graph_sources, cfg.curated_files or None,
                     max_spectra=None if cfg.max_spectra < 0 else cfg.max_spectra)
    gstats = kg.stats()
    (out / "graph_stats.json").write_text(json.dumps(gstats, indent=1), encoding="utf-8")
    parts = split_facts(kg, cfg)
    rejections: Counter = Counter()
    rej_log: list[dict[str, Any]] = []
    seen: set[str] = set()
    near = NearDupIndex(cfg.near_dup_threshold, seed=cfg.seed)
    verifier = Verifier(kg)
    by_split: dict[str, list[TextQA]] = {}
    # test first, so its questions win any cross-split textual tie
    order = [("test", cfg.n_test), ("val", cfg.n_val), ("train", cfg.n_train)]
    gens = {}
    for i, (split, _) in enumerate(order):

        def in_split(s: str, sp: str = split) -> bool:  # sp bound now (the generator keeps the predicate)
            return split_of(kg, s, cfg) == sp

        sgen = ScenarioGenerator(
            kg, seed=cfg.seed * 1000 + 500 + i,
            subjects=in_split,
            qtype_weights={k: float(v) for k, v in cfg.scenario_qtype_weights.items()},
            kinds={k: float(v) for k, v in cfg.scenario_kinds.items()} or None)
        h1, h2, h3 = cfg.hop_weights  # three, checked by BuildQAConfig
        gen = Generator(kg, parts[split], seed=cfg.seed * 1000 + i, hop_weights=(h1, h2, h3),
                        qtype_weights={k: float(v) for k, v in cfg.qtype_weights.items()},
                        relation_weights={k: float(v) for k, v in cfg.relation_weights.items()},
                        n_distractors=cfg.n_distractors)
        gens[split] = (sgen, gen)
    workers = Workers(cfg.workers)
    for sgen, gen in gens.values():
        workers.add(sgen, verifier).add(gen, verifier)
    with workers:  # forked once, after every generator exists
        for split, n in order:
            n_scen = round(n * cfg.scenario_share)
            rules = KeepRules(n)
            sgen, gen = gens[split]
            scen = generate_split(sgen, verifier, split, n_scen, max(1, n_scen) * cfg.max_attempts_factor, near,
                                  seen, rejections, rej_log, rules, stream=f"{cfg.seed}:scenario:{split}",
                                  workers=workers)
            tmpl = generate_split(gen, verifier, split, n - len(scen), (n - len(scen)) * cfg.max_attempts_factor,
                                  near, seen, rejections, rej_log, rules, stream=f"{cfg.seed}:template:{split}",
                                  workers=workers)
            by_split[split] = sorted(scen + tmpl, key=lambda q: q.id)  # interleave the two kinds, deterministically
    teacher_summary: dict[str, Any] = {}
    if cfg.teacher_url and any(int(v) > 0 for v in cfg.teacher_requests.values()):
        teacher_summary = run_teacher(cfg, kg, parts, verifier, by_split, near, seen, rejections, rej_log)
    if len(by_split["test"]) < cfg.min_test:
        raise GenerationError(f"only {len(by_split['test'])} test QA (min_test {cfg.min_test}); raise test_fraction "
                              "or max_attempts_factor, or lower min_test")
    leak = check_leakage(by_split)
    files = {}
    for s in SPLITS:
        files[s] = write_jsonl(out / f"qa_{s}.jsonl", map(qa_row, by_split[s]))
        export_trl(out / f"qa_{s}_trl.jsonl", by_split[s])
    export_sharegpt(out, by_split)
    write_jsonl(out / "rejections.jsonl", rej_log)
    tables = write_stats(out, by_split, rejections, gstats, {
        "seconds": round(time.time() - t0, 1), "facts per split": {s: len(v) for s, v in parts.items()},
        "curated facts": sum(v for k, v in gstats["sources"].items() if k.startswith("curated")),
        "curated facts with a published reference (row/table citation)": len(kg.refs),
        "image-interpretation facts (relations flagged interp)": sum(
            1 for _, r, _ in kg.triples if kg.schema.relations[r].interp),
        "verified QA per minute (whole build)": round(sum(len(v) for v in by_split.values()) / max(
            1e-9, time.time() - t0) * 60),
        "teacher": teacher_summary or "not used"})
    return {"graph_nodes": gstats["nodes"], "graph_edges": gstats["edges"], "counts": files,
            "rejections": dict(rejections), "leakage_check": leak, "teacher": teacher_summary,
            "by_qtype": tables["qtype"], "by_hops": tables["hops"], "quality": tables["quality"],
            "seconds": round(time.time() - t0, 2)}


def run_teacher(cfg: BuildQAConfig, kg: KnowledgeGraph, parts: dict[str, set], verifier: Verifier,
                by_split: dict[str, list[TextQA]], near: NearDupIndex, seen: set[str], rejections: Counter,
                rej_log: list[dict[str, Any]]) -> dict[str, Any]:
    """Call the teacher (resumable), verify its items and add the accepted ones to their split."""
    from kg_qa_builder.teacher import TeacherClient, build_requests

    reqs = build_requests(kg, parts, {k: int(v) for k, v in cfg.teacher_requests.items()},
                          n_items=cfg.teacher_items_per_request, context_triples=cfg.teacher_context_triples,
                          seed=cfg.seed, skip_relations={"instance_of_surface", "from_library"})
    client = TeacherClient(cfg.teacher_url, cfg.teacher_model, os.environ.get(cfg.teacher_api_key_env) or None,
                           cfg.teacher_concurrency, cfg.teacher_timeout_s, cfg.teacher_max_retries,
                           temperature=cfg.teacher_temperature, max_tokens=cfg.teacher_max_tokens)
    raw = Path(cfg.output_dir) / "teacher_raw.jsonl"
    calls = client.run(reqs, raw)
    wanted = {r.id for r in reqs}
    kept: Counter[str] = Counter()
    seen_req: set[str] = set()
    for rec in read_jsonl(raw):
        if rec["id"] not in wanted or rec["id"] in seen_req:
            continue
        seen_req.add(rec["id"])
        if rec.get("error"):
            rejections["teacher_call_failed"] += 1
            continue
        split = rec["split"]
        for item in rec["items"]:
            qa, v = verifier.verify_teacher(item, split)
            if qa is not None and not all(tuple(t) in parts[split] for t in qa.meta["evidence_ids"]):
                qa, v = None, type(v)(False, "split_straddle", "evidence uses facts of another split")
            if qa is None:
                rejections["teacher:" + v.reason] += 1
                rej_log.append({"id": rec["id"], "source": "teacher", "reason": v.reason, "detail": v.detail,
                                "question": str(item.get("question", ""))[:300]})
                continue
            key = norm_question(qa)
            if key in seen:
                rejections["duplicate"] += 1
                continue
            seen.add(key)
            near.add(qa.question + " " + " ".join(qa.choices), qa.answer)
            by_split[split].append(qa)
            kept[split] += 1
    return {"calls": calls, "kept": dict(kept), "requests": len(reqs)}
