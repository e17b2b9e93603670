"""How much of a 7B GRPO step the zoom tool takes, and what running a turn's calls at once buys.

    python tests/benchmarks/bench_rl_tools.py [--cache DIR] [--rollouts 32] [--zooms 2] [--threads 8]
        [--gen-tokens 400] [--gen-tok-s 3000] [--train-tflops 400]

Measured here (the real tool path: `rl.env.LocalEpisodes` → `tools.protocol.Episode` → windowed COG reads,
crops capped at 1003520 pixels as in configs/qwen2_5_vl_7b/rl.yaml, on an 8192^2 COG): seconds per zoom when a
turn's calls run one after another (TRL 1.16's loop) and when they run on a thread pool (`tool_threads`), and
the image-processor time per crop (TRL prepares the crops for the next turn in the trainer process either way).

Assumed, not measured (no GPU here; change them on the command line): a rank's step is 256 rollouts
(per_device_train_batch_size 2 x 128 accumulation), each generating `--gen-tokens` tokens at `--gen-tok-s`
tokens/s of batched vLLM decode, and training on ~1.3k prompt + generated + 1280 tokens per crop at
`--train-tflops` effective TFLOP/s (policy forward+backward with recompute ~8 x 8.29e9 FLOPs/token, reference
and old-logprob forwards 2 x 2 x 8.29e9). Prints the tool share of a step both ways; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PARAMS = 8.29e9
CROP_TOKENS = 1280
PROMPT_TOKENS = 1300
ROLLOUTS_PER_RANK = 256


def ensure_cog(cache: Path, size: int = 8192) -> Path:
    path = cache / f"scene{size}.tif"
    if not path.exists():
        from bench_zoom import _scene, _write_geo_cog

        cache.mkdir(parents=True, exist_ok=True)
        t = time.time()
        _write_geo_cog(_scene(size), path)
        print(f"made a {size}^2 COG in {time.time() - t:.0f}s", file=sys.stderr)
    return path


def boxes(n: int, shown: tuple[int, int], seed: int) -> list[list[float]]:
    """Boxes in the shown overview's pixels covering 1/64 .. 1/2 of its side (native 128 .. 4096 px)."""
    rng = np.random.default_rng(seed)
    w, h = shown
    out = []
    for _ in range(n):
        side = w * float(rng.choice([1 / 64, 1 / 16, 1 / 8, 1 / 4, 1 / 2]))
        x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
        out.append([round(x0, 1), round(y0, 1), round(x0 + side, 1), round(y0 + side, 1)])
    return out


def run_turns(backend, keys: list[str], calls: list[list[list[float]]], threads: int) -> tuple[float, list]:
    """Each turn: every rollout's zoom; sequential (threads=1) or all at once. Returns (seconds, crops)."""
    crops = []
    t0 = time.perf_counter()
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    for turn in range(len(calls[0])):
        def one(i: int, turn: int = turn):
            return backend.execute(keys[i], "zoom_in", {"bbox": calls[i][turn], "source": "image_0"})

        results = list(pool.map(one, range(len(keys)))) if pool else [one(i) for i in range(len(keys))]
        for r in results:
            if r.error is not None:
                raise RuntimeError(r.error)
            crops.append(r.observation.image)
    if pool:
        pool.shutdown()
    return time.perf_counter() - t0, crops


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "knowzoom" / "bench"))
    ap.add_argument("--rollouts", type=int, default=32)
    ap.add_argument("--zooms", type=int, default=2)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--gen-tokens", type=float, default=400.0)
    ap.add_argument("--gen-tok-s", type=float, default=3000.0)
    ap.add_argument("--train-tflops", type=float, default=400.0)
    a = ap.parse_args()

    from pipeline.models import load_processor
    from rl.env import LocalEpisodes
    from tools.store import ImageStore
    from tools.zoom import ZoomConfig

    cog = ensure_cog(Path(a.cache))
    store = ImageStore([cog.parent])
    store.register("scene", cog)
    zcfg = ZoomConfig(max_pixels=1003520, min_pixels=3136, frame="shown_pixels", max_turns=5)
    backend = LocalEpisodes(store, zcfg)

    timings = {}
    crops = []
    for threads in (1, a.threads, 1):  # sequential twice (first warms GDAL's cache and the overview)
        keys = [f"{threads}-{i}-{time.time()}" for i in range(a.rollouts)]
        obs = [backend.start(k, ["scene"])[0] for k in keys]
        calls = [boxes(a.zooms, obs[i].image.size, seed=i) for i in range(a.rollouts)]
        secs, crops = run_turns(backend, keys, calls, threads)
        timings[threads] = secs / (a.rollouts * a.zooms)
        for k in keys:
            backend.close(k)
    seq, par = timings[1], timings[a.threads]

    processor = load_processor("tiny", max_pixels=1003520, min_pixels=3136)
    t = time.perf_counter()
    grids = [processor.image_processor(images=[c], return_tensors="pt")["image_grid_thw"] for c in crops[:16]]
    prep = (time.perf_counter() - t) / len(grids)
    tokens = statistics.mean(int(g.prod()) // 4 for g in grids)
    pixels = statistics.mean(c.size[0] * c.size[1] for c in crops)

    n = ROLLOUTS_PER_RANK
    calls_per_step = n * a.zooms
    gen_s = n * a.gen_tokens / a.gen_tok_s
    tokens_per_rollout = PROMPT_TOKENS + a.gen_tokens + a.zooms * CROP_TOKENS
    train_s = n * tokens_per_rollout * PARAMS * (8 + 4) / (a.train_tflops * 1e12)
    tool_seq, tool_par, prep_s = calls_per_step * seq, calls_per_step * par, calls_per_step * prep
    step_seq = gen_s + train_s + tool_seq + prep_s
    step_par = gen_s + train_s + tool_par + prep_s
    print(f"crops: {pixels:,.0f} px on average ({tokens:.0f} visual tokens), from an 8192^2 COG")
    print(f"zoom read, a turn's calls one after another: {seq * 1000:.0f} ms/call; "
          f"{a.threads} threads: {par * 1000:.0f} ms/call ({seq / par:.1f}x)")
    print(f"image processor per crop (trainer process, sequential either way): {prep * 1000:.0f} ms")
    print(f"per rank and step ({n} rollouts x {a.zooms} zooms; assumed: {a.gen_tokens:.0f} generated tokens at "
          f"{a.gen_tok_s:.0f} tok/s, training at {a.train_tflops:.0f} TFLOP/s):")
    print(f"  generation {gen_s:.0f}s, training {train_s:.0f}s, crop preprocessing {prep_s:.0f}s, "
          f"zoom reads {tool_seq:.0f}s sequential vs {tool_par:.0f}s threaded")
    print(f"  tool share of the step: {100 * (tool_seq + prep_s) / step_seq:.1f}% sequential, "
          f"{100 * (tool_par + prep_s) / step_par:.1f}% with {a.threads} threads; step {step_seq / step_par:.2f}x "
          f"faster")


if __name__ == "__main__":
    main()
