"""Benchmark: verified QA per minute (generate + verify on the graph + normalised/near-dup dedup), 1 process.

Prints, side by side in one run: graph build time, raw generation rate, generation+verification rate and
the full keep-pipeline rate (incl. dedup). Usage: python tests/benchmarks/bench_build_qa.py [--n 60000]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

from kg_qa_builder.dataset import NearDupIndex, norm_question, partition
from kg_qa_builder.generate import Generator
from kg_qa_builder.importers import build_graph
from kg_qa_builder.verify import Verifier


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=60000, help="verified QA to produce")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    t = time.perf_counter()
    kg = build_graph()
    t_graph = time.perf_counter() - t
    parts = partition(kg.triples, a.seed, 0.0, 0.0)
    gen = Generator(kg, parts["train"], seed=a.seed)
    ver = Verifier(kg, gen)

    t = time.perf_counter()
    raw = sum(gen.sample() is not None for _ in range(20000))
    raw_rate = raw / (time.perf_counter() - t) * 60

    near = NearDupIndex(0.9, seed=a.seed)
    seen: set[str] = set()
    kept, verified, reasons = 0, 0, Counter()
    t = time.perf_counter()
    while kept < a.n:
        q = gen.sample()
        if q is None:
            reasons["no_valid_question"] += 1
            continue
        v = ver.verify_template(q)
        if not v.ok:
            reasons[v.reason] += 1
            continue
        verified += 1
        k = norm_question(q)
        if k in seen:
            reasons["duplicate"] += 1
            continue
        ans = q.choices[ord(q.answer) - 65] if q.qtype == "mcq" else q.answer
        if not near.add(q.question + " " + " ".join(q.choices), ans):
            reasons["near_duplicate"] += 1
            continue
        seen.add(k)
        kept += 1
    dt = time.perf_counter() - t
    print(f"graph: {kg.n_nodes} nodes, {kg.n_edges} edges, built in {t_graph:.1f} s")
    print(f"generation only          : {raw_rate:10,.0f} QA/min")
    print(f"verified (before dedup)  : {verified / dt * 60:10,.0f} QA/min")
    print(f"verified + deduplicated  : {kept / dt * 60:10,.0f} QA/min  ({kept} kept in {dt:.1f} s; target >= 50,000)")
    print(f"ratio kept/generation    : {kept / dt * 60 / raw_rate:.2f}")
    print(f"drops: {dict(reasons)}")


if __name__ == "__main__":
    main()
