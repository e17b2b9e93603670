"""Rendering real rasters as the RGB a model sees: band choice, palettes, masks and the display stretch.

Which bands become R, G, B (first match wins):
1. the image's own `bands` in the manifest line (`{"id", "path", "bands": [3, 2, 1]}`), else
2. `ZoomConfig.bands` (one choice for a whole collection), else
3. the file's colour interpretation: the bands marked red, green and blue, in that order (a Sentinel-2-like
   file stored B2, B3, B4, B8 with its interpretation set shows B4, B3, B2), else
4. bands 1, 2, 3 when there are at least three colour bands, else band 1 as grey.
A palette band (colour interpretation "palette" with a colour table) shows its colour table; it is always read
with nearest resampling, since averaging class indices invents classes.

Masks: nodata values, internal (per-dataset) masks and alpha bands all mark pixels as missing (GDAL's mask
band, which rasterio's `masked=True` reads at the output size); non-finite floats are missing too. Missing
pixels are shown black, never as the colour a transparent pixel happens to store.

Stretch (`stretch`): `auto` = none for uint8 and `percentile` otherwise; `percentile` maps each band's
[p_low, p_high] percentiles (default 2, 98, from a coarse masked read of the whole image) linearly to 0..255;
`range` maps fixed [low, high] (one pair for all bands, or one per band) to 0..255; `none` clips values to
0..255 as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

STRETCHES = ("auto", "percentile", "range", "none")
#: manifest keys that describe rendering (everything else on a manifest line is ignored here)
RENDER_KEYS = ("bands", "stretch", "percentiles", "range")


@dataclass(frozen=True)
class RenderSpec:
    """How one image (or, as a default, every image) is rendered; None fields inherit the default."""

    bands: tuple[int, ...] | None = None
    stretch: str | None = None
    percentiles: tuple[float, float] | None = None
    range: tuple[tuple[float, float], ...] | None = None

    def over(self, default: RenderSpec) -> RenderSpec:
        """This spec with its unset fields taken from `default`."""
        return RenderSpec(*(getattr(self, k) if getattr(self, k) is not None else getattr(default, k)
                            for k in ("bands", "stretch", "percentiles", "range")))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.bands is not None:
            d["bands"] = list(self.bands)
        if self.stretch is not None:
            d["stretch"] = self.stretch
        if self.percentiles is not None:
            d["percentiles"] = list(self.percentiles)
        if self.range is not None:
            d["range"] = [list(r) for r in self.range]
        return d


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def parse_render(d: Mapping[str, Any]) -> RenderSpec:
    """A RenderSpec from manifest/config keys; raises ValueError saying which key is wrong and how to fix it."""
    bands = d.get("bands")
    if bands is not None:
        if (not isinstance(bands, Sequence) or isinstance(bands, str) or len(bands) not in (1, 3)
                or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in bands)):
            raise ValueError(f"bands: {bands!r} must be 1 or 3 band numbers >= 1, e.g. [3, 2, 1]")
        bands = tuple(int(b) for b in bands)
    stretch = d.get("stretch")
    if stretch is not None and stretch not in STRETCHES:
        raise ValueError(f"stretch: {stretch!r} not in {STRETCHES}")
    pct = d.get("percentiles")
    if pct is not None:
        if (not isinstance(pct, Sequence) or len(pct) != 2 or not all(_number(p) for p in pct)
                or not 0 <= pct[0] < pct[1] <= 100):
            raise ValueError(f"percentiles: {pct!r} must be [low, high] with 0 <= low < high <= 100")
        pct = (float(pct[0]), float(pct[1]))
    rng = d.get("range")
    if rng is not None:
        pairs = [rng] if (isinstance(rng, Sequence) and len(rng) == 2 and all(_number(v) for v in rng)) else rng
        if (not isinstance(pairs, Sequence) or isinstance(pairs, str) or not pairs
                or not all(isinstance(p, Sequence) and len(p) == 2 and all(_number(v) for v in p) and p[0] < p[1]
                           for p in pairs)):
            raise ValueError(f"range: {rng!r} must be [low, high] or one [low, high] per band, low < high")
        rng = tuple((float(p[0]), float(p[1])) for p in pairs)
    if stretch == "range" and rng is None:
        raise ValueError("stretch: 'range' needs range: [low, high] (or one pair per band)")
    return RenderSpec(bands=bands, stretch=stretch, percentiles=pct, range=rng)


def auto_bands(colorinterp: Sequence[str], count: int) -> tuple[int, ...]:
    """R, G, B band numbers from the colour interpretation, else 1-2-3 (or 1 as grey); see the module doc."""
    ci = [c.lower() for c in colorinterp]
    if all(c in ci for c in ("red", "green", "blue")):
        return (ci.index("red") + 1, ci.index("green") + 1, ci.index("blue") + 1)
    if ci and ci[0] == "palette":
        return (1,)
    colour = [i + 1 for i, c in enumerate(ci) if c != "alpha"] if ci else list(range(1, count + 1))
    if len(colour) >= 3:
        return tuple(colour[:3])
    return (colour[0] if colour else 1,)


def palette_lut(colormap: Mapping[int, Sequence[int]], dtype: str) -> np.ndarray:
    """(n, 4) uint8 lookup table from a GDAL colour table; indices it lacks map to transparent black."""
    n = 256 if dtype in ("uint8", "int8") else 65536
    lut = np.zeros((n, 4), dtype=np.uint8)
    for k, v in colormap.items():
        if 0 <= int(k) < n:
            rgba = list(v) + [255] * (4 - len(v))
            lut[int(k)] = rgba[:4]
    return lut


def apply_palette(index: np.ndarray, lut: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(3, h, w) RGB and the (h, w) missing mask (alpha 0 in the table) of a class-index array."""
    idx = np.clip(np.asarray(index).astype(np.int64), 0, len(lut) - 1)
    rgba = lut[idx]
    return np.moveaxis(rgba[..., :3], -1, 0), rgba[..., 3] == 0


