"""Rasters as geospatial users have them: colour interpretation, band choice, stretch, palettes, masks and
alpha, nodata in downsampled reads, antimeridian lon/lat boxes, GCP-only and south-up grids, sidecar files."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from tests.tools_fixtures import RASTER_KINDS, make_kind
from tools.errors import BadBoxError, UnreadableImageError
from tools.protocol import Episode
from tools.store import ImageStore
from tools.zoom import ZoomConfig, check_box, read_overview, read_region

CFG = ZoomConfig(read_timeout_s=0)


@pytest.fixture(scope="module")
def kinds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("kinds")
    for k in RASTER_KINDS:
        make_kind(d / f"{k}.tif", k, seed=1)
    return d


@pytest.fixture(scope="module")
def store(kinds: Path) -> ImageStore:
    s = ImageStore([kinds])
    s.register_folder(kinds)
    return s


def _centre(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    return img[h // 2 - 4: h // 2 + 4, w // 2 - 4: w // 2 + 4].reshape(-1, 3).mean(axis=0)


def test_every_kind_reads_as_rgb(store: ImageStore) -> None:
    for k in RASTER_KINDS:
        o = read_overview(store, k, CFG)
        assert o.image.mode == "RGB" and np.asarray(o.image).any(), k


# -- bands and stretch ----------------------------------------------------------------------------------
def test_colour_interpretation_picks_red_green_blue(store: ImageStore) -> None:
    assert store.info("sentinel2").bands == [3, 2, 1]
    r, g, b = _centre(np.asarray(read_overview(store, "sentinel2", CFG).image))
    assert r > 200 and g < 80 and b < 80  # the red object renders red, not blue


def test_without_interpretation_bands_default_to_1_2_3_and_render_blue(store: ImageStore) -> None:
    assert store.info("sentinel2_nointerp").bands == [1, 2, 3]
    r, g, b = _centre(np.asarray(read_overview(store, "sentinel2_nointerp", CFG).image))
    assert b > 200 and r < 80  # why a band choice is needed


def test_manifest_bands_choose_per_image(kinds: Path, tmp_path: Path) -> None:
    (kinds / "m.jsonl").write_text("\n".join(json.dumps(d) for d in (
        {"id": "s2", "path": "sentinel2_nointerp.tif", "bands": [3, 2, 1]},
        {"id": "nir", "path": "sentinel2_nointerp.tif", "bands": [4, 3, 2]},
        {"id": "plain", "path": "sentinel2_nointerp.tif"})) + "\n")
    s = ImageStore.from_manifest(kinds / "m.jsonl")
    r, g, b = _centre(np.asarray(read_overview(s, "s2", CFG).image))
    assert r > 200 and g < 80 and b < 80
    assert _centre(np.asarray(read_overview(s, "plain", CFG).image))[2] > 200
    # the config's choice applies to images without their own
    r, g, b = _centre(np.asarray(read_overview(s, "plain", ZoomConfig(read_timeout_s=0, bands=[3, 2, 1])).image))
    assert r > 200 and b < 80
    # and a manifest line beats the config
    r, g, b = _centre(np.asarray(read_overview(s, "s2", ZoomConfig(read_timeout_s=0, bands=[1, 2, 3])).image))
    assert r > 200 and b < 80


def test_bands_beyond_the_file_are_a_clear_error(kinds: Path) -> None:
    (kinds / "bad.jsonl").write_text(json.dumps({"id": "x", "path": "palette.tif", "bands": [3, 2, 1]}) + "\n")
    s = ImageStore.from_manifest(kinds / "bad.jsonl")
    with pytest.raises(UnreadableImageError, match="bands"):
        read_overview(s, "x", CFG)


@pytest.mark.parametrize("line", [{"bands": [0, 1, 2]}, {"bands": [1, 2]}, {"stretch": "gamma"},
                                  {"percentiles": [98, 2]}, {"stretch": "range"}, {"range": [5, 1]}])
def test_bad_render_keys_name_the_manifest_line(kinds: Path, line: dict) -> None:
    (kinds / "badkeys.jsonl").write_text(json.dumps({"id": "ok", "path": "mask.tif"}) + "\n"
                                         + json.dumps({"id": "x", "path": "mask.tif", **line}) + "\n")
    with pytest.raises(UnreadableImageError) as e:
        ImageStore.from_manifest(kinds / "badkeys.jsonl")
    assert "badkeys.jsonl:2" in str(e.value)


def test_percentile_stretch_is_per_band(store: ImageStore) -> None:
    ranges = store.display_range("sentinel2", (3, 2, 1))
    assert ranges[0][0] > ranges[1][0] + 50 > ranges[2][0] + 100  # B4, B3, B2 each get their own range
    img = np.asarray(read_overview(store, "sentinel2", CFG).image).reshape(-1, 3)
    assert img[:, 1].max() > 200 and img[:, 1].min() < 20  # every band uses the full 0..255


def test_fixed_range_stretch(kinds: Path) -> None:
    (kinds / "rng.jsonl").write_text(json.dumps({"id": "s2", "path": "sentinel2.tif", "stretch": "range",
                                                 "range": [0, 8000]}) + "\n")
    s = ImageStore.from_manifest(kinds / "rng.jsonl")
    r, g, b = _centre(np.asarray(read_overview(s, "s2", CFG).image))
    assert 5000 * 255 / 8000 - 10 < r < 5200 * 255 / 8000 + 10
    assert 900 * 255 / 8000 - 10 < b < 1100 * 255 / 8000 + 10
    # per-band pairs and the config's default range
    o = read_overview(s, "s2", ZoomConfig(read_timeout_s=0, stretch="range", stretch_range=[0, 4000]))
    assert o.image.mode == "RGB"
    assert ZoomConfig(stretch="range").validate()  # a range stretch needs its range


# -- palette, masks, alpha, nodata --------------------------------------------------------------------
def test_palette_applies_the_colour_table_with_nearest_reads(store: ImageStore) -> None:
    assert store.info("palette").palette
    img = np.asarray(read_overview(store, "palette", ZoomConfig(read_timeout_s=0, resampling="bilinear")).image)
    colours = {tuple(c) for c in img.reshape(-1, 3)}
    assert colours <= {(255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 0, 0)}  # no invented in-between colours
    assert {(255, 0, 0), (0, 255, 0), (0, 0, 255)} <= colours
    assert tuple(img[0, 0]) == (0, 0, 0)  # index 0 is transparent in the table


@pytest.mark.parametrize("kind", ["mask", "alpha"])
def test_internal_masks_and_alpha_hide_pixels_at_every_level(store: ImageStore, kind: str) -> None:
    assert store.info(kind).mask == ("alpha" if kind == "alpha" else "mask")
    for mp in (28 * 28 * 16, 224 * 224, 512 * 512):  # overview levels and full resolution
        img = np.asarray(read_overview(store, kind, ZoomConfig(read_timeout_s=0, max_pixels=mp)).image)
        colours = {tuple(c) for c in img.reshape(-1, 3)}
        # transparent/masked pixels are black, never white, and no edge pixel mixes white into the data
        assert colours <= {(40, 80, 120), (0, 0, 0)}, (kind, mp, sorted(colours)[:5])
        assert (0, 0, 0) in colours and (40, 80, 120) in colours


def test_external_mask_sidecar_is_not_read(store: ImageStore) -> None:
    """Sidecars (.msk, .ovr, .aux.xml) are never read: a hostile file may carry them (SECURITY.md)."""
    assert store.info("external_mask").mask != "mask"


def test_float_nodata_does_not_bleed_into_downsampled_data(store: ImageStore) -> None:
    for kind in ("float_nodata", "float_nan", "float_nan_nodata"):
        for resampling in ("bilinear", "average", "cubic"):
            cfg = ZoomConfig(read_timeout_s=0, resampling=resampling, max_pixels=100 * 100)
            img = np.asarray(read_overview(store, kind, cfg).image)[..., 0]
            w = img.shape[1]
            assert (img[:, : w // 2 - 2] == 0).all(), (kind, resampling)
            data = img[:, w // 2 + 2:]
            assert data.min() > 0 and data.std() > 10, (kind, resampling)  # stretch from valid pixels only


# -- frames ---------------------------------------------------------------------------------------------
def test_south_up_bounds_are_normalised_and_lonlat_maps_right(store: ImageStore) -> None:
    info = store.info("south_up")
    assert info.bounds[1] < info.bounds[3] and info.geo_bounds[1] < info.geo_bounds[3]
    ep = Episode(store, ["south_up"], ZoomConfig(frame="lonlat", read_timeout_s=0))
    w, s, e, n = ep.observations["image_0"].geo_bounds
    # the southern half of the lon/lat box is the bottom half of a north-up view; stored south-up, it is the
    # first rows of the file (red = row index grows south in the file)
    obs = ep.zoom_in([w, s, e, (s + n) / 2], "image_0")
    assert obs.window[1] < 5 and obs.window[3] < 300


def test_gcp_only_rasters_get_a_lonlat_frame(store: ImageStore) -> None:
    info = store.info("gcps")
    assert info.georef == "gcps" and info.crs == "EPSG:4326"
    assert np.allclose(info.geo_bounds, (12.0, 45.0 - 0.512, 12.512, 45.0), atol=1e-6)
    ep = Episode(store, ["gcps"], ZoomConfig(frame="lonlat", read_timeout_s=0))
    obs = ep.zoom_in([12.1, 44.7, 12.2, 44.8], "image_0")
    assert np.allclose(obs.window, (100, 200, 200, 300), atol=1)


@pytest.mark.parametrize("kind", ["antimeridian_utm", "antimeridian_4326"])
def test_lonlat_boxes_across_the_antimeridian(store: ImageStore, kind: str) -> None:
    info = store.info(kind)
    w, s, e, n = info.geo_bounds
    assert w > 0 > e  # bounds across 180 degrees keep west > east, longitudes in [-180, 180]
    ep = Episode(store, [kind], ZoomConfig(frame="lonlat", read_timeout_s=0))
    lat0, lat1 = s + (n - s) * 0.3, s + (n - s) * 0.6
    obs = ep.zoom_in([179.8, lat0, -179.8, lat1], "image_0")
    x0, _, x1, _ = obs.window
    # the box straddles the column of 180 degrees
    col180 = ep.observations["image_0"].frame_to_native([179.999, lat0, 180.0, lat1])[0]
    assert x0 < col180 < x1 and x1 - x0 < info.width / 2
    ow, _, oe, _ = obs.geo_bounds
    assert ow > 0 > oe
    with pytest.raises(BadBoxError):  # pixel boxes are never wrapped
        check_box([10, 0, 5, 10])
    assert check_box([179.0, 0, -179.0, 1], wrap_x=True) == (179.0, 0, -179.0, 1)


def test_server_lonlat_box_across_the_antimeridian(store: ImageStore) -> None:
    from tools.zoom import lonlat_box_to_native

    info = store.info("antimeridian_4326")
    box = lonlat_box_to_native((179.5, -0.5, -179.5, 0.5), info.crs, info.transform, (info.width, info.height))
    assert np.allclose(box, (128, 128, 384, 384), atol=1)  # 256 px per degree
    obs = read_region(store, "antimeridian_4326", box, CFG, name="obs_1")
    assert obs.window == (128.0, 128.0, 384.0, 384.0)


# -- prepare-images: sidecars ----------------------------------------------------------------------------
def test_prepare_redoes_a_source_when_a_sidecar_appears(tmp_path: Path) -> None:
    from tools.prepare import PrepareImagesConfig, run

    src = tmp_path / "in"
    src.mkdir()
    make_kind(src / "s2.tif", "sentinel2_nointerp", size=256)
    make_kind(src / "pal.tif", "palette", size=256)
    cfg = PrepareImagesConfig(input_dir=str(src), output_dir=str(tmp_path / "out"))
    assert run(cfg)["converted"] == 2
    assert run(cfg)["skipped"] == 2
    # a PAM sidecar written later is recorded: the source is converted again (GDAL itself never reads
    # sidecars under the lock-down of tools/security.py, so the pixels do not change)
    (src / "s2.tif.aux.xml").write_text(
        "<PAMDataset>" + "".join(f'<PAMRasterBand band="{i}"><ColorInterp>{c}</ColorInterp></PAMRasterBand>'
                                 for i, c in ((1, "Blue"), (2, "Green"), (3, "Red"))) + "</PAMDataset>")
    r = run(cfg)
    assert r["converted"] == 1 and r["skipped"] == 1
    s = ImageStore.from_manifest(tmp_path / "out" / "images.jsonl")
    assert s.info("s2").bands == [1, 2, 3]  # the sidecar's colour interpretation was not read
    assert run(cfg)["skipped"] == 2
    time.sleep(1.1)  # a changed sidecar (new mtime/size) is also seen
    (src / "s2.tif.aux.xml").write_text("<PAMDataset></PAMDataset>")
    assert run(cfg)["converted"] == 1
    # the palette COG keeps its table and its overviews hold real classes only
    img = np.asarray(read_overview(s, "pal", ZoomConfig(read_timeout_s=0, max_pixels=28 * 28 * 4)).image)
    assert {tuple(c) for c in img.reshape(-1, 3)} <= {(255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 0, 0)}


def test_prepare_keeps_records_written_before_sidecars_were_tracked(tmp_path: Path) -> None:
    from tools.prepare import PrepareImagesConfig, run

    src = tmp_path / "in"
    src.mkdir()
    make_kind(src / "a.tif", "mask", size=128)
    cfg = PrepareImagesConfig(input_dir=str(src), output_dir=str(tmp_path / "out"))
    run(cfg)
    log = tmp_path / "out" / "prepared.jsonl"
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    for r in rows:
        r.pop("sidecars")
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run(cfg)["skipped"] == 1


def test_prepare_render_config_reaches_every_manifest_line(tmp_path: Path) -> None:
    from tools.prepare import PrepareImagesConfig, run

    src = tmp_path / "in"
    src.mkdir()
    make_kind(src / "s2.tif", "sentinel2_nointerp", size=256)
    cfg = PrepareImagesConfig(input_dir=str(src), output_dir=str(tmp_path / "out"))
    assert run(cfg)["converted"] == 1
    cfg.render = {"bands": [3, 2, 1]}
    assert run(cfg)["skipped"] == 1  # rendering needs no reconversion
    s = ImageStore.from_manifest(tmp_path / "out" / "images.jsonl")
    r, _, b = _centre(np.asarray(read_overview(s, "s2", CFG).image))
    assert r > 200 and b < 80
    assert PrepareImagesConfig(input_dir=str(src), render={"bands": [0]}).validate()
    assert PrepareImagesConfig(input_dir=str(src), render={"colour": 1}).validate()
