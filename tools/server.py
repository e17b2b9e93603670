"""`knowzoom serve-tools`: the zoom tool as an HTTP API (FastAPI) and as an MCP server, for any agent.

The semantics are the training ones: episodes hold observations (`image_k` overviews, then `obs_N` crops)
and `zoom_in(bbox, source)` boxes are in the frame of the named observation, through the same
`tools.protocol.Episode` the trainer uses. A stateless `/zoom` reads an image id + a native-pixel or
geographic box. Callers name images by id only; files come from the operator's manifest/folders under
allowed roots (see SECURITY.md).

Every read runs in a thread pool under `asyncio.wait_for` (a slow read → 504) and a concurrency limit
whose slot is released only when the read thread really ends (saturation → 503). Every typed tool error
maps to one HTTP status in `ERROR_STATUS`.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import dataclasses
import io
import json
import logging
import math
import secrets
import struct
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
from fastapi import Body, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.core.config import StageConfig, hfield
from tools import errors as E
from tools.errors import RequestTooLargeError, ServerBusyError, ToolError, UnknownEpisodeError

log = logging.getLogger("knowzoom.server")

T = TypeVar("T")

FORMATS = ("json", "png", "jpeg")
TRANSPORTS = ("http", "mcp-http", "mcp-stdio")


def _all_tool_errors() -> list[type[ToolError]]:
    seen: list[type[ToolError]] = []
    stack: list[type[ToolError]] = [ToolError]
    while stack:
        cls = stack.pop()
        if cls not in seen:
            seen.append(cls)
            stack.extend(cls.__subclasses__())
    return seen


def error_status_table() -> dict[type[ToolError], int]:
    """THE table: every ToolError class (tools family + server additions) → its HTTP status."""
    return {cls: int(cls.http_status) for cls in _all_tool_errors()}


ERROR_STATUS: dict[type[ToolError], int] = error_status_table()
# Names shown to clients: "unreadable" must be indistinguishable from "unknown".
PUBLIC_ERROR_NAME: dict[type[ToolError], str] = {E.UnreadableImageError: "UnknownImageError"}
SCRUBBED_MESSAGE: dict[type[ToolError], str] = {
    E.UnreadableImageError: E.UnknownImageError.default_message,
    E.UnknownImageError: E.UnknownImageError.default_message,
}


def status_of(err: ToolError) -> int:
    """HTTP status of a tool error (most specific class in the table; 400 for unknown subclasses)."""
    for cls in type(err).__mro__:
        if cls in ERROR_STATUS:
            return ERROR_STATUS[cls]
    return 400


def public_error(err: ToolError) -> dict[str, str]:
    """JSON body for an error: typed name and a safe message (details only in logs)."""
    cls = type(err)
    name = next((PUBLIC_ERROR_NAME[c] for c in cls.__mro__ if c in PUBLIC_ERROR_NAME), cls.__name__)
    msg = next((SCRUBBED_MESSAGE[c] for c in cls.__mro__ if c in SCRUBBED_MESSAGE), err.message)
    return {"error": name, "message": msg}


# -- config -------------------------------------------------------------------------------------------
@dataclass
class ServeConfig(StageConfig):
    """Config of `knowzoom serve-tools`: which images, which zoom semantics, and every server limit."""

    output_dir: str = hfield("runs/tiny/serve", help="Folder for the resolved config, manifest and server log.")
    manifest: str = hfield("", help="images.jsonl ({id, path} lines, paths relative to it) of the images to serve.")
    image_dirs: list[str] = hfield([], help="Folders whose *.tif/*.png/*.jpg files are served (id = file stem).")
    allowed_roots: list[str] = hfield(
        [], help="Folders registered files must resolve under (default: the manifest's folder and image_dirs)."
    )
    transport: str = hfield("http", help="http (FastAPI REST), mcp-http (MCP streamable HTTP at /mcp) or mcp-stdio.")
    host: str = hfield("127.0.0.1", help="Bind address; beyond loopback a bearer token is required (see token_env).")
    token_env: str = hfield(
        "KNOWZOOM_TOKEN", help="Environment variable holding the bearer token; when it is set, every HTTP request "
        "needs 'Authorization: Bearer <token>' (the token never goes in a config file)."
    )
    allow_unauthenticated_remote: bool = hfield(
        False, help="Start beyond loopback without a token (only behind a proxy that authenticates; warned loudly)."
    )
    allowed_hosts: list[str] = hfield(
        [], help="Host header names accepted (DNS-rebinding defence; '*' = any). Default: loopback names when "
        "bound to loopback, else the bind address (any Host when bound to 0.0.0.0 / ::)."
    )
    port: int = hfield(8765, help="TCP port (0 = pick a free one).")
    workers: int = hfield(1, help="uvicorn worker processes; >1 only with stateless_only (episodes live in one process).")
    stateless_only: bool = hfield(False, help="Serve only stateless endpoints (no episodes); allows workers > 1.")
    # zoom semantics (tools.zoom.ZoomConfig)
    frame: str = hfield("shown_pixels", help="Box frame of zoom_in: shown_pixels (Qwen2.5-VL), norm1000 (Qwen3-VL style) or lonlat.")
    max_pixels: int = hfield(50176, help="Pixels of each returned observation (the training value).")
    min_pixels: int = hfield(3136, help="Minimum pixels of a returned observation.")
    max_turns: int = hfield(5, help="zoom_in calls allowed per episode.")
    # caps on caller-chosen sizes and responses
    max_output_pixels: int = hfield(1_048_576, help="Cap on a caller-chosen max_pixels in /zoom (larger → 422).")
    max_response_bytes: int = hfield(8_388_608, help="Cap on one encoded image (larger → 422).")
    max_request_bytes: int = hfield(65_536, help="Cap on a request body (larger → 413).")
    max_images_per_episode: int = hfield(4, help="Input images one episode may hold.")
    max_id_length: int = hfield(200, help="Longest image/episode id accepted (longer → 404 without lookup).")
    max_list: int = hfield(1000, help="Most image ids returned by one /images page.")
    jpeg_quality: int = hfield(90, help="JPEG quality of returned images (1-95).")
    png_compress_level: int = hfield(1, help="Deflate level of returned PNGs (0-9; 1 is fast, lossless anyway).")
    png_encoder: str = hfield("auto", help="PNG deflate: auto (ISA-L via the isal package if installed, else zlib), isal "
                              "(fastest) or zlib (smallest at levels 6-9).")
    # time and concurrency
    request_timeout_s: float = hfield(10.0, help="Per-request limit on the read+encode work (exceeded → 504).")
    max_concurrency: int = hfield(8, help="Reads in flight at once (timed-out reads count until they end).")
    queue_timeout_s: float = hfield(1.0, help="How long a request waits for a read slot before 503.")
    read_threads: int = hfield(4, help="Threads of the read pool.")
    max_connections: int = hfield(256, help="uvicorn limit_concurrency: open connections before 503.")
    # episodes
    max_episodes: int = hfield(64, help="Episodes kept at once; beyond it the heaviest client loses its least recently used one.")
    max_episodes_per_client: int = hfield(
        16, help="Episodes one client (remote address, or MCP session) holds; its own oldest is evicted beyond this."
    )
    episode_ttl_s: float = hfield(600.0, help="Idle seconds after which an episode expires.")
    # GDAL
    gdal_cache_mb: int = hfield(256, help="GDAL block cache per process (MB).")
    gdal_lockdown: bool = hfield(True, help="Deregister non-served GDAL drivers and disable GDAL networking (process-wide).")
    store_max_open: int = hfield(64, help="Open rasterio handles kept by the image store.")
    log_level: str = hfield("info", help="Logging level: debug, info, warning, error.")
    manifest_errors: str = hfield(
        "fail", help="Bad manifest lines / folder files: fail (refuse to start, naming the line) or skip "
        "(serve the rest; each bad entry is logged and counted in /health)."
    )

    def validate(self) -> list[str]:
        p = super().validate()
        if not self.manifest and not self.image_dirs:
            p.append("manifest/image_dirs: nothing to serve; set manifest (images.jsonl) or image_dirs")
        if self.transport not in TRANSPORTS:
            p.append(f"transport: {self.transport!r}; use one of {', '.join(TRANSPORTS)}")
        if not 0 <= self.port <= 65535:
            p.append("port: must be 0..65535")
        if self.workers < 1:
            p.append("workers: must be >= 1")
        if self.workers > 1 and not self.stateless_only:
            p.append("workers: episodes live in one process; use workers: 1 or set stateless_only: true")
        if self.max_output_pixels < self.max_pixels:
            p.append("max_output_pixels: must be >= max_pixels")
        for name in ("max_response_bytes", "max_request_bytes", "max_images_per_episode",
                     "max_id_length", "max_list", "max_concurrency", "read_threads", "max_connections",
                     "max_episodes", "gdal_cache_mb", "store_max_open"):
            if getattr(self, name) < 1:
                p.append(f"{name}: must be >= 1")
        for name in ("request_timeout_s", "episode_ttl_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                p.append(f"{name}: must be a positive number of seconds")
        if not (math.isfinite(self.queue_timeout_s) and self.queue_timeout_s >= 0):
            p.append("queue_timeout_s: must be >= 0")
        if not 1 <= self.jpeg_quality <= 95:
            p.append("jpeg_quality: must be 1..95")
        if not 0 <= self.png_compress_level <= 9:
            p.append("png_compress_level: must be 0..9")
        if self.png_encoder == "libdeflate":
            p.append("png_encoder: libdeflate was removed (it loaded the copy inside rasterio's wheel); use isal "
                     "(the isal package, what auto picks: faster, about the same size) or zlib")
        elif self.png_encoder not in PNG_ENCODERS:
            p.append(f"png_encoder: {self.png_encoder!r}; use auto, isal or zlib")
        elif self.png_encoder == "isal" and isal_zlib() is None:
            p.append("png_encoder: isal needs the isal package (pip install isal); use auto or zlib")
        from tools.zoom import HARD_MAX_PIXELS

        p += [f"zoom: {q}" for q in self.zoom_config().validate()]  # frame, pixel limits, turns: one copy
        if self.max_output_pixels > HARD_MAX_PIXELS:
            p.append(f"max_output_pixels: {self.max_output_pixels} exceeds the hard cap {HARD_MAX_PIXELS}")
        if self.log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
            p.append("log_level: use debug, info, warning or error")
        if self.manifest and not Path(self.manifest).is_file():
            p.append(f"manifest: {self.manifest} does not exist (or is not a file); give the images.jsonl to serve")
        if self.manifest_errors not in ("fail", "skip"):
            p.append("manifest_errors: use fail or skip")
        if not 1 <= self.max_episodes_per_client <= max(1, self.max_episodes):
            p.append("max_episodes_per_client: must be within 1..max_episodes")
        if not isinstance(self.token_env, str) or not self.token_env.strip():
            p.append("token_env: name an environment variable, e.g. KNOWZOOM_TOKEN")
        elif (self.transport != "mcp-stdio" and not is_loopback(self.host) and not self.token()
              and not self.allow_unauthenticated_remote):
            p.append(f"host: {self.host} is reachable beyond this machine and no token is set; export "
                     f"{self.token_env}=<a long random string> (clients send 'Authorization: Bearer <it>'), "
                     "or bind 127.0.0.1, or set allow_unauthenticated_remote: true behind an authenticating proxy")
        return p

    def token(self) -> str | None:
        """The bearer token from the `token_env` environment variable (None when unset or empty)."""
        import os

        t = os.environ.get(self.token_env or "", "").strip()
        return t or None

    def host_allowlist(self) -> set[str] | None:
        """Host header names to accept (lower case, no port); None = any."""
        if self.allowed_hosts:
            names = {h.strip().lower().strip("[]") for h in self.allowed_hosts}
            return None if "*" in names else names
        if is_loopback(self.host):
            return {"127.0.0.1", "localhost", "::1"}
        if self.host in ("0.0.0.0", "::", ""):
            return None  # every interface: the operator names the hosts; the token guards the server
        return {self.host.lower().strip("[]")}

    def zoom_config(self):
        """The tools.zoom.ZoomConfig of this server (same semantics as training)."""
        from tools.zoom import ZoomConfig

        return dataclasses.replace(
            ZoomConfig(), frame=self.frame, max_pixels=self.max_pixels, min_pixels=self.min_pixels,
            max_turns=self.max_turns,
            read_timeout_s=0.0,  # the server bounds the whole request itself (ZoomService.run_read)
        )

    def roots(self) -> list[str]:
        """Allowed roots: configured, else the manifest's folder and the image folders."""
        if self.allowed_roots:
            return list(self.allowed_roots)
        roots = [str(Path(self.manifest).parent)] if self.manifest else []
        return roots + list(self.image_dirs)


