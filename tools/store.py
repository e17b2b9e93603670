"""The image store: images are addressed by id, never by a path an agent supplies.

Ids are registered by the operator (a folder, a manifest, or one by one) and must resolve under the
allowed roots (symlinks are resolved first, so a link cannot escape). Datasets are opened lazily and
pooled: `open(id)` lends a rasterio handle to one thread at a time (GDAL handles are not thread-safe),
so concurrent readers of one image each get their own handle; at most `max_open` idle handles stay open.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# GDAL's block cache defaults to 5% of RAM *per process*; many workers x 5% adds up. 256 MB is plenty
# for window reads of tiled COGs. Set before the first read; callers may override via the environment.
os.environ.setdefault("GDAL_CACHEMAX", "256")

import numpy as np  # noqa: E402
import rasterio  # noqa: E402
from rasterio.enums import Resampling  # noqa: E402
from rasterio.errors import RasterioIOError  # noqa: E402

from tools.errors import ForbiddenPathError, ToolError, UnknownImageError, UnreadableImageError  # noqa: E402
from tools.render import RENDER_KEYS, RenderSpec, auto_bands, palette_lut, parse_render  # noqa: E402
from tools.security import resolve_under_roots  # noqa: E402

DEFAULT_PATTERNS = ("*.tif", "*.tiff", "*.png", "*.jpg", "*.jpeg")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/\-]{0,199}$")


@dataclass
class ImageInfo:
    """Metadata of one registered image (JSON-able through `to_dict`)."""

    id: str
    path: str
    width: int
    height: int
    count: int
    dtype: str
    crs: str | None
    bounds: tuple[float, float, float, float] | None  # in `crs` units; None when not georeferenced
    overviews: list[int]  # decimation factors of band 1's overviews ([] for none)
    nodata: float | None
    driver: str = ""
    transform: tuple[float, ...] | None = None  # affine (a, b, c, d, e, f) of the native grid
    geo_bounds: tuple[float, float, float, float] | None = None  # lon/lat (EPSG:4326) when georeferenced
    tiled: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    colorinterp: list[str] = field(default_factory=list)  # GDAL colour interpretation of each band
    bands: list[int] = field(default_factory=list)  # bands shown as R, G, B (or one grey band): see tools.render
    palette: bool = False  # band 1 carries a colour table that is applied when it is shown
    mask: str = "none"  # how missing pixels are known: none | nodata | mask (internal) | alpha
    georef: str = "none"  # transform | gcps (affine fitted to the ground control points) | none

    def to_dict(self, include_path: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not include_path:
            d.pop("path")  # never shown to agents/clients
        return d


def _open_raw(path: str) -> rasterio.io.DatasetReader:
    from tools.security import open_raster  # sniffed driver, no network/sidecars (tools.security)

    return open_raster(path)


class ImageStore:
    """Registry of image ids → files under allowed roots, with a pool of open rasterio handles."""

    def __init__(self, roots: Sequence[str | Path], max_open: int = 64, overview_cache: int = 16):
        if isinstance(roots, (str, Path)):
            roots = [roots]
        if not roots:
            raise ForbiddenPathError("no allowed roots", detail="ImageStore needs at least one root folder")
        self.roots = [Path(r).resolve() for r in roots]
        self.max_open = int(max_open)
        self._paths: dict[str, Path] = {}
        self._info: dict[str, ImageInfo] = {}
        self._free: OrderedDict[str, list[Any]] = OrderedDict()  # id -> idle handles (LRU order)
        self._n_open = 0
        self._lock = threading.RLock()
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        self._cache_size = int(overview_cache)
        self._stats: dict[tuple, list[tuple[float, float]]] = {}
        self._render: dict[str, RenderSpec] = {}
        self._luts: dict[str, np.ndarray] = {}
        self.manifest_problems: list[str] = []  # entries a lenient registration skipped (server: manifest_errors)

    # -- registration -------------------------------------------------------------------------------
    def _check_path(self, path: str | Path) -> Path:
        """The real file of `path` under the roots (tools.security's check; `..` that resolves inside is fine)."""
        return resolve_under_roots(path, self.roots, parent_refs=True)

    def register(self, image_id: str, path: str | Path, render: RenderSpec | None = None) -> None:
        """Register one image under `image_id`; the path must resolve (symlinks followed) under a root.
        `render` (bands, stretch) overrides the defaults for this image (see tools.render)."""
        if not isinstance(image_id, str) or not _ID_RE.match(image_id) or ".." in image_id:
            raise UnknownImageError("Invalid image id.", detail=f"{image_id!r}: use letters, digits, _ . : / -")
        real = self._check_path(path)
        with self._lock:
            old = self._paths.get(image_id)
            if (old is not None and old != real) or self._render.get(image_id) != render:
                self._drop_handles(image_id)
                self._info.pop(image_id, None)
                self._luts.pop(image_id, None)
                for k in [k for k in self._stats if k[0] == image_id]:
                    del self._stats[k]
            self._paths[image_id] = real
            if render is None:
                self._render.pop(image_id, None)
            else:
                self._render[image_id] = render

    def render_spec(self, image_id: str) -> RenderSpec:
        """The per-image rendering choices registered with the image (empty when none)."""
        return self._render.get(image_id, RenderSpec())

    def register_folder(self, folder: str | Path, patterns: Sequence[str] = DEFAULT_PATTERNS, *,
                        problems: list[str] | None = None) -> list[str]:
        """Register every matching file in `folder` (non-recursive); the id is the file stem. With a
        `problems` list a file that cannot be registered is noted there ('file: why') and skipped."""
        folder = Path(folder)
        ids = []
        files = sorted({f for pat in patterns for f in folder.glob(pat)})
        for f in files:
            if self._register_or_note(f.stem, f, None, str(f), problems):
                ids.append(f.stem)
        return ids

    def register_manifest(self, path: str | Path, *, problems: list[str] | None = None) -> list[str]:
        """Register the `{"id", "path"}` lines of an images.jsonl; paths are relative to its folder. Optional
        keys `bands`, `stretch`, `percentiles`, `range` choose how that image is rendered (tools.render).
        With a `problems` list a bad line is noted there ('images.jsonl:LINE: why') and skipped; without,
        it raises."""
        path = Path(path)
        if not path.is_file():
            raise UnknownImageError("Unknown manifest.", detail=f"{path} does not exist")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UnreadableImageError("Cannot read the manifest.", detail=f"{path}: {e}") from e
        ids = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                image_id, rel = d["id"], d["path"]
                render = parse_render(d) if any(k in d for k in RENDER_KEYS) else None
            except (KeyError, TypeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
                if problems is None:
                    raise UnreadableImageError("Bad manifest line.", detail=f"{path}:{i}: {e}") from e
                problems.append(f"{path.name}:{i}: not a {{\"id\", \"path\"}} JSON object ({type(e).__name__})")
                continue
            if self._register_or_note(str(image_id), path.parent / rel, render, f"{path.name}:{i}", problems):
                ids.append(str(image_id))
        return ids

    def _register_or_note(self, image_id: str, path: Path, render: RenderSpec | None, where: str,
                          problems: list[str] | None) -> bool:
        """register(); with a `problems` list a refusal is noted there instead of raised. True if registered."""
        if problems is None:
            self.register(image_id, path, render=render)
            return True
        try:
            self.register(image_id, path, render=render)
        except (ToolError, OSError, ValueError) as e:
            problems.append(f"{where}: {e}"[:300])
            return False
        return True

    @classmethod
    def from_manifest(cls, manifest_path: str | Path, roots: Sequence[str | Path] | None = None,
                      **kwargs: Any) -> ImageStore:
        """A store holding a manifest's images; the allowed root defaults to the manifest's folder."""
        manifest_path = Path(manifest_path)
        store = cls(roots or [manifest_path.parent], **kwargs)
        if not store.register_manifest(manifest_path):  # a stage would run on nothing
            raise UnknownImageError(f"{manifest_path} lists no images; give an images.jsonl with "
                                    '{"id", "path"} lines (make-scenes and prepare-images write one)')
        return store

    def ids(self) -> list[str]:
        with self._lock:
            return sorted(self._paths)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._paths

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, image_id: str) -> Path:
        """The resolved file of an id (operator use; never shown to a model or client)."""
        try:
            return self._paths[image_id]
        except (KeyError, TypeError):
            raise UnknownImageError(detail=f"{image_id!r} is not registered") from None

    # -- handles ------------------------------------------------------------------------------------
    def _drop_handles(self, image_id: str) -> None:
        for ds in self._free.pop(image_id, []):
            ds.close()
            self._n_open -= 1

    def _evict_one(self) -> None:
        for key in list(self._free):
            lst = self._free[key]
            if lst:
                lst.pop().close()
                self._n_open -= 1
                if not lst:
                    del self._free[key]
                return
            del self._free[key]

    @contextlib.contextmanager
    def open(self, image_id: str) -> Iterator[rasterio.io.DatasetReader]:
        """Lend an open dataset for `image_id` to the calling thread (returned to the pool after)."""
        path = self.path(image_id)
        ds = None
        with self._lock:
            lst = self._free.get(image_id)
            if lst:
                ds = lst.pop()
                self._free.move_to_end(image_id)
            else:
                while self._n_open >= self.max_open and any(self._free.values()):
                    self._evict_one()
                self._n_open += 1  # reserve the slot before the (slow) open outside the lock
        if ds is None:
            try:
                ds = _open_raw(str(path))
            except (RasterioIOError, OSError) as e:
                with self._lock:
                    self._n_open -= 1
                raise UnreadableImageError(detail=f"{image_id}: {e}") from e
        try:
            yield ds
        finally:
            with self._lock:
                if self._paths.get(image_id) == path and self._n_open <= self.max_open and not ds.closed:
                    self._free.setdefault(image_id, []).append(ds)
                    self._free.move_to_end(image_id)
                else:
                    ds.close()
                    self._n_open -= 1

    def close(self) -> None:
        """Close every idle handle (handles lent out are closed when returned)."""
        with self._lock:
            for key in list(self._free):
                self._drop_handles(key)
            self._cache.clear()

    def __enter__(self) -> ImageStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def n_open(self) -> int:
        return self._n_open

    # -- metadata -----------------------------------------------------------------------------------
    def info(self, image_id: str) -> ImageInfo:
        """Metadata of an image (cached after the first call)."""
        with self._lock:
            if image_id in self._info:
                return self._info[image_id]
        lut = None
        with self.open(image_id) as ds:
            crs, transform, georef = _georeference(ds)
            bounds = geo = None
            if crs is not None and transform is not None:  # georef != "none"
                bounds = _pixel_bounds(transform, (0, 0, ds.width, ds.height))
                try:
                    geo = pixel_box_to_lonlat((0, 0, ds.width, ds.height), crs, transform)
                except Exception:  # noqa: BLE001 - a CRS PROJ cannot transform: no geo frame
                    geo = None
            colorinterp = [c.name for c in ds.colorinterp]
            if colorinterp and colorinterp[0] == "palette":
                try:
                    lut = palette_lut(ds.colormap(1), ds.dtypes[0])
                except ValueError:  # marked palette but no table: shown as grey indices
                    lut = None
            flags = {f.name for fl in ds.mask_flag_enums for f in fl}
            mask = ("alpha" if "alpha" in flags else "mask" if "per_dataset" in flags
                    else "nodata" if "nodata" in flags else "none")
            info = ImageInfo(
                id=image_id,
                path=str(self._paths[image_id]),
                width=int(ds.width),
                height=int(ds.height),
                count=int(ds.count),
                dtype=str(ds.dtypes[0]),
                crs=crs,
                bounds=bounds,
                overviews=list(ds.overviews(1)),
                nodata=None if ds.nodata is None else float(ds.nodata),
                driver=str(ds.driver),
                transform=transform,
                geo_bounds=geo,
                tiled=bool(ds.block_shapes and ds.block_shapes[0][0] < ds.height and ds.block_shapes[0][1] < ds.width),
                colorinterp=colorinterp,
                bands=list(auto_bands(colorinterp, int(ds.count))),
                palette=lut is not None,
                mask=mask,
                georef=georef,
            )
        with self._lock:
            self._info[image_id] = info
            if lut is not None:
                self._luts[image_id] = lut
        return info

    def palette(self, image_id: str) -> np.ndarray | None:
        """The (n, 4) RGBA lookup table of a palette image (None for others)."""
        self.info(image_id)
        return self._luts.get(image_id)

    def display_range(self, image_id: str, bands: tuple[int, ...] | list[int] | None = None,
                      percentiles: tuple[float, float] = (2.0, 98.0)) -> list[tuple[float, float]]:
        """Per-band (low, high) percentiles of the valid pixels of a coarse (~256 px) read of the whole image:
        the `percentile` stretch that maps non-8-bit data to 0..255 (see tools.render)."""
        from tools.render import percentile_ranges

        info = self.info(image_id)
        bands = tuple(bands or info.bands)
        key = (image_id, bands, tuple(percentiles))
        with self._lock:
            if key in self._stats:
                return self._stats[key]
        scale = max(1, max(info.width, info.height) // 256)
        shape = (len(bands), max(1, info.height // scale), max(1, info.width // scale))
        with self.open(image_id) as ds:
            arr = ds.read(indexes=list(bands), out_shape=shape, masked=True, resampling=Resampling.nearest)
        rng = percentile_ranges(np.ma.getdata(arr), np.ma.getmaskarray(arr), (percentiles[0], percentiles[1]))
        with self._lock:
            self._stats[key] = rng
        return rng

    def cached(self, key: tuple, make: Callable[[], Any]) -> Any:
        """Small LRU for derived values (e.g. overview arrays) keyed by (image id, ...)."""
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        value = make()
        if self._cache_size > 0:
            with self._lock:
                self._cache[key] = value
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return value


def _georeference(ds: Any) -> tuple[str | None, tuple[float, ...] | None, str]:
    """(crs, affine, kind) of a dataset: its geotransform, else an affine fitted to its ground control points
    (least squares; exact for GCPs of an affine grid, an approximation for warped scenes), else nothing."""
    if ds.crs is not None and not ds.transform.is_identity:
        return ds.crs.to_string(), tuple(ds.transform)[:6], "transform"
    gcps, gcp_crs = ds.gcps
    if gcps and gcp_crs is not None and len(gcps) >= 3:
        from rasterio.transform import from_gcps

        try:
            t = from_gcps(gcps)
        except Exception:  # noqa: BLE001 - degenerate GCPs (collinear): no frame
            return None, None, "none"
        if t.determinant != 0:
            return gcp_crs.to_string(), tuple(t)[:6], "gcps"
    return None, None, "none"


def _pixel_bounds(t: tuple[float, ...], box: tuple[float, ...]) -> tuple[float, float, float, float]:
    """(minx, miny, maxx, maxy) in CRS units of a pixel box's four corners: south-up or rotated grids give
    ordered bounds."""
    c0, r0, c1, r1 = box
    corners = ((c0, r0), (c1, r0), (c0, r1), (c1, r1))
    xs = [t[0] * c + t[1] * r + t[2] for c, r in corners]
    ys = [t[3] * c + t[4] * r + t[5] for c, r in corners]
    return (min(xs), min(ys), max(xs), max(ys))


def pixel_box_to_lonlat(box: tuple[float, ...], crs: str, transform: tuple[float, ...]) -> tuple[float, float, float, float]:
    """Lon/lat bounds (west, south, east, north; longitudes in [-180, 180], west > east across the antimeridian)
    of a native pixel box on a raster in `crs`: the image's geo bounds and every observation's. Raises what
    PROJ raises for a CRS it cannot map."""
    from rasterio.warp import transform_bounds

    bounds = _pixel_bounds(transform, box)
    if crs in ("EPSG:4326", "OGC:CRS84"):
        return _wrap_lon(bounds)
    return _wrap_lon(tuple(float(v) for v in transform_bounds(crs, "EPSG:4326", *bounds, densify_pts=21)))


def _wrap_lon(b: tuple[float, ...]) -> tuple[float, float, float, float]:
    """Lon/lat bounds with longitudes in [-180, 180]; a box across the antimeridian keeps west > east."""
    w, s, e, n = b
    if e - w >= 360:
        return (-180.0, s, 180.0, n)
    w = (w + 180.0) % 360.0 - 180.0 if not -180 <= w <= 180 else w
    e = (e + 180.0) % 360.0 - 180.0 if not -180 <= e <= 180 else e
    return (w, s, e, n)


__all__ = ["ImageInfo", "ImageStore", "DEFAULT_PATTERNS", "pixel_box_to_lonlat"]
