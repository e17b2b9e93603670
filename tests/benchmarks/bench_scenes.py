"""Benchmark: writing one synthetic scene as a COG (tools.scenes.write_cog), striped vs tiled staging copy.

`knowzoom make-scenes` spends most of its time in GDAL's COG driver (8192² px scenes, JPEG, internal overviews).
The driver copies from an in-memory GTiff; this prints the time per scene with that staging copy striped (as
before) and tiled like the COG (the default), in alternating rounds so both see the same machine load, and
checks that the two COGs are byte-identical.

    python tests/benchmarks/bench_scenes.py
    python tests/benchmarks/bench_scenes.py --size 4096 --rounds 5
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_png import scene_array  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=8192, help="scene side in px (make-scenes' default: 8192)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    from tools.scenes import write_cog

    arr = scene_array(args.size, 0)
    times: dict[bool, list[float]] = {False: [], True: []}
    digests: dict[bool, str] = {}
    with tempfile.TemporaryDirectory() as d:
        for _ in range(args.rounds):
            for tiled in (False, True):
                out = Path(d) / f"s{int(tiled)}.tif"
                t0 = time.perf_counter()
                write_cog(arr, out, stage_tiled=tiled)
                times[tiled].append(time.perf_counter() - t0)
                digests[tiled] = hashlib.sha256(out.read_bytes()).hexdigest()
    striped, tiled = statistics.median(times[False]), statistics.median(times[True])
    print(f"scene {args.size}² px, {args.rounds} alternating rounds (median s per scene)")
    print(f"  striped staging copy: {striped:.2f} s")
    print(f"  tiled staging copy:   {tiled:.2f} s")
    print(f"  ratio: {striped / tiled:.2f}x; COGs byte-identical: {digests[False] == digests[True]}")


if __name__ == "__main__":
    main()
