"""Scripted-policy check of the zoom environment on the tiny pipeline's scenes (8192 px, grid 8):
prints oracle (zoom on target, classify the crop) vs no-zoom (classify the overview region) accuracy.

    python tests/benchmarks/bench_scripted_policy.py [--scenes runs/tiny/scenes] [--size 8192]
Without --scenes it builds 2 held-out scenes in a temporary folder (about 20 s).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from pipeline.core.config import load_config
from pipeline.core.records import VQASample, read_jsonl
from rl.backends_scripted import scripted_check


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenes", default="", help="a make-scenes output folder (default: build a fresh one)")
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--grid", type=int, default=8)
    ap.add_argument("--split", default="test")
    a = ap.parse_args()
    from tools.scenes import MakeScenesConfig
    from tools.scenes import run as make_scenes
    from tools.store import ImageStore

    folder = Path(a.scenes) if a.scenes else Path(tempfile.mkdtemp(prefix="kz_scenes_"))
    if not a.scenes:
        make_scenes(load_config(MakeScenesConfig, None, {
            "output_dir": str(folder), "size": a.size, "grid": a.grid, "n_train_scenes": 0, "n_test_scenes": 2,
            "n_train_pairs": 0, "n_test_pairs": 0, "preview": False}))
    samples = list(read_jsonl(folder / f"vqa_{a.split}.jsonl", VQASample))
    t = time.perf_counter()
    r = scripted_check(samples, ImageStore.from_manifest(folder / "images.jsonl"))
    print(json.dumps(r, indent=1))
    print(f"oracle (zoom) {100 * r['oracle']['accuracy']:.1f}% | no-zoom {100 * r['overview']['accuracy']:.1f}% | "
          f"chance {100 * r['chance']:.1f}% | n={r['n']} | {time.perf_counter() - t:.1f}s")


if __name__ == "__main__":
    main()
