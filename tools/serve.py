"""`knowzoom serve-tools`, the stage entry: serve `tools.server.app`'s REST app or `tools.server.mcp`'s MCP server.

Kept apart from the `tools.server` package so the dependency runs one way: the MCP server builds on the
service and the HTTP guard, and only this entry point knows both transports.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from tools.server.app import APP_FACTORY, CONFIG_ENV, create_app
from tools.server.config import ServeConfig, warn_exposure

log = logging.getLogger("knowzoom.server")


def run(cfg: ServeConfig) -> dict[str, Any]:
    """Serve until interrupted (blocks): REST on uvicorn, or MCP over streamable HTTP / stdio."""
    import os

    import uvicorn

    from tools.security import apply_gdal_lockdown

    logging.basicConfig(level=cfg.log_level.upper())
    warn_exposure(cfg)
    if cfg.gdal_lockdown:
        rep = apply_gdal_lockdown(cfg.gdal_cache_mb)
        log.info("GDAL drivers left: %s", rep.remaining)
    if cfg.transport == "mcp-stdio":
        from tools.server.mcp import run_stdio

        run_stdio(cfg)
        return {"transport": cfg.transport}
    if cfg.transport == "mcp-http":
        from tools.server.mcp import create_mcp_http_app

        app: Any = create_mcp_http_app(cfg)
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level.lower(),
                    limit_concurrency=cfg.max_connections)
        return {"transport": cfg.transport, "host": cfg.host, "port": cfg.port}
    if cfg.workers > 1:
        os.environ[CONFIG_ENV] = json.dumps(cfg.to_dict())
        uvicorn.run(APP_FACTORY, factory=True, host=cfg.host, port=cfg.port,
                    workers=cfg.workers, log_level=cfg.log_level.lower(), limit_concurrency=cfg.max_connections)
    else:
        uvicorn.run(create_app(cfg), host=cfg.host, port=cfg.port, log_level=cfg.log_level.lower(),
                    limit_concurrency=cfg.max_connections)
    return {"transport": cfg.transport, "host": cfg.host, "port": cfg.port, "workers": cfg.workers}


__all__ = ["ServeConfig", "run"]
