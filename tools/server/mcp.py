"""The zoom tool as an MCP server (the `mcp` package, low-level `Server`), over stdio or streamable HTTP.

Same service, limits and semantics as the HTTP API (`tools.server.service.ZoomService`). Tools:
`list_images`, `start_episode` (returns the overview images), `zoom_in` (the training tool: `bbox` in the
frame of `source`, plus the `episode_id`), `end_episode`, and a stateless `zoom_region`. A zoom returns an
image content item and a text item (the observation text the model saw in training, then the mapping
metadata as JSON). Tool errors come back as `is_error` results carrying the model-facing message.
"""

from __future__ import annotations

import copy
import json
import logging
from typing import Any

import anyio
import mcp_types as types
from mcp.server.lowlevel import Server

from tools.errors import LimitError, ToolError
from tools.server.config import ServeConfig
from tools.server.encoding import public_error
from tools.server.service import ZoomService

log = logging.getLogger("knowzoom.mcp")

SERVER_NAME = "knowzoom-zoom"


def tool_definitions(cfg: ServeConfig) -> list[types.Tool]:
    """The MCP tools; `zoom_in`'s schema is the training schema plus the episode id."""
    from tools.protocol import TOOL_NAME, zoom_tool_schema

    fn = zoom_tool_schema(cfg.frame)["function"]
    zoom_params = copy.deepcopy(fn["parameters"])
    zoom_params["properties"]["episode_id"] = {"type": "string", "description": "Id returned by start_episode."}
    zoom_params["required"] = ["episode_id", *zoom_params.get("required", [])]
    box = {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4}
    return [
        types.Tool(name="list_images", description="List the ids of the images this server can zoom into.",
                   input_schema={"type": "object", "properties": {
                       "offset": {"type": "integer", "minimum": 0, "default": 0}}}),
        types.Tool(name="start_episode",
                   description="Start a zoom episode on 1..N images; returns their overviews image_0, image_1, ...",
                   input_schema={"type": "object", "required": ["image_ids"], "properties": {
                       "image_ids": {"type": "array", "items": {"type": "string"}, "minItems": 1,
                                     "maxItems": cfg.max_images_per_episode}}}),
        types.Tool(name=TOOL_NAME, description=fn["description"], input_schema=zoom_params),
        types.Tool(name="end_episode", description="End an episode and free its observations.",
                   input_schema={"type": "object", "required": ["episode_id"],
                                 "properties": {"episode_id": {"type": "string"}}}),
        types.Tool(name="zoom_region",
                   description="Stateless zoom: a box of an image id in native pixels, the image CRS or lon/lat.",
                   input_schema={"type": "object", "required": ["image_id", "bbox"], "properties": {
                       "image_id": {"type": "string"}, "bbox": box,
                       "box_crs": {"type": "string", "enum": ["native", "crs", "lonlat"], "default": "native"},
                       "max_pixels": {"type": "integer", "minimum": 1, "maximum": cfg.max_output_pixels}}}),
    ]


def _image_item(payload: dict[str, Any]) -> types.ImageContent:
    img = payload.pop("image")
    return types.ImageContent(type="image", data=img["base64"], mime_type=img["mime"])


def _text(obj: Any) -> types.TextContent:
    return types.TextContent(type="text", text=obj if isinstance(obj, str) else json.dumps(obj))


def _error(err: ToolError) -> types.CallToolResult:
    return types.CallToolResult(content=[_text(err.model_message()), _text(public_error(err))], is_error=True)


def _owner(ctx: Any) -> str:
    """The client an MCP request comes from (its session; one client on stdio), for episode quotas."""
    try:
        sid = ctx.session_id
    except Exception:  # noqa: BLE001 - no connection info (in-process clients)
        sid = None
    return f"mcp:{sid or id(getattr(ctx, 'session', None))}"


