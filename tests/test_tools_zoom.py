"""Zoom tool: exact frames (property tests), limits, typed errors for bad inputs, store safety."""

from __future__ import annotations

import math
import os
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rasterio.windows import Window

from tests.tools_fixtures import make_raster
from tools.errors import (
    BadBoxError,
    BoxOutsideError,
    ForbiddenPathError,
    LimitError,
    ToolError,
    ToolTimeoutError,
    UnknownImageError,
    UnknownSourceError,
    UnreadableImageError,
)
from tools.protocol import Episode
from tools.store import ImageStore
from tools.zoom import ZoomConfig, read_overview, read_region, shown_size, smart_resize


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("rasters")
    make_raster(d / "plain.tif", 1000, 800)
    make_raster(d / "geo.tif", 1200, 900, crs="EPSG:32633")
    make_raster(d / "grey16.tif", 600, 500, count=1, dtype="uint16")
    make_raster(d / "nodata.tif", 400, 300, nodata=0)
    (d / "corrupt.tif").write_bytes(b"II*\x00" + os.urandom(300))
    return d


@pytest.fixture(scope="module")
def store(data_dir: Path) -> ImageStore:
    s = ImageStore([data_dir])
    s.register_folder(data_dir)
    return s


# -- sizes -----------------------------------------------------------------------------------------
@given(st.integers(1, 50000), st.integers(1, 50000), st.booleans())
@settings(max_examples=300, deadline=None)
def test_shown_size_is_a_fixed_point_of_qwen_smart_resize(w: int, h: int, upscale: bool) -> None:
    """Sides are multiples of 28, area within [min, max]; Qwen's processor would keep the image as is."""
    cfg = ZoomConfig(upscale=upscale)
    if max(w, h) / min(w, h) > cfg.max_aspect_ratio:
        return
    sw, sh = shown_size(w, h, cfg)
    assert sw % 28 == 0 and sh % 28 == 0
    assert cfg.min_pixels <= sw * sh <= cfg.max_pixels
    assert smart_resize(sh, sw, 28, cfg.min_pixels, cfg.max_pixels) == (sh, sw)


def test_shown_size_matches_transformers_smart_resize() -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    cfg = ZoomConfig(upscale=False)
    for w, h in [(8192, 8192), (8500, 8500), (1000, 300), (57, 3000), (224, 224), (30, 30), (20000, 15000)]:
        sw, sh = shown_size(w, h, cfg)
        assert hf_smart_resize(h, w, 28, cfg.min_pixels, cfg.max_pixels) == (sh, sw)
        # and the processor leaves our output unchanged
        assert hf_smart_resize(sh, sw, 28, cfg.min_pixels, cfg.max_pixels) == (sh, sw)


def test_max_pixels_caps_every_view(store: ImageStore) -> None:
    for mp in (12544, 50176, 200704):
        cfg = ZoomConfig(max_pixels=mp)
        ov = read_overview(store, "plain", cfg)
        assert ov.image.width * ov.image.height <= mp
        r = read_region(store, "plain", (0, 0, 999, 10), cfg, name="obs_1")
        assert r.image.width * r.image.height <= mp


# -- exact frames (hypothesis) ------------------------------------------------------------------------
boxes = st.tuples(st.floats(0, 0.95), st.floats(0, 0.95), st.floats(0.01, 1), st.floats(0.01, 1))


def _frame_box(obs, frac):  # a valid box inside `obs` in its frame, from fractions
    fx0, fy0, dx, dy = frac
    if obs.frame == "shown_pixels":
        w, h = obs.image.size
    else:
        w, h = 1000, 1000
    x0, y0 = fx0 * w, fy0 * h
    x1, y1 = min(w, x0 + max(dx * (w - x0), 1e-3 * w)), min(h, y0 + max(dy * (h - y0), 1e-3 * h))
    return [x0, y0, x1, y1]


