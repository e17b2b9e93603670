"""Unit tests of the RL pieces: reward components, turn splitting, the environment, the tool template, config
validation and input fallbacks."""

from __future__ import annotations

import json

import pytest
from fixtures.scenes import make_scenes

from pipeline.core.errors import ConfigError, DatasetNotFoundError, ModelNotFoundError
from pipeline.core.records import TargetRegion, VQASample
from rl.rewards import (
    EpisodeStats,
    RewardSettings,
    format_score,
    region_coverage,
    score_episode,
    split_assistant_turns,
)
from tools.protocol import tags_balanced

CALL = '<tool_call>{"name": "zoom_in", "arguments": {"bbox": [1, 2, 30, 40], "source": "image_0"}}</tool_call>'
SAMPLE = VQASample(id="s", images=["a"], question="Colour?", answer="B", qtype="single",
                   choices=["(A) red", "(B) green", "(C) blue", "(D) yellow"],
                   targets=[TargetRegion(image=0, bbox=[100, 100, 140, 140])])


def test_split_assistant_turns_drops_tool_responses():
    text = ("<think>a</think>" + CALL + "<|im_end|>\n<|im_start|>tool\n<|vision_start|><|image_pad|><|vision_end|>"
            "obs_1: zoom<|im_end|>\n<|im_start|>assistant\n<answer>B</answer><|im_end|>")
    assert split_assistant_turns(text) == ["<think>a</think>" + CALL, "<answer>B</answer>"]
    assert split_assistant_turns("<answer>B</ans") == ["<answer>B</ans"]  # cut by the length budget


@pytest.mark.parametrize("turn,ok", [
    ("<think>x</think><answer>B</answer>", True),
    ("<think>x<answer>B</answer>", False),
    ("</think>x<think>", False),
    ("<tool_call>{}", False),
    ("plain", True),
])
def test_tags_balanced(turn, ok):
    assert tags_balanced(turn) is ok


@pytest.mark.parametrize("turns,score,truncated", [
    ([CALL, "<answer>B</answer>"], 1.0, False),
    (["<think>t</think><answer>B</answer>"], 1.0, False),
    ([CALL + "<answer>B</answer>", "<answer>B</answer>"], 0.0, False),  # call + answer in one turn
    (['<tool_call>{"name": "crop", "arguments": {}}</tool_call>', "<answer>B</answer>"], 0.0, False),
    (["<tool_call>{oops</tool_call>"], 0.0, False),
    ([CALL + CALL, "<answer>B</answer>"], 0.0, False),  # several calls in a turn
    (["B"], 0.0, False),  # no answer tag
    (["<answer>B</answer>", "<answer>B</answer>"], 0.0, False),  # a non-final turn without a call
    ([CALL, CALL], 0.0, True),  # cut by the turn limit
    (["<think>x<answer>B</answer>"], -1.0, False),
    ([], 0.0, False),
])
def test_format_score(turns, score, truncated):
    s, errors, t = format_score(turns)
    assert (s, t) == (score, truncated)
    assert (s == 1.0) == (not errors)


def test_score_episode_components_and_weights():
    st = RewardSettings()
    assert st.weights() == [0.8, 0.2, 1.2]
    assert RewardSettings(region_weight=0.5).weights() == [0.8, 0.2, 1.2, 0.5]
    zoomed = EpisodeStats(n_calls=1, zooms=[(0, (90.0, 90.0, 150.0, 150.0))])
    s = score_episode([CALL, "<answer>B</answer>"], SAMPLE, zoomed, st)
    assert (s.accuracy, s.format, s.tool_bonus, s.region, s.correct) == (1.0, 1.0, 1.0, 1.0, True)
    wrong = score_episode([CALL, "<answer>C</answer>"], SAMPLE, zoomed, st)
    assert (wrong.accuracy, wrong.tool_bonus) == (0.0, 0.0)  # no bonus without the right answer
    nozoom = score_episode(["<answer>B</answer>"], SAMPLE, EpisodeStats(), st)
    assert (nozoom.accuracy, nozoom.tool_bonus) == (1.0, 0.0)  # no bonus without a successful zoom
    failed = score_episode([CALL, "<answer>B</answer>"], SAMPLE, EpisodeStats(n_calls=1, n_errors=1), st)
    assert (failed.tool_bonus, failed.format) == (0.0, 0.0)  # a call the tool rejected is not well formed
    assert "rejected" in failed.format_errors[-1]
    retried = EpisodeStats(n_calls=2, n_errors=1, zooms=[(0, (90.0, 90.0, 150.0, 150.0))])
    assert score_episode([CALL, CALL, "<answer>B</answer>"], SAMPLE, retried, st).format == 0.0
    lax = RewardSettings(tool_errors_break_format=False)
    assert score_episode([CALL, "<answer>B</answer>"], SAMPLE, EpisodeStats(n_calls=1, n_errors=1), lax).format == 1.0
    long = score_episode(["<answer>" + "B" * 1000 + "</answer>"], SAMPLE, EpisodeStats(), st)
    assert long.accuracy == 0.0  # answers >= max_answer_chars get no credit
    cut = score_episode([CALL, CALL], SAMPLE, zoomed, st)
    assert cut.masked and cut.component("format") is None
    kept = score_episode([CALL, CALL], SAMPLE, zoomed, RewardSettings(mask_truncated_episodes=False))
    assert not kept.masked and kept.component("accuracy") == 0.0
    crashed = score_episode([CALL], SAMPLE, EpisodeStats(failure="zoom_in: boom"), st)
    assert crashed.unscorable and crashed.component("accuracy") is None


