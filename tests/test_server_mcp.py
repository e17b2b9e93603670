"""The MCP server: list + call in-process, and over stdio through the `knowzoom serve-tools` command."""

from __future__ import annotations

import base64
import io
import json
import os
import sys
from pathlib import Path

import anyio
import pytest
import yaml
from PIL import Image
from test_server_api import make_cfg, make_server_images

pytest.importorskip("mcp")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_server_images(tmp_path_factory.mktemp("mcp"))


def _img(item) -> Image.Image:
    """The PIL image of an MCP image content item (its `data` is base64 PNG)."""
    assert item.type == "image" and item.mime_type == "image/png"
    return Image.open(io.BytesIO(base64.b64decode(item.data)))


async def _session(client) -> dict:
    """list + the training zoom flow + errors through an MCP client; returns facts to assert on."""
    out: dict = {}
    tools = await client.list_tools()
    out["tools"] = {t.name: t for t in tools.tools}
    imgs = await client.call_tool("list_images", {})
    out["images"] = json.loads(imgs.content[0].text)["images"]
    start = await client.call_tool("start_episode", {"image_ids": ["scene_a"]})
    out["overview"] = _img(start.content[0]).size
    body = json.loads(start.content[-1].text)
    eid = body["episode_id"]
    z = await client.call_tool("zoom_in", {"episode_id": eid, "bbox": [10, 10, 60, 60], "source": "image_0"})
    out["zoom_error"] = z.is_error
    out["zoom_size"] = _img(z.content[0]).size
    out["zoom_text"] = z.content[1].text
    out["zoom_meta"] = json.loads(z.content[2].text)
    bad = await client.call_tool("zoom_in", {"episode_id": eid, "bbox": [60, 60, 10, 10]})
    out["bad"] = (bad.is_error, bad.content[0].text, json.loads(bad.content[1].text)["error"])
    unk = await client.call_tool("zoom_region", {"image_id": "corrupt", "bbox": [0, 0, 10, 10]})
    out["unreadable"] = (unk.is_error, json.loads(unk.content[1].text))
    reg = await client.call_tool("zoom_region", {"image_id": "scene_b", "bbox": [0, 0, 300, 300]})
    out["region"] = (reg.is_error, _img(reg.content[0]).size)
    return out


def _check(out: dict) -> None:
    assert set(out["tools"]) == {"list_images", "start_episode", "zoom_in", "end_episode", "zoom_region"}
    zs = out["tools"]["zoom_in"].input_schema
    assert zs["required"] == ["episode_id", "bbox"] and zs["properties"]["bbox"]["maxItems"] == 4
    assert out["images"] == ["corrupt", "plain", "scene_a", "scene_b"]
    w, h = out["overview"]
    assert w * h <= 50176 and w % 28 == 0
    assert out["zoom_error"] is False and out["zoom_text"].startswith("obs_1: zoom of image_0")
    assert tuple(out["zoom_meta"]["shown_size"]) == out["zoom_size"]
    assert out["bad"] == (True, out["bad"][1], "BadBoxError") and out["bad"][1].startswith("Error:")
    assert out["unreadable"] == (True, {"error": "UnknownImageError", "message": "Unknown image."})
    assert out["region"][0] is False and out["region"][1][0] * out["region"][1][1] <= 50176


def test_mcp_in_process_list_and_call(manifest: Path) -> None:
    from mcp import Client

    from tools.server.mcp import create_mcp_server

    server = create_mcp_server(make_cfg(manifest))

    async def go() -> dict:
        async with Client(server) as client:
            return await _session(client)

    _check(anyio.run(go))


def test_mcp_over_stdio_via_cli(manifest: Path, tmp_path: Path) -> None:
    from mcp import Client, StdioServerParameters

    cfg = {"manifest": str(manifest), "output_dir": str(tmp_path / "out"), "transport": "mcp-stdio",
           "log_level": "warning"}
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "KNOWZOOM_LOG": "WARNING"}
    params = StdioServerParameters(command=sys.executable, env=env,
                                   args=["-m", "pipeline", "serve-tools", "--config", str(tmp_path / "serve.yaml")])

    async def go() -> dict:
        with anyio.fail_after(60):
            async with Client(params) as client:
                return await _session(client)

    _check(anyio.run(go))
