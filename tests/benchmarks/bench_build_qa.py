"""Benchmark: verified QA per minute through build-qa's keep pipeline (generate → verify on the graph → keep
rules → exact and near-duplicate dedup), for template QA, scenario QA and the default 70/30 mix, and (with
--e2e) the whole `knowzoom build-qa` command.

Each measurement runs in a fresh subprocess whose PYTHONPATH is a code tree: this checkout, and with
--baseline DIR an older tree (e.g. main exported with `git archive main | tar -x -C /tmp/base`), so old
and new code are timed side by side in one run, interleaved round by round under the same machine load.
Printed per kind and code: kept QA, wall-clock QA/min, QA per CPU-minute (process CPU time including the
worker processes), the ratio new/old of both, the ratio to the 50,000 QA/min target, the load average, and a
digest of the kept items (run twice with the same seed, or with other --workers: the digests match).

Usage:
    python tests/benchmarks/bench_build_qa.py [--n 8000] [--seed 0] [--workers 2] [--baseline /tmp/base]
    python tests/benchmarks/bench_build_qa.py --e2e configs/qwen2_5_vl_7b/build_qa.yaml [--n_train 30000] \\
        [--baseline /tmp/base]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET = 50_000
ROOT = Path(__file__).resolve().parents[2]
KINDS = (("template QA", 0.0), ("scenario QA", 1.0), ("mix 70% scenario", 0.7))


def cpu_now() -> float:
    """CPU seconds of this process plus its finished (waited-for) children, user + system."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def child(n: int, seed: int, workers: int) -> None:
    """Run inside the code tree under test (its kg_qa_builder on PYTHONPATH); print one JSON line."""
    from collections import Counter

    from kg_qa_builder.dataset import NearDupIndex, partition
    from kg_qa_builder.generate import Generator
    from kg_qa_builder.importers import build_graph
    from kg_qa_builder.scenarios import ScenarioGenerator
    from kg_qa_builder.stage import KeepRules, generate_split
    from kg_qa_builder.verify import Verifier

    parallel = "workers" in inspect.signature(generate_split).parameters  # older trees: one process, one stream
    t, c = time.perf_counter(), cpu_now()
    kg = build_graph()
    out: dict = {"graph_s": time.perf_counter() - t, "graph_cpu_s": cpu_now() - c, "workers": workers if parallel else 1,
                 "kinds": {}}
    parts = partition(kg.triples, seed, 0.0, 0.0)
    ver = Verifier(kg)
    for label, share in KINDS:
        near, seen, rej, log = NearDupIndex(0.9, seed=seed), set(), Counter(), []
        rules = KeepRules(n)
        t, c = time.perf_counter(), cpu_now()
        n_s = round(n * share)
        items = []
        todo = [(kind, k, ScenarioGenerator(kg, seed=seed) if kind == "scenario" else Generator(kg, parts["train"], seed=seed))
                for kind, k in (("scenario", n_s), ("template", n - n_s)) if k]
        pool = contextlib.nullcontext()
        if parallel:  # one set of worker processes for the kind, as in build-qa
            from kg_qa_builder.stage import Workers

            pool = Workers(workers)
            for _, _, g in todo:
                pool.add(g, ver)
        with pool:
            for kind, k, g in todo:
                extra = {"stream": f"{seed}:{kind}", "workers": pool} if parallel else {}
                items += generate_split(g, ver, "train", k, k * 40, near, seen, rej, log, rules, **extra)
        dt, dc = time.perf_counter() - t, cpu_now() - c
        digest = hashlib.sha1("".join(sorted(q.id for q in items)).encode()).hexdigest()[:12]
        out["kinds"][label] = {"kept": len(items), "wall_s": dt, "cpu_s": dc, "digest": digest,
                               "attempts": sum(rej.values()) + len(items)}
    print(json.dumps(out))