def test_on_target_and_guess_rate_say_whether_a_right_answer_was_read():
    st = RewardSettings()
    full = score_episode([CALL, "<answer>B</answer>"], SAMPLE, EpisodeStats(n_calls=1, zooms=[(0, (90, 90, 150, 150))]), st)
    half = score_episode([CALL, "<answer>B</answer>"], SAMPLE, EpisodeStats(n_calls=1, zooms=[(0, (0, 0, 120, 999))]), st)
    third = score_episode([CALL, "<answer>B</answer>"], SAMPLE, EpisodeStats(n_calls=1, zooms=[(0, (0, 0, 113, 999))]), st)
    none = score_episode(["<answer>B</answer>"], SAMPLE, EpisodeStats(), st)
    crashed = score_episode([CALL], SAMPLE, EpisodeStats(failure="boom"), st)
    # the eval's threshold (pipeline.eval.report.zoom_hits): half of a target box
    assert (full.on_target, half.on_target, third.on_target, none.on_target) == (True, True, False, False)
    assert {full.guess_rate, none.guess_rate, crashed.guess_rate} == {0.25}  # 4 choices, crashed or not
    assert VQASample(id="m", images=["a"], question="q", answer="AC", qtype="multi",
                     choices=["(A) a", "(B) b", "(C) c"]).guess_rate() == pytest.approx(1 / 7)
    assert VQASample(id="t", images=["a"], question="q", answer="true", qtype="tf").guess_rate() == 0.5
    assert VQASample(id="n", images=["a"], question="q", answer="3", qtype="numeric").guess_rate() == 0.0

    # the batch's rates and the run's totals: 2 right on target, 1 right off it, of 5 rollouts
    from rl.rewards import EpisodeScore, ZoomRewards

    rewards = ZoomRewards(tokenizer=None, settings=st)
    logged: dict = {}
    scores = [EpisodeScore(correct=c, on_target=o, guess_rate=0.25)
              for c, o in ((True, True), (True, True), (False, True), (True, False), (False, False))]
    rewards._account(scores, lambda k, v: logged.__setitem__(k, v))
    assert logged["episodes/on_target_rate"] == pytest.approx(3 / 5)
    assert logged["episodes/correct_on_target_rate"] == pytest.approx(2 / 5)
    assert logged["episodes/guess_rate"] == pytest.approx(0.25)
    t = rewards.totals
    assert (t["on_target"], t["correct_on_target"], t["correct"], t["guess_rate_sum"]) == (3, 2, 3, 1.25)

    # pooled over steps as the plot and the report read them; a log without the keys gives None
    from rl.plots import view_accuracy

    other = {"episodes/on_target_rate": 1.0, "episodes/correct_on_target_rate": 0.0, "episodes/accuracy": 0.0,
             "episodes/guess_rate": 0.5}
    pooled = view_accuracy([dict(logged, **{"episodes/accuracy": 3 / 5}), other])
    assert pooled == {"on": pytest.approx(2 / 8), "off": pytest.approx(1 / 2), "guess": pytest.approx(0.375)}
    assert view_accuracy([{"step": 1, "reward": 0.5}]) == {"on": None, "off": None, "guess": None}


