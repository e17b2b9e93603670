"""Zoom: overviews and region reads of UHR rasters, with exact coordinate frames.

Every view is an `Observation`: a PIL RGB image whose sides are multiples of `size_factor` and whose area
is within [`min_pixels`, `max_pixels`], so Qwen2.5-VL's processor keeps it as is and the `shown_pixels`
frame is exactly the pixel grid the model saw. The native window behind it is integer-aligned and the image
covers it exactly, so frame <-> native mapping is a pure affine map (chained zooms compose exactly).

Reads use rasterio windows with `out_shape`, so GDAL picks the overview level; a whole image is never
decoded at full resolution (JPEG uses its DCT-scaled implicit overviews; a plain PNG has none and is
streamed row by row: bounded memory but slow — run `knowzoom prepare-images` once to make it a COG).
"""

from __future__ import annotations

import math
import reprlib
import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.windows import Window

from tools import render as R
from tools.errors import BadBoxError, BoxOutsideError, LimitError, ToolTimeoutError, UnreadableImageError
from tools.render import RenderSpec, parse_render
from tools.store import ImageInfo, ImageStore

FRAMES = ("shown_pixels", "norm1000", "lonlat")
#: hard ceiling on any configured output size (Qwen2.5-VL's own max: 16384 patches of 28x28)
HARD_MAX_PIXELS = 16384 * 28 * 28


