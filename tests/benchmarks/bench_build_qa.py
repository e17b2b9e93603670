"""Benchmark: verified QA per minute through build-qa's keep pipeline (generate → verify on the graph → keep
rules → exact and near-duplicate dedup), one process, for template QA, scenario QA and the default 70/30 mix.

Prints, side by side in one run: graph build time; per kind the kept rate and its ratio to the 50,000 QA/min
target; and a digest of the kept ids (run twice with the same seed: the digests match, the build is
deterministic). Usage: python tests/benchmarks/bench_build_qa.py [--n 30000] [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections import Counter

from kg_qa_builder.dataset import NearDupIndex, partition
from kg_qa_builder.generate import Generator
from kg_qa_builder.importers import build_graph
from kg_qa_builder.quality import measure
from kg_qa_builder.scenarios import ScenarioGenerator
from kg_qa_builder.stage import KeepRules, generate_split
from kg_qa_builder.verify import Verifier

TARGET = 50_000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=30000, help="verified QA to keep per measurement")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    t = time.perf_counter()
    kg = build_graph()
    t_graph = time.perf_counter() - t
    parts = partition(kg.triples, a.seed, 0.0, 0.0)
    ver = Verifier(kg)
    print(f"graph: {kg.n_nodes} nodes, {kg.n_edges} edges, built in {t_graph:.1f} s")
    print(f"{'kind':<22}{'kept':>8}{'seconds':>9}{'QA/min':>10}{'vs target':>11}  digest")
    rows = {}
    for label, share in (("template QA", 0.0), ("scenario QA", 1.0), ("mix 70% scenario", 0.7)):
        near, seen, rej, log = NearDupIndex(0.9, seed=a.seed), set(), Counter(), []
        rules = KeepRules(a.n)
        t = time.perf_counter()
        n_s = round(a.n * share)
        items = []
        if n_s:
            sg = ScenarioGenerator(kg, seed=a.seed)
            items += generate_split(sg, ver, "train", n_s, n_s * 40, near, seen, rej, log, rules)
        if a.n - n_s:
            g = Generator(kg, parts["train"], seed=a.seed)
            items += generate_split(g, ver, "train", a.n - n_s, (a.n - n_s) * 40, near, seen, rej, log, rules)
        dt = time.perf_counter() - t
        rate = len(items) / dt * 60
        digest = hashlib.sha1("".join(sorted(q.id for q in items)).encode()).hexdigest()[:12]
        rows[label] = (items, rej)
        print(f"{label:<22}{len(items):>8}{dt:>9.1f}{rate:>10,.0f}{rate / TARGET:>10.2f}x  {digest}")
    items, rej = rows["mix 70% scenario"]
    m = measure(items)
    print("mix quality:", {k: v for k, v in m.items() if k != "sub-task shares %"})
    print("mix drops:", dict(rej.most_common(8)))


if __name__ == "__main__":
    main()
