"""Issue 14 classes against the zoom server: every hostile input gets a typed 4xx (0 × 5xx, counted and
printed), the bearer token and Host allow-list, the response cap on the whole JSON body, per-client
episode fairness, no redirects or newline ids, manifest skip mode, MCP (in process and over stdio with raw
lines), OpenAI string arguments on /call and the strict /tools schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from test_server_api import make_cfg, make_server_images

from tools.server import ServeConfig, create_app

REPO = Path(__file__).resolve().parents[1]
HUGE_INT = "9" * 400  # float() overflows
LONG_INT = "7" * 5000  # over Python's 4300-digit int parsing limit
DEEP = 15_000  # deeper than the interpreter's recursion limit
MID = 900  # parses, but deep enough to break naive recursive code


def deep_list(n: int) -> str:
    return "[" * n + "]" * n


def deep_obj(n: int) -> str:
    return '{"a":' * n + "1" + "}" * n


# raw JSON texts put in place of a field (the body is built as text: json.dumps cannot write these)
HOSTILE_VALUES: dict[str, str] = {
    "huge int": HUGE_INT,
    "negative huge int": "-" + HUGE_INT,
    "5000-digit int": LONG_INT,
    "1e400": "1e400",
    "NaN": "NaN",
    "Infinity": "Infinity",
    "-Infinity": "-Infinity",
    "deep list 15000": deep_list(DEEP),
    "deep object 15000": deep_obj(DEEP),
    "deep list 900": deep_list(MID),
    "deep object 900": deep_obj(MID),
    "lone surrogate": '"\\ud800x"',
    "nul and controls": '"a\\u0000b\\u001b\\n"',
    "huge box": f"[0, 0, {HUGE_INT}, 10]",
    "huge negative box": f"[-{HUGE_INT}, 0, 10, 10]",
    "NaN box": "[NaN, 0, 10, 10]",
    "inf box": "[0, -Infinity, 10, Infinity]",
    "1e400 box": "[0, 0, 1e400, 1e400]",
    "deep box": f"[0, 0, 10, {deep_list(MID)}]",
    "very deep box": f"[0, 0, 10, {deep_list(DEEP)}]",
    "empty object": "{}",
    "null": "null",
    "bool": "true",
    "long string": json.dumps("x" * 30_000),
    "unicode": json.dumps("\u202e\ufeff\U0001f600\u0301"),
}

# endpoint → (method, path template, base body); every field of each body is replaced by every value
ENDPOINTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "zoom": ("POST", "/zoom", {"image_id": "scene_b", "bbox": [0, 0, 100, 100], "box_crs": "native",
                               "max_pixels": 4000, "format": "json"}),
    "start": ("POST", "/episodes", {"image_ids": ["scene_b"], "format": "json"}),
    "zoom_in": ("POST", "/episodes/{eid}/zoom_in", {"bbox": [0, 0, 50, 50], "source": "image_0", "format": "json"}),
    "call": ("POST", "/episodes/{eid}/call", {"name": "zoom_in", "arguments": {"bbox": [0, 0, 50, 50]}}),
    "call_text": ("POST", "/episodes/{eid}/call", {"text": "<tool_call>{}</tool_call>"}),
}


MARK = "@@HOSTILE@@"
# the hostile value inside nested fields too: tool arguments, one box coordinate, the image id list
NESTED: dict[str, tuple[str, str, dict[str, Any]]] = {
    "call.arguments.bbox": ("POST", "/episodes/{eid}/call", {"name": "zoom_in", "arguments": {"bbox": MARK}}),
    "call.arguments.source": ("POST", "/episodes/{eid}/call",
                              {"name": "zoom_in", "arguments": {"bbox": [0, 0, 9, 9], "source": MARK}}),
    "zoom.bbox[2]": ("POST", "/zoom", {"image_id": "scene_b", "bbox": [0, 0, MARK, 10]}),
    "zoom_in.bbox[0]": ("POST", "/episodes/{eid}/zoom_in", {"bbox": [MARK, 0, 10, 10]}),
    "start.image_ids[0]": ("POST", "/episodes", {"image_ids": [MARK]}),
}


def _body_with(base: dict[str, Any], field: str | None, raw: str) -> bytes:
    text = json.dumps(base if field is None else {**base, field: MARK})
    return text.replace(json.dumps(MARK), raw).encode("utf-8", "surrogatepass")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_server_images(tmp_path_factory.mktemp("hard"))


@pytest.fixture(scope="module")
def client(manifest: Path):
    from fastapi.testclient import TestClient

    cfg = make_cfg(manifest, max_episodes=1000, max_episodes_per_client=1000, max_turns=1000,
                   max_request_bytes=200_000)  # so that 15,000-deep bodies reach the parsers
    with TestClient(create_app(cfg), raise_server_exceptions=False) as c:
        yield c


def _typed_4xx_or_ok(r, where: str) -> None:
    assert r.status_code < 500, (where, r.status_code, r.text[:300])
    assert not (300 <= r.status_code < 400), (where, r.status_code, r.headers.get("location"))
    if r.status_code >= 400:
        body = r.json()
        assert set(body) == {"error", "message"} and body["error"] != "InternalError", (where, body)
        assert "Traceback" not in r.text and "/tmp" not in r.text and ".tif" not in r.text, where


def test_hostile_value_at_every_field_is_a_typed_4xx(client) -> None:
    """Every hostile value at every field of every body endpoint: 0 × 5xx (counts printed)."""
    eid = client.post("/episodes", json={"image_ids": ["scene_b"]}).json()["episode_id"]
    statuses: dict[int, int] = {}
    n = 0
    cases = [(f"{name}.{field}", method, path, base, field) for name, (method, path, base) in ENDPOINTS.items()
             for field in base]
    cases += [(name, method, path, base, None) for name, (method, path, base) in NESTED.items()]
    for where, method, path, base, field in cases:
        for label, raw in HOSTILE_VALUES.items():
            r = client.request(method, path.format(eid=eid), content=_body_with(base, field, raw),
                               headers={"content-type": "application/json"})
            _typed_4xx_or_ok(r, f"{where}={label}")
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            n += 1
    n5xx = sum(v for k, v in statuses.items() if k >= 500)
    print(f"\nhostile field values: {n} requests, statuses {dict(sorted(statuses.items()))}, 5xx: {n5xx}")
    assert n5xx == 0 and n >= 400


ODD_ENCODINGS: list[tuple[str, bytes, str]] = [
    ("utf-16 body", json.dumps({"image_id": "scene_b", "bbox": [0, 0, 9, 9]}).encode("utf-16"), "application/json"),
    ("utf-32 body", json.dumps({"image_id": "scene_b", "bbox": [0, 0, 9, 9]}).encode("utf-32"), "application/json"),
    ("BOM + utf-8", b"\xef\xbb\xbf" + json.dumps({"image_id": "scene_b", "bbox": [0, 0, 9, 9]}).encode(),
     "application/json"),
    ("invalid utf-8", b'{"image_id": "\xff\xfe\xc0\xaf", "bbox": [0, 0, 9, 9]}', "application/json"),
    ("overlong utf-8 slash", b'{"image_id": "\xc0\xafetc\xc0\xafpasswd", "bbox": [0, 0, 9, 9]}', "application/json"),
    ("latin-1 id", '{"image_id": "sc\xe8ne", "bbox": [0, 0, 9, 9]}'.encode("latin-1"), "application/json"),
    ("raw NUL bytes", b'{"image_id": "scene_b\x00", "bbox": [0, 0, 9, 9]}', "application/json"),
    ("text/plain json", json.dumps({"image_id": "scene_b", "bbox": [0, 0, 9, 9]}).encode(), "text/plain"),
    ("form body", b"image_id=scene_b&bbox=0,0,9,9", "application/x-www-form-urlencoded"),
    ("multipart junk", b"--x\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--x--", "multipart/form-data; boundary=x"),
    ("charset lie", json.dumps({"image_id": "scene_b", "bbox": [0, 0, 9, 9]}).encode("utf-16-le"),
     "application/json; charset=utf-8"),
    ("empty body", b"", "application/json"),
    ("json scalar", b"5", "application/json"),
    ("json list", b"[1, 2]", "application/json"),
    ("5000-digit top-level", LONG_INT.encode(), "application/json"),
    ("deep top-level", deep_list(DEEP).encode(), "application/json"),
    ("duplicate keys", b'{"image_id": "scene_b", "image_id": "../x", "bbox": [0, 0, 9, 9]}', "application/json"),
]


@pytest.mark.parametrize("case,raw,ctype", ODD_ENCODINGS, ids=[c[0] for c in ODD_ENCODINGS])
def test_odd_encodings_are_4xx(client, case: str, raw: bytes, ctype: str) -> None:
    eid = client.post("/episodes", json={"image_ids": ["scene_b"]}).json()["episode_id"]
    for path in ("/zoom", "/episodes", f"/episodes/{eid}/zoom_in", f"/episodes/{eid}/call"):
        r = client.post(path, content=raw, headers={"content-type": ctype})
        _typed_4xx_or_ok(r, f"{case} {path}")


# -- the named failures of the issue ---------------------------------------------------------------------
def test_huge_integer_box_is_400_everywhere(client) -> None:
    eid = client.post("/episodes", json={"image_ids": ["scene_b"]}).json()["episode_id"]
    box = f"[0, 0, {HUGE_INT}, 10]"
    r = client.post("/zoom", content=f'{{"image_id": "scene_a", "bbox": {box}}}'.encode(),
                    headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "BadBoxError", r.text[:200]
    r = client.post(f"/episodes/{eid}/zoom_in", content=f'{{"bbox": {box}}}'.encode(),
                    headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "BadBoxError", r.text[:200]  # was a misleading 404
    r = client.post(f"/episodes/{eid}/call", content=f'{{"name": "zoom_in", "arguments": {{"bbox": {box}}}}}'.encode(),
                    headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["error"]["error"] == "BadBoxError"
    text = f'<tool_call>{{"name": "zoom_in", "arguments": {{"bbox": {box}}}}}</tool_call>'
    r = client.post(f"/episodes/{eid}/call", json={"text": text})
    assert r.status_code == 200 and r.json()["error"]["error"] == "BadBoxError"


def test_deeply_nested_tool_call_text_is_a_parse_error(client) -> None:
    eid = client.post("/episodes", json={"image_ids": ["scene_b"]}).json()["episode_id"]
    for inner in (deep_list(DEEP), deep_obj(DEEP), f'{{"name": "zoom_in", "arguments": {deep_obj(DEEP)}}}',
                  f'{{"name": "zoom_in", "arguments": {json.dumps(deep_list(DEEP))}}}', LONG_INT):
        r = client.post(f"/episodes/{eid}/call", json={"text": f"<tool_call>{inner}</tool_call>"})
        assert r.status_code == 200, r.text[:200]
        assert r.json()["error"]["error"] == "ToolCallParseError" and r.json()["observation"] is None


def test_call_accepts_openai_string_arguments(client) -> None:
    eid = client.post("/episodes", json={"image_ids": ["scene_b"]}).json()["episode_id"]
    r = client.post(f"/episodes/{eid}/call",
                    json={"name": "zoom_in", "arguments": json.dumps({"bbox": [0, 0, 60, 60], "source": "image_0"})})
    assert r.status_code == 200, r.text[:300]
    body = r.json()
    assert body["error"] is None and body["observation"]["name"] == "obs_1" and body["text"].startswith("obs_1")
    bad = client.post(f"/episodes/{eid}/call", json={"name": "zoom_in", "arguments": '{"bbox": [0, 0,'})
    assert bad.status_code == 200 and bad.json()["error"]["error"] == "ToolCallParseError"
    assert client.post(f"/episodes/{eid}/call", json={"name": "zoom_in", "arguments": "[1, 2]"}).json()[
        "error"]["error"] == "ToolCallParseError"


STRICT_KEYWORDS = {
    "object": {"type", "properties", "required", "additionalProperties", "description"},
    "array": {"type", "items", "minItems", "maxItems", "description"},
    "string": {"type", "enum", "pattern", "format", "description", "const"},
    "number": {"type", "enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
               "description", "const"},
    "integer": {"type", "enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
                "description", "const"},
}


def assert_openai_strict(tool: dict[str, Any]) -> None:
    """OpenAI strict function calling's documented rules: `strict: true`; every object lists all its
    properties in `required` and sets `additionalProperties: false`; only supported keywords (no `default`);
    nesting <= 10 levels; a name of [A-Za-z0-9_-]{1,64}."""
    import re

    assert tool["type"] == "function"
    fn = tool["function"]
    assert fn.get("strict") is True and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", fn["name"])
    assert fn["parameters"]["type"] == "object"

    def walk(s: dict[str, Any], depth: int) -> None:
        assert depth <= 10
        t = s.get("type")
        assert t in STRICT_KEYWORDS, s
        extra = set(s) - STRICT_KEYWORDS[t]
        assert not extra, f"keywords strict mode rejects: {extra}"
        if t == "object":
            assert s.get("additionalProperties") is False and sorted(s["required"]) == sorted(s["properties"])
            for sub in s["properties"].values():
                walk(sub, depth + 1)
        if t == "array":
            walk(s["items"], depth + 1)

    walk(fn["parameters"], 1)


def test_tools_schema_is_openai_strict(client) -> None:
    from tools.protocol import zoom_tool_schema

    tools = client.get("/tools").json()["tools"]
    assert len(tools) == 1
    assert_openai_strict(tools[0])
    loose = zoom_tool_schema("shown_pixels")  # the training schema (prompts, TRL) is unchanged
    with pytest.raises(AssertionError):
        assert_openai_strict(loose)
    for frame in ("shown_pixels", "norm1000", "lonlat"):
        assert_openai_strict(zoom_tool_schema(frame, strict=True))


def test_no_redirect_and_no_newline_ids(client) -> None:
    eid = client.post("/episodes", json={"image_ids": ["scene_b"]}).json()["episode_id"]
    for path in ("/episodes/..%2F", "/episodes/", "/images/", "/zoom/", "/episodes/x/"):
        for method in ("GET", "POST", "DELETE"):
            r = client.request(method, path, headers={"host": "127.0.0.1"}, follow_redirects=False)
            assert r.status_code in (404, 405, 422) and "location" not in r.headers, (method, path, r.status_code)
    for path in ("/images/scene_a%0A", "/images/scene_a%0D", f"/episodes/{eid}%0A", "/images/scene_a%00",
                 "/health%0A"):
        r = client.get(path)
        assert r.status_code == 404, (path, r.status_code, r.text[:100])
    assert client.get("/images/scene_a").status_code == 200 and client.get(f"/episodes/{eid}").status_code == 200


def test_response_cap_holds_for_the_json_body(manifest: Path) -> None:
    from fastapi.testclient import TestClient

    cap = 40_000
    with TestClient(create_app(make_cfg(manifest, max_response_bytes=cap))) as c:
        png = c.post("/zoom", json={"image_id": "scene_a", "bbox": [0, 0, 2400, 1800], "format": "png",
                                    "max_pixels": 20_000})
        as_json = c.post("/zoom", json={"image_id": "scene_a", "bbox": [0, 0, 2400, 1800], "max_pixels": 20_000})
        # the raw PNG fits the cap, its base64 inside JSON (4/3 larger) does not: refused, not sent
        assert png.status_code == 200 and len(png.content) <= cap
        assert 3 * len(png.content) // 4 < cap < 4 * len(png.content) // 3 + 200 or as_json.status_code == 200
        assert as_json.status_code == 422 or len(as_json.content) <= cap
        for _ in range(3):
            r = c.post("/zoom", json={"image_id": "scene_a", "bbox": [0, 0, 2400, 1800], "max_pixels": 40_000})
            assert (r.status_code == 422 and r.json()["error"] == "LimitError") or len(r.content) <= cap
        start = c.post("/episodes", json={"image_ids": ["scene_a"] * 4})
        assert start.status_code == 422 or len(start.content) <= cap
    # a cap too small for any observation: every JSON answer is refused, none exceeds it
    with TestClient(create_app(make_cfg(manifest, max_response_bytes=2_000))) as c:
        r = c.post("/zoom", json={"image_id": "scene_b", "bbox": [0, 0, 300, 300]})
        assert r.status_code == 422 and len(r.content) < 2_000


def test_json_body_over_cap_is_refused_even_when_the_image_fits(manifest: Path) -> None:
    """The old cap checked the image bytes only; pick a cap between the PNG size and its JSON size."""
    from fastapi.testclient import TestClient

    body = {"image_id": "scene_a", "bbox": [0, 0, 2400, 1800], "max_pixels": 20_000}
    with TestClient(create_app(make_cfg(manifest))) as c:
        n_png = len(c.post("/zoom", json={**body, "format": "png"}).content)
        n_json = len(c.post("/zoom", json=body).content)
    assert n_json > n_png * 4 // 3
    cap = (n_png + n_json) // 2
    with TestClient(create_app(make_cfg(manifest, max_response_bytes=cap))) as c:
        assert c.post("/zoom", json={**body, "format": "png"}).status_code == 200
        r = c.post("/zoom", json=body)
        assert r.status_code == 422 and r.json()["error"] == "LimitError"


def test_one_client_cannot_evict_another(manifest: Path) -> None:
    import httpx

    app = create_app(make_cfg(manifest, max_episodes=8, max_episodes_per_client=4))

    async def go() -> tuple[list[int], list[int], dict[str, int]]:
        t_a = httpx.ASGITransport(app=app, client=("10.0.0.1", 1111))
        t_b = httpx.ASGITransport(app=app, client=("10.0.0.2", 2222))
        async with httpx.AsyncClient(transport=t_a, base_url="http://127.0.0.1") as a, \
                httpx.AsyncClient(transport=t_b, base_url="http://127.0.0.1") as b:
            mine = [(await b.post("/episodes", json={"image_ids": ["plain"]})).json()["episode_id"] for _ in range(2)]
            flood = [(await a.post("/episodes", json={"image_ids": ["plain"]})).status_code for _ in range(64)]
            still = [(await b.get(f"/episodes/{e}")).status_code for e in mine]
            return flood, still, app.state.service.episodes.owners()

    flood, still, owners = anyio.run(go)
    assert flood == [200] * 64  # the flooder is served, but only evicts its own episodes
    assert still == [200, 200] and owners == {"10.0.0.1": 4, "10.0.0.2": 2}


def test_registry_evicts_the_heaviest_client_when_full() -> None:
    from tools.server import EpisodeRegistry

    reg = EpisodeRegistry(max_episodes=4, ttl_s=60, max_per_owner=3)
    b1 = reg.add("b1", ["x"], "b")
    a = [reg.add(f"a{i}", ["x"], "a") for i in range(3)]
    c1 = reg.add("c1", ["x"], "c")  # full: a (3 episodes) loses its oldest, b keeps its only one
    assert reg.owners() == {"a": 2, "b": 1, "c": 1} and reg.get(b1).episode == "b1" and reg.get(c1)
    assert reg.get(a[2]).episode == "a2"


# -- token and Host header -------------------------------------------------------------------------------
def test_bearer_token_and_host_allowlist(manifest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    monkeypatch.setenv("KZ_TEST_TOKEN", "s3cret-token-value")
    cfg = make_cfg(manifest, token_env="KZ_TEST_TOKEN", allowed_hosts=[])  # default list: loopback names
    with TestClient(create_app(cfg), base_url="http://127.0.0.1:8765") as c:
        ok = {"authorization": "Bearer s3cret-token-value"}
        assert c.get("/health", headers=ok).status_code == 200
        assert c.post("/zoom", json={"image_id": "scene_b", "bbox": [0, 0, 9, 9]}, headers=ok).status_code == 200
        for bad in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic czNjcmV0"},
                    {"authorization": "Bearer s3cret-token-value-x"}, {"authorization": "bearer"}):
            r = c.get("/images", headers=bad)
            assert r.status_code == 401 and r.json()["error"] == "UnauthorizedError"
            assert r.headers["www-authenticate"].startswith("Bearer")
        assert c.get("/health", headers={**ok, "host": "localhost:8765"}).status_code == 200
        assert c.get("/health", headers={**ok, "host": "[::1]:8765"}).status_code == 200
        for host in ("evil.example", "evil.example:8765", "127.0.0.1.evil.example", "", "localhost.evil"):
            r = c.get("/health", headers={**ok, "host": host})
            assert r.status_code == 421 and r.json()["error"] == "HostNotAllowedError", host
    monkeypatch.delenv("KZ_TEST_TOKEN")
    with TestClient(create_app(make_cfg(manifest, token_env="KZ_TEST_TOKEN"))) as c:
        assert c.get("/health").status_code == 200  # no token configured: open on loopback


def test_binding_beyond_loopback_needs_a_token(manifest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tools.server import is_loopback, warn_exposure

    monkeypatch.delenv("KNOWZOOM_TOKEN", raising=False)
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert is_loopback(host) and ServeConfig(manifest=str(manifest), host=host).validate() == []
    problems = ServeConfig(manifest=str(manifest), host="0.0.0.0").validate()
    assert any("KNOWZOOM_TOKEN" in p and p.startswith("host:") for p in problems)
    assert ServeConfig(manifest=str(manifest), host="0.0.0.0", transport="mcp-stdio").validate() == []
    waived = ServeConfig(manifest=str(manifest), host="0.0.0.0", allow_unauthenticated_remote=True)
    assert waived.validate() == [] and any("WITHOUT AUTHENTICATION" in w for w in warn_exposure(waived))
    monkeypatch.setenv("KNOWZOOM_TOKEN", "x" * 32)
    tok = ServeConfig(manifest=str(manifest), host="192.168.1.5")
    assert tok.validate() == [] and tok.host_allowlist() == {"192.168.1.5"} and warn_exposure(tok) == []


def test_cli_refuses_public_bind_without_token(manifest: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "KNOWZOOM_TOKEN"}
    r = subprocess.run([sys.executable, "-m", "pipeline", "serve-tools", "--manifest", str(manifest), "--host",
                        "0.0.0.0", "--output_dir", str(tmp_path / "o")], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "KNOWZOOM_TOKEN" in r.stderr and "Traceback" not in r.stderr


def test_mcp_http_app_is_guarded(manifest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from starlette.testclient import TestClient

    from tools.mcp_server import create_mcp_http_app

    monkeypatch.setenv("KZ_TEST_TOKEN", "tok")
    app = create_mcp_http_app(make_cfg(manifest, token_env="KZ_TEST_TOKEN", allowed_hosts=[]))
    with TestClient(app, base_url="http://127.0.0.1:1") as c:
        assert c.post("/mcp", json={}).status_code == 401
        assert c.post("/mcp", json={}, headers={"authorization": "Bearer tok", "host": "evil.example"}
                      ).status_code == 421


# -- manifest skip mode ----------------------------------------------------------------------------------
def test_bad_manifest_line_fails_or_is_skipped(manifest: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from pipeline.core.errors import ConfigError
    from tools.server import ZoomService

    lines = manifest.read_text().splitlines()
    bad = tmp_path / "images.jsonl"
    for f in manifest.parent.glob("*.*"):
        if f.suffix in (".tif", ".png"):
            (tmp_path / f.name).write_bytes(f.read_bytes())
    bad.write_text("\n".join([lines[0], "{not json", '{"id": "x"}', '{"id": "../up", "path": "scene_b.tif"}',
                              '{"id": "gone", "path": "missing.tif"}', '{"id": "out", "path": "/etc/hostname"}',
                              "[1, 2]", *lines[1:]]) + "\n")
    with pytest.raises(ConfigError, match="manifest_errors: skip"):
        ZoomService(make_cfg(bad))
    cfg = make_cfg(bad, manifest_errors="skip")
    with TestClient(create_app(cfg)) as c:
        h = c.get("/health").json()
        assert h["images"] == 4 and h["refused_images"] == 7  # 6 bad lines + the disguised VRT
        assert c.post("/zoom", json={"image_id": "scene_b", "bbox": [0, 0, 9, 9]}).status_code == 200
    for raw in (b"\xff\xfe\x00binary manifest\n", ("[" * 20000 + "\n").encode()):
        (tmp_path / "weird.jsonl").write_bytes(raw)
        with pytest.raises(ConfigError, match="manifest_errors: skip"):
            ZoomService(make_cfg(tmp_path / "weird.jsonl"))
    only_bad = tmp_path / "bad_only.jsonl"
    only_bad.write_text("{not json\n")
    with pytest.raises(Exception, match="No image could be registered"):
        ZoomService(make_cfg(only_bad, manifest_errors="skip"))
    assert "manifest_errors" in "\n".join(ServeConfig(manifest=str(bad), manifest_errors="maybe").validate())


# -- MCP -------------------------------------------------------------------------------------------------
def test_mcp_hostile_arguments_never_leak_exception_text(manifest: Path) -> None:
    from mcp import Client

    from tools.mcp_server import create_mcp_server

    server = create_mcp_server(make_cfg(manifest, max_episodes=1000, max_episodes_per_client=1000))
    py_values: list[Any] = [10**400, -(10**400), float("nan"), float("inf"), -float("inf"), 1e308, None, True,
                            "", "x" * 10_000, "\x00\ud800", [], {}, [[[[[[]]]]]], [0, 0, 10**400, 10],
                            [float("nan")] * 4, [0, 0, float("inf"), 1], ["0", "0", "9", "9"], {"a": [1]}]
    calls = {"list_images": {"offset": 0}, "start_episode": {"image_ids": ["scene_b"]},
             "zoom_in": {"episode_id": "@eid", "bbox": [0, 0, 50, 50], "source": "image_0"},
             "end_episode": {"episode_id": "@eid"},
             "zoom_region": {"image_id": "scene_b", "bbox": [0, 0, 50, 50], "box_crs": "native", "max_pixels": 4000}}

    async def go() -> tuple[int, int]:
        n = bad = 0
        async with Client(server) as client:
            for tool, base in calls.items():
                for field in base:
                    for v in py_values:
                        start = await client.call_tool("start_episode", {"image_ids": ["scene_b"]})
                        eid = json.loads(start.content[-1].text)["episode_id"]
                        args = {k: (eid if x == "@eid" else x) for k, x in base.items()}
                        args[field] = v
                        try:
                            res = await client.call_tool(tool, args)
                        except Exception as e:  # noqa: BLE001 - a JSON-RPC error: must be the SDK's typed one
                            assert "Traceback" not in str(e) and "float" not in str(e), (tool, field, e)
                            n += 1
                            continue
                        n += 1
                        if res.is_error:
                            texts = [c.text for c in res.content if c.type == "text"]
                            body = json.loads(texts[-1])
                            ok = set(body) == {"error", "message"} and body["error"] != "ToolError"
                            bad += not ok
                            assert ok, (tool, field, v if not isinstance(v, str) else v[:20], texts)
                        await client.call_tool("end_episode", {"episode_id": eid})
        return n, bad

    n, bad = anyio.run(go)
    print(f"\nMCP hostile calls: {n}, untyped errors: {bad}")
    assert n >= 90 and bad == 0


def test_mcp_stdio_raw_lines(manifest: Path, tmp_path: Path) -> None:
    """`knowzoom serve-tools --transport mcp-stdio` as a subprocess, raw lines on stdin: every stdout line is
    a JSON-RPC message (no CLI summary), malformed lines get -32700 / -32600 with id null, and the session
    goes on."""
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
    lines = [
        b"{not json\n",
        b"\xff\xfe garbage \x00\n",
        ("[" * 5000 + "\n").encode(),
        json.dumps(init).encode() + b"\n",
        b'{"jsonrpc": "2.0", "method": "notifications/initialized"}\n',
        b'{"hello": "world"}\n',
        b"[1, 2, 3]\n",
        json.dumps({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
            "name": "zoom_region", "arguments": {"image_id": "scene_a", "bbox": [0, 0, 10**400, 10]}}}).encode() + b"\n",
        json.dumps({"jsonrpc": "2.0", "id": 3, "method": "tools/list"}).encode() + b"\n",
    ]
    env = {**os.environ, "KNOWZOOM_LOG": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve-tools", "--transport", "mcp-stdio",
                             "--manifest", str(manifest), "--output_dir", str(tmp_path / "o"), "--log_level",
                             "warning"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=REPO, env=env)
    msgs: list[dict[str, Any]] = []
    try:
        for line in lines:
            proc.stdin.write(line)
        proc.stdin.flush()
        while not {1, 2, 3} <= {m.get("id") for m in msgs}:  # bounded by the timeout below
            out = proc.stdout.readline()
            assert out, proc.stderr.read()[-2000:]
            msgs.append(json.loads(out))  # every stdout line is JSON-RPC
        proc.stdin.close()  # the client hangs up: the server exits cleanly
        proc.wait(timeout=60)
        rest, err = proc.stdout.read(), proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    msgs += [json.loads(x) for x in rest.decode().splitlines()]
    assert all(m.get("jsonrpc") == "2.0" for m in msgs)
    errors = [m for m in msgs if m.get("id") is None]
    assert [m["error"]["code"] for m in errors] == [-32700, -32700, -32700, -32600, -32600]
    by_id = {m["id"]: m for m in msgs if m.get("id") is not None}
    assert by_id[1]["result"]["serverInfo"]["name"] == "knowzoom-zoom"
    res = by_id[2]["result"]
    assert res["isError"] is True and json.loads(res["content"][-1]["text"])["error"] == "BadBoxError"
    assert len(by_id[3]["result"]["tools"]) == 5
    assert b'"transport"' in err and b'"transport"' not in rest  # the summary went to stderr


# -- the issue's classes in one table: expected status each, 0 × 5xx ----------------------------------
def _issue_table(eid: str) -> list[tuple[str, str, str, bytes | None, dict[str, str], int, str | None]]:
    j = {"content-type": "application/json"}
    call = f"/episodes/{eid}/call"
    return [
        # (case, method, path, body, headers, status, error type in the body (or in body["error"] for /call))
        ("400-digit int box /zoom", "POST", "/zoom", f'{{"image_id": "scene_a", "bbox": [0, 0, {HUGE_INT}, 9]}}'.encode(),
         j, 400, "BadBoxError"),
        ("400-digit int box /zoom_in", "POST", f"/episodes/{eid}/zoom_in", f'{{"bbox": [0, 0, {HUGE_INT}, 9]}}'.encode(),
         j, 400, "BadBoxError"),
        ("400-digit int box /call", "POST", call,
         f'{{"name": "zoom_in", "arguments": {{"bbox": [0, 0, {HUGE_INT}, 9]}}}}'.encode(), j, 200, "BadBoxError"),
        ("15,000-deep tool-call text", "POST", call,
         json.dumps({"text": f"<tool_call>{deep_list(DEEP)}</tool_call>"}).encode(), j, 200, "ToolCallParseError"),
        ("15,000-deep arguments string", "POST", call,
         json.dumps({"name": "zoom_in", "arguments": deep_obj(DEEP)}).encode(), j, 200, "ToolCallParseError"),
        ("5000-digit int in tool-call text", "POST", call,
         json.dumps({"text": f'<tool_call>{{"name": "zoom_in", "arguments": {{"bbox": [0, 0, {LONG_INT}, 1]}}}}</tool_call>'}).encode(),
         j, 200, "ToolCallParseError"),
        ("NaN box", "POST", "/zoom", b'{"image_id": "scene_a", "bbox": [NaN, 0, 9, 9]}', j, 400, "BadBoxError"),
        ("-Infinity box /zoom_in", "POST", f"/episodes/{eid}/zoom_in", b'{"bbox": [-Infinity, 0, 9, 9]}', j, 400,
         "BadBoxError"),
        ("OpenAI string arguments", "POST", call,
         json.dumps({"name": "zoom_in", "arguments": '{"bbox": [0, 0, 40, 40]}'}).encode(), j, 200, None),
        ("forged Host", "GET", "/images", None, {"host": "attacker.example"}, 421, "HostNotAllowedError"),
        ("slash redirect from Host", "GET", "/episodes/..%2F", None, {"host": "attacker.example:80"}, 421, None),
        ("..%2F on an allowed host", "GET", "/episodes/..%2F", None, {}, 404, None),
        ("id with a trailing newline", "GET", "/images/scene_a%0A", None, {}, 404, None),
        ("episode id with a trailing newline", "GET", f"/episodes/{eid}%0A", None, {}, 404, None),
        ("utf-16 body (JSON detects it)", "POST", "/zoom",
         json.dumps({"image_id": "scene_a", "bbox": [0, 0, 9, 9]}).encode("utf-16"), j, 200, None),
        ("invalid utf-8 id", "POST", "/zoom", b'{"image_id": "\xff\xfe", "bbox": [0, 0, 9, 9]}', j, 400, None),
        ("body over the cap", "POST", "/zoom", b'{"image_id": "' + b"x" * 300_000 + b'"}', j, 413,
         "RequestTooLargeError"),
    ]


def test_issue_classes_table(client) -> None:
    eid = client.post("/episodes", json={"image_ids": ["scene_b"]}).json()["episode_id"]
    n5xx = 0
    table = _issue_table(eid)
    for case, method, path, body, headers, status, err in table:
        r = client.request(method, path, content=body, headers=headers, follow_redirects=False)
        n5xx += r.status_code >= 500
        assert r.status_code == status, (case, r.status_code, r.text[:200])
        assert "location" not in r.headers, case
        if err is not None:
            b = r.json()
            got = b["error"]["error"] if path.endswith("/call") and status == 200 else b["error"]
            assert got == err, (case, b)
    print(f"\nissue classes: {len(table)} requests, 5xx: {n5xx}")
    assert n5xx == 0
