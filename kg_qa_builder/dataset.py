"""Split by fact, dedup (normalised + near-duplicate MinHash), the leakage check, exports and stats."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from kg_qa_builder.errors import LeakageError
from kg_qa_builder.graph import norm
from pipeline.core.records import TextQA, write_jsonl
from tools.protocol import text_qa_messages

SPLITS = ("train", "val", "test")
_WORD = re.compile(r"[a-z0-9]+")
_MASK48 = np.uint64(0xFFFFFFFFFFFF)


def fact_split(triple: tuple[str, str, str] | list[str], seed: int, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split of one fact (triple of node ids) by a seeded hash of its subject (head) entity, so
    every fact about one entity lands in one split and no entity is asked about in both train and test."""
    return entity_split(triple[0], seed, val_fraction, test_fraction)


def entity_split(entity: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split of one entity (node id) by a seeded hash."""
    h = hashlib.blake2b(f"{seed}\x1f{entity}".encode(), digest_size=8).digest()
    u = int.from_bytes(h, "big") / 2**64
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def partition(triples: Iterable[tuple[str, str, str]], seed: int, val_fraction: float, test_fraction: float
              ) -> dict[str, set[tuple[str, str, str]]]:
    parts: dict[str, set[tuple[str, str, str]]] = {s: set() for s in SPLITS}
    for tr in triples:
        parts[fact_split(tr, seed, val_fraction, test_fraction)].add(tr)
    return parts


_QA_FIELDS = tuple(f.name for f in dataclasses.fields(TextQA))


def qa_row(q: TextQA) -> dict[str, Any]:
    """The JSONL row of a TextQA: the same keys and JSON as `dataclasses.asdict`, without its deep copy (the
    values are plain JSON data already, so a shallow dict encodes byte for byte the same)."""
    return {k: getattr(q, k) for k in _QA_FIELDS}


def norm_question(q: TextQA) -> str:
    """Dedup key: the normalised question string alone (the same stem with other options is a repeat)."""
    return norm(q.question)


class NearDupIndex:
    """MinHash-LSH over word 3-shingles of question + options; `add` returns False for a near-duplicate
    (estimated Jaccard ≥ threshold with an item already kept that has the same answer)."""

    def __init__(self, threshold: float = 0.9, num_perm: int = 32, bands: int = 8, seed: int = 0):
        self.threshold = threshold
        self.rows = num_perm // bands
        self.bands = bands
        self.seeds = [int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "big")
                      for i in range(num_perm)]
        self._seeds_np = np.array(self.seeds, dtype=np.uint64)
        self.buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
        self.items: list[tuple[frozenset[int], str]] = []

    def signature(self, sh: frozenset[int]) -> list[int]:
        """MinHash signature: per seed, min over shingles of the low 48 bits of (shingle hash XOR seed).

        Vectorised (one numpy op instead of num_perm × shingles Python ops); the low 48 bits of a XOR in
        64-bit two's complement equal those of Python's unbounded ints, so the values are the same."""
        x = np.fromiter(sh, dtype=np.int64, count=len(sh)).view(np.uint64)
        return ((x[:, None] ^ self._seeds_np[None, :]) & _MASK48).min(axis=0).tolist()

    @staticmethod
    def shingles(text: str) -> frozenset[int]:
        w = _WORD.findall(text.lower())
        if len(w) < 3:
            return frozenset({hash(" ".join(w))})
        return frozenset(hash((w[i], w[i + 1], w[i + 2])) for i in range(len(w) - 2))

    def add(self, text: str, answer: str) -> bool:
        sh = self.shingles(text)
        sig = self.signature(sh)
        # only items with the same answer can be near-duplicates, so the answer is part of the bucket key: scenario
        # questions of one template share most shingles, and without it every add would scan thousands of them
        keys = [(b, hash((answer, *sig[b * self.rows:(b + 1) * self.rows]))) for b in range(self.bands)]
        cands = {i for k in keys for i in self.buckets.get(k, ())}
        for i in cands:
            osh, oans = self.items[i]
            if oans == answer and len(sh & osh) / max(1, len(sh | osh)) >= self.threshold:
                return False
        idx = len(self.items)
        self.items.append((sh, answer))
        for k in keys:
            self.buckets[k].append(idx)
        return True


def check_leakage(by_split: dict[str, list[TextQA]]) -> dict[str, int]:
    """Raise LeakageError when a val/test QA uses a fact (evidence triple) or a question seen in training."""
    train_facts = {tuple(t) for q in by_split.get("train", []) for t in q.meta.get("evidence_ids", q.evidence)}
    train_qs = {norm_question(q) for q in by_split.get("train", [])}
    train_subjects = {q.meta["subject"] for q in by_split.get("train", []) if q.meta.get("subject")}
    problems = []
    for s in ("val", "test"):
        for q in by_split.get(s, []):
            tools = {tuple(t) for t in q.meta.get("principle_ids", [])}
            shared = [t for t in q.meta.get("evidence_ids", q.evidence) if tuple(t) in train_facts and tuple(t) not in tools]
            if shared:
                problems.append(f"{s} QA {q.id} uses training fact(s) {shared[:2]}")
            if q.meta.get("subject") in train_subjects:
                problems.append(f"{s} QA {q.id} asks about the training entity {q.meta['subject']!r}")
            if norm_question(q) in train_qs:
                problems.append(f"{s} QA {q.id} repeats a training question")
    if problems:
        raise LeakageError(f"SPLIT LEAKAGE: {len(problems)} val/test item(s) overlap training:\n"
                           + "\n".join(f"  - {p}" for p in problems[:20]))
    return {"train_facts": len(train_facts), "checked": sum(len(by_split.get(s, [])) for s in ("val", "test"))}


# ---------------------------------------------------------------- rendering / exports
def export_trl(path: Path, items: list[TextQA]) -> int:
    """TRL conversational format, {"id", "messages": [user, assistant]} per line: exactly the conversation the
    SFT cold start trains on (`tools.protocol.text_qa_messages` with its rationale; no system turn, as in SFT:
    the chat template adds its default one in both)."""
    rows = [{"id": q.id, "messages": text_qa_messages(q)} for q in items]
    return write_jsonl(path, rows)


_SHAREGPT_ROLE = {"user": "human", "assistant": "gpt"}


def export_sharegpt(out_dir: Path, by_split: dict[str, list[TextQA]], prefix: str = "knowzoom_kgqa") -> dict[str, Any]:
    """LLaMA-Factory sharegpt JSON files + dataset_info.json describing them (the same conversation as
    `export_trl`: what SFT trains on)."""
    info: dict[str, Any] = {}
    for s, items in by_split.items():
        fname = f"qa_{s}_sharegpt.json"
        rows = [{"conversations": [{"from": _SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in text_qa_messages(q)],
                 "id": q.id} for q in items]
        tmp = out_dir / (fname + ".tmp")
        tmp.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
        tmp.replace(out_dir / fname)
        info[f"{prefix}_{s}"] = {
            "file_name": fname, "formatting": "sharegpt",
            "columns": {"messages": "conversations"},
            "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"},
        }
    (out_dir / "dataset_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return info


def write_stats(out_dir: Path, by_split: dict[str, list[TextQA]], rejections: Counter, graph_stats: dict[str, Any],
                extra: dict[str, Any]) -> dict[str, Any]:
    """stats.md (counts by split/type/hops/domain/source/relation, rejection reasons) + stats.png."""
    allq = [q for s in SPLITS for q in by_split.get(s, [])]
    tables = {
        "split": Counter(q.split for q in allq), "qtype": Counter(q.qtype for q in allq),
        "hops": Counter(str(q.hops) for q in allq), "domain": Counter(q.domain or "-" for q in allq),
        "source": Counter(q.source for q in allq),
        "relation": Counter(q.meta.get("relation", "-") for q in allq),
    }
    lines = ["# build-qa statistics", "",
             f"Graph: {graph_stats['nodes']} nodes, {graph_stats['edges']} edges. "
             f"Sources: {', '.join(f'{k} ({v})' for k, v in graph_stats['sources'].items())}.", ""]
    for k, v in extra.items():
        lines.append(f"- {k}: {v}")
    from kg_qa_builder.quality import markdown as quality_md
    from kg_qa_builder.quality import measure

    quality = {s: measure(by_split.get(s, [])) for s in SPLITS}
    lines += ["", *quality_md(quality["train"], "quality targets (train split)")]
    lines += ["", "Checked by kg_qa_builder/quality.py: two right options = an option the value-kind rule would also "
              "accept (colour families, overlapping or close quantities, word containment); leak = the answer "
              "text in the question; tokens = words and punctuation marks of the rationale; steps = rationale entries."]
    lines += ["", "| split | items | interp % | min sub-task % | steps | tokens | repeats % | two-right % | leaks % |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s, m in quality.items():
        lines.append(f"| {s} | {m['items']} | {m['image-interpretation share %']} | {m['min sub-task share %']} | "
                     f"{m['mean rationale steps']} | {m['mean rationale tokens']} | {m['repeated question strings %']} | "
                     f"{m['MCQs with two right options %']} | {m['answer leaks %']} |")
    tables["task"] = Counter(q.meta.get("task", "general") for q in allq)
    for name, c in [*tables.items(), ("rejection reason", rejections)]:
        lines += ["", f"## by {name}", "", f"| {name} | count |", "|---|---:|"]
        lines += [f"| {k} | {n} |" for k, n in c.most_common()]
    (out_dir / "stats.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, (name, c) in zip(axes, [("qtype", tables["qtype"]), ("hops", tables["hops"]),
                                    ("domain", tables["domain"]), ("rejections", rejections)], strict=False):
        items = c.most_common(10)
        ax.barh([str(k)[:22] for k, _ in items][::-1], [n for _, n in items][::-1], color="#3b7dd8")
        ax.set_title(name)
    fig.tight_layout()
    fig.savefig(out_dir / "stats.png", dpi=90)
    plt.close(fig)
    out = {k: dict(v) for k, v in tables.items()}
    out["quality"] = quality
    return out
