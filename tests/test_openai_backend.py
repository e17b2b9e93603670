"""The OpenAI-compatible backend against a local server that speaks the chat-completions format exactly
(tests/openai_standin.py): tool calls in `message.tool_calls` with string arguments, native tool calling,
data-URL images, and `knowzoom eval` failing loudly when nothing could be scored."""

from __future__ import annotations

import json

import pytest
from openai_standin import StandinServer
from test_eval_helpers import make_vqa_set, store_for

from pipeline.core.records import VQASample, read_jsonl
from rl.agent import AgentConfig, run_episodes
from rl.backends import OpenAIBackend, message_text
from tools.protocol import system_prompt, zoom_tool_schema


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_vqa_set(tmp_path_factory.mktemp("vqa"), n=4)


@pytest.fixture(scope="module")
def vqa(data):
    return list(read_jsonl(data / "vqa_test.jsonl", VQASample)), store_for(data)


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch):
    monkeypatch.setattr("pipeline.core.http.time.sleep", lambda s: None)


def test_text_mode_reads_tool_calls_the_server_returns(vqa):
    """`transformers serve` / vLLM return calls in message.tool_calls (content null): they are read."""
    samples, store = vqa
    with StandinServer(answer="A") as srv:
        be = OpenAIBackend(srv.base_url, "served", timeout_s=10, concurrency=2)
        trajs = run_episodes(be, samples[:2], store, AgentConfig(max_turns=3))
    assert srv.rejected == []
    assert [(t.tool_calls, t.tool_errors, t.prediction) for t in trajs] == [(1, 0, "A"), (1, 0, "A")], \
        [(t.error, t.final_text) for t in trajs]
    assert trajs[0].correct and not trajs[1].correct  # q1's answer is B
    assert "tools" not in srv.requests[0]
    last = srv.requests[-1]["messages"]
    assert last[2]["role"] == "assistant" and last[2]["content"].startswith("<tool_call>")  # text protocol
    assert last[3]["role"] == "user" and last[3]["content"][0]["text"].startswith("<tool_response>")


def test_native_mode_speaks_tool_calls_and_tool_messages(vqa):
    samples, store = vqa
    with StandinServer(answer="A") as srv:
        be = OpenAIBackend(srv.base_url, "served", timeout_s=10, tool_mode="native")
        trajs = run_episodes(be, samples[:1], store, AgentConfig(max_turns=3))
    assert srv.rejected == []
    t = trajs[0]
    assert (t.tool_calls, t.tool_errors, t.correct, t.turns) == (1, 0, True, 2), (t.error, t.final_text)
    first, second = srv.requests
    assert first["tools"] == [zoom_tool_schema("shown_pixels")] and first["tool_choice"] == "auto"
    assert "</tool_call>" not in first["stop"] and "</answer>" in first["stop"]
    assert first["messages"][0] == {"role": "system", "content": system_prompt("shown_pixels", native_tools=True)}
    m = second["messages"]
    call = m[2]["tool_calls"][0]
    assert m[2]["role"] == "assistant" and call["type"] == "function" and call["function"]["name"] == "zoom_in"
    assert isinstance(call["function"]["arguments"], str)
    assert json.loads(call["function"]["arguments"])["bbox"] == [0, 0, 60, 60]
    assert m[3] == {"role": "tool", "tool_call_id": call["id"], "content": m[3]["content"]}
    assert m[3]["content"].startswith("obs_1: zoom of image_0")
    assert m[4]["role"] == "user" and m[4]["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")


@pytest.mark.parametrize("mode", ["text", "native"])
def test_malformed_call_from_tool_calls_gets_an_error_observation(vqa, mode):
    """Arguments that are not JSON: the documented behaviour (an error observation, another turn) in both
    modes; in native mode the error goes back as the tool message answering that call."""
    samples, store = vqa
    with StandinServer(answer="A", malformed_first=True) as srv:
        be = OpenAIBackend(srv.base_url, "served", timeout_s=10, tool_mode=mode)
        [t] = run_episodes(be, samples[:1], store, AgentConfig(max_turns=4))
    assert srv.rejected == []
    assert (t.tool_calls, t.tool_errors, t.turns, t.correct) == (1, 1, 3, True), (t.error, t.final_text)
    tool_turn = t.messages[3]
    assert tool_turn["role"] == "tool" and "arguments" in tool_turn["content"][0]["text"]
    if mode == "native":
        m = srv.requests[1]["messages"]
        assert m[2]["tool_calls"][0]["function"]["arguments"].startswith('{"bbox"')  # the server's own string
        assert m[3]["role"] == "tool" and m[3]["tool_call_id"] == m[2]["tool_calls"][0]["id"]


