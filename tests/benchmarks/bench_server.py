"""Benchmark: our zoom server vs titiler on the same COGs, same random crops, same concurrency, one run.

Both servers run under uvicorn on loopback with the same number of worker processes, one server at a
time, hit by the same asyncio httpx client. Every request asks for the same output: an RGB image of the
size our zoom tool returns for that crop (titiler gets it as `{w}x{h}`), PNG at deflate level 6 (titiler's
default; ours is run at 6 too, plus our default level 1) or JPEG quality 85 (titiler's default), bilinear
resampling on both, no alpha mask (titiler `return_mask=false`). Prints throughput and latency side by side
and the ratio (target: ours >= 1.5x titiler).

    python tests/benchmarks/bench_server.py                    # defaults: 2 workers, concurrency 8
    python tests/benchmarks/bench_server.py --requests 400 --concurrency 16 --format jpeg

titiler is a benchmark-only dependency (the `bench` extra: titiler.core, rio-tiler).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def titiler_app():
    """A minimal titiler app: one TilerFactory (with /bbox crop endpoints) under /cog (uvicorn factory)."""
    from fastapi import FastAPI
    from titiler.core.factory import TilerFactory

    app = FastAPI(title="titiler (bench)")
    app.include_router(TilerFactory().router, prefix="/cog")
    return app


def make_cogs(folder: Path, n: int, size: int, seed: int) -> Path:
    """`n` RGB COGs of size x size (tiled 512, deflate, overviews 2..32, EPSG:32633) + images.jsonl."""
    import numpy as np
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.transform import from_origin

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        path = folder / f"cog_{i}.tif"
        lines.append(json.dumps({"id": f"cog_{i}", "path": path.name}))
        if path.exists():
            continue
        profile = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8", tiled=True,
                       blockxsize=512, blockysize=512, compress="deflate", crs="EPSG:32633",
                       transform=from_origin(500000, 4600000 + i * 10000, 0.5, 0.5), BIGTIFF="IF_SAFER")
        with rasterio.open(path, "w", **profile) as ds:
            for r0 in range(0, size, 512):
                h = min(512, size - r0)
                yy, xx = np.mgrid[r0:r0 + h, 0:size]
                band = np.stack([(xx // 7) % 256, (yy // 5) % 256, ((xx + yy) // 11) % 256]).astype("uint8")
                band += rng.integers(0, 24, size=band.shape, dtype="uint8")  # texture: realistic compression
                ds.write(band, window=rasterio.windows.Window(0, r0, size, h))
            ds.build_overviews([2, 4, 8, 16, 32], Resampling.average)
    (folder / "images.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "images.jsonl"


def make_requests(n: int, n_images: int, size: int, max_pixels: int, seed: int) -> list[dict]:
    """Random crops: side 128..size/2 native px, aspect up to 3:1, with the output size our tool returns."""
    from tools.zoom import ZoomConfig, shown_size

    zcfg = ZoomConfig(max_pixels=max_pixels)
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        side = int(2 ** rnd.uniform(7, (size // 2).bit_length() - 1))
        w = max(28, min(size, int(side * rnd.uniform(0.6, 1.7))))
        h = max(28, min(size, int(side * rnd.uniform(0.6, 1.7))))
        x0, y0 = rnd.randrange(0, size - w + 1), rnd.randrange(0, size - h + 1)
        ow, oh = shown_size(w, h, zcfg)
        out.append({"image": rnd.randrange(n_images), "box": (x0, y0, x0 + w, y0 + h), "out": (ow, oh),
                    "max_pixels": max_pixels})
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, env: dict, log: Path) -> subprocess.Popen:
    """Start a server process and wait (bounded, 90 s) until it accepts connections."""
    f = open(log, "w")  # noqa: SIM115 - owned by the process lifetime
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                time.sleep(1.0)  # let every worker finish importing
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start in 90 s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=20)


async def load(send, reqs: list[dict], concurrency: int) -> tuple[float, list[float], int, int]:
    """Run `reqs` with `concurrency` in flight; return (elapsed s, latencies s, n errors, bytes)."""
    queue: asyncio.Queue = asyncio.Queue()
    for r in reqs:
        queue.put_nowait(r)
    lat: list[float] = []
    errors = 0
    nbytes = 0

    async def worker() -> None:
        nonlocal errors, nbytes
        while True:
            try:
                r = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            t0 = time.perf_counter()
            resp = await send(r)
            lat.append(time.perf_counter() - t0)
            nbytes += len(resp.content)
            if resp.status_code != 200:
                errors += 1

    t0 = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return time.perf_counter() - t0, lat, errors, nbytes


def make_sender(kind: str, client, fmt: str, paths: dict[int, str], georef: dict[int, tuple]):
    """An async `send(request) -> httpx.Response` for one server kind, asking for identical outputs."""
    if kind == "knowzoom":
        async def send(r: dict):
            body = {"image_id": f"cog_{r['image']}", "bbox": list(r["box"]), "format": fmt,
                    "max_pixels": r["max_pixels"]}
            return await client.post("/zoom", json=body)
    else:
        async def send(r: dict):
            ox, oy, res = georef[r["image"]]
            x0, y0, x1, y1 = r["box"]
            minx, maxx = ox + x0 * res, ox + x1 * res
            miny, maxy = oy - y1 * res, oy - y0 * res
            w, h = r["out"]
            return await client.get(
                f"/cog/bbox/{minx},{miny},{maxx},{maxy}/{w}x{h}.{'jpg' if fmt == 'jpeg' else 'png'}",
                params={"url": paths[r["image"]], "coord_crs": "EPSG:32633", "dst_crs": "EPSG:32633",
                        "resampling": "bilinear", "return_mask": "false"},
            )
    return send


async def check_outputs(servers: dict[str, tuple[str, str]], req: dict, fmt: str, paths, georef) -> dict:
    """Every server returns an RGB image of exactly the requested size for the same crop."""
    import io

    import httpx
    from PIL import Image

    sizes = {}
    for name, (kind, base) in servers.items():
        async with httpx.AsyncClient(base_url=base, timeout=60) as c:
            resp = await make_sender(kind, c, fmt, paths, georef)(req)
            img = Image.open(io.BytesIO(resp.content))
            sizes[name] = (resp.status_code, img.size, img.mode)
    return sizes


def run_interleaved(servers: dict[str, tuple[str, str]], reqs: list[dict], warm: list[dict], concurrency: int,
                    fmt: str, paths, georef, rounds: int) -> dict[str, dict]:
    """Warm every server, then alternate chunks of the same requests between servers (`rounds` chunks each),
    so background load on a shared machine hits all of them alike."""
    import httpx

    # no keep-alive: each request is accepted by whichever uvicorn worker is free, for both servers alike
    # (with pooled keep-alive connections one worker can end up owning most of them for a whole run)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
    chunks = [reqs[i::rounds] for i in range(rounds)]
    acc = {n: {"elapsed": 0.0, "lat": [], "errors": 0, "bytes": 0} for n in servers}

    async def go() -> None:
        clients = {n: httpx.AsyncClient(base_url=b, timeout=60, limits=limits) for n, (_, b) in servers.items()}
        try:
            senders = {n: make_sender(k, clients[n], fmt, paths, georef) for n, (k, _) in servers.items()}
            for n in servers:
                await load(senders[n], warm, concurrency)
            for i, chunk in enumerate(chunks):
                order = list(servers) if i % 2 == 0 else list(reversed(list(servers)))
                for n in order:
                    el, lat, err, nb = await load(senders[n], chunk, concurrency)
                    a = acc[n]
                    a["elapsed"] += el
                    a["lat"] += lat
                    a["errors"] += err
                    a["bytes"] += nb
        finally:
            for c in clients.values():
                await c.aclose()

    asyncio.run(go())
    out = {}
    for n, a in acc.items():
        lat = sorted(a["lat"])
        out[n] = {"server": n, "requests": len(lat), "errors": a["errors"], "rps": len(lat) / a["elapsed"],
                  "p50_ms": 1000 * statistics.median(lat), "p95_ms": 1000 * lat[min(len(lat) - 1, int(0.95 * len(lat)))],
                  "mean_kb": a["bytes"] / len(lat) / 1024}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=300, help="Measured requests per server.")
    ap.add_argument("--warmup", type=int, default=40, help="Unmeasured requests per server first.")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2, help="uvicorn worker processes, same for both servers.")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--size", type=int, default=8192, help="COG side in pixels.")
    ap.add_argument("--max-pixels", type=int, default=200704, help="Output pixel budget of each crop (448^2).")
    ap.add_argument("--format", choices=["png", "jpeg"], default="png")
    ap.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "knowzoom_bench_cogs"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--read-threads", type=int, default=4, help="Our server's read threads per worker.")
    ap.add_argument("--rounds", type=int, default=6, help="Interleaved chunks per server (fairness under load).")
    args = ap.parse_args(argv)

    data = Path(args.data)
    t0 = time.perf_counter()
    manifest = make_cogs(data, args.images, args.size, args.seed)
    print(f"COGs ready in {time.perf_counter() - t0:.1f}s: {args.images} x {args.size}^2 in {data}", flush=True)
    reqs = make_requests(args.requests, args.images, args.size, args.max_pixels, args.seed + 1)
    warm = make_requests(args.warmup, args.images, args.size, args.max_pixels, args.seed + 2)
    paths = {i: str((data / f"cog_{i}.tif").resolve()) for i in range(args.images)}
    georef = {i: (500000.0, 4600000.0 + i * 10000, 0.5) for i in range(args.images)}
    env = {**os.environ, "GDAL_CACHEMAX": "256", "KNOWZOOM_LOG": "WARNING", "PYTHONWARNINGS": "ignore"}

    procs = []
    servers: dict[str, tuple[str, str]] = {}
    try:
        # ours three ways: titiler's deflate level 6 (ISA-L, our default encoder), level 6 through zlib
        # (the encoder GDAL's PNG driver uses), and our default config (level 1, ISA-L)
        variants = [("knowzoom (png level 6)", 6, "auto"), ("knowzoom (png level 6, zlib)", 6, "zlib"),
                    ("knowzoom (default: level 1)", 1, "auto")]
        if args.format == "jpeg":
            variants = [("knowzoom (jpeg q85)", 6, "auto")]
        for name, level, enc in variants:
            port = free_port()
            cfg = {"manifest": str(manifest), "output_dir": str(data / f"serve_out{level}{enc}"), "port": port,
                   "workers": args.workers, "stateless_only": True, "log_level": "warning",
                   "max_output_pixels": max(args.max_pixels, 50176), "png_compress_level": level,
                   "png_encoder": enc, "jpeg_quality": 85, "max_concurrency": 64,
                   "read_threads": args.read_threads, "queue_timeout_s": 30.0}
            (data / f"serve{level}{enc}.yaml").write_text(json.dumps(cfg))
            procs.append(start([sys.executable, "-m", "pipeline", "serve-tools", "--config",
                                str(data / f"serve{level}{enc}.yaml")], port, env, data / f"knowzoom{level}{enc}.log"))
            servers[name] = ("knowzoom", f"http://127.0.0.1:{port}")
        port = free_port()
        procs.append(start([sys.executable, "-m", "uvicorn", "--factory", "bench_server:titiler_app", "--app-dir",
                            str(Path(__file__).parent), "--host", "127.0.0.1", "--port", str(port), "--workers",
                            str(args.workers), "--log-level", "warning", "--no-access-log"], port, env,
                           data / "titiler.log"))
        servers["titiler"] = ("titiler", f"http://127.0.0.1:{port}")
        sizes = asyncio.run(check_outputs(servers, reqs[0], args.format, paths, georef))
        assert len({(s, size, mode) for s, size, mode in sizes.values()}) == 1, f"outputs differ: {sizes}"
        assert next(iter(sizes.values()))[1] == tuple(reqs[0]["out"]), sizes
        results = run_interleaved(servers, reqs, warm, args.concurrency, args.format, paths, georef, args.rounds)
    finally:
        for p in procs:
            stop(p)

    print(f"\n{args.requests} random crops of {args.images} COGs ({args.size}^2) -> RGB {args.format} <= "
          f"{args.max_pixels} px (same size from every server), concurrency {args.concurrency}, "
          f"{args.workers} uvicorn workers each, loopback, {args.rounds} interleaved rounds")
    print(f"{'server':<32} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'errors':>7} {'KB/resp':>8} {'vs titiler':>10}")
    tit = results["titiler"]
    for r in results.values():
        print(f"{r['server']:<32} {r['rps']:>7.1f} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} {r['errors']:>7d} "
              f"{r['mean_kb']:>8.1f} {r['rps'] / tit['rps']:>9.2f}x")
    ratios = {n: r["rps"] / tit["rps"] for n, r in results.items() if n != "titiler"}
    print("throughput ratios vs titiler (target >= 1.5x): " + ", ".join(f"{n}: {v:.2f}x" for n, v in ratios.items()))
    return {"results": results, "throughput_ratio": ratios}


if __name__ == "__main__":
    main()
