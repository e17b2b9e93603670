"""The REST app (FastAPI, OpenAPI docs at /docs) over `ZoomService`, the ASGI guards in front of every HTTP
app (bearer token, Host allow-list, control characters, body cap), and uvicorn's worker factory
`app_from_env` (named by the string `APP_FACTORY`, which tools/serve.py hands to uvicorn)."""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
from collections.abc import Callable
from typing import Any, Literal

from fastapi import Body, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from tools import errors as E
from tools.errors import RequestTooLargeError, ToolError
from tools.server.config import ServeConfig
from tools.server.encoding import MIME, public_error, status_of
from tools.server.service import ZoomService

log = logging.getLogger("knowzoom.server")

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


# -- uvicorn's worker factory (the serve-tools stage itself, which also starts the MCP transports, is tools.serve)
CONFIG_ENV = "KNOWZOOM_SERVE_CONFIG"
APP_FACTORY = "tools.server.app:app_from_env"  # uvicorn imports it by this name in each worker


def app_from_env() -> Any:
    """uvicorn factory for worker processes: config JSON from the environment, lock-down first."""
    import os

    from pipeline.core.config import config_from_dict
    from tools.security import apply_gdal_lockdown

    cfg = config_from_dict(ServeConfig, json.loads(os.environ[CONFIG_ENV]), source=CONFIG_ENV)
    if cfg.gdal_lockdown:
        apply_gdal_lockdown(cfg.gdal_cache_mb)
    return create_app(cfg)


__all__ = ["create_app", "guard_app", "client_key", "app_from_env", "APP_FACTORY", "CONFIG_ENV"]
