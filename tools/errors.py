"""Errors of the tools package family: one root, typed subclasses, one-line docstrings.

Each error carries the HTTP status the server answers with (`http_status`, the one table) and a short,
safe `model_message()`: the text the model sees as the tool's response (no paths, no stack traces).
"""

from __future__ import annotations

from pipeline.core.errors import KnowZoomError


class ToolError(KnowZoomError):
    """Base exception class of the tools package."""

    http_status: int = 400
    #: default short text shown to the model when the instance has no message of its own
    default_message: str = "The tool call failed."

    def __init__(self, message: str | None = None, *, detail: str | None = None):
        # `message` is safe to show the model; `detail` (paths, exceptions) is for logs only.
        self.message = message or self.default_message
        self.detail = detail
        super().__init__(self.message if detail is None else f"{self.message} ({detail})")

    def model_message(self) -> str:
        """Short, safe text the model sees as the tool response."""
        return f"Error: {self.message}"

    def to_dict(self) -> dict[str, object]:
        """JSON body for the HTTP API: the typed error name and its safe message."""
        return {"error": type(self).__name__, "message": self.message}


class BadBoxError(ToolError):
    """Malformed, NaN, inverted, zero-area or wrong-length box."""

    default_message = "bbox must be 4 finite numbers [x0, y0, x1, y1] with x0 < x1 and y0 < y1."


class BoxOutsideError(ToolError):
    """The box lies entirely outside the observation."""

    default_message = "bbox lies entirely outside the image."


class UnknownSourceError(ToolError):
    """`source` names no observation of this episode."""

    default_message = "Unknown source; use image_0 or an earlier obs_N."


class UnknownImageError(ToolError):
    """The image id is not in the store."""

    http_status = 404
    default_message = "Unknown image."


class UnreadableImageError(ToolError):
    """The image file is corrupt or unreadable (same scrubbed message as an unknown image)."""

    http_status = 404
    default_message = "Unknown image."


class ForbiddenPathError(ToolError):
    """A registered path lies outside the allowed roots (or escapes them through a symlink)."""

    http_status = 403
    default_message = "Forbidden path."


class ToolCallParseError(ToolError):
    """Malformed JSON or missing arguments in a <tool_call>, or a call and an answer in one turn."""

    default_message = 'Malformed tool call; use <tool_call>{"name": "zoom_in", "arguments": {"bbox": [x0, y0, x1, y1], "source": "image_0"}}</tool_call>.'


class UnknownToolError(ToolError):
    """The tool name is not zoom_in."""

    default_message = "Unknown tool; the only tool is zoom_in."


class MultipleToolCallsError(ToolError):
    """More than one <tool_call> in a turn."""

    default_message = "Only one tool call per turn."


class ToolTimeoutError(ToolError):
    """A read exceeded its time limit."""

    http_status = 504
    default_message = "The zoom read timed out."


class LimitError(ToolError):
    """A size, turn, aspect-ratio or pixel cap was exceeded."""

    http_status = 422
    default_message = "A tool limit was exceeded."


# -- raised by the HTTP/MCP server (tools.server)
class UnknownEpisodeError(ToolError):
    """The episode id is unknown, expired or was evicted."""

    http_status = 404
    default_message = "Unknown or expired episode; start a new one."


class ServerBusyError(ToolError):
    """Every read slot is busy (concurrency limit reached); retry later."""

    http_status = 503
    default_message = "Server busy; retry shortly."


class RequestTooLargeError(ToolError):
    """The request body exceeds the configured byte limit."""

    http_status = 413
    default_message = "Request body too large."


class UnauthorizedError(ToolError):
    """The server requires a bearer token and the request has none or a wrong one."""

    http_status = 401
    default_message = "Missing or wrong bearer token; send 'Authorization: Bearer <token>'."


class HostNotAllowedError(ToolError):
    """The Host header names no host this server answers for (DNS-rebinding defence)."""

    http_status = 421
    default_message = "Host header not allowed on this server."


class PrepareFailedError(ToolError):
    """prepare-images could not convert some source files (they are listed; the others were converted)."""

    default_message = "Some images could not be prepared."


__all__ = [
    "ToolError",
    "BadBoxError",
    "BoxOutsideError",
    "UnknownSourceError",
    "UnknownImageError",
    "UnreadableImageError",
    "ForbiddenPathError",
    "ToolCallParseError",
    "UnknownToolError",
    "MultipleToolCallsError",
    "ToolTimeoutError",
    "LimitError",
    "UnknownEpisodeError",
    "ServerBusyError",
    "RequestTooLargeError",
    "UnauthorizedError",
    "HostNotAllowedError",
    "PrepareFailedError",
]
