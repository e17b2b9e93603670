"""The agent loop on the real zoom tool with scripted and real (tiny) backends, plus the vLLM and
OpenAI-compatible backends against fake engines."""

from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from PIL import Image
from test_eval_helpers import OracleBackend, ScriptBackend, make_vqa_set, store_for

from pipeline.core.records import VQASample, read_jsonl
from rl.agent import AgentConfig, BackendError, run_episodes
from tools.protocol import close_stopped, format_tool_call, trim_at_stop
from tools.zoom import ZoomConfig


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    root = make_vqa_set(tmp_path_factory.mktemp("vqa"), n=4)
    return list(read_jsonl(root / "vqa_test.jsonl", VQASample)), store_for(root)


def test_oracle_zoom_then_answer(vqa):
    samples, store = vqa
    cfg = AgentConfig(batch_size=3)
    be = OracleBackend(samples, store, cfg.zoom)
    trajs = run_episodes(be, samples, store, cfg)
    assert [t.sample_id for t in trajs] == [s.id for s in samples]
    assert all(t.correct and t.tool_calls == 1 and t.tool_errors == 0 and t.turns == 2 for t in trajs)
    assert be.batches == [3, 1, 3, 1]  # lockstep batches of batch_size per turn
    t = trajs[0]
    assert [o["name"] for o in t.observations] == ["image_0", "obs_1"]
    tool = [m for m in t.messages if m["role"] == "tool"][0]
    assert tool["content"][0] == {"type": "image", "observation": "obs_1"}
    # the crop covers the target
    x0, y0, x1, y1 = t.observations[1]["window"]
    tx0, ty0, tx1, ty1 = samples[0].targets[0].bbox
    assert x0 <= tx0 and y0 <= ty0 and x1 >= tx1 and y1 >= ty1


def test_tool_and_format_errors_go_back_to_the_model(vqa):
    samples, store = vqa
    script = [format_tool_call([5, 5, 5, 5]), "<tool_call>{bad json</tool_call>",
              '<tool_call>{"name": "rotate", "arguments": {}}</tool_call>', "<answer>A</answer>"]
    be = ScriptBackend(script)
    [t] = run_episodes(be, samples[:1], store, AgentConfig(max_turns=5))
    tools = [m for m in t.messages if m["role"] == "tool"]
    assert len(tools) == 3 and all(m["content"][0]["type"] == "text" for m in tools)
    assert t.tool_errors == 3 and t.turns == 4 and t.correct and not t.truncated
    # the model saw the error texts in its next turn's conversation
    assert any(m["role"] == "tool" for m in be.seen[-1])


def test_turn_limit_truncates_without_credit(vqa):
    samples, store = vqa
    be = ScriptBackend([format_tool_call([0, 0, 100, 100]) + " <answer>A</answer>"[:0]])
    [t] = run_episodes(be, samples[:1], store, AgentConfig(max_turns=2))
    assert t.truncated and t.turns == 2 and t.prediction is None and not t.correct


def test_zoom_call_limit_is_enforced(vqa):
    samples, store = vqa
    be = ScriptBackend([format_tool_call([0, 0, 100, 100])] * 3 + ["<answer>A</answer>"])
    cfg = AgentConfig(max_turns=6, zoom=ZoomConfig(max_turns=2))
    [t] = run_episodes(be, samples[:1], store, cfg)
    assert t.tool_calls == 3 and t.tool_errors == 1 and t.correct


def test_backend_failure_marks_episodes_not_the_run(vqa):
    samples, store = vqa

    class Flaky:
        n = 0

        def generate(self, conversations, images, **kw):
            self.n += 1
            if self.n == 1:
                raise RuntimeError("engine died")
            return ["<answer>A</answer>"] * len(conversations)

    trajs = run_episodes(Flaky(), samples, store, AgentConfig(batch_size=2))
    assert [t.error is not None for t in trajs] == [True, True, False, False]
    assert "engine died" in trajs[0].error


def test_bad_sample_does_not_stop_others(vqa):
    samples, store = vqa
    bad = VQASample(id="bad", images=["no_such_image"], question="q", answer="A", choices=["(A) x", "(B) y"])
    trajs = run_episodes(ScriptBackend(["<answer>A</answer>"]), [bad, samples[0]], store, AgentConfig())
    assert trajs[0].error.startswith("setup:") and trajs[1].correct


