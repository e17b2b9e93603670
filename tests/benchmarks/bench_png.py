"""Benchmark: the deflate behind the server's PNGs (tools.server.encoding.png_bytes), encoder by encoder.

Crops like the server returns (RGB, resampled to `--max-pixels`, "Up" filter as png_bytes applies) are cut
from a rendered tools.scenes scene and from bench_server.py's textured COG pattern, then deflated by each
encoder that is importable here: zlib (stdlib), and the optional `deflate` (libdeflate), `isal` (ISA-L) and
`zlib_ng` packages (the server uses isal, levels mapped as tools.server.encoding._isal_level does). Prints time per image and size, side by side as ratios to zlib at level 6. (All of these
release the GIL while compressing, so the server's read threads keep running.)

    python tests/benchmarks/bench_png.py
    python tests/benchmarks/bench_png.py --crops 40 --max-pixels 200704
"""

from __future__ import annotations

import argparse
import functools
import importlib
import statistics
import time
import zlib
from collections.abc import Callable

import numpy as np


def scene_array(size: int, seed: int) -> np.ndarray:
    """One procedural scene (tools.scenes) as an (H, W, 3) uint8 array."""
    from tools import scenes

    rng = np.random.default_rng(seed)
    tex = scenes._texture_tile(rng)
    sc = scenes.plan_scene(rng, "bench", size, 8, 144)
    return scenes.render_scene(rng, sc, tex, 144, 3000 * size * size // 8192**2, 1500 * size * size // 8192**2)


def texture_array(size: int, seed: int) -> np.ndarray:
    """bench_server.py's COG pattern: gradients plus uniform noise (0..23)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    band = np.stack([(xx // 7) % 256, (yy // 5) % 256, ((xx + yy) // 11) % 256], axis=-1).astype("uint8")
    return band + rng.integers(0, 24, size=band.shape, dtype="uint8")


def crops(arr: np.ndarray, n: int, max_pixels: int, seed: int) -> list[np.ndarray]:
    """Random crops (side 128..size/2, aspect <= 3:1) resized bilinearly to about `max_pixels`."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out, size = [], arr.shape[0]
    for _ in range(n):
        w = int(rng.integers(128, size // 2))
        h = int(np.clip(w * rng.uniform(1 / 3, 3), 64, size - 1))
        x0, y0 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
        s = min(1.0, (max_pixels / (w * h)) ** 0.5)
        img = Image.fromarray(arr[y0:y0 + h, x0:x0 + w]).resize((max(1, round(w * s)), max(1, round(h * s))),
                                                                 Image.BILINEAR)
        out.append(np.asarray(img))
    return out


def filtered(a: np.ndarray) -> bytes:
    """The bytes png_bytes deflates: each row prefixed by filter type 2 (Up) and differenced."""
    h, w, c = a.shape
    rows = a.reshape(h, w * c)
    raw = np.empty((h, w * c + 1), np.uint8)
    raw[:, 0] = 2
    raw[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=raw[1:, 1:])
    return raw.tobytes()


def _call(f: Callable[[bytes, int], bytes], level: int, b: bytes) -> bytes:
    return bytes(f(b, level))


def encoders() -> dict[str, Callable[[bytes], bytes]]:
    """name → compress(raw) for every encoder importable here."""
    encs: dict[str, Callable[[bytes], bytes]] = {
        "zlib 6": lambda b: zlib.compress(b, 6), "zlib 1": lambda b: zlib.compress(b, 1)}
    for mod, fn, levels, label in [("deflate", "zlib_compress", (6, 1), "deflate (pkg)"),
                                   ("isal.isal_zlib", "compress", (3, 2, 1, 0), "isal"),
                                   ("zlib_ng.zlib_ng", "compress", (6, 1), "zlib-ng")]:
        try:
            f = getattr(importlib.import_module(mod), fn)
        except ImportError:
            continue
        for lv in levels:
            encs[f"{label} {lv}"] = functools.partial(_call, f, lv)
    return encs


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--crops", type=int, default=24, help="Crops per content kind.")
    ap.add_argument("--size", type=int, default=4096, help="Side of the source arrays (>= 4096: the scene grid needs it).")
    ap.add_argument("--max-pixels", type=int, default=200704, help="Pixels of each crop (448^2, bench_server's).")
    ap.add_argument("--repeat", type=int, default=3, help="Timed passes (the median is reported).")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    kinds = {"scene": scene_array(args.size, args.seed), "texture": texture_array(args.size, args.seed)}
    encs = encoders()
    results: dict[str, dict] = {}
    for kind, arr in kinds.items():
        raws = [filtered(c) for c in crops(arr, args.crops, args.max_pixels, args.seed + 1)]
        for b in raws[:2]:  # every encoder is a valid zlib stream of the same bytes
            for name, enc in encs.items():
                assert zlib.decompress(enc(b)) == b, name
        for name, enc in encs.items():
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                size = sum(len(enc(b)) for b in raws)
                times.append(time.perf_counter() - t0)
            results[f"{kind}|{name}"] = {"ms": statistics.median(times) * 1000 / len(raws),
                                         "kb": size / 1024 / len(raws)}
        print(f"\n{kind}: {len(raws)} crops of ~{args.max_pixels} px, raw {len(raws[0]) / 1024:.0f} KB each")
        base = results[f"{kind}|zlib 6"]
        print(f"{'encoder':<22} {'ms/img':>8} {'KB/img':>8} {'speed vs zlib 6':>16} {'size vs zlib 6':>15}")
        for name in encs:
            r = results[f"{kind}|{name}"]
            print(f"{name:<22} {r['ms']:>8.2f} {r['kb']:>8.1f} {base['ms'] / r['ms']:>15.2f}x "
                  f"{r['kb'] / base['kb']:>14.3f}x")
    return results


if __name__ == "__main__":
    main()
