"""Zoom latency and memory benchmark (prints ratios measured side by side; asserts nothing).

    python tests/benchmarks/bench_zoom.py [--cache DIR] [--n 40] [--rss-sizes 5000,20000,40000]

Latency: p50/p95 of random 1024^2-ish views (1008^2: multiples of 28) at mixed zoom levels (native boxes of
256..16384 px) on (1) a 20k^2 COG with our zoom vs rio-tiler `part` with the same output size and resampling, and (2) the same
scene as 8.5k^2 JPEG/PNG: PIL full decode + crop + resize (what the reference code does) vs our zoom on the
prepared 8.5k^2 COG (and on the raw JPEG). Peak RSS: a fresh process per raster size doing 20 random views.
Rasters are generated once into --cache (default ~/.cache/knowzoom/bench).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
warnings.simplefilter("ignore")


def _scene(size: int, seed: int = 0) -> np.ndarray:
    from tools.scenes import _texture_tile, plan_scene, render_scene

    rng = np.random.default_rng(seed)
    grid = max(1, size // 1024)
    scene = plan_scene(rng, "bench", size, grid, 144)
    return render_scene(rng, scene, _texture_tile(rng), 144, 3000, 1500)


def _write_geo_cog(arr: np.ndarray, path: Path) -> None:
    from rasterio.transform import from_origin

    from tools.scenes import write_cog

    write_cog(arr, path, crs="EPSG:3857", transform=from_origin(0, arr.shape[0], 1, 1))


def _sparse_cog(path: Path, size: int) -> None:
    """A size^2 tiled GTiff with overviews where only a few tiles hold data (fast to make at 40k^2)."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    prof = {"driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint8", "tiled": True,
            "blockxsize": 512, "blockysize": 512, "compress": "DEFLATE", "sparse_ok": True, "BIGTIFF": "YES",
            "crs": "EPSG:3857", "transform": from_origin(0, size, 1, 1)}
    rng = np.random.default_rng(0)
    tmp = path.with_name(path.name + ".tmp")
    with rasterio.open(tmp, "w", **prof) as ds:
        for _ in range(64):
            x, y = (int(v) * 512 for v in rng.integers(0, size // 512, 2))
            ds.write(rng.integers(0, 255, (3, 512, 512), dtype=np.uint8), window=Window(x, y, 512, 512))
        ds.build_overviews([2, 4, 8, 16, 32, 64, 128], Resampling.nearest)
    os.replace(tmp, path)


def ensure_data(cache: Path) -> dict[str, Path]:
    cache.mkdir(parents=True, exist_ok=True)
    paths = {"cog20k": cache / "scene20k.tif", "cog8k": cache / "scene8500.tif", "jpg": cache / "scene8500.jpg",
             "png": cache / "scene8500.png"}
    if not paths["cog20k"].exists():
        t = time.time()
        _write_geo_cog(_scene(20000), paths["cog20k"])
        print(f"made 20k^2 COG in {time.time() - t:.0f}s", file=sys.stderr)
    if not all(paths[k].exists() for k in ("cog8k", "jpg", "png")):
        from PIL import Image

        arr = _scene(8500)
        _write_geo_cog(arr, paths["cog8k"])
        Image.MAX_IMAGE_PIXELS = None
        Image.fromarray(arr).save(paths["jpg"], quality=90)
        Image.fromarray(arr).save(paths["png"], compress_level=1)
    return paths


def random_boxes(n: int, size: int, seed: int = 1) -> list[tuple[int, int, int, int]]:
    rng = np.random.default_rng(seed)
    sides = [s for s in (256, 1024, 4096, 16384) if s <= size]
    out = []
    for _ in range(n):
        s = int(rng.choice(sides))
        x, y = (int(v) for v in rng.integers(0, size - s + 1, 2))
        out.append((x, y, x + s, y + s))
    return out


def _stats(ts: list[float]) -> tuple[float, float]:
    a = np.array(ts) * 1000
    return float(np.percentile(a, 50)), float(np.percentile(a, 95))


def bench_ours(path: Path, boxes: list, cfg) -> list[float]:
    from tools.store import ImageStore
    from tools.zoom import read_region

    store = ImageStore([path.parent])
    store.register("x", path)
    read_region(store, "x", boxes[0], cfg, name="warm")
    ts = []
    for b in boxes:
        t = time.perf_counter()
        read_region(store, "x", b, cfg, name="obs")
        ts.append(time.perf_counter() - t)
    return ts


def bench_riotiler(path: Path, boxes: list, side: int, resampling: str = "bilinear") -> list[float]:
    from rio_tiler.io import Reader

    ts = []
    with Reader(str(path)) as r:
        H = r.dataset.height
        r.part((0, H - 256, 256, H), dst_crs=r.crs, bounds_crs=r.crs, width=side, height=side)
        for x0, y0, x1, y1 in boxes:
            t = time.perf_counter()
            r.part((x0, H - y1, x1, H - y0), dst_crs=r.crs, bounds_crs=r.crs, width=side, height=side,
                   indexes=(1, 2, 3), resampling_method=resampling)
            ts.append(time.perf_counter() - t)
    return ts


def bench_pil(path: Path, boxes: list, side: int) -> list[float]:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    ts = []
    for b in boxes:
        t = time.perf_counter()
        with Image.open(path) as im:
            im.convert("RGB").crop(b).resize((side, side), Image.BILINEAR)
        ts.append(time.perf_counter() - t)
    return ts


def rss_child(path: str, n: int) -> None:
    """Run in a fresh process: baseline RSS after imports, then peak RSS after n random views."""
    from tools.store import ImageStore
    from tools.zoom import ZoomConfig, read_overview, read_region

    cfg = ZoomConfig(max_pixels=1008 * 1008, read_timeout_s=0)
    store = ImageStore([Path(path).parent])
    store.register("x", path)
    size = store.info("x").width
    base = _hwm_mb()
    read_overview(store, "x", cfg)
    for b in random_boxes(n, size, seed=3):
        read_region(store, "x", b, cfg, name="obs")
    peak = _hwm_mb()
    print(json.dumps({"size": size, "base_mb": base, "peak_mb": peak}))


def _hwm_mb() -> float:
    """Peak RSS of this process image (VmHWM resets at exec, unlike ru_maxrss which a fork inherits)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "knowzoom" / "bench"))
    ap.add_argument("--n", type=int, default=40, help="views per method (PIL gets n//8: each decodes the whole file)")
    ap.add_argument("--rss-sizes", default="5000,20000,40000")
    ap.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rss_child:
        rss_child(a.rss_child, 20)
        return
    from tools.zoom import ZoomConfig

    cache = Path(a.cache)
    paths = ensure_data(cache)
    side = 1008
    cfg = ZoomConfig(max_pixels=side * side, read_timeout_s=0)
    rows = []
    b20 = random_boxes(a.n, 20000)
    # same output size and the same resampling (ours defaults to bilinear; rio-tiler's default is nearest)
    for resampling in ("bilinear", "nearest"):
        c = dataclasses.replace(cfg, resampling=resampling)
        ours20 = _stats(bench_ours(paths["cog20k"], b20, c))
        rt20 = _stats(bench_riotiler(paths["cog20k"], b20, side, resampling))
        rows.append((f"20k COG: KnowZoom read_region, {resampling}", *ours20, 1.0))
        rows.append((f"20k COG: rio-tiler part, {resampling}", *rt20, rt20[0] / ours20[0]))
    b8 = random_boxes(a.n, 8500)
    ours8 = _stats(bench_ours(paths["cog8k"], b8, cfg))
    rows.append(("8.5k COG (prepared): KnowZoom", *ours8, 1.0))
    rows.append(("8.5k JPEG (raw): KnowZoom", *_stats(bench_ours(paths["jpg"], b8[: max(3, a.n // 4)], cfg)), None))
    for k in ("jpg", "png"):
        p = _stats(bench_pil(paths[k], b8[: max(3, a.n // 8)], side))
        rows.append((f"8.5k {k.upper()}: PIL full decode+crop", *p, p[0] / ours8[0]))
    print(f"\n{'method':44s} {'p50 ms':>9s} {'p95 ms':>9s} {'p50 / ours':>11s}")
    for name, p50, p95, ratio in rows:
        r = "" if ratio is None else f"{ratio:10.1f}x"
        print(f"{name:44s} {p50:9.1f} {p95:9.1f} {r:>11s}")
    print(f"\nPeak RSS, fresh process, 20 random views + overview (output {side}x{side}); GDAL's block cache "
          "(GDAL_CACHEMAX) holds decoded tiles, so the peak is bounded by the cache, not by the raster:")
    print(f"{'raster':>10s} {'cache MB':>9s} {'after imports MB':>17s} {'peak MB':>9s} {'delta MB':>9s}")
    for s in (int(v) for v in a.rss_sizes.split(",") if v):
        p = cache / f"sparse{s}.tif"
        if s == 20000:
            p = paths["cog20k"]
        elif not p.exists():
            _sparse_cog(p, s)
        for cache_mb in ("256", "32"):
            env = {**os.environ, "GDAL_CACHEMAX": cache_mb}
            out = subprocess.run([sys.executable, __file__, "--rss-child", str(p)], capture_output=True, text=True,
                                 timeout=600, env=env)
            d = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{s:>9d}² {cache_mb:>9s} {d['base_mb']:17.0f} {d['peak_mb']:9.0f} {d['peak_mb'] - d['base_mb']:9.0f}")


if __name__ == "__main__":
    main()