def test_direct_protocol_uses_official_prompt(vqa):
    samples, store = vqa
    be = ScriptBackend(["C"])
    [t] = run_episodes(be, samples[2:3], store, AgentConfig(protocol="direct", max_new_tokens=64))
    text = be.seen[0][0]["content"][-1]["text"]
    assert text.endswith("The answer is:") and "The choices are listed below:" in text
    assert t.correct and t.turns == 1 and t.tool_calls == 0


def test_sampling_rollouts_and_ids(vqa):
    samples, store = vqa
    trajs = run_episodes(ScriptBackend(["<answer>A</answer>"]), samples[:2], store, AgentConfig(), n=3)
    assert [(t.sample_id, t.meta["rollout"]) for t in trajs] == [
        ("q0", 0), ("q0", 1), ("q0", 2), ("q1", 0), ("q1", 1), ("q1", 2)]
    trajs = run_episodes(ScriptBackend(["<answer>A</answer>"]), samples[:2], store, AgentConfig(),
                         rollout_ids=[4, 7])
    assert [t.meta["rollout"] for t in trajs] == [4, 7]


def test_stop_helpers():
    assert trim_at_stop('<tool_call>{"a": 1}</tool_call> more <answer>A</answer>', ["</tool_call>", "</answer>"]) \
        == '<tool_call>{"a": 1}</tool_call>'
    assert close_stopped('<tool_call>{"a": 1}') == '<tool_call>{"a": 1}</tool_call>'
    assert close_stopped("<answer>B") == "<answer>B</answer>"
    assert close_stopped("<answer>B</answer>") == "<answer>B</answer>"


def test_agent_config_problems():
    assert AgentConfig(max_turns=0, temperature=-1, protocol="x", top_p=0).validate()
    from pipeline.core.errors import ConfigError

    with pytest.raises(ConfigError):
        run_episodes(ScriptBackend(["x"]), [], None, AgentConfig(batch_size=0))


# ------------------------------------------------------------------------------------------ real tiny model
def test_transformers_backend_tiny_batched(vqa):
    import torch

    from rl.backends import make_backend

    torch.set_num_threads(1)
    samples, store = vqa
    be = make_backend("transformers", "tiny")
    trajs = run_episodes(be, samples[:3], store, AgentConfig(max_new_tokens=12, max_turns=2, batch_size=3))
    assert len(trajs) == 3 and all(t.error is None for t in trajs), [t.error for t in trajs]
    assert all(isinstance(t.final_text, str) for t in trajs)


def test_stop_criteria_reads_decoded_text():
    import torch

    from pipeline.models import load_processor
    from rl.backends import _stop_criteria_class

    tok = load_processor("tiny").tokenizer
    ids = tok('xx <tool_call>{"a": 1}</tool_call> yy', return_tensors="pt")["input_ids"]
    crit = _stop_criteria_class()(tok, ["</tool_call>"], prompt_len=0)
    cut = tok("xx <tool_call>", return_tensors="pt")["input_ids"]
    batch = torch.nn.utils.rnn.pad_sequence([ids[0], cut[0]], batch_first=True, padding_value=0)
    assert crit(batch, None).tolist() == [True, False]  # row 1 holds only a prefix of the call


# ------------------------------------------------------------------------------------------ vLLM (fake engine)
class _FakeOut:
    def __init__(self, text):
        self.outputs = [type("C", (), {"text": text})()]


class _FakeLLM:
    def __init__(self):
        self.calls = []

    def generate(self, reqs, params, use_tqdm=False):
        self.calls.append((reqs, params))
        return [_FakeOut('<tool_call>{"name": "zoom_in", "arguments": {"bbox": [0, 0, 50, 50]}}</tool_call> junk')
                if i == 0 else _FakeOut("<answer>A</answer>") for i in range(len(reqs))]


class _FakeProcessor:
    def apply_chat_template(self, conv, tokenize=False, add_generation_prompt=True):
        return "|".join(m["role"] for m in conv) + "|assistant:"