@dataclass
class ZoomConfig:
    """Limits of the zoom tool; every limit is a named field with a default."""

    max_pixels: int = field(default=50176, metadata={"help": "Output image pixel cap (tiny: 224*224; 7B: 1003520)."})
    min_pixels: int = field(default=3136, metadata={"help": "Output image pixel floor (Qwen: 4*28*28)."})
    size_factor: int = field(default=28, metadata={"help": "Output sides are multiples of this (patch 14 x merge 2)."})
    min_crop_side: int = field(default=28, metadata={"help": "Smaller native boxes expand about their centre to this side."})
    max_aspect_ratio: float = field(default=100.0, metadata={"help": "Longest/shortest side cap of a crop (LimitError above)."})
    frame: str = field(default="shown_pixels", metadata={"help": "Box frame: shown_pixels | norm1000 | lonlat."})
    max_turns: int = field(default=5, metadata={"help": "Zoom calls allowed per episode."})
    read_timeout_s: float = field(default=10.0, metadata={"help": "Per-read time limit in seconds (<= 0: none)."})
    upscale: bool = field(default=True, metadata={"help": "Magnify crops smaller than max_pixels up to the budget (a zoom magnifies); False keeps Qwen smart_resize sizes."})
    max_upscale: float = field(default=8.0, metadata={"help": "Largest magnification of native pixels when upscale is on."})
    resampling: str = field(default="bilinear", metadata={"help": "rasterio resampling: nearest | bilinear | cubic | average | lanczos."})
    bands: list[int] | None = field(default=None, metadata={"help": "Bands shown as R, G, B (or one grey band) for every image without its own manifest 'bands'; None: the file's colour interpretation, else 1-2-3 (tools.render)."})
    stretch: str = field(default="auto", metadata={"help": "Display stretch: auto (none for uint8, else percentile) | percentile | range | none; a manifest line's 'stretch' wins."})
    stretch_percentiles: list[float] = field(default_factory=lambda: [2.0, 98.0], metadata={"help": "Per-band [low, high] percentiles of the percentile stretch."})
    stretch_range: list[float] | None = field(default=None, metadata={"help": "[low, high] of the range stretch (one pair for all bands)."})

    def validate(self) -> list[str]:
        """Problems as 'field: what is wrong; what to do'."""
        p = []
        if self.size_factor < 1:
            p.append("size_factor: must be >= 1; use 28 for Qwen2.5-VL")
        if not self.size_factor**2 <= self.min_pixels <= self.max_pixels:
            p.append("min_pixels/max_pixels: need size_factor^2 <= min_pixels <= max_pixels")
        if self.max_pixels > HARD_MAX_PIXELS:
            p.append(f"max_pixels: {self.max_pixels} exceeds the hard cap {HARD_MAX_PIXELS}; lower it")
        if self.min_crop_side < 1:
            p.append("min_crop_side: must be >= 1 native pixel (28 is the usual)")
        if self.max_aspect_ratio < 1:
            p.append("max_aspect_ratio: must be >= 1 (100 is the usual)")
        if self.frame not in FRAMES:
            p.append(f"frame: {self.frame!r} not in {FRAMES}")
        if self.max_turns < 0:
            p.append("max_turns: must be >= 0")
        if self.max_upscale < 1:
            p.append("max_upscale: must be >= 1")
        if self.resampling not in ("nearest", "bilinear", "cubic", "average", "lanczos"):
            p.append("resampling: use nearest | bilinear | cubic | average | lanczos")
        try:
            self.render_default()
        except ValueError as e:
            p.append(str(e))
        return p

    def render_default(self) -> RenderSpec:
        """The collection-wide rendering choices (a manifest line's own keys override them)."""
        return parse_render({"bands": self.bands, "stretch": self.stretch, "percentiles": self.stretch_percentiles,
                             "range": self.stretch_range})

    def check(self) -> None:
        problems = self.validate()
        if problems:
            from pipeline.core.errors import ConfigError

            raise ConfigError("invalid ZoomConfig:\n" + "\n".join(f"  - {x}" for x in problems))


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2.5-VL's smart_resize (returns (h, w)), copied so tools/ never imports transformers."""
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def shown_size(width: int, height: int, cfg: ZoomConfig) -> tuple[int, int]:
    """(w, h) of the image shown for a native window of width x height: multiples of size_factor,
    area in [min_pixels, max_pixels], so Qwen's processor leaves it unchanged."""
    f = cfg.size_factor
    if width <= 0 or height <= 0:
        raise BadBoxError(detail=f"empty window {width}x{height}")
    if cfg.upscale:
        s = min(math.sqrt(cfg.max_pixels / (width * height)), cfg.max_upscale)
        w = max(f, math.floor(width * s / f) * f)
        h = max(f, math.floor(height * s / f) * f)
        if w * h < cfg.min_pixels:
            h, w = smart_resize(height, width, f, cfg.min_pixels, cfg.max_pixels)
    else:
        h, w = smart_resize(height, width, f, cfg.min_pixels, cfg.max_pixels)
    # extreme aspect ratios: max(f, ...) can push the area over the cap; shrink the long side
    if w * h > cfg.max_pixels:
        if w >= h:
            w = max(f, (cfg.max_pixels // h) // f * f)
        else:
            h = max(f, (cfg.max_pixels // w) // f * f)
    if w * h > cfg.max_pixels or w * h < cfg.min_pixels:
        raise LimitError("The box aspect ratio is too extreme.", detail=f"{width}x{height} -> {w}x{h}")
    return w, h


@dataclass
class Observation:
    """One view shown to the model and the exact native window behind it."""

    name: str
    image: Image.Image
    image_id: str
    image_index: int
    window: tuple[float, float, float, float]  # native x0, y0, x1, y1 (integer-aligned)
    frame: str
    geo_bounds: tuple[float, float, float, float] | None = None  # lon/lat of the window
    crs: str | None = None
    parent: str | None = None
    source_box: list[float] | None = None  # the box as given in the parent's frame
    native_size: tuple[int, int] = (0, 0)  # (width, height) of the whole raster
    transform: tuple[float, ...] | None = None  # native affine when georeferenced

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    @property
    def scale(self) -> tuple[float, float]:
        """Native pixels per shown pixel along x and y."""
        w, h = self.image.size
        return ((self.window[2] - self.window[0]) / w, (self.window[3] - self.window[1]) / h)

    def frame_to_native(self, bbox: Any) -> tuple[float, float, float, float]:
        """Map a box given in this observation's frame to native raster pixels (not clipped)."""
        x0, y0, x1, y1 = check_box(bbox, wrap_x=self.frame == "lonlat")
        wx0, wy0, wx1, wy1 = self.window
        if self.frame == "shown_pixels":
            sx, sy = self.scale
            return (wx0 + x0 * sx, wy0 + y0 * sy, wx0 + x1 * sx, wy0 + y1 * sy)
        if self.frame == "norm1000":
            sx, sy = (wx1 - wx0) / 1000.0, (wy1 - wy0) / 1000.0
            return (wx0 + x0 * sx, wy0 + y0 * sy, wx0 + x1 * sx, wy0 + y1 * sy)
        if self.frame == "lonlat":
            return _lonlat_to_native((x0, y0, x1, y1), self)
        raise BadBoxError(detail=f"unknown frame {self.frame!r}")

    def native_to_frame(self, native_box: Any) -> tuple[float, float, float, float]:
        """Map a native pixel box into this observation's frame (inverse of frame_to_native)."""
        x0, y0, x1, y1 = (float(v) for v in native_box)
        wx0, wy0, wx1, wy1 = self.window
        if self.frame == "shown_pixels":
            sx, sy = self.scale
            return ((x0 - wx0) / sx, (y0 - wy0) / sy, (x1 - wx0) / sx, (y1 - wy0) / sy)
        if self.frame == "norm1000":
            sx, sy = (wx1 - wx0) / 1000.0, (wy1 - wy0) / 1000.0
            return ((x0 - wx0) / sx, (y0 - wy0) / sy, (x1 - wx0) / sx, (y1 - wy0) / sy)
        if self.frame == "lonlat":
            return _native_to_lonlat((x0, y0, x1, y1), self)
        raise BadBoxError(detail=f"unknown frame {self.frame!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description without pixels."""
        return {
            "name": self.name,
            "image_id": self.image_id,
            "image_index": self.image_index,
            "window": [float(v) for v in self.window],
            "shown_size": list(self.image.size),
            "scale": list(self.scale),
            "frame": self.frame,
            "geo_bounds": None if self.geo_bounds is None else list(self.geo_bounds),
            "crs": self.crs,
            "parent": self.parent,
            "source_box": self.source_box,
        }


def check_box(bbox: Any, wrap_x: bool = False) -> tuple[float, float, float, float]:
    """4 finite numbers with x0 < x1 and y0 < y1, else BadBoxError. `wrap_x` (lon/lat boxes) also accepts
    x0 > x1: a box across the antimeridian, west edge first (as GeoJSON and STAC write it)."""
    if isinstance(bbox, (str, bytes, dict)) or not hasattr(bbox, "__len__") or len(bbox) != 4:
        raise BadBoxError(detail=f"not a 4-number box: {reprlib.repr(bbox)}")  # reprlib: bounded depth
    out = []
    for v in bbox:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise BadBoxError(detail=f"non-numeric coordinate {reprlib.repr(v)}")
        try:
            v = float(v)
        except OverflowError:  # a 400-digit integer: a caller mistake, not a server error
            raise BadBoxError("bbox coordinates must be finite numbers.", detail="integer too large") from None
        if not math.isfinite(v):
            raise BadBoxError("bbox coordinates must be finite numbers.", detail=str(bbox))
        out.append(v)
    x0, y0, x1, y1 = out
    if wrap_x and x1 < x0 and not (-180 <= x0 <= 180 and -180 <= x1 <= 180):
        raise BadBoxError("A lon/lat box across the antimeridian needs longitudes within [-180, 180].")
    if (x1 < x0 and not wrap_x) or y1 < y0:
        raise BadBoxError("bbox is inverted; use [x0, y0, x1, y1] with x0 < x1 and y0 < y1.")
    if x1 == x0 or y1 == y0:
        raise BadBoxError("bbox has zero area.")
    return x0, y0, x1, y1


# -- geo -------------------------------------------------------------------------------------------
def _apply(t: tuple[float, ...], x: float, y: float) -> tuple[float, float]:
    """Apply affine coefficients (a, b, c, d, e, f) to a point."""
    return (t[0] * x + t[1] * y + t[2], t[3] * x + t[4] * y + t[5])


def _lonlat_to_native(box: tuple[float, ...], obs: Observation) -> tuple[float, float, float, float]:
    if obs.crs is None or obs.transform is None:
        raise BadBoxError("This image has no georeference; use pixel boxes.")
    w, h = obs.native_size
    return lonlat_box_to_native(box, obs.crs, obs.transform, (w, h))


def lonlat_box_to_native(box: tuple[float, ...], crs: str, transform: tuple[float, ...],
                         size: tuple[int, int] = (0, 0)) -> tuple[float, float, float, float]:
    """Native pixel box (not clipped) of a lon/lat box on a raster in `crs`. West > east means the box
    crosses the antimeridian; on a geographic raster the box is shifted by whole turns to the raster's
    longitudes (a raster stored in 0..360 or across 180 degrees)."""
    from affine import Affine
    from rasterio.crs import CRS
    from rasterio.warp import transform_bounds

    lon0, lat0, lon1, lat1 = (float(v) for v in box)
    inv = tuple(~Affine(*transform))
    try:
        geographic = CRS.from_user_input(crs).is_geographic
    except Exception:  # noqa: BLE001 - an unparsable CRS is treated as projected
        geographic = False
    if geographic:
        if lon1 < lon0:
            lon1 += 360.0
        # raster's own longitude span; pick the shift (whole turns) that overlaps it most
        cx = _apply(transform, size[0] / 2, size[1] / 2)[0] if size[0] else (lon0 + lon1) / 2
        k = round((cx - (lon0 + lon1) / 2) / 360.0)
        lon0, lon1 = lon0 + 360.0 * k, lon1 + 360.0 * k
        try:
            x0, y0, x1, y1 = transform_bounds("EPSG:4326", crs, lon0, lat0, lon1, lat1, densify_pts=21)
        except Exception as e:  # noqa: BLE001 - PROJ errors on impossible coordinates
            raise BadBoxError("lon/lat box cannot be projected onto this image.", detail=str(e)) from e
        if x1 < x0:  # the datum shift wrapped it again: keep it unwrapped on the raster's side
            x1 += 360.0
    else:
        try:
            x0, y0, x1, y1 = transform_bounds("EPSG:4326", crs, lon0, lat0, lon1, lat1, densify_pts=21)
        except Exception as e:  # noqa: BLE001 - PROJ errors on impossible coordinates
            raise BadBoxError("lon/lat box cannot be projected onto this image.", detail=str(e)) from e
    cols, rows = zip(*(_apply(inv, x, y) for x, y in ((x0, y0), (x0, y1), (x1, y0), (x1, y1))), strict=True)
    out = (min(cols), min(rows), max(cols), max(rows))
    if not all(math.isfinite(v) for v in out):
        raise BadBoxError("lon/lat box cannot be projected onto this image.")
    return out


def _native_to_lonlat(box: tuple[float, ...], obs: Observation) -> tuple[float, float, float, float]:
    if obs.crs is None or obs.transform is None:
        raise BadBoxError("This image has no georeference; use pixel boxes.")
    return _window_geo_bounds(box, obs.crs, obs.transform)


def _window_geo_bounds(box: tuple[float, ...], crs: str, transform: tuple[float, ...]) -> tuple[float, float, float, float]:
    from rasterio.warp import transform_bounds

    from tools.store import _wrap_lon

    xs, ys = zip(*(_apply(transform, c, r) for c, r in ((box[0], box[1]), (box[0], box[3]), (box[2], box[1]), (box[2], box[3]))), strict=True)
    if crs in ("EPSG:4326", "OGC:CRS84"):
        return _wrap_lon((min(xs), min(ys), max(xs), max(ys)))
    return _wrap_lon(tuple(float(v) for v in transform_bounds(crs, "EPSG:4326", min(xs), min(ys), max(xs), max(ys),
                                                               densify_pts=21)))


# -- reads -----------------------------------------------------------------------------------------
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="knowzoom-read")
        return _POOL


def render_spec(store: ImageStore, info: ImageInfo, cfg: ZoomConfig) -> RenderSpec:
    """The image's rendering choices: its manifest keys over the config's, bands resolved and checked."""
    spec = store.render_spec(info.id).over(cfg.render_default())
    bands = spec.bands or tuple(info.bands)
    if any(b > info.count for b in bands):
        raise UnreadableImageError("The image cannot be rendered with the configured bands.",
                                   detail=f"{info.id}: bands {list(bands)} but the file has {info.count}")
    stretch = spec.stretch or "auto"
    if stretch == "auto":
        stretch = "none" if info.dtype == "uint8" or (info.palette and bands == (1,)) else "percentile"
    return RenderSpec(bands=bands, stretch=stretch, percentiles=spec.percentiles or (2.0, 98.0), range=spec.range)


def _read_pixels(store: ImageStore, info: ImageInfo, win: tuple[int, int, int, int], out_w: int, out_h: int,
                 cfg: ZoomConfig) -> np.ndarray:
    """RGB uint8 array (h, w, 3) of native window `win`, resampled to out_w x out_h by GDAL and rendered as
    tools.render documents (bands, palette, masks, stretch); missing pixels are black."""
    x0, y0, x1, y1 = win
    spec = render_spec(store, info, cfg)
    bands = list(spec.bands or (1,))
    lut = store.palette(info.id) if bands == [1] else None
    masked = info.mask != "none"
    window = Window(x0, y0, x1 - x0, y1 - y0)
    # class indices must not be interpolated: a palette band is always read with nearest
    resampling = Resampling.nearest if lut is not None else Resampling[cfg.resampling]
    if info.dtype == "uint8" and not masked and len(bands) == 3 and spec.stretch == "none":
        # GDAL writes straight into a pixel-interleaved (h, w, 3) buffer (rasterio passes the strides of a
        # transposed view): no band-to-pixel copy afterwards, and it matches how RGB COG tiles are stored
        out = np.empty((out_h, out_w, 3), dtype=np.uint8)
        with store.open(info.id) as ds:
            ds.read(indexes=bands, window=window, out=out.transpose(2, 0, 1), resampling=resampling)
        return out
    with store.open(info.id) as ds:
        arr = ds.read(indexes=bands, window=window, out_shape=(len(bands), out_h, out_w),
                      resampling=resampling, masked=masked)
    data = np.ma.getdata(arr)
    missing = np.ma.getmaskarray(arr).any(axis=0) if masked else None
    if data.dtype.kind == "f":
        bad = ~np.isfinite(data).all(axis=0)
        missing = bad if missing is None else missing | bad
    if lut is not None:
        out, transparent = R.apply_palette(data[0], lut)
        missing = transparent if missing is None else missing | transparent
    else:
        if spec.stretch == "percentile":
            ranges = store.display_range(info.id, tuple(bands), spec.percentiles or (2.0, 98.0))
        elif spec.stretch == "range":
            try:
                ranges = R.band_ranges(spec, len(bands))
            except ValueError as e:
                raise UnreadableImageError("The image's display range does not fit its bands.",
                                           detail=f"{info.id}: {e}") from e
        else:
            ranges = None
        out = data if data.dtype == np.uint8 and ranges is None else R.stretch(data, ranges)
    if missing is not None:
        out = np.where(missing[None], 0, out).astype(np.uint8)
    if out.shape[0] == 1:
        out = np.repeat(out, 3, axis=0)
    return np.ascontiguousarray(out.transpose(1, 2, 0))


def _timed(fn: Any, timeout: float) -> Any:
    if timeout <= 0:
        return fn()
    fut = _pool().submit(fn)
    try:
        return fut.result(timeout=timeout)
    except FutureTimeout:
        fut.cancel()
        raise ToolTimeoutError(detail=f"read exceeded {timeout}s") from None


def _snap_window(native_box: Any, info: ImageInfo, cfg: ZoomConfig) -> tuple[int, int, int, int]:
    """Clip to the raster, expand to min_crop_side about the centre, snap outward to integers."""
    x0, y0, x1, y1 = check_box(native_box)
    W, H = info.width, info.height
    cx0, cy0, cx1, cy1 = max(0.0, x0), max(0.0, y0), min(float(W), x1), min(float(H), y1)
    if cx0 >= cx1 or cy0 >= cy1:
        raise BoxOutsideError(detail=f"{native_box} vs raster {W}x{H}")

    def expand(a: float, b: float, n: int) -> tuple[float, float]:
        side = max(b - a, float(min(cfg.min_crop_side, n)))
        c = (a + b) / 2
        a, b = c - side / 2, c + side / 2
        if a < 0:
            a, b = 0.0, side
        if b > n:
            a, b = n - side, float(n)
        return a, b

    cx0, cx1 = expand(cx0, cx1, W)
    cy0, cy1 = expand(cy0, cy1, H)
    ix0, iy0 = max(0, math.floor(cx0 + 1e-9)), max(0, math.floor(cy0 + 1e-9))
    ix1, iy1 = min(W, math.ceil(cx1 - 1e-9)), min(H, math.ceil(cy1 - 1e-9))
    w, h = ix1 - ix0, iy1 - iy0
    if max(w, h) / min(w, h) > cfg.max_aspect_ratio:
        raise LimitError(
            f"The box aspect ratio exceeds {cfg.max_aspect_ratio:g}:1.", detail=f"{w}x{h}"
        )
    return ix0, iy0, ix1, iy1


def _observation(store: ImageStore, info: ImageInfo, win: tuple[int, int, int, int], arr: np.ndarray,
                 cfg: ZoomConfig, name: str, image_index: int, parent: str | None,
                 source_box: list[float] | None) -> Observation:
    geo = None
    if info.crs is not None and info.transform is not None:
        try:
            geo = _window_geo_bounds(win, info.crs, info.transform)
        except Exception:  # noqa: BLE001 - a CRS PROJ cannot map to lon/lat: no geo frame
            geo = None
    return Observation(
        name=name,
        image=Image.fromarray(arr, "RGB"),
        image_id=info.id,
        image_index=image_index,
        window=tuple(float(v) for v in win),
        frame=cfg.frame,
        geo_bounds=geo,
        crs=info.crs,
        parent=parent,
        source_box=source_box,
        native_size=(info.width, info.height),
        transform=info.transform,
    )


def read_region(store: ImageStore, image_id: str, native_box: Any, cfg: ZoomConfig, name: str,
                image_index: int = 0, parent: str | None = None,
                source_box: list[float] | None = None) -> Observation:
    """Read the native box (clipped, min-side expanded, integer-snapped) resampled to <= max_pixels."""
    info = store.info(image_id)
    win = _snap_window(native_box, info, cfg)
    out_w, out_h = shown_size(win[2] - win[0], win[3] - win[1], cfg)
    try:
        arr = _timed(lambda: _read_pixels(store, info, win, out_w, out_h, cfg), cfg.read_timeout_s)
    except RasterioError as e:
        raise UnreadableImageError(detail=f"{image_id}: {e}") from e
    return _observation(store, info, win, arr, cfg, name, image_index, parent, source_box)


def read_overview(store: ImageStore, image_id: str, cfg: ZoomConfig, name: str = "image_0",
                  image_index: int = 0) -> Observation:
    """The whole image resampled to <= max_pixels (cached per store, image and size)."""
    info = store.info(image_id)
    win = (0, 0, info.width, info.height)
    out_w, out_h = shown_size(info.width, info.height, cfg)
    if max(info.width, info.height) / min(info.width, info.height) > cfg.max_aspect_ratio:
        raise LimitError(f"The image aspect ratio exceeds {cfg.max_aspect_ratio:g}:1.")

    def make() -> np.ndarray:
        try:
            a = _timed(lambda: _read_pixels(store, info, win, out_w, out_h, cfg), cfg.read_timeout_s)
        except RasterioError as e:
            raise UnreadableImageError(detail=f"{image_id}: {e}") from e
        a.setflags(write=False)
        return a

    key = ("overview", image_id, info.path, out_w, out_h, cfg.resampling, cfg.render_default(),
           store.render_spec(image_id))
    arr = store.cached(key, make)
    return _observation(store, info, win, np.array(arr), cfg, name, image_index, None, None)


__all__ = [
    "FRAMES",
    "HARD_MAX_PIXELS",
    "ZoomConfig",
    "Observation",
    "check_box",
    "shown_size",
    "smart_resize",
    "read_overview",
    "read_region",
    "render_spec",
    "lonlat_box_to_native",
]