def is_loopback(host: str) -> bool:
    """True for a bind address reachable only from this machine (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


# -- image encoding -----------------------------------------------------------------------------------
MIME = {"png": "image/png", "jpeg": "image/jpeg"}


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


PNG_ENCODERS = ("auto", "isal", "zlib")


def isal_zlib() -> Any | None:
    """python-isal's zlib-compatible module (Intel ISA-L deflate), or None when the package is missing.

    The default PNG deflate: on the server's crops, at level 1 it is 4-5x faster than zlib and about 2x
    faster than libdeflate, output within 4% of libdeflate's (tests/benchmarks/bench_png.py); it drops the
    GIL while compressing, as zlib does, so read threads keep working.
    """
    try:
        from isal import isal_zlib as mod
    except ImportError:
        return None
    return mod


def _isal_level(level: int) -> int:
    """zlib level 1..9 → ISA-L level 1 or 2. ISA-L has 0..3: its 0 compresses far less than zlib 1, and its 3
    was no smaller than 2 on the server's crops (bench_png.py). For the smallest PNGs use encoder zlib."""
    return 1 if level <= 3 else 2


def png_bytes(arr: np.ndarray, level: int, encoder: str = "auto") -> bytes:
    """Lossless 8-bit RGB/gray PNG of an (h, w[, c]) uint8 array: PNG "Up" filter on every row, then deflate
    at `level` by ISA-L (`encoder` auto/isal; zlib levels mapped onto its 1..3) or zlib.

    Several times faster than Pillow's encoder at the same level (its per-row adaptive filter search is
    costly), and the deflate runs without the GIL, so read threads keep working.
    """
    a = np.ascontiguousarray(arr, dtype=np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]
    h, w, c = a.shape
    if c not in (1, 3):
        raise ValueError(f"png_bytes: 1 or 3 channels, got {c}")
    rows = a.reshape(h, w * c)
    raw = np.empty((h, w * c + 1), np.uint8)
    raw[:, 0] = 2  # filter type Up: each row minus the row above (the first row minus zeros)
    raw[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=raw[1:, 1:])  # uint8 wrap-around is what PNG specifies
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2 if c == 3 else 0, 0, 0, 0)
    isal = isal_zlib() if encoder in ("auto", "isal") and level > 0 else None  # level 0: stored, zlib's
    if encoder == "isal" and level > 0 and isal is None:
        raise RuntimeError("png encoder isal requested but the isal package is not installed (pip install isal)")
    idat = isal.compress(raw, _isal_level(level)) if isal is not None else zlib.compress(raw, level)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def encode_image(img: Any, fmt: str, cfg: ServeConfig) -> bytes:
    """PIL image → PNG/JPEG bytes, refused (LimitError) above max_response_bytes."""
    if fmt == "jpeg":
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="JPEG", quality=cfg.jpeg_quality)
        data = buf.getvalue()
    else:
        data = png_bytes(np.asarray(img.convert("RGB")), cfg.png_compress_level, cfg.png_encoder)
    if len(data) > cfg.max_response_bytes:
        raise E.LimitError(
            f"Encoded image exceeds the {cfg.max_response_bytes}-byte cap; ask for fewer pixels or jpeg.",
            detail=f"{len(data)} bytes",
        )
    return data


