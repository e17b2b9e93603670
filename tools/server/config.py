"""Config of `knowzoom serve-tools` (`ServeConfig`: images, zoom semantics, every server limit) and how exposed
a config leaves the server (`is_loopback`, `warn_exposure`)."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.config import StageConfig, hfield
from tools.server.encoding import PNG_ENCODERS, isal_zlib

if TYPE_CHECKING:
    from tools.zoom import ZoomConfig

log = logging.getLogger("knowzoom.server")

TRANSPORTS = ("http", "mcp-http", "mcp-stdio")


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

    def zoom_config(self) -> ZoomConfig:
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


__all__ = ["ServeConfig", "TRANSPORTS", "is_loopback", "warn_exposure"]
