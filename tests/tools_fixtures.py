"""Fixture factory for tools tests: small rasters made on the fly (never committed)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import MemoryFile
from rasterio.transform import from_bounds


def make_raster(path: Path, width: int = 1000, height: int = 800, count: int = 3, dtype: str = "uint8",
                crs: str | None = None, nodata: float | None = None, cog: bool = True, seed: int = 0,
                driver: str = "GTiff") -> Path:
    """A raster whose pixel (x, y) encodes its coordinates (band 1: x % 256, band 2: y % 256, band 3: noise),
    so any crop can be checked against the exact native pixels it should show."""
    yy, xx = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    bands = [(xx % 256), (yy % 256), rng.integers(0, 256, (height, width))][:count]
    while len(bands) < count:
        bands.append((xx + yy) % 256)
    arr = np.stack(bands).astype(dtype)
    prof = {"driver": "GTiff", "width": width, "height": height, "count": count, "dtype": dtype}
    if crs is not None:
        prof.update(crs=crs, transform=from_bounds(500000, 4000000, 500000 + width * 10, 4000000 + height * 10,
                                                   width, height))
    if nodata is not None:
        prof["nodata"] = nodata
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        if driver != "GTiff":
            with MemoryFile() as mf:
                with mf.open(**prof) as ds:
                    ds.write(arr)
                with mf.open() as src:
                    rasterio.shutil.copy(src, str(path), driver=driver)
            return path
        with MemoryFile() as mf:
            with mf.open(**prof) as ds:
                ds.write(arr)
            with mf.open() as src:
                if cog:
                    rasterio.shutil.copy(src, str(path), driver="COG", compress="DEFLATE", blocksize=256,
                                         overview_resampling="average")
                else:
                    rasterio.shutil.copy(src, str(path), driver="GTiff")
    return path


# -- the raster kinds geospatial users have (after rio-tiler's own fixture set) ---------------------------
RASTER_KINDS = ("sentinel2", "sentinel2_nointerp", "palette", "mask", "external_mask", "alpha", "float_nodata",
                "float_nan", "float_nan_nodata", "south_up", "gcps", "antimeridian_utm", "antimeridian_4326")


def make_kind(path: Path, kind: str, size: int = 512, seed: int = 0) -> Path:
    """One seeded raster of a kind (see RASTER_KINDS); each hides a feature a naive reader renders wrong.

    - sentinel2: uint16 bands stored B2, B3, B4, B8 (blue, green, red, NIR) with that colour interpretation;
      a red square (high B4, low B2/B3) in the centre, a bright roof in a corner. `sentinel2_nointerp`: the same without interpretation.
    - palette: uint8 class indices 1..3 with a colour table (1 red, 2 green, 3 blue; 0 transparent).
    - mask: RGB uint8 with an internal mask; the masked left third stores white. `external_mask`: the same with
      the mask in a `.msk` sidecar (plain GTiff).
    - alpha: RGBA uint8 COG with overviews; the transparent left third stores white.
    - float_nodata / float_nan / float_nan_nodata: float32 with -9999 nodata (declared) / NaN (undeclared) / NaN
      (declared as nodata) in the left half.
    - south_up: a projected grid stored south-up (positive y pixel size).
    - gcps: no geotransform, only 4 ground control points in EPSG:4326.
    - antimeridian_utm: UTM 60N across 180 degrees; antimeridian_4326: lon 179..181 in EPSG:4326.
    """
    from rasterio.control import GroundControlPoint
    from rasterio.enums import ColorInterp
    from rasterio.transform import Affine

    rng = np.random.default_rng(seed)
    n = size
    yy, xx = np.mgrid[0:n, 0:n]
    centre = (abs(xx - n / 2) < n / 8) & (abs(yy - n / 2) < n / 8)
    left3 = xx < n // 3
    prof: dict = {"driver": "GTiff", "width": n, "height": n, "crs": "EPSG:32633",
                  "transform": from_bounds(500000, 4000000, 500000 + n * 10, 4000000 + n * 10, n, n)}
    env: dict = {}
    interp = None
    mask = None
    cmap = None
    gcps = None
    cog = False
    if kind in ("sentinel2", "sentinel2_nointerp"):
        noise = rng.integers(0, 200, (4, n, n))
        roof = (xx < n // 4) & (yy < n // 4)  # a bright roof (all bands high) in a corner
        b2 = np.where(roof, 5000, 900) + noise[0]
        b3 = np.where(roof, 5000, 1000) + noise[1]
        b4 = np.where(centre | roof, 5000, 1100) + noise[2]
        b8 = 3000 + noise[3]
        arr = np.stack([b2, b3, b4, b8]).astype("uint16")
        prof.update(count=4, dtype="uint16")
        if kind == "sentinel2":
            interp = [ColorInterp.blue, ColorInterp.green, ColorInterp.red, ColorInterp.undefined]
    elif kind == "palette":
        arr = (1 + (xx * 3 // n)).astype("uint8")[None]
        arr[0, :8, :8] = 0
        prof.update(count=1, dtype="uint8", photometric="palette")
        cmap = {0: (0, 0, 0, 0), 1: (255, 0, 0, 255), 2: (0, 255, 0, 255), 3: (0, 0, 255, 255)}
        cog = True
    elif kind in ("mask", "external_mask"):
        arr = np.stack([np.full((n, n), v) for v in (40, 80, 120)]).astype("uint8")
        arr[:, left3] = 255
        prof.update(count=3, dtype="uint8", photometric="RGB")
        mask = np.where(left3, 0, 255).astype("uint8")
        env["GDAL_TIFF_INTERNAL_MASK"] = kind == "mask"
        cog = kind == "mask"
    elif kind == "alpha":
        arr = np.stack([np.full((n, n), v) for v in (40, 80, 120, 255)]).astype("uint8")
        arr[:3, left3] = 255
        arr[3, left3] = 0
        prof.update(count=4, dtype="uint8", photometric="RGB", alpha="YES")
        cog = True
    elif kind in ("float_nodata", "float_nan", "float_nan_nodata"):
        arr = (100 + rng.random((1, n, n))).astype("float32")
        arr[0, :, : n // 2] = -9999 if kind == "float_nodata" else np.nan
        prof.update(count=1, dtype="float32")
        if kind != "float_nan":
            prof["nodata"] = -9999 if kind == "float_nodata" else np.nan
        cog = True
    elif kind == "south_up":
        arr = np.stack([(yy * 255 // n), (xx * 255 // n), np.zeros((n, n))]).astype("uint8")  # red grows south
        prof.update(count=3, dtype="uint8", transform=Affine(10, 0, 500000, 0, 10, 4000000))
    elif kind == "gcps":
        arr = np.stack([(xx % 256), (yy % 256), (xx + yy) % 256]).astype("uint8")
        prof.update(count=3, dtype="uint8")
        prof.pop("crs")
        prof.pop("transform")
        lon0, lat0, d = 12.0, 45.0, 0.001
        gcps = [GroundControlPoint(row=r, col=c, x=lon0 + c * d, y=lat0 - r * d)
                for r, c in ((0, 0), (0, n), (n, 0), (n, n))]
    elif kind == "antimeridian_utm":
        # UTM 60N; eastings 700 km..900 km near the equator span about 178.8 E .. 179.4 W
        arr = np.stack([(xx % 256), (yy % 256), (xx + yy) % 256]).astype("uint8")
        prof.update(count=3, dtype="uint8", crs="EPSG:32660",
                    transform=from_bounds(700000, 0, 900000, 200000, n, n))
    elif kind == "antimeridian_4326":
        arr = np.stack([(xx % 256), (yy % 256), (xx + yy) % 256]).astype("uint8")
        prof.update(count=3, dtype="uint8", crs="EPSG:4326", transform=from_bounds(179, -1, 181, 1, n, n))
    else:
        raise ValueError(f"unknown raster kind {kind!r}; use one of {RASTER_KINDS}")
    tmp = path.with_name(path.name + ".src.tif") if cog else path
    with warnings.catch_warnings(), rasterio.Env(**env):
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(tmp, "w", **prof) as ds:
            ds.write(arr)
            if interp is not None:
                ds.colorinterp = interp
            if cmap is not None:
                ds.write_colormap(1, cmap)
            if mask is not None:
                ds.write_mask(mask)
            if gcps is not None:
                ds.gcps = (gcps, rasterio.crs.CRS.from_epsg(4326))
        if cog:
            with rasterio.open(tmp) as src:
                rasterio.shutil.copy(src, str(path), driver="COG", compress="DEFLATE", blocksize=128,
                                     overview_resampling="nearest" if kind == "palette" else "average")
            tmp.unlink()
    return path