@given(boxes, st.sampled_from(["shown_pixels", "norm1000"]))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_valid_box_maps_inside_the_raster_and_matches_a_direct_read(store: ImageStore, frac, frame) -> None:
    cfg = ZoomConfig(frame=frame, read_timeout_s=0)
    ep = Episode(store, ["plain"], cfg)
    box = _frame_box(ep.observations["image_0"], frac)
    if box[2] <= box[0] or box[3] <= box[1]:
        return
    obs = ep.zoom_in(box, "image_0")
    x0, y0, x1, y1 = obs.window
    assert 0 <= x0 < x1 <= 1000 and 0 <= y0 < y1 <= 800
    assert all(float(v).is_integer() for v in obs.window)
    # the requested native box (clipped) is inside the window read
    nat = ep.observations["image_0"].frame_to_native(box)
    assert x0 <= max(0, nat[0]) + 1e-6 and min(1000, nat[2]) <= x1 + 1e-6
    # crop == a direct window read of the same native pixels at the same output size
    w, h = obs.image.size
    with store.open("plain") as ds:
        direct = ds.read(indexes=[1, 2, 3], window=Window(x0, y0, x1 - x0, y1 - y0), out_shape=(3, h, w),
                         resampling=__import__("rasterio").enums.Resampling.bilinear)
    assert np.array_equal(np.asarray(obs.image).transpose(2, 0, 1), direct)


