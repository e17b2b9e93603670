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