def observation_payload(obs: Any, fmt: str, cfg: ServeConfig, data: bytes | None = None) -> dict[str, Any]:
    """JSON body of one observation: mapping metadata, plus the image as base64 when `fmt` is json."""
    d = obs.to_dict()
    d["size"] = list(obs.image.size)
    if fmt == "json":
        raw = data if data is not None else encode_image(obs.image, "png", cfg)
        d["image"] = {"mime": "image/png", "base64": base64.b64encode(raw).decode("ascii")}
    return d


def _finite_json(obj: Any) -> Any:
    """Replace non-finite floats (not valid JSON) by None, recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_json(v) for v in obj]
    return obj


# -- the service (shared by the HTTP app and the MCP server) -------------------------------------------
@dataclass
class _EpisodeSlot:
    episode: Any
    image_ids: list[str]
    created: float
    last_used: float
    lock: threading.Lock
    owner: str = ""


class EpisodeRegistry:
    """Bounded, expiring map episode id → Episode, fair between clients.

    A client (`owner`) holds at most `max_per_owner` episodes: beyond that its own least recently used one
    goes. When the whole registry is full, the least recently used episode of the client holding the most
    is evicted, so one client opening many episodes never evicts a lighter client's.
    """

    def __init__(self, max_episodes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic,
                 max_per_owner: int | None = None):
        self.max_episodes = int(max_episodes)
        self.max_per_owner = int(max_per_owner or max_episodes)
        self.ttl_s = float(ttl_s)
        self.clock = clock
        self._slots: OrderedDict[str, _EpisodeSlot] = OrderedDict()
        self._lock = threading.Lock()
        self.n_evicted = 0
        self.n_expired = 0

    def _purge(self, now: float) -> None:
        for eid in [e for e, s in self._slots.items() if now - s.last_used > self.ttl_s]:
            del self._slots[eid]
            self.n_expired += 1

    def _evict_lru_of(self, owner: str) -> None:
        victim = next(e for e, s in self._slots.items() if s.owner == owner)  # OrderedDict: LRU first
        del self._slots[victim]
        self.n_evicted += 1

    def add(self, episode: Any, image_ids: list[str], owner: str = "") -> str:
        now = self.clock()
        eid = secrets.token_urlsafe(16)  # unguessable: one agent cannot drive another's episode
        with self._lock:
            self._purge(now)
            counts: dict[str, int] = {}
            for s in self._slots.values():
                counts[s.owner] = counts.get(s.owner, 0) + 1
            while counts.get(owner, 0) >= self.max_per_owner:
                self._evict_lru_of(owner)
                counts[owner] -= 1
            while len(self._slots) >= self.max_episodes:
                heaviest = max(counts, key=lambda o: counts[o])
                self._evict_lru_of(heaviest)
                counts[heaviest] -= 1
            self._slots[eid] = _EpisodeSlot(episode, list(image_ids), now, now, threading.Lock(), owner)
        return eid

    def owners(self) -> dict[str, int]:
        """Episodes held per client (for tests and /health)."""
        with self._lock:
            out: dict[str, int] = {}
            for s in self._slots.values():
                out[s.owner] = out.get(s.owner, 0) + 1
            return out

    def get(self, eid: str) -> _EpisodeSlot:
        now = self.clock()
        with self._lock:
            self._purge(now)
            slot = self._slots.get(eid) if isinstance(eid, str) else None
            if slot is None:
                raise UnknownEpisodeError(detail=f"episode {str(eid)[:40]!r} not found")
            slot.last_used = now
            self._slots.move_to_end(eid)
            return slot

    def remove(self, eid: str) -> bool:
        with self._lock:
            return self._slots.pop(eid, None) is not None

    def __len__(self) -> int:
        with self._lock:
            self._purge(self.clock())
            return len(self._slots)


class ZoomService:
    """Images, episodes and zoom reads with timeouts, a concurrency limit and caps (transport-agnostic)."""

    def __init__(self, cfg: ServeConfig, store: Any | None = None):
        from tools.security import resolve_under_roots, sniff_driver

        self.cfg = cfg
        self.zcfg = cfg.zoom_config()
        self.store = store if store is not None else build_store(cfg)
        # Defence in depth beside the store's own root check: every served file must still resolve under
        # the roots and start with TIFF/PNG/JPEG magic bytes; others are refused (logged, then "unknown").
        self.served: dict[str, str] = {}
        self.refused: dict[str, str] = {}
        roots = cfg.roots() or [str(r) for r in getattr(self.store, "roots", [])]
        for image_id in self.store.ids():
            try:
                real = resolve_under_roots(self.store.path(image_id), roots)
                self.served[image_id] = sniff_driver(real)
            except ToolError as e:
                self.refused[image_id] = str(e)
                log.warning("refusing to serve %r: %s", image_id, e)
        self.episodes = EpisodeRegistry(cfg.max_episodes, cfg.episode_ttl_s,
                                        max_per_owner=cfg.max_episodes_per_client)
        self.pool = concurrent.futures.ThreadPoolExecutor(cfg.read_threads, thread_name_prefix="kz-read")
        self._sem: asyncio.Semaphore | None = None
        self._sem_loop: asyncio.AbstractEventLoop | None = None
        self.inflight = 0
        self.n_timeouts = 0
        self.n_busy = 0

    # -- plumbing ---------------------------------------------------------------------------------------
    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._sem is None or self._sem_loop is not loop:
            self._sem, self._sem_loop = asyncio.Semaphore(self.cfg.max_concurrency), loop
        return self._sem

    async def run_read(self, fn: Callable[[], T]) -> T:
        """Run blocking read work in the pool under the concurrency limit and the request timeout."""
        from tools.security import gdal_env

        sem = self._semaphore()
        try:
            await asyncio.wait_for(sem.acquire(), timeout=self.cfg.queue_timeout_s)
        except TimeoutError:
            self.n_busy += 1
            raise ServerBusyError(detail=f"{self.cfg.max_concurrency} reads in flight") from None
        self.inflight += 1

        def work() -> T:
            with gdal_env():
                return fn()

        fut = asyncio.get_running_loop().run_in_executor(self.pool, work)

        def release(_: Any) -> None:  # the slot frees when the thread ends, not when the caller gives up
            self.inflight -= 1
            sem.release()

        fut.add_done_callback(release)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout=self.cfg.request_timeout_s)
        except TimeoutError:
            self.n_timeouts += 1
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # swallow the late result/error
            raise E.ToolTimeoutError(detail=f"read exceeded {self.cfg.request_timeout_s}s") from None

    def check_id(self, image_id: Any) -> str:
        """An id that names a served image, else UnknownImageError (never reveals why)."""
        if not isinstance(image_id, str) or len(image_id) > self.cfg.max_id_length or image_id not in self.served:
            raise E.UnknownImageError(detail=f"image id {str(image_id)[:80]!r} not served")
        return image_id

    def check_format(self, fmt: Any) -> str:
        if fmt not in FORMATS:
            raise E.BadBoxError(f"format must be one of {', '.join(FORMATS)}.")
        return fmt

    def _read_guard(self, image_id: str, fn: Callable[[], T]) -> T:
        """Map low-level read failures of a served file to the scrubbed UnreadableImageError."""
        try:
            return fn()
        except ToolError:
            raise
        except (OverflowError, RecursionError) as e:  # numbers/nesting from the request, not the file
            raise E.BadBoxError(detail=f"{type(e).__name__} on {image_id}") from None
        except (OSError, ValueError, RuntimeError, MemoryError) as e:
            if isinstance(e, (ValueError,)) and "bbox" in str(e).lower():
                raise E.BadBoxError(detail=str(e)) from e
            log.warning("read of %r failed: %r", image_id, e)
            raise E.UnreadableImageError(detail=f"{image_id}: {e!r}") from e
        except Exception as e:  # noqa: BLE001 - rasterio raises its own hierarchy; never a 500 for a file
            log.exception("read of %r failed: %r", image_id, e)  # full trace in the log, scrubbed answer
            raise E.UnreadableImageError(detail=f"{image_id}: {e!r}") from e

    # -- images ---------------------------------------------------------------------------------------
    def list_images(self, offset: int = 0, limit: int | None = None) -> dict[str, Any]:
        ids = sorted(self.served)
        limit = self.cfg.max_list if limit is None else max(0, min(int(limit), self.cfg.max_list))
        offset = max(0, int(offset))
        return {"images": ids[offset:offset + limit], "total": len(ids), "offset": offset, "limit": limit}

    async def image_info(self, image_id: str) -> dict[str, Any]:
        image_id = self.check_id(image_id)
        info = await self.run_read(lambda: self._read_guard(image_id, lambda: self.store.info(image_id)))
        d = info.to_dict() if hasattr(info, "to_dict") else dataclasses.asdict(info)
        d.pop("path", None)  # never reveal paths
        d.pop("meta", None)
        d["bands"] = d.get("count")
        return _finite_json(d)

    def tools(self) -> dict[str, Any]:
        from tools.protocol import system_prompt, zoom_tool_schema

        # strict form: OpenAI strict function calling accepts it as is (same tool, same semantics)
        return {"tools": [zoom_tool_schema(self.cfg.frame, strict=True)], "frame": self.cfg.frame,
                "system_prompt": system_prompt(self.cfg.frame), "max_turns": self.cfg.max_turns}

    # -- episodes -------------------------------------------------------------------------------------
    def _need_episodes(self) -> None:
        if self.cfg.stateless_only:
            raise E.LimitError("Episodes are disabled on this server (stateless_only); use /zoom.")

    async def start_episode(self, image_ids: Any, fmt: str = "json", owner: str = "") -> dict[str, Any]:
        from tools.protocol import Episode

        self._need_episodes()
        fmt = self.check_format(fmt)
        if not isinstance(image_ids, list) or not image_ids:
            raise E.ToolCallParseError("image_ids must be a non-empty list of image ids.")
        if len(image_ids) > self.cfg.max_images_per_episode:
            raise E.LimitError(f"At most {self.cfg.max_images_per_episode} images per episode.")
        ids = [self.check_id(i) for i in image_ids]

        def make() -> tuple[Any, list[dict[str, Any]]]:
            ep = self._read_guard(ids[0], lambda: Episode(self.store, ids, self.zcfg))
            obs = self._read_guard(ids[0], ep.initial_observations)
            return ep, [observation_payload(o, fmt, self.cfg) for o in obs]

        ep, payloads = await self.run_read(make)
        eid = self.episodes.add(ep, ids, owner)
        return {"episode_id": eid, "frame": self.cfg.frame, "max_turns": self.cfg.max_turns,
                "expires_after_idle_s": self.cfg.episode_ttl_s, "observations": _finite_json(payloads)}

    async def episode_zoom(self, eid: str, bbox: Any, source: Any = "image_0",
                           fmt: str = "json") -> tuple[dict[str, Any], bytes | None]:
        """zoom_in on an episode; returns (observation payload, image bytes or None for json)."""
        self._need_episodes()
        fmt = self.check_format(fmt)
        slot = self.episodes.get(eid)
        if not isinstance(source, str) or len(source) > 64:
            raise E.UnknownSourceError(detail=f"bad source {str(source)[:64]!r}")

        def work() -> tuple[dict[str, Any], bytes | None]:
            if not slot.lock.acquire(timeout=self.cfg.request_timeout_s):
                raise E.ToolTimeoutError(detail="episode busy")
            try:
                obs = self._read_guard(slot.image_ids[0], lambda: slot.episode.zoom_in(bbox, source))
            finally:
                slot.lock.release()
            data = encode_image(obs.image, "png" if fmt == "json" else fmt, self.cfg)
            return observation_payload(obs, fmt, self.cfg, data), (None if fmt == "json" else data)

        payload, data = await self.run_read(work)
        return _finite_json(payload), data

    async def episode_call(self, eid: str, name: Any = None, arguments: Any = None,
                           text: Any = None) -> dict[str, Any]:
        """Execute one tool call as in training: errors come back as the text the model would see.

        `arguments` may be an object or the JSON string of an OpenAI tool call; a malformed string is the
        model's mistake and comes back as error text, like a malformed `text`."""
        from tools.protocol import ToolCall, parse_arguments, parse_turn

        self._need_episodes()
        slot = self.episodes.get(eid)
        if text is not None:
            if not isinstance(text, str):
                raise E.ToolCallParseError()
            parsed = parse_turn(text)
            if parsed.error is not None:
                return {"text": parsed.error.model_message(), "error": public_error(parsed.error),
                        "observation": None}
            if parsed.tool_call is None:
                return {"text": E.ToolCallParseError().model_message(),
                        "error": public_error(E.ToolCallParseError()), "observation": None}
            call = parsed.tool_call
        else:
            if not isinstance(name, str) or not isinstance(arguments, (dict, str)):
                raise E.ToolCallParseError()
            try:
                args = parse_arguments(arguments)
            except E.ToolCallParseError as e:
                return {"text": e.model_message(), "error": public_error(e), "observation": None}
            call = ToolCall(name=name, arguments=args)

        def work() -> dict[str, Any]:
            if not slot.lock.acquire(timeout=self.cfg.request_timeout_s):
                raise E.ToolTimeoutError(detail="episode busy")
            try:
                res = slot.episode.execute(call)
            finally:
                slot.lock.release()
            out: dict[str, Any] = {"text": res.text, "error": public_error(res.error) if res.error else None,
                                   "observation": None}
            if res.observation is not None:
                out["observation"] = observation_payload(res.observation, "json", self.cfg)
            return out

        return _finite_json(await self.run_read(work))

    def episode_state(self, eid: str) -> dict[str, Any]:
        self._need_episodes()
        slot = self.episodes.get(eid)
        ep = slot.episode
        return _finite_json({"episode_id": eid, "image_ids": slot.image_ids, "n_calls": ep.n_calls,
                             "n_errors": ep.n_errors, "observations": [o.to_dict() for o in ep.observations.values()]})

    async def episode_observation(self, eid: str, name: Any, fmt: str) -> tuple[dict[str, Any], bytes | None]:
        self._need_episodes()
        fmt = self.check_format(fmt)
        slot = self.episodes.get(eid)
        obs = slot.episode.observations.get(name) if isinstance(name, str) else None
        if obs is None:
            raise E.UnknownSourceError(detail=f"no observation {str(name)[:64]!r}")

        def work() -> tuple[dict[str, Any], bytes | None]:
            data = encode_image(obs.image, "png" if fmt == "json" else fmt, self.cfg)
            return observation_payload(obs, fmt, self.cfg, data), (None if fmt == "json" else data)

        payload, data = await self.run_read(work)
        return _finite_json(payload), data

    def end_episode(self, eid: str) -> dict[str, Any]:
        self._need_episodes()
        if not self.episodes.remove(eid):
            raise UnknownEpisodeError()
        return {"episode_id": eid, "ended": True}

    # -- stateless zoom -------------------------------------------------------------------------------
    def _to_native(self, info: Any, box: tuple[float, float, float, float], box_crs: str) -> tuple[float, ...]:
        if box_crs == "native":
            return box
        if info.transform is None or info.crs is None:
            raise E.BadBoxError("This image has no georeference; give a native pixel box.")
        from rasterio.transform import Affine

        x0, y0, x1, y1 = box
        if box_crs == "lonlat":
            from tools.zoom import lonlat_box_to_native

            return lonlat_box_to_native(box, info.crs, info.transform, (info.width, info.height))
        inv = ~Affine(*info.transform)
        pts = [inv @ (x, y) for x in (x0, x1) for y in (y0, y1)]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        nat = (min(xs), min(ys), max(xs), max(ys))
        if not all(math.isfinite(v) for v in nat):
            raise E.BadBoxError()
        return nat

    async def zoom(self, image_id: Any, bbox: Any, box_crs: str = "native", max_pixels: Any = None,
                   fmt: str = "json") -> tuple[dict[str, Any], bytes | None]:
        """Stateless zoom: native-pixel / image-CRS / lon-lat box of an image id → one observation."""
        from tools.zoom import check_box, read_region

        fmt = self.check_format(fmt)
        image_id = self.check_id(image_id)
        if box_crs not in ("native", "crs", "lonlat"):
            raise E.BadBoxError("box_crs must be native, crs or lonlat.")
        box = check_box(bbox, wrap_x=box_crs == "lonlat")  # a lon/lat box may cross the antimeridian
        zcfg = self.zcfg
        if max_pixels is not None:
            if isinstance(max_pixels, bool) or not isinstance(max_pixels, int):
                raise E.LimitError("max_pixels must be an integer.")
            if not self.zcfg.min_pixels <= max_pixels <= self.cfg.max_output_pixels:
                raise E.LimitError(
                    f"max_pixels must be between {self.zcfg.min_pixels} and {self.cfg.max_output_pixels}."
                )
            zcfg = dataclasses.replace(self.zcfg, max_pixels=int(max_pixels))

        def work() -> tuple[dict[str, Any], bytes | None]:
            info = self._read_guard(image_id, lambda: self.store.info(image_id))
            native = self._to_native(info, box, box_crs)
            obs = self._read_guard(image_id, lambda: read_region(self.store, image_id, native, zcfg, name="obs_1"))
            data = encode_image(obs.image, "png" if fmt == "json" else fmt, self.cfg)
            return observation_payload(obs, fmt, self.cfg, data), (None if fmt == "json" else data)

        payload, data = await self.run_read(work)
        return _finite_json(payload), data

    def health(self) -> dict[str, Any]:
        from tools.security import lockdown_report

        rep = lockdown_report()
        skipped = len(getattr(self.store, "manifest_problems", []))
        return {"status": "ok", "images": len(self.served), "refused_images": len(self.refused) + skipped,
                "episodes": len(self.episodes), "inflight": self.inflight, "timeouts": self.n_timeouts,
                "busy_rejections": self.n_busy, "gdal_drivers_locked": bool(rep and rep.drivers_locked)}

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _register_skipping(store: Any, cfg: ServeConfig) -> list[str]:
    """Register the manifest line by line and the folders file by file, skipping bad entries (manifest_errors:
    skip); returns one 'where: why' line per skipped entry (also logged)."""
    from tools.store import DEFAULT_PATTERNS

    problems: list[str] = []
    entries: list[tuple[str, Any, Any]] = []  # (where, id, path)
    if cfg.manifest:
        mpath = Path(cfg.manifest)
        try:
            lines = mpath.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise E.UnreadableImageError("Cannot read the manifest.", detail=f"{mpath}: {e}") from e
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                entries.append((f"{mpath.name}:{i}", str(d["id"]), mpath.parent / d["path"]))
            except (ValueError, RecursionError, KeyError, TypeError) as e:
                problems.append(f"{mpath.name}:{i}: not a {{\"id\", \"path\"}} JSON object ({type(e).__name__})")
    for folder in cfg.image_dirs:
        files = sorted({f for pat in DEFAULT_PATTERNS for f in Path(folder).glob(pat)})
        entries += [(str(f), f.stem, f) for f in files]
    for where, image_id, path in entries:
        try:
            store.register(image_id, path)
        except (ToolError, OSError, ValueError) as e:
            problems.append(f"{where}: {e}"[:300])
    return problems