def test_vllm_backend_requests_with_fake_engine(vqa):
    from rl.backends import VLLMBackend

    samples, store = vqa
    llm = _FakeLLM()
    be = VLLMBackend(llm, _FakeProcessor(), sampling_params_cls=lambda **kw: kw, seed=3)
    trajs = run_episodes(be, samples[:2], store, AgentConfig(max_turns=2, temperature=0.0))
    reqs, params = llm.calls[0]
    assert reqs[0]["prompt"] == "system|user|assistant:"
    assert isinstance(reqs[0]["multi_modal_data"]["image"], Image.Image)
    assert len(params) == len(reqs)  # one SamplingParams per request
    params = params[0]
    assert params["include_stop_str_in_output"] and params["stop"] == ["</tool_call>", "</answer>"]
    assert params["temperature"] == 0.0 and params["seed"] is None  # greedy: no seed needed
    # turn 2 of episode 0 carries the overview and the crop, in order
    reqs2, _ = llm.calls[1]
    assert reqs2[0]["prompt"] == "system|user|assistant|tool|assistant:"
    assert len(reqs2[0]["multi_modal_data"]["image"]) == 2
    assert trajs[0].messages[2]["content"].endswith("</tool_call>")  # junk after the stop string dropped
    with pytest.raises(BackendError, match="placeholders"):
        be.build_requests([[{"role": "user", "content": [{"type": "image"}]}]], [[]])


def _vllm_run(samples, store, *, batch_size, n=4, temperature=1.0, seed=7):
    import vllm_standin

    from rl.backends import VLLMBackend

    be = VLLMBackend.from_engine_class("tiny", vllm_standin.LLM, vllm_standin.SamplingParams, seed=0)
    trajs = run_episodes(be, samples, store, AgentConfig(max_turns=1, temperature=temperature, seed=seed,
                                                         batch_size=batch_size), n=n)
    return be, trajs


def test_vllm_backend_seeds_each_rollout_against_the_vllm_contract(vqa):
    """Issue #11 finding 7: every request carries its rollout's own seed (vLLM seeds each request's generator
    from SamplingParams.seed): distinct across rollouts, identical on a rerun with other batches."""
    samples, store = vqa
    be, trajs = _vllm_run(samples[:2], store, batch_size=8)
    reqs = be.llm.requests
    seeds = [sp.seed for _, sp in reqs]
    assert len(reqs) == 8 and all(sp.sampling_type == "RANDOM_SEED" for _, sp in reqs)
    assert len(set(seeds)) == 8  # one seed per rollout
    assert len({t.final_text for t in trajs}) > 1  # so the rollouts of an item can differ
    be2, trajs2 = _vllm_run(samples[:2], store, batch_size=3)  # a rerun, batched differently
    assert [sp.seed for _, sp in be2.llm.requests] == seeds
    assert [t.final_text for t in trajs2] == [t.final_text for t in trajs]
    be3, _ = _vllm_run(samples[:2], store, batch_size=8, seed=8)  # another base seed: other draws
    assert not set(sp.seed for _, sp in be3.llm.requests) & set(seeds)
    be4, _ = _vllm_run(samples[:1], store, batch_size=8, n=1, temperature=0.0)  # greedy needs no seed
    assert be4.llm.requests[0][1].sampling_type == "GREEDY"


