"""GDAL lock-down and path checks for processes that serve rasters to untrusted callers.

Two layers, because GDAL reads its driver list once per process:

1. `apply_gdal_lockdown()` (server processes, before any rasterio open): sets the GDAL config options of
   `gdal_config_options()` in the environment, names the dangerous drivers in `GDAL_SKIP`, and deregisters
   every registered driver outside `ALLOWED_DRIVERS` (through the loaded libgdal), so VRT/HTTP/WMS/... files
   cannot be opened at all, whatever they are named.
2. Per file, always: `resolve_under_roots` (the path must be a regular file under an allowed root, no `..`,
   no symlink escape, no URL or GDAL virtual path) and `sniff_driver` (the first bytes must be TIFF, PNG or
   JPEG; the result is the only driver `rasterio.open(path, driver=...)` may use).

`gdal_env()` returns a `rasterio.Env` with the same options, for reads in processes (tests, notebooks) where a
process-wide lock-down would disturb other users of GDAL.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tools.errors import ForbiddenPathError, UnreadableImageError

log = logging.getLogger(__name__)

# Formats we serve; everything else is deregistered. MEM stays: rasterio uses it internally and it cannot be
# reached from a file path (GDAL_MEM_ENABLE_OPEN=NO also refuses "MEM:::" names).
ALLOWED_DRIVERS: tuple[str, ...] = ("GTiff", "PNG", "JPEG")
INTERNAL_DRIVERS: tuple[str, ...] = ("MEM",)

# Drivers that read other files, URLs or databases named inside the file; skipped at registration time.
FILE_REFERENCING_DRIVERS: tuple[str, ...] = (
    "VRT", "DERIVED", "GTI", "HTTP", "WMS", "WMTS", "WCS", "EEDA", "EEDAI", "DAAS", "PLMOSAIC", "OGCAPI",
    "STACIT", "STACTA", "MBTiles", "GPKG", "SQLite", "Rasterlite", "KMLSUPEROVERLAY", "ECRGTOC", "RPFTOC",
    "SENTINEL2", "SAFE", "DIMAP", "netCDF", "HDF5", "HDF5Image", "Zarr", "PDF", "ESRIC", "MRF", "NITF",
    "PDS", "PDS4", "ISIS3", "VICAR", "TIL", "CPG", "GNMFile", "GNMDatabase", "OSM", "TileDB", "PostGISRaster",
)

# Magic bytes → the one driver allowed to open that file.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"II*\x00", "GTiff"),
    (b"MM\x00*", "GTiff"),
    (b"II+\x00", "GTiff"),  # BigTIFF
    (b"MM\x00+", "GTiff"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
)

_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_lock = threading.Lock()


def gdal_config_options(cache_mb: int = 256) -> dict[str, str]:
    """GDAL config options of a locked-down reader: no network, no sidecar probing, no VRT escape hatches."""
    return {
        # never list directories or read sidecars (.aux.xml, .ovr, .msk) next to the file
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
        "GDAL_PAM_ENABLED": "NO",
        # no network from GDAL: /vsicurl/ accepts no extension, no retries, tiny timeouts
        "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".knowzoom-network-disabled",
        "GDAL_HTTP_MAX_RETRY": "0",
        "GDAL_HTTP_TIMEOUT": "1",
        "GDAL_HTTP_CONNECTTIMEOUT": "1",
        "GDAL_HTTP_UNSAFESSL": "NO",
        "VSI_CACHE": "FALSE",
        # the escape hatches of VRT and MEM, in case such a driver is registered anyway
        "GDAL_VRT_ENABLE_PYTHON": "NO",
        "GDAL_VRT_ENABLE_RAWRASTERBAND": "NO",
        "GDAL_MEM_ENABLE_OPEN": "NO",
        # bounded memory and CPU per read; concurrency is the server's job
        "GDAL_CACHEMAX": str(int(cache_mb)),
        "GDAL_NUM_THREADS": "1",
        "GDAL_ALLOW_LARGE_LIBJPEG_MEM_ALLOC": "NO",
    }


def gdal_env(**overrides: object):
    """A `rasterio.Env` carrying `gdal_config_options` (thread-local in non-main threads, where rasterio uses
    CPLSetThreadLocalConfigOption; GDAL_CACHEMAX is process-wide and left to `apply_gdal_lockdown`).
    `overrides` change resource options only (a converter may use GDAL_CACHEMAX / GDAL_NUM_THREADS)."""
    import rasterio

    bad = set(overrides) - {"GDAL_CACHEMAX", "GDAL_NUM_THREADS"}
    if bad:
        raise ValueError(f"gdal_env: only resource options may be overridden, not {sorted(bad)}")
    opts: dict[str, object] = dict(gdal_config_options())
    opts.pop("GDAL_CACHEMAX")
    opts.update(overrides)  # rasterio wants GDAL_CACHEMAX as an int
    return rasterio.Env(**opts)


def open_raster(path: str | os.PathLike, roots: Sequence[str | os.PathLike] | None = None,
                base: str | os.PathLike | None = None):
    """THE guarded raster open of the project (server store, prepare-images, every read of a file we did not
    write in this call): the path must be a local regular file (under `roots` when given, symlinks followed
    and kept inside), its first bytes pick the only driver GDAL may use (TIFF, PNG or JPEG — a VRT, WMS or
    XML document named `.tif` is refused before GDAL sees it), and the open runs under `gdal_env` (no
    network, no sidecars, no directory listing). Returns an open rasterio dataset; raises ForbiddenPathError
    / UnreadableImageError for refused files and rasterio's errors for corrupt ones.
    """
    import warnings

    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    if roots is not None:
        real = resolve_under_roots(path, roots, base)
    else:
        p = Path(check_path_text(path))
        try:
            real = p.resolve(strict=True)
        except (OSError, RuntimeError) as e:
            raise UnreadableImageError(detail=f"cannot resolve {p}: {e}") from e
        if not real.is_file():
            raise UnreadableImageError(detail=f"{real} is not a regular file")
    driver = sniff_driver(real)
    with gdal_env(), warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(str(real), driver=driver)


@dataclass
class LockdownReport:
    """What `apply_gdal_lockdown` did, for logs and `/health`."""

    options: dict[str, str] = field(default_factory=dict)
    deregistered: list[str] = field(default_factory=list)
    remaining: list[str] = field(default_factory=list)
    libgdal: str | None = None

    @property
    def drivers_locked(self) -> bool:
        """True when no driver outside ALLOWED_DRIVERS + INTERNAL_DRIVERS can open anything."""
        keep = set(ALLOWED_DRIVERS) | set(INTERNAL_DRIVERS)
        return bool(self.remaining) and set(self.remaining) <= keep

    def to_dict(self) -> dict:
        return {
            "drivers_locked": self.drivers_locked,
            "drivers": sorted(self.remaining),
            "n_deregistered": len(self.deregistered),
            "options": dict(self.options),
        }


_report: LockdownReport | None = None


def _find_libgdal() -> str | None:
    """Path of the libgdal this process's rasterio has loaded (wheel-bundled or system)."""
    import rasterio._base  # noqa: F401  (loads libgdal)

    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                path = line.rsplit(None, 1)[-1]
                if "libgdal" in os.path.basename(path) and path.startswith("/"):
                    return path
    except OSError:
        pass
    import rasterio

    libs = glob.glob(os.path.join(os.path.dirname(os.path.dirname(rasterio.__file__)), "rasterio.libs", "libgdal*"))
    return libs[0] if libs else None