def test_reward_curve_plots_the_view_panel_and_older_logs(tmp_path):
    from rl.plots import plot_reward_curve

    keys = {"episodes/on_target_rate": 0.5, "episodes/correct_on_target_rate": 0.25, "episodes/accuracy": 0.25,
            "episodes/guess_rate": 0.25, "reward": 0.3}
    for name, rows in (("new", [dict(keys, step=i) for i in range(1, 4)]),
                       ("old", [{"step": i, "reward": 0.1 * i} for i in range(1, 4)])):
        path = plot_reward_curve(rows, tmp_path / f"{name}.png")
        assert path.stat().st_size > 0


def test_region_coverage():
    t = [TargetRegion(image=0, bbox=[100, 100, 140, 140])]
    assert region_coverage([(0, (0, 0, 120, 1000))], t) == pytest.approx(0.5)
    assert region_coverage([(1, (0, 0, 1000, 1000))], t) == 0.0  # other image
    assert region_coverage([(0, (0, 0, 50, 50))], t) == 0.0
    assert region_coverage([], t) == 0.0


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoomtask_units")
    make_scenes(root, n=2, size=512, square=32, seed=4)
    return root


def test_env_reset_zoom_errors_and_failures(task):
    from rl.env import LocalEpisodes, make_env_factory
    from tools.store import ImageStore
    from tools.zoom import ZoomConfig

    store = ImageStore.from_manifest(task / "images.jsonl")
    counters: dict[str, int] = {}
    cls = make_env_factory(LocalEpisodes(store, ZoomConfig(max_turns=2)), counters=counters)
    env = cls()
    sample = dict(json.loads((task / "vqa.jsonl").read_text().splitlines()[0]), hint="Site: column 3, row 2.")
    content = env.reset(sample=json.dumps(sample))
    images = [p for p in content if p["type"] == "image"]
    assert len(images) == 1 and images[0]["image"].size == (224, 224)
    assert any("What colour" in p.get("text", "") for p in content)
    # the user turn RL trains on is the one eval, mining and SFT pre-warm render (overview sizes included)
    from pipeline.core.records import VQASample
    from tools.protocol import build_prompt_messages

    want = build_prompt_messages(VQASample.from_dict(sample), sizes=[(224, 224)])[-1]["content"]
    assert [{k: v for k, v in p.items() if k != "image"} for p in content] == want
    assert want[0]["text"] == "image_0 (224x224):" and want[-1]["text"].endswith("\nSite: column 3, row 2.")
    out = env.zoom_in([10, 10, 80, 80])
    assert [p["type"] for p in out] == ["image", "text"] and out[1]["text"].startswith("obs_1")
    err = env.zoom_in([5000, 5000, 6000, 6000])  # outside: an observation, not an exception
    assert isinstance(err, list) and err[0]["type"] == "text" and "outside" in err[0]["text"]
    assert env.zoom_in([10, 10, 80, 80], source="obs_9")[0]["type"] == "text"  # over the turn limit / bad source
    assert env.stats.n_calls == 3 and env.stats.n_errors == 2 and len(env.stats.zooms) == 1
    assert env.stats.failure is None
    # an unreadable image makes the episode unscorable, not the batch fail
    bad = dict(sample, images=["no_such_image"])
    content = env.reset(sample=bad)
    assert all(p["type"] == "text" for p in content)
    assert env.stats.failure and counters["episode_failures"] == 1
    assert env.zoom_in([1, 1, 50, 50]) and env.stats.n_errors == 1


def test_env_tool_schema_matches_protocol():
    from transformers.utils import get_json_schema

    from rl.env import ZoomEnv, make_env_factory
    from tools.protocol import zoom_tool_schema

    for frame in ("shown_pixels", "norm1000"):
        cls = make_env_factory(backend=None, frame=frame)  # type: ignore[arg-type]
        got = get_json_schema(cls().zoom_in)["function"]
        want = zoom_tool_schema(frame)["function"]
        assert got["name"] == want["name"] == "zoom_in"
        assert got["description"] == " ".join(want["description"].split())
        for arg in ("bbox", "source"):
            assert got["parameters"]["properties"][arg]["description"] == want["parameters"]["properties"][arg]["description"]
        assert got["parameters"]["required"] == ["bbox"]
    public = [n for n in vars(ZoomEnv) if callable(getattr(ZoomEnv, n)) and not n.startswith("_")]
    assert sorted(public) == ["reset", "zoom_in"]  # TRL exposes every public method as a tool


