"""One meaning per protocol setting and one parsing behaviour across SFT trajectories, mining, RL and eval:

- `max_zooms` allows the same number of zoom calls (and the answer turn on top) in all four stages;
- the same malformed model outputs get the same error observation, counts and next turn in eval's agent loop
  (`rl.agent`) and in RL through TRL's real tool loop (`GRPOTrainer`, `rl.env`).
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
from test_eval_helpers import ScriptBackend

from pipeline.core.records import VQASample, read_jsonl
from pipeline.eval.evaluate import EvalConfig
from pipeline.eval.mining import MineHardConfig
from rl.agent import run_episodes
from rl.config import RLConfig
from rl.scripted import VALID_CALL, script_policy
from rl.stage import build_run
from rl.synthetic import make_zoom_task
from sft.config import SFTConfig
from sft.data import oracle_trajectory
from tools.protocol import Episode, ToolCall, turn_budget
from tools.store import ImageStore
from tools.zoom import ZoomConfig

N = 2  # the zoom limit every stage is given
ANSWER = "<answer>A</answer>"
# (name, first turn): what eval and RL must treat alike
MALFORMED = [
    ("bad json", "<tool_call>{bad json</tool_call>"),
    ("two calls", VALID_CALL + VALID_CALL),
    ("call and answer", VALID_CALL + ANSWER),
    ("unknown tool", '<tool_call>{"name": "crop", "arguments": {"bbox": [1, 2, 3, 4]}}</tool_call>'),
    ("missing bbox", '<tool_call>{"name": "zoom_in", "arguments": {"source": "image_0"}}</tool_call>'),
    ("bbox_2d alias", '<tool_call>{"name": "zoom_in", "arguments": {"bbox_2d": [10, 10, 80, 80]}}</tool_call>'),
    ("string arguments", '<tool_call>{"name": "zoom_in", "arguments": "{\\"bbox\\": [10, 10, 80, 80]}"}'
                         '</tool_call>'),
]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoomtask")
    make_zoom_task(root, n=2, size=512, square=32, seed=1)
    return root


@pytest.fixture(scope="module")
def sample(task):
    return list(read_jsonl(task / "vqa.jsonl", VQASample))[0]


@pytest.fixture(scope="module")
def store(task):
    return ImageStore.from_manifest(task / "images.jsonl")


@pytest.fixture(scope="module")
def rl_run(task, tmp_path_factory):
    """One GRPO step through TRL's real tool loop: rollout k plays MALFORMED[k] then answers; the last
    rollout zooms on every turn (it meets the zoom limit)."""
    scripts = [[f"<think>r{k}</think>{text}", ANSWER] for k, (_, text) in enumerate(MALFORMED)]
    scripts.append([f"<think>r{len(MALFORMED)}</think>{VALID_CALL}", VALID_CALL, VALID_CALL, VALID_CALL])
    n = len(scripts)
    cfg = RLConfig(output_dir=str(tmp_path_factory.mktemp("rl")), model="tiny", train_data=str(task / "vqa.jsonl"),
                   image_manifest=str(task / "images.jsonl"), max_samples=1, num_generations=n,
                   per_device_train_batch_size=n, max_steps=1, max_zooms=N, save_steps=0, plot=False,
                   max_completion_length=2048, learning_rate=1e-3, max_failure_rate=1.0)
    run = build_run(cfg)
    script_policy(run.trainer, scripts)
    run.trainer.train()
    by_rollout = {}
    for env, comp in zip(run.trainer.environments, run.trainer._logs["completion"], strict=True):
        k = int(re.search(r"<think>r(\d+)", json.dumps(comp, default=str)).group(1))
        by_rollout[k] = (env, comp)
    return cfg, by_rollout


def _tool_texts(messages: list[dict]) -> list[str]:
    out = []
    for m in messages:
        if m.get("role") == "tool":
            c = m["content"]
            out.append(c if isinstance(c, str) else " ".join(p.get("text", "") for p in c if p.get("type") == "text"))
    return out


def _assistant_turns(messages: list[dict]) -> int:
    return sum(1 for m in messages if m.get("role") == "assistant")


def test_turn_budget():
    assert [turn_budget(n) for n in (0, 1, 4)] == [1, 2, 5]
    with pytest.raises(ValueError):
        turn_budget(-1)


def test_every_stage_allows_the_same_zooms(task, sample, store, rl_run):
    """For max_zooms = N: SFT trajectories hold at most N zooms, eval and mine-hard run N zooms and then stop
    the episode, RL (TRL's loop) runs N zooms and cuts the next; the tool itself refuses call N + 1 in each."""
    # SFT: an oracle trajectory over more targets than the limit
    sft = SFTConfig(max_zooms=N)
    many = dataclasses.replace(sample, targets=sample.targets * (N + 2))
    messages, _, _ = oracle_trajectory(many, store, ZoomConfig(max_turns=sft.max_zooms), max_zooms=sft.max_zooms)
    sft_zooms = sum(1 for m in messages if m["role"] == "tool")
    # eval and mine-hard: a policy that zooms on every turn
    base = {"dataset_path": str(task / "vqa.jsonl"), "images_manifest": str(task / "images.jsonl"),
            "max_zooms": N}
    zooms = {"sft": sft_zooms}
    for name, cfg in (("eval", EvalConfig(**base)), ("mine-hard", MineHardConfig(**base))):
        agent = cfg.agent_config(temperature=0.0, top_p=1.0)
        [t] = run_episodes(ScriptBackend([VALID_CALL]), [sample], store, agent)
        assert t.truncated and t.turns == turn_budget(N) and t.tool_errors == 0, name
        zooms[name] = t.tool_calls
        ep = Episode(store, sample.images, cfg.zoom_config())
        assert [ep.execute(ToolCall("zoom_in", {"bbox": [10, 10, 80, 80]})).error is None
                for _ in range(N + 1)] == [True] * N + [False]
    # RL: TRL's tool loop
    rl_cfg, by_rollout = rl_run
    env, comp = by_rollout[len(MALFORMED)]
    assert env.score.truncated and _assistant_turns(comp) == turn_budget(N)
    zooms["rl"] = len(env.stats.zooms)
    ep = Episode(store, sample.images, ZoomConfig(**rl_cfg.zoom_config()))
    assert [ep.execute(ToolCall("zoom_in", {"bbox": [10, 10, 80, 80]})).error is None
            for _ in range(N + 1)] == [True] * N + [False]
    assert zooms == {"sft": N, "eval": N, "mine-hard": N, "rl": N}


@pytest.mark.parametrize("k", range(len(MALFORMED)), ids=[m[0] for m in MALFORMED])
def test_malformed_outputs_get_the_same_treatment_in_eval_and_rl(k, sample, store, rl_run):
    """Same first turn → same observation text, same call/error counts, and a second turn in both paths."""
    _, text = MALFORMED[k]
    first = f"<think>r{k}</think>{text}"
    agent = EvalConfig(max_zooms=N).agent_config(temperature=0.0, top_p=1.0)
    [t] = run_episodes(ScriptBackend([first, ANSWER]), [sample], store, agent)
    env, comp = by_rollout = rl_run[1][k]
    eval_obs, rl_obs = _tool_texts(t.messages), _tool_texts(comp)
    assert len(eval_obs) == len(rl_obs) == 1
    assert rl_obs == eval_obs, (rl_obs, eval_obs)
    assert (env.stats.n_calls, env.stats.n_errors) == (t.tool_calls, t.tool_errors)
    assert _assistant_turns(comp) == t.turns == 2  # the error was read and the model answered next
    assert env.score.correct == t.correct
    del by_rollout