def _deregister(keep: set[str]) -> tuple[list[str], list[str], str | None]:
    """Deregister every GDAL driver not in `keep`; return (removed, remaining, libgdal path)."""
    import rasterio

    with rasterio.Env():  # makes sure GDALAllRegister ran (with GDAL_SKIP applied)
        pass
    libpath = _find_libgdal()
    if libpath is None:
        return [], [], None
    lib = ctypes.CDLL(libpath)  # same handle as the one already loaded: same driver manager
    lib.GDALGetDriverCount.restype = ctypes.c_int
    lib.GDALGetDriver.restype = ctypes.c_void_p
    lib.GDALGetDriver.argtypes = [ctypes.c_int]
    lib.GDALGetDriverShortName.restype = ctypes.c_char_p
    lib.GDALGetDriverShortName.argtypes = [ctypes.c_void_p]
    lib.GDALDeregisterDriver.argtypes = [ctypes.c_void_p]
    lib.GDALDeregisterDriver.restype = None
    removed: list[str] = []
    # bounded: each pass removes at least one driver or stops
    for _ in range(int(lib.GDALGetDriverCount()) + 1):
        victim = None
        for i in range(int(lib.GDALGetDriverCount())):
            h = lib.GDALGetDriver(i)
            name = lib.GDALGetDriverShortName(h).decode()
            if name not in keep:
                victim = (h, name)
                break
        if victim is None:
            break
        lib.GDALDeregisterDriver(victim[0])  # the driver object is leaked on purpose: it may be referenced
        removed.append(victim[1])
    remaining = [
        lib.GDALGetDriverShortName(lib.GDALGetDriver(i)).decode() for i in range(int(lib.GDALGetDriverCount()))
    ]
    return removed, remaining, libpath


