"""Real servers on loopback: `knowzoom serve-tools` (uvicorn) hit by real HTTP requests, REST and MCP."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image
from test_server_api import make_server_images

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(tmp: Path, manifest: Path, **overrides) -> Iterator[str]:
    """Run `python -m pipeline serve-tools` on a free loopback port; yield its base URL; stop it."""
    port = free_port()
    cfg = {"manifest": str(manifest), "output_dir": str(tmp / f"out{port}"), "port": port, "log_level": "warning",
           **overrides}
    (tmp / f"serve{port}.yaml").write_text(yaml.safe_dump(cfg))
    log = open(tmp / f"server{port}.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve-tools", "--config", str(tmp / f"serve{port}.yaml")],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "KNOWZOOM_LOG": "WARNING"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:  # bounded: 60 s
            if proc.poll() is not None:
                raise AssertionError((tmp / f"server{port}.log").read_text()[-3000:])
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("server did not start in 60 s") from None
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        log.close()


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_server_images(tmp_path_factory.mktemp("live"))


def test_real_http_server(manifest: Path, tmp_path: Path) -> None:
    with serve(tmp_path, manifest, max_concurrency=4) as base, httpx.Client(base_url=base, timeout=30) as c:
        health = c.get("/health").json()
        assert health["status"] == "ok" and health["gdal_drivers_locked"] is True  # the process is locked down
        assert c.get("/docs").status_code == 200
        assert c.get("/images").json()["images"] == ["corrupt", "plain", "scene_a", "scene_b"]
        assert c.get("/images/scene_b").json()["width"] == 1200
        ep = c.post("/episodes", json={"image_ids": ["scene_a"]}).json()
        z = c.post(f"/episodes/{ep['episode_id']}/zoom_in", json={"bbox": [0, 0, 56, 56], "format": "png"})
        assert z.status_code == 200 and Image.open(io.BytesIO(z.content)).size == tuple(
            json.loads(z.headers["x-knowzoom-observation"])["shown_size"])
        r = c.post("/zoom", json={"image_id": "scene_a", "bbox": [1200, 900, 1300, 1000], "format": "png"})
        img = Image.open(io.BytesIO(r.content)).convert("RGB")
        assert img.getpixel((img.width // 2, img.height // 2)) == (255, 255, 255)
        # hostile inputs over the wire, including raw traversal the client does not normalise
        assert c.get("/images/..%2F..%2Fetc%2Fpasswd").status_code == 404
        assert c.post("/zoom", json={"image_id": "evil", "bbox": [0, 0, 5, 5]}).json()["message"] == "Unknown image."
        assert c.post("/zoom", json={"image_id": "corrupt", "bbox": [0, 0, 5, 5]}).status_code == 404
        assert c.post("/zoom", content=b'{"image_id":"scene_a","bbox":[NaN,0,1,1]}',
                      headers={"content-type": "application/json"}).status_code == 400
        assert c.post("/zoom", content=b"x" * 200_000, headers={"content-type": "application/json"}).status_code == 413
        # concurrent real requests
        with httpx.Client(base_url=base, timeout=30) as c2:
            import concurrent.futures as cf

            with cf.ThreadPoolExecutor(8) as pool:
                codes = list(pool.map(
                    lambda i: c2.post("/zoom", json={"image_id": "scene_b", "bbox": [i * 10, 0, i * 10 + 300, 300]}).status_code,
                    range(16)))
        assert codes == [200] * 16


def test_real_mcp_http_server(manifest: Path, tmp_path: Path) -> None:
    import anyio
    from mcp import Client

    with serve(tmp_path, manifest, transport="mcp-http") as base:
        async def go():
            with anyio.fail_after(60):
                async with Client(f"{base}/mcp") as client:
                    names = {t.name for t in (await client.list_tools()).tools}
                    res = await client.call_tool("zoom_region", {"image_id": "scene_b", "bbox": [0, 0, 100, 100]})
                    return names, res

        names, res = anyio.run(go)
    assert "zoom_in" in names and "start_episode" in names
    assert res.is_error is False and res.content[0].type == "image"


def test_real_server_token_host_and_no_redirect(manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """uvicorn with KNOWZOOM_TOKEN set (inherited by the server process): 401 without it, 421 for a forged
    Host, no redirect and no 5xx for the issue's raw requests."""
    monkeypatch.setenv("KNOWZOOM_TOKEN", "live-test-token-0123456789")
    ok = {"authorization": "Bearer live-test-token-0123456789"}
    with serve(tmp_path, manifest) as base, httpx.Client(base_url=base, timeout=30) as c:
        assert c.get("/health").status_code == 401 and c.get("/health", headers=ok).status_code == 200
        assert c.get("/health", headers={**ok, "host": "rebind.attacker.example"}).status_code == 421
        r = c.get("/episodes/..%2F", headers=ok, follow_redirects=False)
        assert r.status_code == 404 and "location" not in r.headers
        assert c.get("/images/scene_b%0A", headers=ok).status_code == 404
        big = b'{"image_id": "scene_a", "bbox": [0, 0, ' + b"9" * 400 + b", 10]}"
        r = c.post("/zoom", content=big, headers={**ok, "content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"] == "BadBoxError"