def test_vllm_backend_bans_the_image_placeholders_against_the_vllm_contract(vqa, monkeypatch):
    """A placeholder the model writes would come back in the next turn's prompt without its image, and vLLM's
    prompt update would fail on it: every request bans them through `bad_words`, which the stand-in resolves
    and applies as vLLM 0.31 does (one special token each, never generated)."""
    import vllm_standin

    samples, store = vqa
    monkeypatch.setattr(vllm_standin.LLM, "prefix", "<think>I see <|image_pad|> and <|video_pad|>.</think>")
    be, trajs = _vllm_run(samples[:1], store, batch_size=4, n=2)
    tok = be.processor.tokenizer
    ids = [tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>")]
    for _, sp in be.llm.requests:
        assert sp.bad_words == ["<|image_pad|>", "<|video_pad|>"]
        assert sp._bad_words_token_ids == [[i] for i in ids]  # one token each: -inf at every step
    assert all(t.error is None and t.final_text.startswith("<think>I see  and .</think><answer>")
               for t in trajs)
    # the stand-in's model does write them when nothing bans them
    free = vllm_standin.SamplingParams(max_tokens=8)
    out = be.llm.generate([{"prompt": "x"}], free)[0].outputs[0].text
    assert "<|image_pad|>" in out and "<|video_pad|>" in out


def test_vllm_backend_gets_the_resolved_local_folder(vqa, tmp_path):
    """Issue #11 finding 8: the engine is built on the resolved local model folder ("tiny", a stage output
    folder, a cached HF id), never on the raw spec; an HF id that is not cached is a clear error, offline."""
    import vllm_standin

    from pipeline.core.errors import ModelNotFoundError
    from pipeline.models import resolve_model_path
    from rl.backends import VLLMBackend

    be = VLLMBackend.from_engine_class("tiny", vllm_standin.LLM, vllm_standin.SamplingParams, max_images=3)
    assert be.llm.model == str(resolve_model_path("tiny")) and be.llm.engine_args["limit_mm_per_prompt"] == {
        "image": 3}
    stage = tmp_path / "sft"
    (stage / "model").mkdir(parents=True)
    for f in resolve_model_path("tiny").iterdir():
        if f.is_file():
            (stage / "model" / f.name).write_bytes(f.read_bytes())
    be = VLLMBackend.from_engine_class(str(stage), vllm_standin.LLM, vllm_standin.SamplingParams)
    assert be.llm.model == str(stage / "model")
    n = len(vllm_standin.LLM.instances)
    with pytest.raises(ModelNotFoundError, match="local Hugging Face cache"):
        VLLMBackend.from_engine_class("nobody/not-cached-model", vllm_standin.LLM, vllm_standin.SamplingParams)
    assert len(vllm_standin.LLM.instances) == n  # no engine was started on the Hub id


def test_vllm_from_pretrained_without_vllm_is_a_clear_error():
    import importlib.util

    from rl.backends import VLLMBackend

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm installed")
    with pytest.raises(BackendError, match="knowzoom\\[gpu\\]"):
        VLLMBackend.from_pretrained("/nowhere")


# ------------------------------------------------------------------------------------------ OpenAI-compatible
class _Handler(BaseHTTPRequestHandler):
    bodies: list = []
    fail_first = 0

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append((self.path, self.headers.get("Authorization"), body))
        if type(self).fail_first > 0:
            type(self).fail_first -= 1
            self.send_response(503)
            self.end_headers()
            self.wfile.write(b"busy")
            return
        n_assist = sum(1 for m in body["messages"] if m["role"] == "assistant")
        # a real OpenAI server drops the stop string: the closing tag is missing
        text = '<tool_call>{"name": "zoom_in", "arguments": {"bbox": [0, 0, 60, 60]}}' if n_assist == 0 \
            else "<answer>A"
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text},
                                        "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_openai_backend_against_fake_server(vqa, monkeypatch):
    from rl.backends import OpenAIBackend

    samples, store = vqa
    srv = HTTPServer(("127.0.0.1", 0), _Handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        _Handler.bodies, _Handler.fail_first = [], 1
        be = OpenAIBackend(f"http://127.0.0.1:{srv.server_port}/v1", "served-model", api_key="k",
                           timeout_s=10, max_retries=2, concurrency=2)
        monkeypatch.setattr("pipeline.core.http.time.sleep", lambda s: None)
        trajs = run_episodes(be, samples[:2], store, AgentConfig(max_turns=3))
    finally:
        srv.shutdown()
    assert all(t.prediction == "A" and t.tool_calls == 1 and t.tool_errors == 0 for t in trajs), \
        [(t.error, t.final_text) for t in trajs]
    assert trajs[0].correct and not trajs[1].correct  # q1's answer is B
    path, auth, body = _Handler.bodies[-1]
    assert path == "/v1/chat/completions" and auth == "Bearer k" and body["model"] == "served-model"
    assert body["stop"] == ["</tool_call>", "</answer>"] and body["temperature"] == 0.0
    user = [m for m in body["messages"] if m["role"] == "user"]
    urls = [p["image_url"]["url"] for m in user for p in m["content"] if p["type"] == "image_url"]
    assert len(urls) == 2 and all(u.startswith("data:image/png;base64,") for u in urls)
    crop = Image.open(io.BytesIO(base64.b64decode(urls[1].split(",", 1)[1])))
    assert crop.size[0] % 28 == 0 and crop.size[1] % 28 == 0
    assert user[1]["content"][0]["text"].startswith("<tool_response>")
    assert body["messages"][2]["content"].endswith("</tool_call>")  # stop string re-appended


def test_openai_backend_gives_up_with_a_clear_error(monkeypatch):
    from rl.backends import OpenAIBackend

    srv = HTTPServer(("127.0.0.1", 0), _Handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        _Handler.bodies, _Handler.fail_first = [], 10
        monkeypatch.setattr("pipeline.core.http.time.sleep", lambda s: None)
        be = OpenAIBackend(f"http://127.0.0.1:{srv.server_port}/v1", "m", max_retries=1)
        with pytest.raises(BackendError, match="HTTP 503"):
            be.generate([[{"role": "user", "content": "hi"}]], [[]], max_new_tokens=4, temperature=0,
                        top_p=1, stop=[])
        assert len(_Handler.bodies) == 2
    finally:
        srv.shutdown()
