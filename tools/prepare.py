"""`knowzoom prepare-images`: convert rasters or large JPEG/PNG (XLRS-Bench: ~8.5k² px) into tiled COGs
with overviews, once. Idempotent and resumable: each converted file is recorded (source size + mtime + config
fingerprint) in `prepared.jsonl`; a rerun skips what is up to date. Writes `images.jsonl` for the store.

PNG has no internal tiling or overviews, so a zoom on an un-prepared PNG streams rows from the top of the file
(bounded memory, but slow); JPEG has DCT-scaled implicit overviews (faster, still whole-file decodes). After
this stage every read is a few tile fetches. The source is first copied row by row (sequential, which PNG
needs) into a temporary tiled GTiff, then written as a COG with average-resampled overviews.

Sources are untrusted (eval runs this on downloaded XLRS-Bench copies): every one is opened through
`tools.security.open_raster` — it must resolve inside `input_dir` (a symlink out of it is refused), its
first bytes choose the only GDAL driver allowed (a VRT/XML named `.tif` is refused), and GDAL runs with no
network, no sidecar files and no directory listing. Bad files are skipped and reported; the stage exits
non-zero when any failed unless `allow_failures` is set.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.config import StageConfig, hfield
from pipeline.core.records import JsonlAppender, write_jsonl


@dataclass
class PrepareImagesConfig(StageConfig):
    """Rasters / JPEG / PNG → COGs with overviews (the output folder is a store root)."""

    input_dir: str = hfield("data/images", help="Folder with the source images (searched recursively).")
    output_dir: str = hfield("runs/prepared", help="Folder for <id>.tif COGs, images.jsonl and prepared.jsonl.")
    patterns: list[str] = hfield(["*.tif", "*.tiff", "*.png", "*.jpg", "*.jpeg"], help="Glob patterns of sources.")
    compress: str = hfield("JPEG", help="COG compression: JPEG (RGB uint8 only, small) | DEFLATE | ZSTD | LZW | WEBP.")
    quality: int = hfield(90, help="JPEG/WEBP quality (1..100).")
    blocksize: int = hfield(512, help="COG tile side (multiple of 16).")
    overview_resampling: str = hfield("average", help="Overview resampling: average | bilinear | nearest.")
    cache_mb: int = hfield(256, help="GDAL_CACHEMAX during conversion (MB).")
    overwrite: bool = hfield(False, help="Reconvert even when the recorded conversion is up to date.")
    render: dict = hfield({}, help="Rendering keys written on every images.jsonl line (tools/render.py), e.g. "
                                   "{bands: [3, 2, 1], stretch: range, range: [0, 3000]}; no reconversion needed.")
    allow_failures: bool = hfield(
        False, help="Finish with exit 0 when some sources could not be converted (they are still listed); "
        "default: convert the rest, then fail naming them."
    )

    def validate(self) -> list[str]:
        p = super().validate()
        if not Path(self.input_dir).is_dir():
            p.append(f"input_dir: {self.input_dir} is not a folder; point it at your images")
        if self.compress.upper() not in ("JPEG", "DEFLATE", "ZSTD", "LZW", "WEBP", "NONE"):
            p.append("compress: use JPEG, DEFLATE, ZSTD, LZW, WEBP or NONE")
        if not 1 <= self.quality <= 100:
            p.append("quality: within 1..100")
        if self.blocksize % 16 or not 128 <= self.blocksize <= 4096:
            p.append("blocksize: a multiple of 16 within 128..4096")
        if self.overview_resampling not in ("average", "bilinear", "nearest", "cubic", "lanczos"):
            p.append("overview_resampling: average | bilinear | nearest | cubic | lanczos")
        if not self.patterns:
            p.append("patterns: give at least one glob, e.g. '*.png'")
        from tools.render import RENDER_KEYS, parse_render

        unknown = sorted(set(self.render) - set(RENDER_KEYS))
        if unknown:
            p.append(f"render: unknown keys {unknown}; use {list(RENDER_KEYS)}")
        try:
            parse_render(self.render)
        except ValueError as e:
            p.append(f"render: {e}")
        return p


def image_id_for(path: Path, root: Path) -> str:
    """A store id from the relative path: folders joined by '__', extension dropped."""
    rel = path.relative_to(root).with_suffix("")
    return "__".join(rel.parts).replace(" ", "_")


#: files GDAL reads beside a source (PAM metadata, external overviews and masks, world files, RPCs): adding,
#: changing or removing one changes what the source means, so the recorded conversion is no longer up to date
SIDECAR_SUFFIXES = (".aux.xml", ".ovr", ".msk", ".aux", ".rpb", "_rpc.txt", ".imd", ".wld", ".tfw", ".tifw",
                    ".pgw", ".pngw", ".jgw", ".jpgw", ".jpegw")


def sidecars(src: Path) -> dict[str, list[int]]:
    """{name: [size, mtime]} of the sidecar files beside `src` (full name + suffix, or stem + world-file suffix)."""
    out = {}
    for suffix in SIDECAR_SUFFIXES:
        for cand in {src.with_name(src.name + suffix), src.with_name(src.stem + suffix)}:
            if cand.is_file():
                st = cand.stat()
                out[cand.name] = [st.st_size, int(st.st_mtime)]
    return dict(sorted(out.items()))


def convert_to_cog(src: Path, dst: Path, cfg: PrepareImagesConfig, root: Path | None = None) -> dict[str, Any]:
    """Convert one file (atomic: written to a temp name, renamed at the end). The source is opened through
    the guarded `open_raster` (inside `root` when given; sniffed driver; no network or sidecars)."""
    import rasterio.shutil
    from rasterio.errors import NotGeoreferencedWarning

    from tools.security import gdal_env, open_raster

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp_tiled = dst.with_name(dst.name + ".tiled.tmp.tif")
    tmp_cog = dst.with_name(dst.name + ".cog.tmp.tif")
    with warnings.catch_warnings(), gdal_env(GDAL_CACHEMAX=int(cfg.cache_mb), GDAL_NUM_THREADS="ALL_CPUS"):
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with open_raster(src, None if root is None else [root]) as ds:
            info = {"width": ds.width, "height": ds.height, "count": ds.count, "dtype": ds.dtypes[0]}
            rgb8 = ds.count == 3 and ds.dtypes[0] == "uint8"
            palette = bool(ds.colorinterp) and ds.colorinterp[0].name == "palette"
            rasterio.shutil.copy(ds, str(tmp_tiled), driver="GTiff", tiled=True, blockxsize=cfg.blocksize,
                                 blockysize=cfg.blocksize, compress="NONE", BIGTIFF="IF_SAFER")
        compress = cfg.compress.upper()
        if compress == "JPEG" and not rgb8:
            compress = "DEFLATE"  # JPEG needs 8-bit data; keep other rasters lossless
        opts: dict[str, Any] = {"compress": compress, "blocksize": cfg.blocksize, "BIGTIFF": "IF_SAFER",
                                # averaging class indices invents classes: palette overviews are nearest
                                "overview_resampling": "nearest" if palette else cfg.overview_resampling, "num_threads": "ALL_CPUS"}
        if compress in ("JPEG", "WEBP"):
            opts["quality"] = cfg.quality
        try:
            with open_raster(tmp_tiled) as ds:
                rasterio.shutil.copy(ds, str(tmp_cog), driver="COG", **opts)
            os.replace(tmp_cog, dst)
        finally:
            for t in (tmp_tiled, tmp_cog):
                t.unlink(missing_ok=True)
    return {**info, "compress": compress}


def run(cfg: PrepareImagesConfig) -> dict[str, Any]:
    """Convert every matching source not yet converted with this config; write images.jsonl."""
    from tqdm import tqdm

    t0 = time.time()
    root = Path(cfg.input_dir).resolve()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    sources = sorted({p for pat in cfg.patterns for p in root.rglob(pat) if p.is_file()})
    fp = cfg.fingerprint(exclude=("input_dir", "output_dir", "overwrite", "seed", "cache_mb", "render",
                                  "allow_failures"))
    log_path = out / "prepared.jsonl"
    done: dict[str, dict[str, Any]] = {}
    if log_path.exists():
        for line in log_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    d = json.loads(line)
                    done[d["id"]] = d
                except (json.JSONDecodeError, KeyError):
                    continue
    converted = skipped = failed = 0
    failures: list[dict[str, str]] = []
    images = []
    with JsonlAppender(log_path) as log:
        for src in tqdm(sources, desc="prepare-images", unit="image"):
            iid = image_id_for(src, root)
            dst = out / f"{iid}.tif"
            st = src.stat()
            key = {"size": st.st_size, "mtime": int(st.st_mtime), "config": fp, "sidecars": sidecars(src)}
            prev = done.get(iid)
            # records written before sidecars were tracked read as "no sidecars"
            if (not cfg.overwrite and dst.exists() and prev
                    and all(prev.get(k, {} if k == "sidecars" else None) == v for k, v in key.items())):
                skipped += 1
                images.append({"id": iid, "path": dst.name, **cfg.render})
                continue
            try:
                meta = convert_to_cog(src, dst, cfg, root)
            except Exception as e:  # noqa: BLE001 - one bad file must not stop the batch; it is reported
                failed += 1
                failures.append({"source": str(src.relative_to(root)), "error": _why(e)[:300]})
                continue
            log.append({"id": iid, "source": str(src.relative_to(root)), **key, **meta})
            converted += 1
            images.append({"id": iid, "path": dst.name, **cfg.render})
    write_jsonl(out / "images.jsonl", images)
    write_jsonl(out / "failed.jsonl", failures)
    errors = [f"{f['source']}: {f['error']}" for f in failures]
    summary = {"sources": len(sources), "converted": converted, "skipped": skipped, "failed": failed,
               "errors": errors[:20], "seconds": round(time.time() - t0, 1)}
    if failed and not cfg.allow_failures:
        from tools.errors import PrepareFailedError

        shown = "\n".join(f"  - {e}" for e in errors[:10]) + (f"\n  ... ({failed - 10} more)" if failed > 10 else "")
        raise PrepareFailedError(
            f"{failed} of {len(sources)} source files could not be converted ({converted} converted, {skipped} "
            f"up to date; images.jsonl lists those, {out / 'failed.jsonl'} the failures):\n{shown}\n"
            "fix or remove these files, or pass --allow_failures to accept the others")
    return summary


def _why(e: BaseException) -> str:
    """One line on why a source failed (the refusals of the guarded open say what the file is)."""
    from tools.errors import ToolError

    if isinstance(e, ToolError):
        return f"refused: {e.detail or e.message}"
    return f"{type(e).__name__}: {e}"


__all__ = ["PrepareImagesConfig", "run", "convert_to_cog", "image_id_for"]