@given(st.integers(0, 900), st.integers(0, 700), st.integers(28, 100), st.integers(28, 100))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_native_scale_crop_shows_exact_native_pixels(store: ImageStore, x: int, y: int, w: int, h: int) -> None:
    """A 1:1 view (no resampling) holds exactly the encoded coordinates of its window."""
    cfg = ZoomConfig(upscale=False, min_pixels=28 * 28, read_timeout_s=0)
    w, h = (w // 28) * 28, (h // 28) * 28
    x, y = min(x, 1000 - w), min(y, 800 - h)
    obs = read_region(store, "plain", (x, y, x + w, y + h), cfg, name="obs_1")
    a = np.asarray(obs.image)
    assert obs.image.size == (w, h)
    yy, xx = np.mgrid[y:y + h, x:x + w]
    assert np.array_equal(a[..., 0], (xx % 256).astype(np.uint8))
    assert np.array_equal(a[..., 1], (yy % 256).astype(np.uint8))


@given(boxes, boxes, st.sampled_from(["shown_pixels", "norm1000"]))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_chained_zooms_compose_exactly(store: ImageStore, f1, f2, frame) -> None:
    cfg = ZoomConfig(frame=frame, read_timeout_s=0)
    ep = Episode(store, ["plain"], cfg)
    b1 = _frame_box(ep.observations["image_0"], f1)
    o1 = ep.zoom_in(b1, "image_0")
    b2 = _frame_box(o1, f2)
    o2 = ep.zoom_in(b2, "obs_1")
    # mapping through obs_1 equals the affine composition of both frames
    nat = o1.frame_to_native(b2)
    sx = (o1.window[2] - o1.window[0]) / (o1.image.width if frame == "shown_pixels" else 1000)
    sy = (o1.window[3] - o1.window[1]) / (o1.image.height if frame == "shown_pixels" else 1000)
    expect = (o1.window[0] + b2[0] * sx, o1.window[1] + b2[1] * sy, o1.window[0] + b2[2] * sx, o1.window[1] + b2[3] * sy)
    assert np.allclose(nat, expect)
    # round trip native -> frame -> native is exact
    assert np.allclose(o1.frame_to_native(o1.native_to_frame(nat)), nat)
    assert o2.parent == "obs_1" and o2.window[0] >= 0 and o2.window[2] <= 1000
    # the chained window covers the (clipped) requested region
    assert o2.window[0] <= max(nat[0], o1.window[0]) + 1e-6 or o2.window[2] - o2.window[0] >= cfg.min_crop_side


def test_oracle_bbox_round_trip(store: ImageStore) -> None:
    ep = Episode(store, ["plain"], ZoomConfig())
    target = [400.0, 300.0, 520.0, 390.0]
    obs = ep.zoom_in(ep.oracle_bbox(0, target), "image_0")
    x0, y0, x1, y1 = obs.window
    assert x0 <= 400 and y0 <= 300 and x1 >= 520 and y1 >= 390
    s = ep.observations["image_0"].scale
    assert 400 - x0 <= s[0] + 1 and x1 - 520 <= s[0] + 1 and 300 - y0 <= s[1] + 1


# -- geo ----------------------------------------------------------------------------------------------
def test_geo_bounds_and_lonlat_frame(store: ImageStore) -> None:
    info = store.info("geo")
    assert info.crs == "EPSG:32633" and info.geo_bounds is not None
    ep = Episode(store, ["geo"], ZoomConfig(frame="lonlat"))
    ov = ep.observations["image_0"]
    assert np.allclose(ov.geo_bounds, info.geo_bounds, atol=1e-6)
    # a lon/lat box of a native region maps back to (about) that region
    target = (300.0, 200.0, 600.0, 500.0)
    ll = ov.native_to_frame(target)
    obs = ep.zoom_in(list(ll), "image_0")
    assert np.allclose(obs.window, target, atol=2)
    assert obs.geo_bounds is not None and obs.crs == "EPSG:32633"


def test_lonlat_on_plain_image_is_a_bad_box(store: ImageStore) -> None:
    ep = Episode(store, ["plain"], ZoomConfig(frame="lonlat"))
    with pytest.raises(BadBoxError):
        ep.zoom_in([15.0, 36.0, 15.1, 36.1], "image_0")


def test_non_uint8_and_nodata_render_rgb(store: ImageStore) -> None:
    o = read_overview(store, "grey16", ZoomConfig())
    assert o.image.mode == "RGB" and np.asarray(o.image).std() > 0
    o = read_region(store, "nodata", (0, 0, 100, 100), ZoomConfig(), name="obs_1")
    assert o.image.mode == "RGB"


# -- limits -------------------------------------------------------------------------------------------
def test_min_crop_side_expands_about_centre(store: ImageStore) -> None:
    cfg = ZoomConfig(min_crop_side=64)
    o = read_region(store, "plain", (500, 400, 502, 401), cfg, name="obs_1")
    x0, y0, x1, y1 = o.window
    assert x1 - x0 >= 64 and y1 - y0 >= 64
    assert abs((x0 + x1) / 2 - 501) <= 1 and abs((y0 + y1) / 2 - 400.5) <= 1
    # at the border the expanded box shifts inside the raster
    o = read_region(store, "plain", (0, 0, 2, 2), cfg, name="obs_2")
    assert o.window == (0.0, 0.0, 64.0, 64.0)


def test_partly_outside_box_is_clipped(store: ImageStore) -> None:
    o = read_region(store, "plain", (900, 700, 1500, 1500), ZoomConfig(), name="obs_1")
    assert o.window == (900.0, 700.0, 1000.0, 800.0)


def test_max_aspect_ratio(store: ImageStore) -> None:
    with pytest.raises(LimitError):
        read_region(store, "plain", (0, 0, 1000, 28), ZoomConfig(max_aspect_ratio=10), name="obs_1")
    read_region(store, "plain", (0, 0, 280, 28), ZoomConfig(max_aspect_ratio=10), name="obs_1")


def test_max_turns(store: ImageStore) -> None:
    ep = Episode(store, ["plain"], ZoomConfig(max_turns=2))
    ep.zoom_in([0, 0, 50, 50])
    ep.zoom_in([0, 0, 50, 50])
    with pytest.raises(LimitError):
        ep.zoom_in([0, 0, 50, 50])
    assert ep.n_calls == 3 and ep.n_errors == 1


def test_read_timeout(store: ImageStore, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    import tools.zoom as z

    real = z._read_pixels
    monkeypatch.setattr(z, "_read_pixels", lambda *a, **k: (time.sleep(0.5), real(*a, **k))[1])
    with pytest.raises(ToolTimeoutError):
        read_region(store, "plain", (0, 0, 100, 100), ZoomConfig(read_timeout_s=0.05), name="obs_1")


def test_config_validation() -> None:
    assert ZoomConfig().validate() == []
    bad = ZoomConfig(max_pixels=10**9, frame="pixels", size_factor=0, max_turns=-1, resampling="magic")
    problems = " ".join(bad.validate())
    for name in ("max_pixels", "frame", "size_factor", "max_turns", "resampling"):
        assert name in problems


# -- bad inputs → typed errors ------------------------------------------------------------------------
BAD = [
    ("nan", [float("nan"), 0, 10, 10], "image_0", BadBoxError),
    ("inf", [0, 0, float("inf"), 10], "image_0", BadBoxError),
    ("inverted", [50, 50, 10, 10], "image_0", BadBoxError),
    ("zero-area", [10, 10, 10, 50], "image_0", BadBoxError),
    ("three numbers", [1, 2, 3], "image_0", BadBoxError),
    ("five numbers", [1, 2, 3, 4, 5], "image_0", BadBoxError),
    ("string", "0,0,10,10", "image_0", BadBoxError),
    ("strings inside", ["0", "0", "10", "10"], "image_0", BadBoxError),
    ("bools", [True, False, True, True], "image_0", BadBoxError),
    ("dict", {"x": 1}, "image_0", BadBoxError),
    ("none", None, "image_0", BadBoxError),
    ("nested", [[0, 0, 10, 10]], "image_0", BadBoxError),
    ("outside right", [5000, 0, 6000, 10], "image_0", BoxOutsideError),
    ("outside negative", [-100, -100, -10, -10], "image_0", BoxOutsideError),
    ("edge touching", [224, 0, 300, 10], "image_0", BoxOutsideError),
    ("unknown source", [0, 0, 10, 10], "obs_7", UnknownSourceError),
    ("source not a string", [0, 0, 10, 10], 3, UnknownSourceError),
    ("huge numbers", [0, 0, 1e300, 1e300], "image_0", None),  # clipped: a valid full view
    # found by the server fuzz test: 1e295 written out is 296 digits, and the message must stay one short line
    ("outside by huge numbers", [0.0, 1e66, 1.0, 1e295], "image_0", BoxOutsideError),
]


@pytest.mark.parametrize("name,bbox,source,err", BAD, ids=[b[0] for b in BAD])
def test_bad_boxes_raise_typed_errors(store: ImageStore, name, bbox, source, err) -> None:
    ep = Episode(store, ["plain"], ZoomConfig())
    if err is None:
        ep.zoom_in(bbox, source)
        return
    with pytest.raises(err) as ei:
        ep.zoom_in(bbox, source)
    msg = ei.value.model_message()
    assert msg.startswith("Error:") and len(msg) < 200 and "/" not in msg.replace("/tool", "")
    # execute() never raises: the error text goes back to the model
    from tools.errors import ToolCallParseError
    from tools.protocol import ToolCall

    res = ep.execute(ToolCall("zoom_in", {"bbox": bbox, "source": source}))
    assert res.observation is None and isinstance(res.error, (err, ToolCallParseError)) and res.text == res.error.model_message()


def test_unknown_and_corrupt_images(store: ImageStore, data_dir: Path) -> None:
    with pytest.raises(UnknownImageError):
        store.info("nope")
    with pytest.raises(UnknownImageError):
        Episode(store, ["../plain"], ZoomConfig())
    with pytest.raises(UnreadableImageError) as ei:
        Episode(store, ["corrupt"], ZoomConfig())
    # same scrubbed message as unknown; no path leaks to the model
    assert ei.value.model_message() == UnknownImageError().model_message()
    assert str(data_dir) not in ei.value.model_message()
    assert UnknownImageError.http_status == 404 and issubclass(UnreadableImageError, ToolError)


def test_forbidden_paths(tmp_path: Path, data_dir: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    s = ImageStore([root])
    with pytest.raises(ForbiddenPathError):
        s.register("x", data_dir / "plain.tif")
    (root / "link.tif").symlink_to(data_dir / "plain.tif")
    with pytest.raises(ForbiddenPathError):
        s.register("y", root / "link.tif")
    with pytest.raises(ForbiddenPathError):
        s.register("z", root / ".." / "root" / ".." / "x.tif") if (tmp_path / "x.tif").touch() is None else None
    with pytest.raises(UnknownImageError):
        s.register("bad id with spaces", root / "link.tif")


def test_store_registration_is_the_security_root_check(tmp_path: Path, data_dir: Path) -> None:
    """The store registers through tools.security.resolve_under_roots: path text GDAL would not read as a
    local file is refused as forbidden (a NUL byte was a raw ValueError, URLs and /vsi paths "unreadable"),
    while an operator's `..` that resolves inside a root stays accepted."""
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "a.tif").write_bytes((data_dir / "plain.tif").read_bytes())
    s = ImageStore([root])
    for bad in ["a\x00.tif", "http://example.org/a.tif", "/vsicurl/http://example.org/a.tif"]:
        with pytest.raises(ForbiddenPathError):
            s.register("x", bad)
    s.register("ok", root / "sub" / ".." / "a.tif")
    assert s.path("ok") == (root / "a.tif").resolve()


def test_manifest_store(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    make_raster(tmp_path / "images" / "a.tif", 300, 300)
    (tmp_path / "images.jsonl").write_text('{"id": "a", "path": "images/a.tif"}\n')
    s = ImageStore.from_manifest(tmp_path / "images.jsonl")
    assert s.ids() == ["a"] and s.info("a").width == 300
    assert "path" not in s.info("a").to_dict()


def test_lenient_manifest_registration_notes_bad_lines_and_keeps_render_keys(tmp_path: Path) -> None:
    """`register_manifest(problems=...)` (the server's manifest_errors: skip) skips and notes bad lines, and
    registers the good ones exactly as the strict path does, render keys included (the server's own skipping
    reader used to drop them)."""
    make_raster(tmp_path / "a.tif", 300, 300)
    (tmp_path / "images.jsonl").write_text('{"id": "a", "path": "a.tif", "stretch": "none"}\n{not json\n'
                                           '{"id": "gone", "path": "missing.tif"}\n')
    s = ImageStore([tmp_path])
    problems: list[str] = []
    assert s.register_manifest(tmp_path / "images.jsonl", problems=problems) == ["a"]
    assert s.render_spec("a").stretch == "none"
    assert [p.split(": ")[0] for p in problems] == ["images.jsonl:2", "images.jsonl:3"]
    with pytest.raises(UnreadableImageError):
        ImageStore([tmp_path]).register_manifest(tmp_path / "images.jsonl")


def test_thread_safe_concurrent_reads(store: ImageStore) -> None:
    cfg = ZoomConfig(read_timeout_s=0)
    ref = np.asarray(read_region(store, "plain", (100, 100, 400, 400), cfg, name="obs_1").image)
    errors: list[Exception] = []

    def work() -> None:
        try:
            for _ in range(10):
                a = np.asarray(read_region(store, "plain", (100, 100, 400, 400), cfg, name="obs_1").image)
                assert np.array_equal(a, ref)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert store.n_open <= store.max_open


def test_memory_is_bounded_by_the_output_not_the_raster(tmp_path: Path) -> None:
    """A whole-raster read of a 6000x6000 COG allocates about the output size, not 108 MB."""
    make_raster(tmp_path / "big.tif", 6000, 6000, count=3, seed=1)
    s = ImageStore([tmp_path])
    s.register("big", tmp_path / "big.tif")
    s.info("big")
    tracemalloc.start()
    read_region(s, "big", (0, 0, 6000, 6000), ZoomConfig(read_timeout_s=0), name="obs_1")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 5 * 1024 * 1024, peak
    assert math.isfinite(peak)
