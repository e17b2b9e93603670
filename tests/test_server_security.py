"""Hostile inputs against the zoom API (one table, expected statuses) and the security helpers.

The slow-read case of the table lives in test_server_api.py (test_slow_read_is_504_...), with the
injected slow store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_server_api import make_cfg, make_server_images

from tools.errors import ForbiddenPathError, UnreadableImageError
from tools.security import check_path_text, gdal_config_options, resolve_under_roots, sniff_driver
from tools.server.app import create_app

UNKNOWN = {"error": "UnknownImageError", "message": "Unknown image."}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_server_images(tmp_path_factory.mktemp("sec"))


@pytest.fixture(scope="module")
def client(manifest: Path):
    from fastapi.testclient import TestClient

    with TestClient(create_app(make_cfg(manifest)), raise_server_exceptions=True) as c:
        yield c


@pytest.fixture(scope="module")
def episode(client) -> str:
    return client.post("/episodes", json={"image_ids": ["scene_a"]}).json()["episode_id"]


def zoom(image_id="scene_a", bbox=(0, 0, 100, 100), **kw) -> dict:
    return {"image_id": image_id, "bbox": list(bbox), **kw}


VRT = '<VRTDataset rasterXSize="9" rasterYSize="9"><VRTRasterBand band="1"><SimpleSource><SourceFilename>/etc/passwd</SourceFilename></SimpleSource></VRTRasterBand></VRTDataset>'
DEEP = "[" * 20000 + "]" * 20000

# (case, method, path, json body or raw bytes, expected status, expected body or None)
HOSTILE = [
    # path traversal and paths/URLs instead of ids
    ("traversal in path", "GET", "/images/..%2F..%2Fetc%2Fpasswd", None, 404, UNKNOWN),
    ("absolute path in path", "GET", "/images/%2Fetc%2Fpasswd", None, 404, UNKNOWN),
    ("traversal id", "POST", "/zoom", zoom("../scene_a"), 404, UNKNOWN),
    ("absolute path id", "POST", "/zoom", zoom("/etc/passwd"), 404, UNKNOWN),
    ("file name id", "POST", "/zoom", zoom("scene_a.tif"), 404, UNKNOWN),
    ("http URL id", "POST", "/zoom", zoom("http://169.254.169.254/latest/meta-data"), 404, UNKNOWN),
    ("vsicurl id", "POST", "/zoom", zoom("/vsicurl/http://evil.example/x.tif"), 404, UNKNOWN),
    ("gdal prefix id", "POST", "/zoom", zoom("GTIFF_DIR:1:/etc/passwd"), 404, UNKNOWN),
    ("episode of path", "POST", "/episodes", {"image_ids": ["/etc/passwd"]}, 404, UNKNOWN),
    # VRT / XML payloads
    ("VRT xml as id", "POST", "/zoom", zoom(VRT), 404, UNKNOWN),
    ("registered VRT disguised as .tif", "POST", "/zoom", zoom("evil"), 404, UNKNOWN),
    ("info of disguised VRT", "GET", "/images/evil", None, 404, UNKNOWN),
    ("xml body", "POST", "/zoom", VRT.encode(), 422, None),
    # corrupt files and unknown ids: same scrubbed answer
    ("corrupt file", "POST", "/zoom", zoom("corrupt"), 404, UNKNOWN),
    ("corrupt info", "GET", "/images/corrupt", None, 404, UNKNOWN),
    ("unknown id", "POST", "/zoom", zoom("no_such_image"), 404, UNKNOWN),
    ("very long id", "POST", "/zoom", zoom("a" * 20000), 404, UNKNOWN),
    ("id not a string", "POST", "/zoom", zoom(12), 422, None),
    ("unknown episode", "POST", "/episodes/AAAA/zoom_in", {"bbox": [0, 0, 5, 5]}, 404, None),
    ("episode traversal", "POST", "/episodes/..%2F..%2Fetc/zoom_in", {"bbox": [0, 0, 5, 5]}, 404, None),
    # boxes: NaN, inf, inverted, zero area, wrong length, junk
    ("NaN box", "POST", "/zoom", b'{"image_id": "scene_a", "bbox": [NaN, 0, 10, 10]}', 400, None),
    ("Infinity box", "POST", "/zoom", b'{"image_id": "scene_a", "bbox": [0, 0, Infinity, 10]}', 400, None),
    ("overflow box", "POST", "/zoom", b'{"image_id": "scene_a", "bbox": [0, 0, 1e400, 10]}', 400, None),
    ("inverted box", "POST", "/zoom", zoom(bbox=(100, 100, 0, 0)), 400, None),
    ("zero-area box", "POST", "/zoom", zoom(bbox=(5, 5, 5, 50)), 400, None),
    ("3-number box", "POST", "/zoom", zoom(bbox=(1, 2, 3)), 400, None),
    ("string box", "POST", "/zoom", zoom(bbox=("0", "0", "9", "9")), 400, None),
    ("bool box", "POST", "/zoom", zoom(bbox=(False, False, True, True)), 400, None),
    ("box outside image", "POST", "/zoom", zoom(bbox=(1e6, 1e6, 2e6, 2e6)), 400, None),
    ("negative box outside", "POST", "/zoom", zoom(bbox=(-500, -500, -1, -1)), 400, None),
    ("1-px-thin box (expanded to min side)", "POST", "/zoom", zoom(bbox=(0, 0, 2400, 1)), 200, None),
    ("lonlat on nonsense", "POST", "/zoom", zoom(bbox=(500, 500, 600, 600), box_crs="lonlat"), 400, None),
    ("bad box_crs", "POST", "/zoom", zoom(box_crs="EPSG:4326';--"), 422, None),
    # huge sizes and bodies
    ("huge max_pixels", "POST", "/zoom", zoom(max_pixels=10**12), 422, None),
    ("negative max_pixels", "POST", "/zoom", zoom(max_pixels=-1), 422, None),
    ("float max_pixels", "POST", "/zoom", zoom(max_pixels=1.5), 422, None),
    ("huge box (clipped, capped)", "POST", "/zoom", zoom(bbox=(-1e12, -1e12, 1e12, 1e12)), 200, None),
    ("too many images", "POST", "/episodes", {"image_ids": ["scene_a"] * 50}, 422, None),
    ("body over the cap", "POST", "/zoom", b'{"image_id": "' + b"x" * 100_000 + b'"}', 413, None),
    ("deeply nested json", "POST", "/zoom", DEEP.encode(), 400, None),
    ("not json", "POST", "/zoom", b"\xff\xfe\x00garbage", 422, None),
    ("unknown field", "POST", "/zoom", {**zoom(), "path": "/etc/passwd"}, 422, None),
    ("bad format", "POST", "/zoom", zoom(format="gif"), 422, None),
]


@pytest.mark.parametrize("case,method,path,body,status,expected", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_inputs(client, case, method, path, body, status, expected) -> None:
    if isinstance(body, bytes):
        r = client.request(method, path, content=body, headers={"content-type": "application/json"})
    elif body is not None:
        r = client.request(method, path, json=body)
    else:
        r = client.request(method, path)
    assert r.status_code == status, (case, r.status_code, r.text[:300])
    assert len(r.content) < 2_000_000
    if expected is not None:
        assert r.json() == expected
    if status >= 400:
        text = r.text
        assert "/etc" not in text and "Traceback" not in text and str(Path.home()) not in text
        assert "srv" not in text and ".tif" not in text  # no file names or folders leak


def test_streamed_body_over_the_cap_is_413(client) -> None:
    def chunks():
        for _ in range(100):
            yield b"x" * 1000

    r = client.post("/zoom", content=chunks(), headers={"content-type": "application/json"})
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert r.status_code == 413 and r.json()["error"] == "RequestTooLargeError"


@pytest.mark.parametrize("bbox,source,status", [
    ([0, 0, 10, 10], "../../etc/passwd", 400),
    ([0, 0, 10, 10], "obs_99", 400),
    ([float("nan"), 0, 1, 1], "image_0", 400),
    ([0, 0, 1e9, 1e9], "image_0", 200),
    ([0, 0, 10, 10], "x" * 10000, 400),
])
def test_hostile_episode_zoom(client, episode: str, bbox, source, status) -> None:
    body = json.dumps({"bbox": bbox, "source": source}).encode()  # json.dumps writes NaN as NaN
    r = client.post(f"/episodes/{episode}/zoom_in", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text[:300]


# -- the helpers of tools/security.py --------------------------------------------------------------------
def test_resolve_under_roots(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.tif").write_bytes(b"II*\x00" + b"\x00" * 16)
    outside = tmp_path / "secret.tif"
    outside.write_bytes(b"II*\x00" + b"\x00" * 16)
    (root / "escape.tif").symlink_to(outside)
    (root / "inside.tif").symlink_to(root / "a.tif")
    (root / "loop.tif").symlink_to(root / "loop.tif")
    assert resolve_under_roots("a.tif", [root], base=root) == (root / "a.tif").resolve()
    assert resolve_under_roots(root / "inside.tif", [root]) == (root / "a.tif").resolve()
    for bad in [root / "escape.tif", f"{root}/../secret.tif", "http://x/a.tif", "/vsicurl/http://x/a.tif",
                "/vsizip//tmp/a.zip/a.tif", "a\x00.tif", ""]:
        with pytest.raises(ForbiddenPathError):
            resolve_under_roots(bad, [root], base=root)
    for missing in [root / "nope.tif", root / "loop.tif", root]:
        with pytest.raises(UnreadableImageError):
            resolve_under_roots(missing, [root])
    assert check_path_text("/data/scenes/x.tif") == "/data/scenes/x.tif"


def test_store_refuses_symlink_escape_and_the_server_refuses_non_rasters(tmp_path: Path) -> None:
    from tools.server.service import ZoomService
    from tools.store import ImageStore

    make_server_images(tmp_path / "root")
    (tmp_path / "outside.tif").write_bytes((tmp_path / "root" / "scene_b.tif").read_bytes())
    (tmp_path / "root" / "link.tif").symlink_to(tmp_path / "outside.tif")
    store = ImageStore([tmp_path / "root"])
    with pytest.raises(ForbiddenPathError):
        store.register("link", tmp_path / "root" / "link.tif")
    svc = ZoomService(make_cfg(tmp_path / "root" / "images.jsonl"))
    assert "evil" in svc.refused and "evil" not in svc.served and "corrupt" in svc.served
    assert sniff_driver(tmp_path / "root" / "plain.png") == "PNG"
    svc.close()


def test_gdal_config_options_disable_network_and_sidecars() -> None:
    o = gdal_config_options()
    assert o["GDAL_DISABLE_READDIR_ON_OPEN"] == "EMPTY_DIR" and o["GDAL_PAM_ENABLED"] == "NO"
    assert o["GDAL_HTTP_MAX_RETRY"] == "0" and o["GDAL_VRT_ENABLE_PYTHON"] == "NO"
    assert o["CPL_VSIL_CURL_ALLOWED_EXTENSIONS"].startswith(".knowzoom")


def test_gdal_lockdown_in_a_fresh_process(tmp_path: Path) -> None:
    """Process-wide lock-down (what serve-tools does): only GTiff/PNG/JPEG(/MEM) remain; VRT/HTTP refused."""
    root = tmp_path / "r"
    manifest = make_server_images(root)
    (root / "real.vrt").write_text(
        f'<VRTDataset rasterXSize="8" rasterYSize="8"><VRTRasterBand dataType="Byte" band="1"><SimpleSource>'
        f"<SourceFilename>{root / 'scene_b.tif'}</SourceFilename><SourceBand>1</SourceBand></SimpleSource>"
        "</VRTRasterBand></VRTDataset>"
    )
    script = textwrap.dedent(f"""
        import json, rasterio
        from tools.security import apply_gdal_lockdown
        rep = apply_gdal_lockdown()
        out = {{"locked": rep.drivers_locked, "drivers": sorted(rep.remaining)}}
        for name, p in [("vrt", {str(root / 'real.vrt')!r}), ("evil", {str(root / 'evil.tif')!r}),
                        ("url", "/vsicurl/http://127.0.0.1:9/x.tif"), ("wms", "WMS:http://127.0.0.1:9/wms")]:
            try:
                rasterio.open(p).close(); out[name] = "opened"
            except Exception as e:
                out[name] = type(e).__name__
        with rasterio.open({str(root / 'scene_b.tif')!r}) as ds:
            out["tif"] = ds.read(1, window=((0, 8), (0, 8))).shape
        with rasterio.open({str(root / 'plain.png')!r}) as ds:
            out["png"] = ds.count
        print(json.dumps(out))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1], env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["locked"] is True and out["drivers"] == ["GTiff", "JPEG", "MEM", "PNG"]
    assert out["vrt"] != "opened" and out["evil"] != "opened" and out["url"] != "opened" and out["wms"] != "opened"
    assert out["tif"] == [8, 8] and out["png"] == 3
    assert manifest.exists()
