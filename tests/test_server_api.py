"""The zoom HTTP API through FastAPI's TestClient: endpoints, training semantics, caps, timeouts, limits.

`make_server_images` builds the test rasters (seeded) and is shared by the other test_server_* files.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.transform import from_origin

from tools import errors as E
from tools.server import (
    ERROR_STATUS,
    EpisodeRegistry,
    ServeConfig,
    UnknownEpisodeError,
    create_app,
    public_error,
)

W, H = 2400, 1800


def _write_cog(path: Path, width: int, height: int, seed: int, georef: bool = True) -> None:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(xx * 255 // width), (yy * 255 // height), ((xx + yy) % 256)]).astype("uint8")
    base[:, : height // 2 : 37, :] = rng.integers(0, 255, size=(3, 1, width), dtype="uint8")
    # a bright square at a known place, so crops can be checked
    base[:, 900:1000, 1200:1300] = 255
    profile = dict(driver="GTiff", width=width, height=height, count=3, dtype="uint8", tiled=True,
                   blockxsize=256, blockysize=256, compress="deflate")
    if georef:
        profile.update(crs="EPSG:32633", transform=from_origin(500000, 4600000, 0.5, 0.5))
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(base)
        ds.build_overviews([2, 4, 8], rasterio.enums.Resampling.average)


def make_server_images(root: Path) -> Path:
    """Rasters + images.jsonl under `root`: a COG, a PNG, a corrupt TIFF and a VRT disguised as .tif."""
    root.mkdir(parents=True, exist_ok=True)
    _write_cog(root / "scene_a.tif", W, H, seed=0)
    _write_cog(root / "scene_b.tif", 1200, 900, seed=1)
    Image.fromarray(np.full((200, 300, 3), 128, "uint8")).save(root / "plain.png")
    # TIFF magic, then garbage: passes sniffing, fails in GDAL → "unreadable"
    (root / "corrupt.tif").write_bytes(b"II*\x00" + bytes(range(256)) * 8)
    # a VRT that would read /etc/passwd, named .tif: never served
    (root / "evil.tif").write_text(
        '<VRTDataset rasterXSize="64" rasterYSize="64"><VRTRasterBand dataType="Byte" band="1">'
        "<SimpleSource><SourceFilename>/etc/passwd</SourceFilename></SimpleSource></VRTRasterBand></VRTDataset>"
    )
    lines = [{"id": i, "path": f"{i}.{ext}"} for i, ext in
             [("scene_a", "tif"), ("scene_b", "tif"), ("plain", "png"), ("corrupt", "tif"), ("evil", "tif")]]
    (root / "images.jsonl").write_text("".join(json.dumps(d) + "\n" for d in lines))
    return root / "images.jsonl"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_server_images(tmp_path_factory.mktemp("srv"))


def make_cfg(manifest: Path, **kw) -> ServeConfig:
    kw.setdefault("allowed_hosts", ["testserver", "127.0.0.1", "localhost"])  # TestClient sends Host: testserver
    cfg = ServeConfig(manifest=str(manifest), output_dir=str(manifest.parent / "out"), gdal_lockdown=False, **kw)
    cfg.check()
    return cfg


@pytest.fixture(scope="module")
def client(manifest: Path):
    from fastapi.testclient import TestClient

    with TestClient(create_app(make_cfg(manifest))) as c:
        yield c


def _png(b64_or_bytes) -> Image.Image:
    raw = base64.b64decode(b64_or_bytes) if isinstance(b64_or_bytes, str) else b64_or_bytes
    return Image.open(io.BytesIO(raw))


# -- basic endpoints ------------------------------------------------------------------------------------
def test_health_images_info_tools(client) -> None:
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["images"] == 4 and h["refused_images"] == 1  # evil.tif refused
    ids = client.get("/images").json()
    assert ids["images"] == ["corrupt", "plain", "scene_a", "scene_b"] and ids["total"] == 4
    assert client.get("/images", params={"limit": 1, "offset": 1}).json()["images"] == ["plain"]
    info = client.get("/images/scene_a").json()
    assert (info["width"], info["height"], info["bands"], info["dtype"]) == (W, H, 3, "uint8")
    assert info["crs"] == "EPSG:32633" and info["overviews"] == [2, 4, 8] and "path" not in info
    tools = client.get("/tools").json()
    fn = tools["tools"][0]["function"]
    assert tools["tools"][0]["type"] == "function" and fn["name"] == "zoom_in"
    assert fn["parameters"]["required"] == ["bbox", "source"] and "system_prompt" in tools
    assert client.get("/openapi.json").status_code == 200


def test_unknown_and_unreadable_answer_the_same(client) -> None:
    a = client.get("/images/nope")
    b = client.get("/images/corrupt")
    c = client.get("/images/evil")
    assert a.status_code == b.status_code == c.status_code == 404
    assert a.json() == b.json() == c.json() == {"error": "UnknownImageError", "message": "Unknown image."}


# -- episodes: the training semantics -------------------------------------------------------------------
def test_episode_zoom_matches_training_episode(client, manifest: Path) -> None:
    from tools.protocol import Episode
    from tools.store import ImageStore

    r = client.post("/episodes", json={"image_ids": ["scene_a"]})
    assert r.status_code == 200, r.text
    body = r.json()
    eid = body["episode_id"]
    ov = body["observations"][0]
    assert ov["name"] == "image_0" and ov["window"] == [0.0, 0.0, float(W), float(H)]
    shown_w, shown_h = ov["shown_size"]
    assert _png(ov["image"]["base64"]).size == (shown_w, shown_h)
    assert shown_w * shown_h <= 50176 and shown_w % 28 == 0 and shown_h % 28 == 0

    # zoom onto the bright square (native 1200..1300 x 900..1000) given in the overview's frame
    sx, sy = W / shown_w, H / shown_h
    bbox = [1200 / sx, 900 / sy, 1300 / sx, 1000 / sy]
    z = client.post(f"/episodes/{eid}/zoom_in", json={"bbox": bbox, "source": "image_0"})
    assert z.status_code == 200, z.text
    obs = z.json()
    assert obs["name"] == "obs_1" and obs["parent"] == "image_0"
    img = np.asarray(_png(obs["image"]["base64"]))
    # same as the trainer's Episode on the same store
    ep = Episode(ImageStore.from_manifest(manifest), ["scene_a"], make_cfg(manifest).zoom_config())
    ref = ep.zoom_in(bbox, "image_0")
    assert obs["window"] == list(ref.window) and img.shape[:2] == (ref.image.size[1], ref.image.size[0])
    assert np.array_equal(img, np.asarray(ref.image))
    assert img[img.shape[0] // 2, img.shape[1] // 2].tolist() == [255, 255, 255]

    # chained zoom in obs_1's frame, returned as PNG bytes with the mapping in a header
    z2 = client.post(f"/episodes/{eid}/zoom_in", json={"bbox": [0, 0, 28, 28], "source": "obs_1", "format": "png"})
    assert z2.status_code == 200 and z2.headers["content-type"] == "image/png"
    meta = json.loads(z2.headers["x-knowzoom-observation"])
    assert meta["name"] == "obs_2" and meta["parent"] == "obs_1"
    assert _png(z2.content).size == tuple(meta["shown_size"])
    jz = client.post(f"/episodes/{eid}/zoom_in", json={"bbox": [0, 0, 50, 50], "format": "jpeg"})
    assert jz.status_code == 200 and jz.headers["content-type"] == "image/jpeg"

    st = client.get(f"/episodes/{eid}").json()
    assert [o["name"] for o in st["observations"]] == ["image_0", "obs_1", "obs_2", "obs_3"]
    assert client.get(f"/episodes/{eid}/observations/obs_1").headers["content-type"] == "image/png"
    assert client.delete(f"/episodes/{eid}").json()["ended"] is True
    assert client.get(f"/episodes/{eid}").status_code == 404


def test_episode_errors_and_turn_limit(client) -> None:
    eid = client.post("/episodes", json={"image_ids": ["scene_b", "plain"]}).json()["episode_id"]
    cases = [
        ({"bbox": [10, 10, 5, 5]}, 400, "BadBoxError"),
        ({"bbox": [1, 2, 3]}, 400, "BadBoxError"),
        ({"bbox": [5000, 5000, 6000, 6000]}, 400, "BoxOutsideError"),
        ({"bbox": [0, 0, 10, 10], "source": "obs_9"}, 400, "UnknownSourceError"),
    ]
    for body, status, name in cases:
        r = client.post(f"/episodes/{eid}/zoom_in", json=body)
        assert (r.status_code, r.json()["error"]) == (status, name), (body, r.text)
    # second image of the episode
    assert client.post(f"/episodes/{eid}/zoom_in", json={"bbox": [0, 0, 50, 50], "source": "image_1"}).status_code == 200
    # 4 failed + 1 ok calls count as turns (as in training): the 6th call hits max_turns=5
    r = client.post(f"/episodes/{eid}/zoom_in", json={"bbox": [0, 0, 50, 50]})
    assert r.status_code == 422 and r.json()["error"] == "LimitError"


def test_episode_call_returns_model_text(client) -> None:
    eid = client.post("/episodes", json={"image_ids": ["scene_a"]}).json()["episode_id"]
    ok = client.post(f"/episodes/{eid}/call", json={"name": "zoom_in", "arguments": {"bbox": [0, 0, 40, 40]}}).json()
    assert ok["error"] is None and ok["text"].startswith("obs_1:") and ok["observation"]["name"] == "obs_1"
    txt = '<think>look</think><tool_call>{"name": "zoom_in", "arguments": {"bbox": [0, 0, 20, 20], "source": "obs_1"}}</tool_call>'
    r = client.post(f"/episodes/{eid}/call", json={"text": txt}).json()
    assert r["observation"]["parent"] == "obs_1"
    bad = client.post(f"/episodes/{eid}/call", json={"name": "crop", "arguments": {"bbox": [0, 0, 1, 1]}})
    assert bad.status_code == 200 and bad.json()["error"]["error"] == "UnknownToolError"
    assert bad.json()["text"].startswith("Error:")
    two = client.post(f"/episodes/{eid}/call", json={"text": "<tool_call>{}</tool_call><tool_call>{}</tool_call>"})
    assert two.json()["error"]["error"] == "MultipleToolCallsError"


def test_start_episode_validation(client) -> None:
    assert client.post("/episodes", json={"image_ids": []}).status_code == 400
    assert client.post("/episodes", json={"image_ids": ["scene_a"] * 5}).status_code == 422
    assert client.post("/episodes", json={"image_ids": ["nope"]}).status_code == 404
    assert client.post("/episodes", json={"image_ids": ["corrupt"]}).json() == {
        "error": "UnknownImageError", "message": "Unknown image."}
    assert client.post("/episodes", json={"images": ["scene_a"]}).status_code == 422
    assert client.post("/episodes/nope/zoom_in", json={"bbox": [0, 0, 5, 5]}).status_code == 404


# -- stateless zoom -------------------------------------------------------------------------------------
def test_stateless_zoom_native_geo_lonlat(client) -> None:
    r = client.post("/zoom", json={"image_id": "scene_a", "bbox": [1200, 900, 1300, 1000]})
    assert r.status_code == 200, r.text
    nat = r.json()
    assert nat["window"] == [1200.0, 900.0, 1300.0, 1000.0]
    # the same box in the image CRS (0.5 m pixels from 500000, 4600000)
    geo = [500000 + 600, 4600000 - 500, 500000 + 650, 4600000 - 450]
    g = client.post("/zoom", json={"image_id": "scene_a", "bbox": geo, "box_crs": "crs"}).json()
    assert g["window"] == nat["window"]
    lon0, lat0, lon1, lat1 = nat["geo_bounds"]
    ll = client.post("/zoom", json={"image_id": "scene_a", "bbox": [lon0, lat0, lon1, lat1], "box_crs": "lonlat"})
    w = ll.json()["window"]
    assert all(abs(a - b) <= 2 for a, b in zip(w, nat["window"], strict=True))
    # caller-chosen size within the cap
    big = client.post("/zoom", json={"image_id": "scene_a", "bbox": [0, 0, 1400, 1400], "max_pixels": 200704,
                                     "format": "png"})
    assert big.status_code == 200 and _png(big.content).size == (448, 448)
    # non-georeferenced image refuses geo boxes with a 400
    assert client.post("/zoom", json={"image_id": "plain", "bbox": [0, 0, 1, 1], "box_crs": "crs"}).status_code == 400


def test_caps_on_caller_sizes_and_bytes(manifest: Path) -> None:
    from fastapi.testclient import TestClient

    with TestClient(create_app(make_cfg(manifest, max_output_pixels=100_000, max_response_bytes=20_000))) as c:
        over = c.post("/zoom", json={"image_id": "scene_a", "bbox": [0, 0, 900, 900], "max_pixels": 100_001})
        assert over.status_code == 422 and "100000" in over.json()["message"]
        assert c.post("/zoom", json={"image_id": "scene_a", "bbox": [0, 0, 9, 9], "max_pixels": 10**12}).status_code == 422
        # noisy crop at 100k pixels: PNG over 20 kB → refused by the byte cap, JPEG of a flat image fits
        noisy = c.post("/zoom", json={"image_id": "scene_a", "bbox": [0, 0, 2400, 900], "max_pixels": 100_000})
        assert noisy.status_code == 422 and "byte cap" in noisy.json()["message"]
        flat = c.post("/zoom", json={"image_id": "plain", "bbox": [0, 0, 300, 200], "format": "jpeg"})
        assert flat.status_code == 200 and len(flat.content) <= 20_000
        # body cap
        assert c.post("/zoom", content=b"{" + b" " * 70_000 + b"}",
                      headers={"content-type": "application/json"}).status_code == 413


# -- time and concurrency -------------------------------------------------------------------------------
class SlowStore:
    """An ImageStore whose reads sleep first (the injected slow read)."""

    def __init__(self, inner, delay: float):
        self.inner, self.delay = inner, delay

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def open(self, image_id):
        time.sleep(self.delay)
        return self.inner.open(image_id)


def test_slow_read_is_504_and_slot_held_until_the_read_ends(manifest: Path) -> None:
    import httpx

    from tools.store import ImageStore

    store = SlowStore(ImageStore.from_manifest(manifest), delay=1.0)
    store.inner.info("scene_a")  # cache info, so only pixel reads are slow
    cfg = make_cfg(manifest, request_timeout_s=0.3, max_concurrency=1, queue_timeout_s=0.05)
    app = create_app(cfg, store=store)
    svc = app.state.service

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            t0 = time.perf_counter()
            r1 = await c.post("/zoom", json={"image_id": "scene_a", "bbox": [0, 0, 100, 100]})
            dt = time.perf_counter() - t0
            # the timed-out read still runs: the only slot is busy → 503 with Retry-After
            r2 = await c.post("/zoom", json={"image_id": "scene_a", "bbox": [0, 0, 100, 100]})
            await asyncio.sleep(1.0)  # the read ends, the slot frees
            assert svc.inflight == 0
            return r1, dt, r2

    r1, dt, r2 = asyncio.run(go())
    assert r1.status_code == 504 and r1.json() == {"error": "ToolTimeoutError", "message": "The zoom read timed out."}
    assert dt < 0.9
    assert r2.status_code == 503 and r2.headers["retry-after"] == "1" and r2.json()["error"] == "ServerBusyError"
    assert svc.n_timeouts == 1 and svc.n_busy == 1


def test_concurrency_limit_queues_then_serves(manifest: Path) -> None:
    import httpx

    from tools.store import ImageStore

    store = SlowStore(ImageStore.from_manifest(manifest), delay=0.2)
    store.inner.info("scene_b")
    app = create_app(make_cfg(manifest, max_concurrency=2, queue_timeout_s=5.0), store=store)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
            body = {"image_id": "scene_b", "bbox": [0, 0, 100, 100]}
            return await asyncio.gather(*[c.post("/zoom", json=body) for _ in range(4)])

    t0 = time.perf_counter()
    rs = asyncio.run(go())
    assert [r.status_code for r in rs] == [200] * 4
    assert time.perf_counter() - t0 >= 0.39  # 4 reads of 0.2 s through 2 slots: at least two rounds


def test_episode_registry_ttl_and_lru() -> None:
    now = [0.0]
    reg = EpisodeRegistry(max_episodes=2, ttl_s=10, clock=lambda: now[0])
    a, b = reg.add("A", ["x"]), reg.add("B", ["x"])
    reg.get(a)  # a is now most recent
    c = reg.add("C", ["x"])  # evicts b (LRU)
    with pytest.raises(UnknownEpisodeError):
        reg.get(b)
    assert reg.get(c).episode == "C" and reg.n_evicted == 1
    now[0] = 11.0
    with pytest.raises(UnknownEpisodeError):
        reg.get(a)
    assert len(reg) == 0 and reg.n_expired == 2


# -- the one error table ---------------------------------------------------------------------------------
def test_every_tool_error_has_one_status() -> None:
    caller_mistakes = [E.BadBoxError, E.BoxOutsideError, E.UnknownSourceError, E.UnknownImageError,
                       E.UnreadableImageError, E.ForbiddenPathError, E.ToolCallParseError, E.UnknownToolError,
                       E.MultipleToolCallsError, E.LimitError, UnknownEpisodeError]
    for cls in caller_mistakes:
        assert 400 <= ERROR_STATUS[cls] < 500, cls
    assert ERROR_STATUS[E.ToolTimeoutError] == 504
    for cls in E.__all__:
        assert getattr(E, cls) in ERROR_STATUS
    assert all(s != 500 for s in ERROR_STATUS.values())
    assert public_error(E.UnreadableImageError(detail="/secret/path.tif: TIFFReadDirectory failed")) == \
        public_error(E.UnknownImageError(detail="x"))


def test_config_validation_messages(manifest: Path) -> None:
    bad = ServeConfig(manifest="", workers=2, transport="grpc", max_output_pixels=10, frame="pixels",
                      png_encoder="lz4", request_timeout_s=float("nan"), max_concurrency=0)
    problems = "\n".join(bad.validate())
    for field in ("manifest/image_dirs", "workers", "transport", "max_output_pixels", "frame", "png_encoder",
                  "request_timeout_s", "max_concurrency"):
        assert field in problems
    assert ServeConfig(manifest=str(manifest), workers=2, stateless_only=True).validate() == []
    huge = ServeConfig(manifest=str(manifest), max_pixels=10**9, max_output_pixels=10**9).validate()
    assert any(p.startswith("zoom: max_pixels") for p in huge) and any("max_output_pixels" in p for p in huge)


def test_stateless_only_disables_episodes(manifest: Path) -> None:
    from fastapi.testclient import TestClient

    with TestClient(create_app(make_cfg(manifest, stateless_only=True))) as c:
        assert c.post("/episodes", json={"image_ids": ["scene_a"]}).status_code == 422
        assert c.post("/zoom", json={"image_id": "scene_a", "bbox": [0, 0, 64, 64]}).status_code == 200


@pytest.mark.parametrize("shape", [(1, 1, 3), (5, 7, 3), (224, 168, 3), (30, 2, 3), (9, 9)])
@pytest.mark.parametrize("level", [0, 1, 6, 9])
@pytest.mark.parametrize("encoder", ["zlib", "auto", "isal"])
def test_png_encoder_is_lossless(shape, level, encoder) -> None:
    from tools.server import png_bytes

    a = np.random.default_rng(sum(shape) + level).integers(0, 256, shape).astype("uint8")
    img = Image.open(io.BytesIO(png_bytes(a, level, encoder)))
    img.load()
    assert img.format == "PNG" and np.array_equal(np.asarray(img), a)


def test_png_encoder_auto_is_isal_and_libdeflate_names_its_replacement(manifest: Path) -> None:
    """auto deflates with ISA-L (the isal package), not a library loaded out of rasterio's wheel; the removed
    `libdeflate` setting is refused with a message naming what to use instead."""
    from tools.server import png_bytes

    yy, xx = np.mgrid[0:96, 0:128]
    a = np.stack([xx * 2, yy * 2, (xx + yy) % 256], axis=-1).astype("uint8")
    assert png_bytes(a, 1, "auto") == png_bytes(a, 1, "isal") != png_bytes(a, 1, "zlib")
    assert png_bytes(a, 0, "auto") == png_bytes(a, 0, "zlib")  # level 0 = stored, as zlib writes it
    problems = ServeConfig(manifest=str(manifest), png_encoder="libdeflate").validate()
    assert len(problems) == 1 and problems[0].startswith("png_encoder: libdeflate was removed")
    assert "use isal" in problems[0] and "zlib" in problems[0]


def test_tiny_serve_config_loads(manifest: Path) -> None:
    from pipeline.core.config import load_config

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(ServeConfig, repo / "configs" / "tiny" / "serve.yaml",
                      {"manifest": str(manifest), "gdal_lockdown": False})
    assert cfg.host == "127.0.0.1" and cfg.max_pixels == 50176 and cfg.validate() == []
    create_app(cfg).state.service.close()