def run_tree(tree: Path, args: list[str]) -> tuple[dict, float, float]:
    """Run this script in child mode with `tree` first on PYTHONPATH; returns (its JSON, wall s, CPU s)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t, c = time.perf_counter(), cpu_now()
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", *args], env=env, cwd=tree,
                       capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"benchmark child in {tree} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1]), time.perf_counter() - t, cpu_now() - c


def e2e(tree: Path, config: str, overrides: list[str]) -> dict:
    """Time `python -m pipeline build-qa` from `tree` with that tree's config: wall, CPU (with its workers), kept
    QA, digest of the QA."""
    out = Path(tempfile.mkdtemp(prefix="bench_build_qa_"))
    env = {**os.environ, "PYTHONPATH": str(tree)}
    load = os.getloadavg()[0]
    t, c = time.perf_counter(), cpu_now()
    p = subprocess.run([sys.executable, "-m", "pipeline", "build-qa", "--config", str(tree / config), "--output_dir",
                        str(out), *overrides], env=env, cwd=tree, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t, cpu_now() - c
    if p.returncode:
        sys.exit(f"build-qa in {tree} failed:\n{p.stderr[-3000:]}")
    files = sorted(out.glob("qa_*.jsonl"))
    kept = sum(1 for f in files if not f.name.endswith("_trl.jsonl") for _ in f.open(encoding="utf-8"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + f.read_bytes())
    return {"wall_s": wall, "cpu_s": cpu, "kept": kept, "digest": h.hexdigest()[:12], "load": load, "dir": str(out)}


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8000, help="verified QA to keep per measurement")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2, help="worker processes of the new code (old code: 1)")
    ap.add_argument("--baseline", default="", help="an older code tree to time side by side (e.g. main exported to /tmp)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds (new, old, new, old, ...)")
    ap.add_argument("--e2e", default="", help="time the whole `knowzoom build-qa --config E2E` instead")
    ap.add_argument("--n_train", type=int, default=0, help="with --e2e: override n_train (0 = the config's)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.n, a.seed, a.workers)
        return
    trees = {"new": ROOT} | ({"old": Path(a.baseline).resolve()} if a.baseline else {})
    print(f"cpus: {os.cpu_count()}, load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if a.e2e:
        over = ["--n_train", str(a.n_train)] if a.n_train else []
        res: dict[str, list[dict]] = {k: [] for k in trees}
        for _ in range(a.rounds):
            for name, tree in trees.items():
                r = e2e(tree, a.e2e, over + (["--workers", str(a.workers)] if name == "new" else []))
                res[name].append(r)
                print(f"{name}: {r['kept']} QA in {r['wall_s']:.0f} s wall, {r['cpu_s']:.0f} s CPU, load {r['load']:.1f}, "
                      f"digest {r['digest']}", flush=True)
        print(f"\nend to end: knowzoom build-qa --config {a.e2e} {' '.join(over)} (new: --workers {a.workers})")
        print(f"{'code':<6}{'QA':>9}{'wall s':>9}{'CPU s':>9}{'QA/min':>10}{'QA/CPU-min':>12}{'vs target':>11}")
        rates = {}
        for name, rs in res.items():
            kept, wall, cpu = (sum(r[k] for r in rs) for k in ("kept", "wall_s", "cpu_s"))
            rates[name] = (kept / wall * 60, kept / cpu * 60)
            print(f"{name:<6}{kept // len(rs):>9}{wall / len(rs):>9.0f}{cpu / len(rs):>9.0f}{rates[name][0]:>10,.0f}"
                  f"{rates[name][1]:>12,.0f}{rates[name][0] / TARGET:>10.2f}x")
        if "old" in rates:
            print(f"new/old: wall-clock QA/min {ratio(rates['new'][0], rates['old'][0])}, "
                  f"QA per CPU-minute {ratio(rates['new'][1], rates['old'][1])}")
        print(f"load average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
        return
    args = ["--n", str(a.n), "--seed", str(a.seed), "--workers", str(a.workers)]
    runs: dict[str, list[dict]] = {k: [] for k in trees}
    for _ in range(a.rounds):
        for name, tree in trees.items():
            load = os.getloadavg()[0]
            r, _, _ = run_tree(tree, args)
            r["load"] = load
            runs[name].append(r)
    print(f"keep pipeline, --n {a.n} per kind, seed {a.seed}; new code: {a.workers} worker process(es)")
    for name, rs in runs.items():
        loads = ", ".join(f"{r['load']:.1f}" for r in rs)
        print(f"{name}: graph built in {rs[0]['graph_s']:.1f} s ({rs[0]['graph_cpu_s']:.1f} s CPU), "
              f"workers {rs[0]['workers']}, load average at its start {loads}")
    print(f"\n{'kind':<18}{'code':<5}{'kept':>7}{'wall s':>8}{'CPU s':>8}{'QA/min':>9}{'QA/CPU-min':>11}"
          f"{'vs target':>10}  digest")
    for label, _ in KINDS:
        rate = {}
        for name, rs in runs.items():
            kept = sum(r["kinds"][label]["kept"] for r in rs)
            wall = sum(r["kinds"][label]["wall_s"] for r in rs)
            cpu = sum(r["kinds"][label]["cpu_s"] for r in rs)
            rate[name] = (kept / wall * 60, kept / cpu * 60)
            digests = sorted({r["kinds"][label]["digest"] for r in rs})
            print(f"{label:<18}{name:<5}{kept // len(rs):>7}{wall / len(rs):>8.1f}{cpu / len(rs):>8.1f}{rate[name][0]:>9,.0f}"
                  f"{rate[name][1]:>11,.0f}{rate[name][0] / TARGET:>9.2f}x  {' '.join(digests)}")
        if "old" in rate:
            print(f"{'':<18}new/old: QA/min {ratio(rate['new'][0], rate['old'][0])}, "
                  f"QA/CPU-min {ratio(rate['new'][1], rate['old'][1])}")
    print(f"load average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