def create_mcp_server(cfg: ServeConfig, service: ZoomService | None = None) -> Server:
    """A low-level MCP server bound to a ZoomService (one is built from `cfg` when not given)."""
    from tools.protocol import TOOL_NAME, observation_text

    svc = service if service is not None else ZoomService(cfg)
    tools = tool_definitions(cfg)

    async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=tools)

    async def dispatch(name: str, a: dict[str, Any], owner: str) -> list[Any]:
        if name == "list_images":
            off = a.get("offset", 0)
            return [_text(svc.list_images(off if isinstance(off, int) and not isinstance(off, bool) else 0))]
        if name == "start_episode":
            body = await svc.start_episode(a.get("image_ids"), "json", owner=owner)
            items: list[Any] = []
            for obs in body["observations"]:
                items.append(_image_item(obs))
            items.append(_text(body))
            return items
        if name == TOOL_NAME:
            eid = a.get("episode_id")
            if not isinstance(eid, str):
                from tools.errors import UnknownEpisodeError

                raise UnknownEpisodeError()
            payload, _ = await svc.episode_zoom(eid, a.get("bbox"), a.get("source", "image_0"), "json")
            item = _image_item(payload)
            slot = svc.episodes.get(eid)
            text = observation_text(slot.episode.observations[payload["name"]])
            return [item, _text(text), _text(payload)]
        if name == "end_episode":
            return [_text(svc.end_episode(str(a.get("episode_id"))))]
        if name == "zoom_region":
            payload, _ = await svc.zoom(a.get("image_id"), a.get("bbox"), a.get("box_crs", "native"),
                                        a.get("max_pixels"), "json")
            return [_image_item(payload), _text(payload)]
        from tools.errors import UnknownToolError

        raise UnknownToolError()

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        try:
            content = await dispatch(params.name, dict(params.arguments or {}), _owner(ctx))
            size = sum(len(getattr(c, "data", "") or "") + len(getattr(c, "text", "") or "") for c in content)
            if size > cfg.max_response_bytes:  # the cap holds for the whole result, as for REST bodies
                raise LimitError(f"Result exceeds the {cfg.max_response_bytes}-byte cap; zoom a smaller box.",
                                 detail=f"{size} bytes")
        except ToolError as e:
            log.info("mcp tool %s failed: %s", params.name, e)
            return _error(e)
        except Exception:  # noqa: BLE001 - a bug, never input: logged with its trace, scrubbed for the client
            log.exception("mcp tool %s raised", str(params.name)[:64])
            return _error(ToolError("Internal error."))
        return types.CallToolResult(content=content)

    server: Server = Server(
        SERVER_NAME,
        version="1",
        instructions=svc.tools()["system_prompt"],
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )
    return server


def create_mcp_http_app(cfg: ServeConfig, service: ZoomService | None = None) -> Any:
    """Starlette app serving MCP over streamable HTTP at /mcp (DNS-rebinding protection on loopback)."""
    from tools.server.app import guard_app

    server = create_mcp_server(cfg, service)
    app = server.streamable_http_app(streamable_http_path="/mcp", host=cfg.host,
                                     max_request_body_size=cfg.max_request_bytes)
    return guard_app(app, cfg)  # bearer token, Host allow-list, control characters: as the REST app


class ParseErrorReplies:
    """Read-stream wrapper answering undecodable JSON-RPC lines as JSON-RPC 2.0 specifies: -32700 (parse
    error) for text that is not JSON, -32600 (invalid request) for JSON that is no JSON-RPC message, both
    with `"id": null`. The SDK's stdio transport hands such lines on as exceptions and answers nothing."""

    def __init__(self, inner: Any, write: Any):
        self.inner, self.write, self.n_errors = inner, write, 0

    @property
    def last_context(self) -> Any:
        return getattr(self.inner, "last_context", None)

    async def receive(self) -> Any:
        from mcp.shared.message import SessionMessage

        while True:
            item = await self.inner.receive()
            if not isinstance(item, Exception):
                return item
            self.n_errors += 1
            kinds = {e.get("type", "") for e in item.errors()} if hasattr(item, "errors") else {"json_invalid"}
            code, msg = ((types.PARSE_ERROR, "Parse error") if any(k.startswith("json") for k in kinds)
                         else (types.INVALID_REQUEST, "Invalid Request"))
            log.info("mcp: undecodable message (%s): answered %d", ",".join(sorted(kinds))[:80], code)
            err = types.JSONRPCError(jsonrpc="2.0", id=None, error=types.ErrorData(code=code, message=msg))
            await self.write.send(SessionMessage(err))

    async def aclose(self) -> None:
        await self.inner.aclose()

    def __aiter__(self) -> ParseErrorReplies:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise StopAsyncIteration from None

    async def __aenter__(self) -> ParseErrorReplies:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def run_stdio(cfg: ServeConfig) -> None:
    """Serve MCP over stdin/stdout until the client closes the stream (blocks)."""
    from mcp.server.stdio import stdio_server

    server = create_mcp_server(cfg)

    async def main() -> None:
        async with stdio_server() as (read, write):
            await server.run(ParseErrorReplies(read, write), write, server.create_initialization_options())

    anyio.run(main)


__all__ = ["create_mcp_server", "create_mcp_http_app", "run_stdio", "tool_definitions"]