def apply_gdal_lockdown(cache_mb: int = 256, deregister: bool = True) -> LockdownReport:
    """Lock GDAL down for this whole process (idempotent). Call before serving; see module docstring."""
    global _report
    with _lock:
        opts = gdal_config_options(cache_mb)
        skip = set(os.environ.get("GDAL_SKIP", "").split()) | set(FILE_REFERENCING_DRIVERS)
        os.environ["GDAL_SKIP"] = " ".join(sorted(skip))
        os.environ.update(opts)
        report = LockdownReport(options={**opts, "GDAL_SKIP": os.environ["GDAL_SKIP"]})
        if deregister:
            removed, remaining, libpath = _deregister(set(ALLOWED_DRIVERS) | set(INTERNAL_DRIVERS))
            prev = _report.deregistered if _report else []
            report.deregistered, report.remaining, report.libgdal = prev + removed, remaining, libpath
            if libpath is None:
                log.warning("libgdal not found: drivers not deregistered; relying on per-file driver checks")
        _report = report
        log.info("GDAL lock-down: %d drivers removed, remaining %s", len(report.deregistered), report.remaining)
        return report


def lockdown_report() -> LockdownReport | None:
    """The last `apply_gdal_lockdown` result in this process (None if never applied)."""
    return _report


def check_path_text(path: str | os.PathLike, *, parent_refs: bool = False) -> str:
    """Reject path strings GDAL would treat as something other than a local file; return the text.
    `..` components are refused unless `parent_refs` (the result must still resolve under the roots)."""
    text = os.fspath(path)
    if not isinstance(text, str) or not text.strip():
        raise ForbiddenPathError(detail="empty path")
    if "\x00" in text or any(ord(c) < 32 for c in text):
        raise ForbiddenPathError(detail="path contains control characters")
    if _URL_RE.match(text) or text.lower().startswith("/vsi"):
        raise ForbiddenPathError(detail="URLs and GDAL virtual file systems are not allowed; register local files")
    if not parent_refs and ".." in Path(text).parts:
        raise ForbiddenPathError(detail="'..' components are not allowed in registered paths")
    return text


def resolve_under_roots(
    path: str | os.PathLike, roots: Sequence[str | os.PathLike], base: str | os.PathLike | None = None,
    *, parent_refs: bool = False,
) -> Path:
    """The real path of a regular file that lies under one of `roots` after following symlinks: THE
    allowed-root check (the image store's registration and the server's per-file check both call it).

    Relative paths are taken from `base` (e.g. a manifest's folder). Raises ForbiddenPathError for URLs,
    `..` (unless `parent_refs`: the store accepts operator paths like `../x.tif` that resolve inside a
    root), virtual paths, symlink escapes and files outside the roots; UnreadableImageError when the file
    is missing or not a regular file.
    """
    text = check_path_text(path, parent_refs=parent_refs)
    if not roots:
        raise ForbiddenPathError(detail="no allowed roots configured")
    p = Path(text)
    if not p.is_absolute():
        p = Path(base or os.getcwd()) / p
    try:
        real = p.resolve(strict=True)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise UnreadableImageError(detail=f"no such file: {p}") from e
    except (OSError, RuntimeError) as e:  # RuntimeError: symlink loop
        raise UnreadableImageError(detail=f"cannot resolve {p}: {e}") from e
    real_roots = []
    for r in roots:
        try:
            real_roots.append(Path(check_path_text(r)).resolve(strict=False))
        except ForbiddenPathError:
            continue
    if not any(real == r or real.is_relative_to(r) for r in real_roots):
        raise ForbiddenPathError(detail=f"{p} resolves to {real}, outside the allowed roots")
    if not real.is_file():
        raise UnreadableImageError(detail=f"{real} is not a regular file")
    return real


def sniff_driver(path: str | os.PathLike) -> str:
    """The GDAL driver allowed for this file, from its first bytes (TIFF/PNG/JPEG); else UnreadableImageError.

    The extension is ignored: a VRT/XML document named `.tif` is refused here, before GDAL sees it.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise UnreadableImageError(detail=f"cannot read {path}: {e}") from e
    for magic, driver in _MAGIC:
        if head.startswith(magic):
            return driver
    raise UnreadableImageError(detail=f"{path}: not a TIFF, PNG or JPEG file (first bytes {head[:8]!r})")