def test_tool_template_renders_sft_and_eval_prompts_unchanged():
    """The RL template only adds tool-call rendering: every conversation SFT/eval render is byte-identical."""
    from pipeline.models import load_processor
    from rl.stage import TOOLS_TEMPLATE, prepare_processor

    proc = load_processor("tiny")
    msgs = [{"role": "system", "content": "sys"},
            {"role": "user", "content": [{"type": "text", "text": "image_0:"}, {"type": "image"},
                                         {"type": "text", "text": "Q?"}]},
            {"role": "assistant", "content": "<think>z</think>" + CALL},
            {"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": "obs_1: zoom"}]},
            {"role": "assistant", "content": "<answer>B</answer>"}]
    before = proc.apply_chat_template(msgs, tokenize=False)
    prepare_processor(proc, "auto")
    assert proc.chat_template == TOOLS_TEMPLATE.read_text()
    assert proc.apply_chat_template(msgs, tokenize=False) == before
    structured = [msgs[0], msgs[1], {"role": "assistant", "content": "<think>z</think>", "tool_calls": [
        {"type": "function", "function": {"name": "zoom_in", "arguments": {"bbox": [1, 2, 30, 40], "source": "image_0"}}}]}]
    assert proc.apply_chat_template(structured, tokenize=False) == proc.apply_chat_template(msgs[:3], tokenize=False)
    assert proc.tokenizer.response_template is not None


def test_config_validation_messages(tmp_path):
    from pipeline.core.config import load_config
    from rl.config import RLConfig

    with pytest.raises(ConfigError) as e:
        load_config(RLConfig, None, {"num_generations": 3, "per_device_train_batch_size": 4, "max_zooms": 0,
                                     "zoom_frame": "pixels", "max_failure_rate": 2.0, "vllm_mode": "remote"})
    msg = str(e.value)
    for field in ("divisible by num_generations", "max_zooms", "frame", "max_failure_rate", "vllm_mode"):
        assert field in msg
    with pytest.raises(ConfigError, match="max_turns: unknown field .*replaced by max_zooms"):
        load_config(RLConfig, None, {"max_turns": 5})  # the old name says what replaced it
    for path in ("configs/tiny/rl.yaml", "configs/qwen2_5_vl_7b/rl.yaml"):
        cfg = load_config(RLConfig, path)
        assert cfg.reward_settings().weights() == [0.8, 0.2, 1.2]
    big = load_config(RLConfig, "configs/qwen2_5_vl_7b/rl.yaml")
    assert (big.num_generations, big.learning_rate, big.beta, big.entropy_coef, big.max_zooms) == (16, 5e-7, 0.001, 0.001, 4)
    assert big.per_device_train_batch_size * big.gradient_accumulation_steps * big.world_size() == 128 * 16
    assert big.use_vllm and big.vllm_mode == "colocate" and big.world_size() == 8 and big.ray_use_gpu


def test_input_fallbacks(task, tmp_path):
    from rl.config import RLConfig
    from rl.stage import resolve_inputs

    cfg = RLConfig(model=str(tmp_path / "nope"), train_data=str(task / "vqa.jsonl"),
                   image_manifest=str(task / "images.jsonl"))
    with pytest.raises(ModelNotFoundError, match="model_fallback"):
        resolve_inputs(cfg)
    empty = tmp_path / "hard.jsonl"
    empty.write_text("")
    cfg = RLConfig(model=str(tmp_path / "nope"), model_fallback="tiny", train_data=str(empty),
                   train_data_fallback=str(task / "vqa.jsonl"), image_manifest=str(task / "images.jsonl"))
    got = resolve_inputs(cfg)
    assert got["model"] == "tiny" and got["train_data"] == str(task / "vqa.jsonl") and len(got["fallbacks"]) == 2
    cfg = RLConfig(model="tiny", train_data=str(tmp_path / "missing.jsonl"), image_manifest=str(task / "images.jsonl"))
    with pytest.raises(DatasetNotFoundError, match="mine-hard"):
        resolve_inputs(cfg)
    cfg = RLConfig(model="tiny", train_data=str(task / "vqa.jsonl"), image_manifest=str(tmp_path / "x.jsonl"))
    with pytest.raises(DatasetNotFoundError, match="make-scenes"):
        resolve_inputs(cfg)


