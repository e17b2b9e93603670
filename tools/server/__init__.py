"""The zoom tool served to agents (`knowzoom serve-tools`): a REST API (FastAPI) and an MCP server.

One module per concern; each imports only the ones listed above it (tests/test_architecture.py checks that
no two of them import each other):

- `encoding`: wire formats: PNG/JPEG bytes, observation payloads, tool error → HTTP status and public body;
- `config`: `ServeConfig` (every limit a named field) and how exposed a config leaves the server;
- `service`: `ZoomService` (images, episodes, reads under a timeout and a concurrency limit) and the store;
- `app`: the FastAPI app, the ASGI guards and uvicorn's worker factory;
- `mcp`: the same service as MCP tools (stdio or streamable HTTP behind the same guard).

The stage entry that picks a transport and starts uvicorn is `tools.serve`. This package exports nothing
itself: import from the module that owns a name.
"""
