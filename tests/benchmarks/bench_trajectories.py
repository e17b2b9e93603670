"""Benchmark: rendering oracle zoom trajectories (sft.data.materialize_trajectories), as the aiming step of
`knowzoom run` does for every training question before its first step. Nearly all of it was PNG encoding of
the crops; this times the build with PIL's default PNG level 6 against the default level 1 (both lossless; the
crops are encoded in a background thread while the next sample renders), in alternating rounds so both see the
same machine load, and checks that the two give the same JSONL and the same pixels.

    python tests/benchmarks/bench_trajectories.py                      # the seeded fixture scenes
    python tests/benchmarks/bench_trajectories.py --vqa runs/tiny/scenes/vqa_train.jsonl \\
        --images runs/tiny/scenes/images.jsonl --n 300
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the fixtures package


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vqa", default="")
    ap.add_argument("--images", default="")
    ap.add_argument("--n", type=int, default=200, help="questions rendered per round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    import numpy as np
    from PIL import Image

    from pipeline.core.records import read_vqa
    from sft.data import materialize_trajectories
    from tools.store import ImageStore
    from tools.zoom import ZoomConfig

    tmp = Path(tempfile.mkdtemp(prefix="kz_bench_traj_"))
    if not args.vqa:
        from fixtures.scenes import make_scenes

        sc = make_scenes(tmp / "scenes", n=args.n, size=4096, square=48)
        args.vqa, args.images = str(sc.vqa), str(sc.manifest)
    samples = read_vqa([args.vqa])[: args.n]
    store = ImageStore.from_manifest(args.images)
    zoom = ZoomConfig(frame="norm1000", max_pixels=50176, min_pixels=3136)
    times: dict[int, list[float]] = {6: [], 1: []}
    sizes: dict[int, int] = {}
    for r in range(args.rounds):
        for level in (6, 1):
            out = tmp / f"r{r}_l{level}"
            t0 = time.perf_counter()
            materialize_trajectories(samples, store, zoom, out, max_zooms=3, progress=False,
                                     png_compress_level=level)
            times[level].append(time.perf_counter() - t0)
            sizes[level] = sum(f.stat().st_size for f in (out / "images").iterdir())
    last = tmp / f"r{args.rounds - 1}_l6", tmp / f"r{args.rounds - 1}_l1"
    same_jsonl = (last[0] / "trajectories.jsonl").read_text() == (last[1] / "trajectories.jsonl").read_text()
    same_pixels = all(np.array_equal(np.asarray(Image.open(f)), np.asarray(Image.open(last[1] / "images" / f.name)))
                      for f in (last[0] / "images").iterdir())
    a, b = statistics.median(times[6]), statistics.median(times[1])
    print(f"{len(samples)} questions, {args.rounds} alternating rounds (median s per build)")
    print(f"  PNG level 6 (PIL's default): {a:.2f} s, {sizes[6] / 2**20:.1f} MiB of crops")
    print(f"  PNG level 1 (the default):   {b:.2f} s, {sizes[1] / 2**20:.1f} MiB of crops")
    print(f"  ratio: {a / b:.2f}x; same JSONL: {same_jsonl}; same pixels: {same_pixels}")


if __name__ == "__main__":
    main()