def test_length_truncated_completions_leave_the_loss_not_the_attention():
    """Fix 5 of rl/trainer.py: a completion cut by max_completion_length (no stop token at its end) gets a zero
    loss row, while completion_mask (the loss forward's attention mask) keeps every generated token: with
    TRL's own flag the crop tokens of such a completion left the attention mask and the next rollouts' images
    went to the wrong rows (the RL step crashed in get_rope_index)."""
    import torch

    from rl.trainer import loss_mask_without_truncated

    eos, pad, img = 2, 0, 9
    ids = torch.tensor([[5, 6, img, img, 7, eos, pad],   # answered: ends with a stop token
                        [5, img, img, 6, 7, 8, 8],       # cut by the length limit, a crop inside
                        [5, 6, pad, pad, pad, pad, pad]])  # ends with pad (TRL counts pad as a stop), not cut
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0]])
    tool = torch.tensor([[1, 1, 0, 0, 1, 1, 1], [1, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    out = {"completion_ids": ids, "completion_mask": mask.clone(), "tool_mask": tool.clone(),
           "num_items_in_batch": torch.tensor(99)}
    loss_mask_without_truncated(out, [eos, pad])
    assert torch.equal(out["completion_mask"], mask)  # attention untouched: the crop stays attended
    assert out["tool_mask"][1].sum() == 0 and torch.equal(out["tool_mask"][[0, 2]], tool[[0, 2]])
    assert int(out["num_items_in_batch"]) == int((mask * tool)[[0, 2]].sum())
    out = {"completion_ids": ids, "completion_mask": mask.clone(), "num_items_in_batch": torch.tensor(99)}
    loss_mask_without_truncated(out, [eos, pad], gather=lambda t: t.reshape(1))  # no tools: a mask is made
    assert out["tool_mask"].tolist()[1] == [0] * 7 and int(out["num_items_in_batch"]) == 9


def test_a_model_cannot_write_an_image_placeholder_into_its_own_episode(task):
    """A random model (the ablation's RL-only variant) sometimes writes `<|image_pad|>`: the turn went back into
    the conversation, the processor found one image placeholder more than images and raised StopIteration, and
    mine-hard and eval dropped the episode as unscorable ("generation failed", 12 of 40 items). The
    transformers backend now suppresses the image and video placeholder tokens, as TRL's GRPO generation
    suppresses the image token: a model pushed to write nothing else writes neither, and its episodes end
    without an error."""
    import torch

    from pipeline.core.records import read_vqa
    from rl.agent import AgentConfig, run_episodes
    from rl.backends import make_backend
    from tools.store import ImageStore

    backend = make_backend("transformers", "tiny")
    tok = backend.tokenizer
    pads = [tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>")]
    lm_head = backend.model.get_output_embeddings()
    handle = lm_head.register_forward_hook(lambda m, i, o: o.index_fill(-1, torch.tensor(pads), 1e4))
    try:
        samples = read_vqa([task / "vqa.jsonl"])[:2]
        store = ImageStore.from_manifest(task / "images.jsonl")
        trajs = run_episodes(backend, samples, store, AgentConfig(max_new_tokens=8, max_turns=2))
    finally:
        handle.remove()
    assert [t.error for t in trajs] == [None, None]
    assert all("<|image_pad|>" not in str(m.get("content")) for t in trajs for m in t.messages
               if m["role"] == "assistant")


def test_rl_generation_may_not_write_a_placeholder_on_either_path(tmp_path):
    """TRL's own generation gets the same ban: vLLM (colocate or server) as `bad_words` in every SamplingParams
    (TRL bans nothing there), transformers as `suppress_tokens` (TRL's default suppresses the image token only,
    not the video token). tests/test_rl_gpu_path.py runs the vLLM one through TRL's colocate loop."""
    from pipeline.models import load_processor, resolve_model_path
    from rl.config import RLConfig
    from rl.stage import _grpo_config

    proc = load_processor(str(resolve_model_path("tiny")))
    ids = [proc.tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>")]
    cfg = RLConfig(output_dir=str(tmp_path))
    assert _grpo_config(cfg, tmp_path / "ck", False, proc).generation_kwargs == {"suppress_tokens": ids}
    cfg.use_vllm = True
    vllm = _grpo_config(cfg, tmp_path / "ck", False, proc)
    assert vllm.use_vllm and vllm.generation_kwargs == {"bad_words": ["<|image_pad|>", "<|video_pad|>"]}