def build_store(cfg: ServeConfig) -> Any:
    """The ImageStore of a config: manifest and/or folders, under the allowed roots. With
    `manifest_errors: skip` bad entries are skipped and listed in `store.manifest_problems`."""
    from tools.store import ImageStore

    store = ImageStore(cfg.roots(), max_open=cfg.store_max_open)
    if cfg.manifest_errors == "skip":
        store.manifest_problems = _register_skipping(store, cfg)
        for p in store.manifest_problems:
            log.warning("skipped image entry %s", p)
        if not store.ids():
            from pipeline.core.errors import ConfigError

            raise ConfigError("No image could be registered: " + "; ".join(store.manifest_problems[:5]))
        return store
    from pipeline.core.errors import ConfigError

    try:
        if cfg.manifest:
            store.register_manifest(cfg.manifest)
        for d in cfg.image_dirs:
            store.register_folder(d)
    except (ToolError, ValueError, RecursionError, OSError) as e:  # ValueError: a non-UTF-8 manifest
        raise ConfigError(f"cannot register the images: {str(e)[:300]}; fix that entry, or set "
                          "manifest_errors: skip to serve the others") from None
    if not store.ids():
        where = " and ".join(x for x in [cfg.manifest and f"manifest {cfg.manifest}",
                                         cfg.image_dirs and f"image_dirs {cfg.image_dirs}"] if x)
        raise ConfigError(f"nothing to serve: {where} list no images; point them at images.jsonl lines "
                          '{"id", "path"} or folders with .tif/.png/.jpg files')
    return store