def band_ranges(spec: RenderSpec, n_bands: int) -> list[tuple[float, float]] | None:
    """Per-band (low, high) of a `range` stretch (one pair repeats for every band)."""
    if spec.range is None:
        return None
    if len(spec.range) == 1:
        return [spec.range[0]] * n_bands
    if len(spec.range) != n_bands:
        raise ValueError(f"range: {len(spec.range)} pairs for {n_bands} bands; give one pair or one per band")
    return list(spec.range)


def percentile_ranges(arr: np.ndarray, mask: np.ndarray | None, percentiles: tuple[float, float]) -> list[tuple[float, float]]:
    """Per-band (low, high) percentiles of the valid, finite pixels of a (bands, h, w) array."""
    out = []
    for b in range(arr.shape[0]):
        v = np.asarray(arr[b], dtype="float64")
        ok = np.isfinite(v) if mask is None else (np.isfinite(v) & ~mask[b])
        v = v[ok]
        if v.size == 0:
            out.append((0.0, 1.0))
            continue
        lo, hi = np.percentile(v, list(percentiles))
        out.append((float(lo), float(hi if hi > lo else lo + 1)))
    return out


def stretch(arr: np.ndarray, ranges: Sequence[tuple[float, float]] | None) -> np.ndarray:
    """Map each band linearly from its (low, high) to 0..255 (None: clip as is); non-finite → 0."""
    if ranges is not None:
        lo = np.asarray([r[0] for r in ranges], dtype="float32")[:, None, None]
        scale = np.asarray([255.0 / (r[1] - r[0]) for r in ranges], dtype="float32")[:, None, None]
        data = (np.asarray(arr, dtype="float32") - lo) * scale  # a new array: the caller's is never changed
    else:
        data = np.array(arr, dtype="float32")
    np.clip(data, 0, 255, out=data)
    if not np.isfinite(data).all():  # NaN survives clip
        np.nan_to_num(data, copy=False, nan=0.0)
    return data.astype("uint8")


__all__ = ["RenderSpec", "STRETCHES", "RENDER_KEYS", "parse_render", "auto_bands", "palette_lut",
           "apply_palette", "band_ranges", "percentile_ranges", "stretch"]