def test_content_and_tool_calls_together():
    msg = {"role": "assistant", "content": "<think>zoom</think>",
           "tool_calls": [{"id": "c", "type": "function",
                           "function": {"name": "zoom_in", "arguments": '{"bbox": [1, 2, 3, 4]}'}}]}
    assert message_text(msg) == '<think>zoom</think><tool_call>{"name": "zoom_in", "arguments": ' \
                                '{"bbox": [1, 2, 3, 4]}}</tool_call>'
    assert message_text({"role": "assistant", "content": "<answer>B</answer>", "tool_calls": None}) == \
        "<answer>B</answer>"
    # a server that leaves the raw call in the content as well: one call, not two
    raw = '<tool_call>{"name": "zoom_in", "arguments": {"bbox": [1, 2, 3, 4]}}</tool_call>'
    assert message_text(dict(msg, content="<think>zoom</think>" + raw)) == message_text(msg)


def test_direct_protocol_never_sends_tools(data):
    from pipeline.core.config import load_config
    from pipeline.eval.evaluate import EvalConfig

    cfg = load_config(EvalConfig, None, {"backend": "openai", "base_url": "http://127.0.0.1:9/v1",
                                         "openai_tool_mode": "native", "protocol": "direct"})
    assert cfg.make_backend().tool_mode == "text"
    cfg = load_config(EvalConfig, None, {"backend": "openai", "base_url": "http://127.0.0.1:9/v1",
                                         "openai_tool_mode": "native"})
    assert cfg.make_backend().tool_mode == "native"


def test_the_real_openai_client_reads_the_standin(vqa):
    """The stand-in's responses parse with the real `openai` client, and the client sends our native
    payload unchanged (so the format both sides use is the API's)."""
    openai = pytest.importorskip("openai")
    samples, store = vqa
    with StandinServer() as srv:
        be = OpenAIBackend(srv.base_url, "served", tool_mode="native")
        from tools.protocol import Episode, build_prompt_messages

        ep = Episode(store, samples[0].images)
        obs = ep.initial_observations()
        conv = build_prompt_messages(samples[0], sizes=[o.image.size for o in obs])
        body = be._payload(conv, [o.image for o in obs], max_new_tokens=32, temperature=0.0, top_p=1.0,
                           stop=["</tool_call>", "</answer>"])
        client = openai.OpenAI(base_url=srv.base_url, api_key="k")
        resp = client.chat.completions.create(**body)
    assert srv.rejected == []
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert isinstance(choice.message.tool_calls[0].function.arguments, str)
    assert message_text(choice.message.model_dump()).startswith('<tool_call>{"name": "zoom_in"')


def _eval_args(data, out, base_url, *extra):
    return ["eval", "--config", "configs/tiny/eval.yaml", "--backend", "openai", "--model", "served",
            "--base_url", base_url, "--output_dir", str(out), "--dataset_path", str(data / "vqa_test.jsonl"),
            "--images_manifest", str(data / "images.jsonl"), "--openai_timeout_s", "5", *extra]


def test_knowzoom_eval_native_end_to_end(data, tmp_path, capsys):
    from pipeline.cli import main

    with StandinServer(answer="A") as srv:
        rc = main(_eval_args(data, tmp_path / "e", srv.base_url, "--openai_tool_mode", "native"))
    assert rc == 0 and srv.rejected == []
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 4 and out["errors"] == 0 and out["pass@1_micro"] == 0.25  # only q0's answer is A
    assert out["tool_calls_per_question"] == 1.0


def test_knowzoom_eval_exits_nonzero_when_no_episode_scores(data, tmp_path, capsys):
    """Every request fails (nothing listens): a clear error and a non-zero exit, not a 0.0 score."""
    import socket

    from pipeline.cli import main

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # a port nothing listens on
    rc = main(_eval_args(data, tmp_path / "e", f"http://127.0.0.1:{port}/v1"))
    err = capsys.readouterr().err
    assert rc != 0 and "no episode could be scored" in err and "Traceback" not in err
    assert (tmp_path / "e" / "results.json").exists()  # the reports with every error are still written
    assert not (tmp_path / "e" / "DONE.json").exists()


def test_openai_extra_body_reaches_every_request(data, tmp_path, capsys):
    """`openai_extra_body` is how a vLLM server is told to ban the image placeholders (its chat endpoint takes
    `bad_words`): every request of the eval carries it, beside the fields the backend sets."""
    from pipeline.cli import main

    ban = ["<|image_pad|>", "<|video_pad|>"]
    with StandinServer(answer="A") as srv:
        rc = main(_eval_args(data, tmp_path / "e", srv.base_url, "--openai_extra_body", f"{{bad_words: {ban}}}"))
    assert rc == 0 and srv.rejected == [] and len(srv.requests) >= 4
    assert all(r["bad_words"] == ban and r["model"] == "served" for r in srv.requests)