# -- the HTTP app -------------------------------------------------------------------------------------
Fmt = Literal["json", "png", "jpeg"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StartEpisode(_Model):
    image_ids: list[str] = Field(..., description="Ids from GET /images (1..max_images_per_episode).")
    format: Literal["json"] = Field("json", description="Observations come back as JSON with base64 PNG.")

class ZoomIn(_Model):
    bbox: list[Any] = Field(..., description="[x0, y0, x1, y1] in the frame of `source` as shown.")
    source: str = Field("image_0", description="Observation the box refers to: image_k or obs_N.")
    format: Fmt = Field("json", description="json (metadata + base64 PNG) or png/jpeg bytes.")

class ToolCallBody(_Model):
    name: str | None = Field(None, description="Tool name (zoom_in).")
    arguments: dict[str, Any] | str | None = Field(
        None, description="Tool arguments {bbox, source}, as an object or as the JSON string OpenAI tool calls carry.")
    text: str | None = Field(None, description="Or the raw model turn containing one <tool_call>.")

class StatelessZoom(_Model):
    image_id: str = Field(..., description="Image id from GET /images.")
    bbox: list[Any] = Field(..., description="[x0, y0, x1, y1] (native pixels, image CRS or lon/lat).")
    box_crs: Literal["native", "crs", "lonlat"] = Field("native", description="Units of bbox.")
    max_pixels: int | None = Field(None, description="Output pixel budget (<= max_output_pixels).")
    format: Fmt = Field("json", description="json (metadata + base64 PNG) or png/jpeg bytes.")


class _BodyLimit:
    """ASGI middleware: refuse request bodies above `limit` bytes with 413 (declared or streamed)."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, int(limit)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    n = int(v)
                except ValueError:
                    n = self.limit + 1
                if n > self.limit:
                    return await _send_json(send, 413, public_error(RequestTooLargeError()))
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            msg = await receive()
            if msg.get("type") == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise RequestTooLargeError(detail=f"body over {self.limit} bytes")
            return msg

        return await self.app(scope, limited_receive, send)


async def _send_json(send: Callable, status: int, body: dict, headers: list | None = None) -> None:
    raw = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": raw})


def _host_name(value: str) -> str:
    """The host part of a Host header value, lower case, without port or IPv6 brackets."""
    v = value.strip().lower()
    if v.startswith("["):
        return v[1:v.find("]")] if "]" in v else v
    return v.rsplit(":", 1)[0] if v.count(":") == 1 else v


class _Guard:
    """ASGI middleware in front of every HTTP app (REST and MCP): refuses, before any routing or body read,

    - paths with control characters (a trailing newline would otherwise match a route: regex `$` matches
      before a final newline) → 404;
    - a Host header outside the allow-list (DNS rebinding) → 421;
    - a missing or wrong bearer token when one is configured → 401 (constant-time comparison).
    """

    def __init__(self, app: Any, token: str | None, hosts: set[str] | None):
        self.app, self.hosts = app, hosts
        self.token = token.encode() if token else None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "websocket":  # no websocket endpoints: refuse the handshake
            return await send({"type": "websocket.close", "code": 1008})
        if scope["type"] != "http":  # lifespan
            return await self.app(scope, receive, send)
        path = scope.get("path", "") + scope.get("raw_path", b"").decode("latin-1")
        if any(ord(c) < 32 or ord(c) == 127 for c in path):
            return await _send_json(send, 404, {"error": "HTTPError", "message": "Not found."})
        headers = dict(scope.get("headers") or [])
        if self.hosts is not None:
            host = headers.get(b"host", b"").decode("latin-1")
            if _host_name(host) not in self.hosts:
                log.info("refused Host header %r", host[:100])
                return await _send_json(send, 421, public_error(E.HostNotAllowedError()))
        if self.token is not None:
            auth = headers.get(b"authorization", b"")
            scheme, _, given = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(given.strip(), self.token):
                return await _send_json(send, 401, public_error(E.UnauthorizedError()),
                                        [(b"www-authenticate", b'Bearer realm="knowzoom"')])
        return await self.app(scope, receive, send)


def guard_app(app: Any, cfg: ServeConfig) -> Any:
    """Wrap an ASGI app in the token / Host / path guard of `cfg` (the REST app and the MCP HTTP app)."""
    return _Guard(app, cfg.token(), cfg.host_allowlist())


def client_key(request: Request) -> str:
    """Who a request comes from, for per-client episode quotas: the peer address (behind a proxy every
    client shares the proxy's address; see SECURITY.md)."""
    return request.client.host if request.client else ""


def create_app(cfg: ServeConfig, store: Any | None = None) -> Any:
    """The FastAPI app (OpenAPI docs at /docs). Tests pass a store; servers build it from the config."""
    svc = ZoomService(cfg, store)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any):
        yield
        svc.close()

    cap = cfg.max_response_bytes

    class CappedJSON(JSONResponse):
        """JSON body refused (422) above max_response_bytes: the cap holds for the whole body, not only the
        image inside it (base64 makes that 4/3 larger)."""

        def render(self, content: Any) -> bytes:
            raw = super().render(content)
            if len(raw) > cap:
                raise E.LimitError(f"Response exceeds the {cap}-byte cap; ask for fewer pixels, fewer images or "
                                   "png/jpeg bytes.", detail=f"{len(raw)} bytes")
            return raw

    app = FastAPI(
        lifespan=lifespan,
        default_response_class=CappedJSON,
        redirect_slashes=False,  # a slash redirect would be built from the Host header

        title="KnowZoom zoom tool",
        version="1",
        description="The zoom_in tool of KnowZoom with the training semantics. Images are addressed by id only.",
    )
    app.state.service = svc

    def image_response(payload: dict[str, Any], data: bytes | None, fmt: str) -> Response:
        if data is None:
            return CappedJSON(payload)
        meta = json.dumps(payload, separators=(",", ":"), ensure_ascii=True)
        return Response(data, media_type=MIME[fmt], headers={"X-KnowZoom-Observation": meta})

    @app.exception_handler(ToolError)
    async def _tool_error(request: Request, exc: ToolError) -> JSONResponse:
        status = status_of(exc)
        log.info("%s %s -> %d %s", request.method, request.url.path, status, exc)
        headers = {"Retry-After": "1"} if status in (503, 429) else None
        return JSONResponse(public_error(exc), status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        where = sorted({".".join(str(p) for p in e.get("loc", ())) for e in exc.errors()})[:8]
        return JSONResponse({"error": "RequestValidationError", "message": f"Invalid request fields: {where}"},
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, ToolError):  # e.g. a streamed body over the cap, seen while parsing
            return JSONResponse(public_error(exc.__cause__), status_code=status_of(exc.__cause__))
        msg = "Not found." if exc.status_code == 404 else str(exc.detail)[:200]
        return JSONResponse({"error": "HTTPError", "message": msg}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:  # a bug, never input
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": "InternalError", "message": "Internal error."}, status_code=500)

    @app.get("/health", summary="Liveness, counts and the GDAL lock-down state")
    async def health() -> dict[str, Any]:
        return svc.health()

    @app.get("/images", summary="List served image ids")
    async def images(offset: int = Query(0, ge=0, le=10**9), limit: int = Query(cfg.max_list, ge=0)) -> dict:
        return svc.list_images(offset, limit)

    @app.get("/images/{image_id:path}", summary="Image info: size, bands, dtype, CRS, bounds, overviews")
    async def image_info(image_id: str) -> dict:
        return await svc.image_info(image_id)

    @app.get("/tools", summary="The zoom tool in OpenAI function format, the system prompt and frame")
    async def tools() -> dict:
        return svc.tools()

    @app.post("/episodes", summary="Start an episode: returns the overview observations (image_k)")
    async def start_episode(request: Request, body: StartEpisode = Body(...)) -> dict:
        return await svc.start_episode(body.image_ids, body.format, owner=client_key(request))

    @app.get("/episodes/{episode_id}", summary="Episode state: observations, calls, errors")
    async def episode(episode_id: str) -> dict:
        return svc.episode_state(episode_id)

    @app.post("/episodes/{episode_id}/zoom_in", summary="zoom_in(bbox, source) on an episode, as in training")
    async def zoom_in(episode_id: str, body: ZoomIn = Body(...)) -> Response:
        payload, data = await svc.episode_zoom(episode_id, body.bbox, body.source, body.format)
        return image_response(payload, data, body.format)

    @app.post("/episodes/{episode_id}/call", summary="Execute a tool call; errors come back as model-facing text")
    async def call(episode_id: str, body: ToolCallBody = Body(...)) -> dict:
        return await svc.episode_call(episode_id, body.name, body.arguments, body.text)

    @app.get("/episodes/{episode_id}/observations/{name}", summary="One observation's image")
    async def observation(episode_id: str, name: str, format: Fmt = Query("png")) -> Response:  # noqa: A002
        payload, data = await svc.episode_observation(episode_id, name, format)
        return image_response(payload, data, format)

    @app.delete("/episodes/{episode_id}", summary="End an episode")
    async def end_episode(episode_id: str) -> dict:
        return svc.end_episode(episode_id)

    @app.post("/zoom", summary="Stateless zoom: image id + native / CRS / lon-lat box")
    async def zoom(body: StatelessZoom = Body(...)) -> Response:
        payload, data = await svc.zoom(body.image_id, body.bbox, body.box_crs, body.max_pixels, body.format)
        return image_response(payload, data, body.format)

    app.add_middleware(_BodyLimit, limit=cfg.max_request_bytes)
    app.add_middleware(_Guard, token=cfg.token(), hosts=cfg.host_allowlist())  # outermost: before any body
    return app


# -- entry points (the serve-tools stage itself, which also starts the MCP transports, is tools.serve) -----
_CFG_ENV = "KNOWZOOM_SERVE_CONFIG"


def app_from_env() -> Any:
    """uvicorn factory for worker processes: config JSON from the environment, lock-down first."""
    import os

    from pipeline.core.config import config_from_dict
    from tools.security import apply_gdal_lockdown

    cfg = config_from_dict(ServeConfig, json.loads(os.environ[_CFG_ENV]), source=_CFG_ENV)
    if cfg.gdal_lockdown:
        apply_gdal_lockdown(cfg.gdal_cache_mb)
    return create_app(cfg)


def warn_exposure(cfg: ServeConfig) -> list[str]:
    """Log (at WARNING, on stderr) how exposed this server is; returns the warnings for tests."""
    out: list[str] = []
    if cfg.transport == "mcp-stdio":
        return out
    if not is_loopback(cfg.host):
        if cfg.token() is None:
            out.append(f"SERVING WITHOUT AUTHENTICATION ON {cfg.host}:{cfg.port}: anyone who can reach this "
                       f"address can read every served image and use every read slot. Export {cfg.token_env} "
                       "or keep an authenticating proxy in front (allow_unauthenticated_remote is set).")
        if cfg.host_allowlist() is None:
            out.append("Any Host header is accepted (bound to every interface); set allowed_hosts to the names "
                       "clients use.")
    for w in out:
        log.warning("%s", w)
    return out


__all__ = [
    "ServeConfig", "ZoomService", "EpisodeRegistry", "create_app", "build_store", "ERROR_STATUS",
    "error_status_table", "status_of", "public_error", "encode_image", "UnknownEpisodeError",
    "ServerBusyError", "RequestTooLargeError",
]
