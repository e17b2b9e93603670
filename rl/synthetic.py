"""A small seeded zoom task for RL tests, the rollout benchmark and smoke runs (no other stage needed).

`make_zoom_task(out, n)` writes `images/*.tif` (tiled GeoTIFFs with overviews), `images.jsonl` and
`vqa.jsonl`: each image is textured ground with one small coloured square that is a few pixels wide in the
overview and clear after a zoom; the question asks its colour (4 options, fixed order), the target region is
the square. Same layout as `knowzoom make-scenes`, so `ImageStore.from_manifest(out/"images.jsonl")` works.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.core.records import TargetRegion, VQASample, write_jsonl

COLOURS = {"red": (220, 30, 30), "green": (30, 190, 40), "blue": (30, 60, 220), "yellow": (235, 220, 30)}


def make_zoom_task(out_dir: str | Path, n: int = 8, size: int = 1024, square: int = 40, seed: int = 0) -> Path:
    """Write n images + questions under out_dir; returns the path of vqa.jsonl."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.transform import from_origin

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    manifest, samples = [], []
    for i in range(n):
        base = rng.integers(90, 140, size=(3, 1, 1))
        img = (base + rng.integers(-12, 13, size=(3, size, size))).clip(0, 255).astype(np.uint8)
        colour = names[int(rng.integers(len(names)))]
        x0, y0 = (int(v) for v in rng.integers(square, size - 2 * square, size=2))
        img[:, y0:y0 + square, x0:x0 + square] = np.array(COLOURS[colour], dtype=np.uint8)[:, None, None]
        path = out / "images" / f"scene_{i:03d}.tif"
        profile = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8", tiled=True,
                       blockxsize=256, blockysize=256, compress="deflate", crs="EPSG:3857",
                       transform=from_origin(0, size, 1.0, 1.0), photometric="RGB")
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(img)
            dst.build_overviews([2, 4], Resampling.average)
        iid = f"scene_{i:03d}"
        manifest.append({"id": iid, "path": f"images/{path.name}"})
        choices = [f"({chr(65 + k)}) {c}" for k, c in enumerate(names)]
        samples.append(VQASample(
            id=f"zoomtask-{i:03d}", images=[iid], question="What colour is the small square?", qtype="single",
            answer=chr(65 + names.index(colour)), choices=choices, category="Perception/Object color",
            targets=[TargetRegion(image=0, bbox=[float(x0), float(y0), float(x0 + square), float(y0 + square)])],
            split="train"))
    (out / "images.jsonl").write_text("".join(json.dumps(m) + "\n" for m in manifest), encoding="utf-8")
    write_jsonl(out / "vqa.jsonl", samples)
    return out / "vqa.jsonl"
