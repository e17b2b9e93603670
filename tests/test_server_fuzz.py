"""Hypothesis fuzz of the zoom endpoints: never a 5xx, and every response within the byte bound.

Every field may also carry a raw JSON token json.dumps cannot write (400-digit and 5000-digit integers,
1e400, NaN, Infinity, nesting 15,000 deep, lone surrogates), and whole bodies are re-encoded (UTF-16/32,
BOM, Latin-1, invalid UTF-8).

Examples: 2,000 per test when CI=true (the CI profile), 150 locally; KNOWZOOM_FUZZ_EXAMPLES overrides.
"""

from __future__ import annotations

import json
import math
import os

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_server_api import make_cfg, make_server_images

from tools.server.app import create_app

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
N_EXAMPLES = int(os.environ.get("KNOWZOOM_FUZZ_EXAMPLES", 2000 if CI else 150))
FUZZ = settings(max_examples=N_EXAMPLES, deadline=None, database=None, derandomize=CI,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

MAX_RESPONSE_BYTES = 300_000
MAX_OUTPUT_PIXELS = 120_000
# the cap holds for the whole body (JSON with base64 inside included)
RESPONSE_BOUND = MAX_RESPONSE_BYTES
DATA_ROOT = ["<unset>"]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    from fastapi.testclient import TestClient

    manifest = make_server_images(tmp_path_factory.mktemp("fuzz"))
    DATA_ROOT[0] = str(manifest.parent)
    cfg = make_cfg(manifest, max_output_pixels=MAX_OUTPUT_PIXELS, max_response_bytes=MAX_RESPONSE_BYTES,
                   max_turns=3, max_request_bytes=200_000, max_episodes=10_000, max_episodes_per_client=10_000)
    with TestClient(create_app(cfg), raise_server_exceptions=False) as c:
        yield c


numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.floats(min_value=-100, max_value=3000),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.integers(min_value=0, max_value=2500),
)
junk = st.one_of(st.none(), st.booleans(), st.text(max_size=20), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


@st.composite
def plausible_boxes(draw, side: float = 2400) -> list[float]:
    """Mostly-valid boxes: anywhere around an image of about `side` pixels, sub-pixel to larger than it."""
    x0 = draw(st.floats(min_value=-0.1 * side, max_value=side))
    y0 = draw(st.floats(min_value=-0.1 * side, max_value=0.8 * side))
    w = draw(st.one_of(st.floats(min_value=1e-3, max_value=1.2 * side), st.integers(min_value=1, max_value=60)))
    h = draw(st.one_of(st.floats(min_value=1e-3, max_value=1.2 * side), st.integers(min_value=1, max_value=60)))
    return [x0, y0, x0 + w, y0 + h]


hostile_boxes = st.one_of(st.lists(numbers, min_size=4, max_size=4), st.lists(st.one_of(numbers, junk), max_size=6), junk)
served = st.sampled_from(["scene_a", "scene_b", "plain"])
fmts = st.sampled_from(["json", "png", "jpeg"])
# ~2/3 plausible requests (exercise real reads and encodes), ~1/3 hostile ones (every field may be junk)
plausible_bodies = st.fixed_dictionaries(
    {"image_id": served, "bbox": plausible_boxes()},
    optional={"max_pixels": st.one_of(st.none(), st.integers(min_value=3136, max_value=MAX_OUTPUT_PIXELS)),
              "format": fmts, "box_crs": st.just("native")},
)
hostile_bodies = st.fixed_dictionaries(
    {"image_id": st.one_of(served, st.sampled_from(["corrupt", "evil", "../scene_a", "/etc/passwd"]),
                           st.text(max_size=40)),
     "bbox": st.one_of(plausible_boxes(), hostile_boxes)},
    optional={
        "box_crs": st.one_of(st.sampled_from(["native", "crs", "lonlat"]), st.text(max_size=8)),
        "max_pixels": st.one_of(st.none(), st.integers(min_value=3000, max_value=130_000),
                                st.integers(min_value=-(10**15), max_value=10**15), junk),
        "format": st.one_of(fmts, st.text(max_size=5)),
    },
)
bodies = st.one_of(plausible_bodies, plausible_bodies, hostile_bodies)
# episode boxes are in the shown frame of image_0 (scene_b's overview is about 252 px wide)
bboxes = st.one_of(plausible_boxes(260), plausible_boxes(260), hostile_boxes)
sources = st.one_of(st.sampled_from(["image_0", "obs_1"]), st.sampled_from(["image_0", "obs_1"]),
                    st.text(max_size=12))


class Raw(str):
    """A raw JSON token placed verbatim in a body (what json.dumps cannot write)."""


RAW_TOKENS = ["9" * 400, "-" + "9" * 400, "7" * 5000, "1e400", "-1e400", "NaN", "Infinity", "-Infinity",
              "[" * 15000 + "]" * 15000, '{"a":' * 15000 + "1" + "}" * 15000, "[" * 900 + "]" * 900,
              '"\\ud800"', '"\\udfff\\u0000"', "1" + "0" * 330, "-0", "1E+999999"]
raw_tokens = st.sampled_from(RAW_TOKENS).map(Raw)
huge_numbers = st.one_of(st.integers(min_value=10**300, max_value=10**400), st.integers(max_value=-(10**300)),
                         st.sampled_from([1e308, -1e308, 5e-324, float("nan"), float("inf"), -float("inf")]))
odd_values = st.one_of(raw_tokens, huge_numbers)
ENCODINGS = ["utf-8", "utf-16", "utf-32", "utf-8-sig", "latin-1", "invalid-utf-8"]


def _dumps(v) -> str:
    if isinstance(v, Raw):
        return str(v)
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {_dumps(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_dumps(x) for x in v) + "]"
    return json.dumps(v, allow_nan=True)


def _raw(body: dict, encoding: str = "utf-8") -> bytes:
    # allow_nan: the wire may carry NaN/Infinity tokens, which Python's JSON parser accepts
    text = _dumps(body)
    if encoding == "invalid-utf-8":
        return text.encode("utf-8", "surrogatepass").replace(b'"', b'"\xc0\xaf', 1)
    return text.encode(encoding, "surrogatepass" if encoding.startswith("utf-8") else "replace")


@st.composite
def oddly(draw, body: dict) -> dict:
    """`body` with odd values at a few fields (top level or one level inside a list)."""
    out = dict(body)
    for k in draw(st.lists(st.sampled_from(sorted(out)), min_size=1, max_size=3, unique=True)):
        v = out[k]
        if isinstance(v, list) and v and draw(st.booleans()):
            v = list(v)
            v[draw(st.integers(0, len(v) - 1))] = draw(odd_values)
            out[k] = v
        else:
            out[k] = draw(odd_values)
    return out


def _check(r) -> None:
    event(f"status {r.status_code}")
    assert r.status_code < 500, (r.status_code, r.text[:500])
    assert len(r.content) <= RESPONSE_BOUND, len(r.content)
    if r.status_code >= 400:
        body = r.json()
        assert set(body) == {"error", "message"} and len(body["message"]) < 400
        assert DATA_ROOT[0] not in r.text and "Traceback" not in r.text  # no paths, no stack traces


@FUZZ
@given(body=bodies)
def test_fuzz_stateless_zoom(client, body: dict) -> None:
    r = client.post("/zoom", content=_raw(body), headers={"content-type": "application/json"})
    _check(r)
    if r.status_code == 200 and r.headers["content-type"].startswith("image/"):
        meta = json.loads(r.headers["x-knowzoom-observation"])
        w, h = meta["shown_size"]
        assert w * h <= MAX_OUTPUT_PIXELS


@FUZZ
@given(bbox=bboxes, source=sources, fmt=st.sampled_from(["json", "png", "jpeg"]))
def test_fuzz_episode_zoom(client, bbox, source, fmt) -> None:
    start = client.post("/episodes", json={"image_ids": ["scene_b"]})
    assert start.status_code == 200
    eid = start.json()["episode_id"]
    try:
        for _ in range(2):  # a chained call exercises obs_1 as source
            r = client.post(f"/episodes/{eid}/zoom_in",
                            content=_raw({"bbox": bbox, "source": source, "format": fmt}),
                            headers={"content-type": "application/json"})
            _check(r)
    finally:
        client.delete(f"/episodes/{eid}")


@FUZZ
@given(data=st.data(), which=st.sampled_from(["zoom", "start", "zoom_in", "call", "call_str", "text"]),
       encoding=st.sampled_from(ENCODINGS))
def test_fuzz_odd_values_at_every_field(client, data, which: str, encoding: str) -> None:
    """Huge/non-finite numbers, deep nesting and odd encodings at every field of every endpoint."""
    eid = client.post("/episodes", json={"image_ids": ["scene_b"]}).json()["episode_id"]
    base = {
        "zoom": ("/zoom", {"image_id": "scene_b", "bbox": [0, 0, 99, 99], "box_crs": "native", "max_pixels": 4000,
                           "format": "json"}),
        "start": ("/episodes", {"image_ids": ["scene_b", "plain"], "format": "json"}),
        "zoom_in": (f"/episodes/{eid}/zoom_in", {"bbox": [0, 0, 50, 50], "source": "image_0", "format": "png"}),
        "call": (f"/episodes/{eid}/call", {"name": "zoom_in", "arguments": {"bbox": [0, 0, 50, 50], "source": "image_0"}}),
        "call_str": (f"/episodes/{eid}/call", {"name": "zoom_in", "arguments": Raw(json.dumps(json.dumps({"bbox": [0, 0, 9, 9]})))}),
        "text": (f"/episodes/{eid}/call", {"text": "<tool_call>{}</tool_call>"}),
    }[which]
    path, body = base
    if which == "call":  # also inside the arguments object
        args = data.draw(oddly(body["arguments"]))
        body = {**body, "arguments": args}
    elif which == "text":  # the odd token inside the tool-call JSON the model wrote
        tok = data.draw(odd_values)
        body = {"text": Raw(json.dumps(f'<tool_call>{{"name": "zoom_in", "arguments": {{"bbox": [0, 0, {_dumps(tok)}, 9]}}}}</tool_call>'))}
    body = data.draw(oddly(body)) if which != "text" or data.draw(st.booleans()) else body
    r = client.post(path, content=_raw(body, encoding), headers={"content-type": "application/json"})
    _check(r)
    client.delete(f"/episodes/{eid}")


@FUZZ
@given(raw=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
def test_fuzz_raw_bodies(client, raw: bytes) -> None:
    for path in ("/zoom", "/episodes"):
        _check(client.post(path, content=raw, headers={"content-type": "application/json"}))


def test_fuzz_profile_is_2000_in_ci() -> None:
    if CI and "KNOWZOOM_FUZZ_EXAMPLES" not in os.environ:
        assert N_EXAMPLES >= 2000
    assert N_EXAMPLES >= 1 and not math.isnan(N_EXAMPLES)
