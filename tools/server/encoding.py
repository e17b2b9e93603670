"""What goes on the wire: PNG/JPEG bytes of an observation (our own PNG writer: Up filter + ISA-L or zlib
deflate), observation JSON payloads, and the error bodies and HTTP statuses of tool errors (`ERROR_STATUS`:
every typed tool error → one status; unreadable files look exactly like unknown ids)."""

from __future__ import annotations

import base64
import io
import math
import struct
import zlib
from typing import TYPE_CHECKING, Any

import numpy as np

from tools import errors as E
from tools.errors import ToolError

if TYPE_CHECKING:
    from tools.server.config import ServeConfig

FORMATS = ("json", "png", "jpeg")


# -- tool errors → HTTP status and a public JSON body -------------------------------------------------
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
    buf = raw.data  # a memoryview: both deflates take any contiguous buffer, no copy
    idat = isal.compress(buf, _isal_level(level)) if isal is not None else zlib.compress(buf, level)
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


def finite_json(obj: Any) -> Any:
    """Replace non-finite floats (not valid JSON) by None, recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


__all__ = [
    "FORMATS", "MIME", "PNG_ENCODERS", "ERROR_STATUS", "error_status_table", "status_of", "public_error",
    "isal_zlib", "png_bytes", "encode_image", "observation_payload", "finite_json",
]
