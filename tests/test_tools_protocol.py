"""The tool protocol: parsing of turns (typed format errors), canonical rendering, messages, Episode.execute."""

from __future__ import annotations

import json

import pytest

from pipeline.core.records import RecordError, VQASample
from tests.tools_fixtures import make_raster
from tools.errors import MultipleToolCallsError, ToolCallParseError, UnknownToolError
from tools.protocol import (
    TOOL_NAME,
    Episode,
    ToolCall,
    build_prompt_messages,
    format_tool_call,
    parse_turn,
    system_prompt,
    tool_message,
    user_message,
    zoom_tool_schema,
)
from tools.store import ImageStore
from tools.zoom import ZoomConfig

CALL = '<tool_call>{"name": "zoom_in", "arguments": {"bbox": [10, 20, 60, 90], "source": "image_0"}}</tool_call>'

TURNS = [
    ("call", "<think>look</think>" + CALL, None, True, None),
    ("unclosed call (stop string stripped)", CALL[: -len("</tool_call>")], None, True, None),
    ("answer", "<think>x</think><answer>B</answer>", None, False, "B"),
    ("plain text", "I think it is B", None, False, None),
    ("bad json", "<tool_call>{name: zoom_in}</tool_call>", ToolCallParseError, False, None),
    ("not an object", "<tool_call>[1, 2]</tool_call>", ToolCallParseError, False, None),
    ("arguments not object", '<tool_call>{"name": "zoom_in", "arguments": 5}</tool_call>', ToolCallParseError, False, None),
    ("unknown tool", '<tool_call>{"name": "crop", "arguments": {}}</tool_call>', UnknownToolError, True, None),
    ("two calls", CALL + CALL, MultipleToolCallsError, False, None),
    ("call and answer", CALL + "<answer>A</answer>", ToolCallParseError, False, "A"),
]


@pytest.mark.parametrize("name,text,err,has_call,answer", TURNS, ids=[t[0] for t in TURNS])
def test_parse_turn(name, text, err, has_call, answer) -> None:
    p = parse_turn(text)
    assert (type(p.error) if p.error else None) is err
    assert (p.tool_call is not None) == has_call
    assert p.answer == answer


def test_arguments_as_json_string_and_canonical_round_trip() -> None:
    p = parse_turn('<tool_call>{"name": "zoom_in", "arguments": "{\\"bbox\\": [1, 2, 3, 4]}"}</tool_call>')
    assert p.ok and p.tool_call.arguments == {"bbox": [1, 2, 3, 4]}
    text = format_tool_call([10.0, 20.5, 60, 90], "obs_2")
    assert text == '<tool_call>{"name": "zoom_in", "arguments": {"bbox": [10, 20.5, 60, 90], "source": "obs_2"}}</tool_call>'
    p = parse_turn(text)
    assert p.tool_call == ToolCall(TOOL_NAME, {"bbox": [10, 20.5, 60, 90], "source": "obs_2"})


def test_schema_and_prompts() -> None:
    for frame in ("shown_pixels", "norm1000", "lonlat"):
        s = zoom_tool_schema(frame)
        json.dumps(s)
        assert s["function"]["name"] == "zoom_in" and s["function"]["parameters"]["required"] == ["bbox"]
        assert "zoom_in" in system_prompt(frame)
    assert "0-1000" in system_prompt("norm1000")
    with pytest.raises(ValueError):
        zoom_tool_schema("pixels")


def test_messages_snapshot() -> None:
    m = user_message("How many ships?", ["(A) 2", "(B) 3"], 2)
    assert [c["type"] for c in m["content"]] == ["text", "image", "text", "image", "text"]
    assert m["content"][0]["text"] == "image_0:" and m["content"][2]["text"] == "image_1:"
    assert m["content"][-1]["text"].startswith("How many ships?\nThe choices are listed below:\n(A) 2\n(B) 3\n")
    sample = VQASample(id="q", images=["a"], question="Q?", answer="A", choices=["(A) x", "(B) y"])
    msgs = build_prompt_messages(sample, "shown_pixels")
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert isinstance(msgs[0]["content"], str)
    assert msgs[1]["content"][-1]["text"].endswith("inside <answer></answer>.")  # no hint: the official prompt
    sample.hint = "Site: column 7, row 3."
    text = build_prompt_messages(sample, "shown_pixels")[1]["content"][-1]["text"]
    assert text.endswith("inside <answer></answer>.\nSite: column 7, row 3.")
    with pytest.raises(RecordError, match="hint"):
        VQASample.from_dict({"id": "q", "images": ["a"], "question": "Q?", "answer": "A", "qtype": "open",
                             "hint": 7}).validate()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ImageStore:
    d = tmp_path_factory.mktemp("proto")
    make_raster(d / "a.tif", 2000, 1500)
    make_raster(d / "b.tif", 1000, 1000)
    s = ImageStore([d])
    s.register_folder(d)
    return s


def test_episode_execute_counts_and_messages(store: ImageStore) -> None:
    ep = Episode(store, ["a", "b"], ZoomConfig(max_turns=3))
    assert [o.name for o in ep.initial_observations()] == ["image_0", "image_1"]
    ok = ep.execute(parse_turn(format_tool_call([10, 10, 100, 100], "image_1")).tool_call)
    assert ok.error is None and ok.observation.name == "obs_1" and ok.observation.image_id == "b"
    assert tool_message(ok)["content"][0] == {"type": "image"} and ok.text.startswith("obs_1:")
    bad = ep.execute(ToolCall("zoom_in", {"source": "image_0"}))
    assert isinstance(bad.error, ToolCallParseError) and tool_message(bad)["content"] == [{"type": "text", "text": bad.text}]
    unknown = ep.execute(ToolCall("crop", {"bbox": [0, 0, 1, 1]}))
    assert isinstance(unknown.error, UnknownToolError)
    assert ep.n_calls == 3 and ep.n_errors == 2
    chained = ep.execute(ToolCall("zoom_in", {"bbox": [0, 0, 50, 50], "source": "obs_1"}))
    assert chained.error is not None  # max_turns=3 reached: LimitError text, no crash
    assert [o["name"] for o in ep.observation_list()] == ["image_0", "image_1", "obs_1"]


def test_norm1000_frame_episode(store: ImageStore) -> None:
    ep = Episode(store, ["a"], ZoomConfig(frame="norm1000"))
    obs = ep.zoom_in([0, 0, 500, 500])
    assert obs.window == (0.0, 0.0, 1000.0, 750.0)
    assert ep.oracle_bbox(0, [1000, 750, 2000, 1500]) == [500.0, 500.0, 1000.0, 1000.0]
