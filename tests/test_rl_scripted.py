"""GRPO through TRL's real tool loop with a scripted policy: reward components, failure counters, tool masks,
unscorable episodes, turn-limit masking, the failure-rate limit and the non-finite-gradient guard."""

from __future__ import annotations

import json
import re

import pytest
import torch
from fixtures.scenes import make_scenes
from fixtures.scripted_trainer import VALID_CALL, script_policy

from rl.config import RLConfig
from rl.errors import RolloutFailureError
from rl.stage import build_run, train_worker

VALID = VALID_CALL


def scripts(answer: str, wrong: str) -> list[list[str]]:
    """Rollout k's turns; each first turn carries a unique marker r<k> so later calls can be matched."""
    return [
        [f"<think>r0</think>{VALID}", f"<think>seen</think><answer>{answer}</answer>"],  # valid
        ["<think>r1</think><tool_call>{bad json</tool_call>"],  # malformed call: error observation, again
        ['<think>r2</think><tool_call>{"name": "crop", "arguments": {"bbox": [1, 2, 3, 4]}}</tool_call>',
         f"<answer>{answer}</answer>"],  # unknown tool
        ['<think>r3</think><tool_call>{"name": "zoom_in", "arguments": {"bbox": [5000, 5000, 6000, 6000], '
         '"source": "image_0"}}</tool_call>', f"<answer>{wrong}</answer>"],  # out of bounds
        [f"<think>r4</think>{VALID}<answer>{answer}</answer>", f"<answer>{answer}</answer>"],  # call + answer
        [f"<think>r5<answer>{answer}</answer>"],  # unbalanced tags
        [f"<think>r6</think>{VALID}", VALID, VALID],  # cut by max_zooms=2
        ['<think>r7</think><tool_call>{"name": "zoom_in", "arguments": {"bbox": [66, 66, 99, 99], '
         '"source": "image_0"}}</tool_call>', f"<answer>{answer}</answer>"],  # the backend raises
    ]


class RaisingBackend:
    """Wraps a backend; a call with bbox starting at 66 raises like a crashed reader would."""

    def __init__(self, inner):
        self.inner = inner
        self.counters = {}

    def start(self, key, image_ids):
        return self.inner.start(key, image_ids)

    def execute(self, key, name, arguments):
        if list(arguments.get("bbox", []))[:1] == [66]:
            raise RuntimeError("reader crashed")
        return self.inner.execute(key, name, arguments)

    def close(self, key):
        self.inner.close(key)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoomtask")
    make_scenes(root, n=2, size=512, square=32, seed=1)
    return root


def _cfg(task, out, **kw):
    base = dict(output_dir=str(out), model="tiny", train_data=str(task / "vqa.jsonl"),
                image_manifest=str(task / "images.jsonl"), max_samples=1, num_generations=8,
                per_device_train_batch_size=8, max_steps=1, max_zooms=2, save_steps=0, plot=False,
                max_completion_length=1024, learning_rate=1e-2, max_failure_rate=0.2)
    base.update(kw)
    return RLConfig(**base)


def _sample(task):
    return json.loads((task / "vqa.jsonl").read_text().splitlines()[0])


def capture_first_loss_inputs(trainer) -> dict:
    """Wrap the trainer's `_compute_loss`: the returned dict gets the first batch of inputs it sees ("inputs")."""
    captured: dict = {}
    orig = trainer._compute_loss

    def spy(model, inputs):
        captured.setdefault("inputs", inputs)
        return orig(model, inputs)

    trainer._compute_loss = spy
    return captured


def test_scripted_rewards_counters_and_masks(task, tmp_path):
    from rl.env import LocalEpisodes

    cfg = _cfg(task, tmp_path / "out")
    sample = _sample(task)
    wrong = "A" if sample["answer"] != "A" else "B"
    run = build_run(cfg)
    assert isinstance(run.backend, LocalEpisodes)
    run = build_run(cfg, backend=RaisingBackend(run.backend))  # same store, one call raises
    trainer = run.trainer
    script_policy(trainer, scripts(sample["answer"], wrong))
    captured = capture_first_loss_inputs(trainer)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()

    envs = trainer.environments
    # map envs to rollout index through their first zoom/turn marker in the completion text
    logs = trainer._logs
    completions = logs["completion"]
    idx = {}
    for i, comp in enumerate(completions):
        text = json.dumps(comp, default=str)
        m = re.search(r"r(\d)", text)
        idx[int(m.group(1))] = i
    s = {k: envs[i].score for k, i in idx.items()}

    assert (s[0].accuracy, s[0].format, s[0].tool_bonus, s[0].n_zooms_ok) == (1.0, 1.0, 1.0, 1)
    assert s[1].format == 0.0 and s[1].accuracy == 0.0 and s[1].n_tool_calls == 0
    assert any("ToolCallParseError" in e for e in s[1].format_errors)
    assert s[2].format == 0.0 and s[2].accuracy == 1.0 and s[2].tool_bonus == 0.0
    assert any("UnknownToolError" in e for e in s[2].format_errors)
    # an out-of-bounds box: the turn parses, the tool rejects the call, and that costs the format reward
    assert s[3].format == 0.0 and s[3].accuracy == 0.0 and s[3].n_tool_errors == 1 and s[3].n_zooms_ok == 0
    assert any("rejected by the tool" in e for e in s[3].format_errors)
    assert s[4].format == 0.0 and s[4].accuracy == 1.0  # a tool call and an answer in one turn
    assert s[5].format == -1.0
    assert s[6].truncated and s[6].masked and s[6].component("accuracy") is None
    assert s[7].unscorable and s[7].masked and "reader crashed" in envs[idx[7]].stats.failure
    assert run.counters["episode_failures"] == 1
    tot = run.rewards.totals
    assert tot["unscorable"] == 1 and tot["masked_truncated"] == 1 and tot["episodes"] == 8
    # masked rollouts get exactly zero advantage
    adv = torch.tensor(logs["advantages"])
    assert adv[idx[6]] == 0 and adv[idx[7]] == 0 and adv.abs().sum() > 0
    # protocol errors are observations the environment returns (as in eval), never exceptions in TRL's loop;
    # they are counted by the environment: the unknown tool as a call and an error, bad JSON as an error only
    logged = next(h for h in trainer.state.log_history if "reward" in h)
    assert logged["tools/failure_frequency"] == 0
    assert (s[2].n_tool_calls, s[2].n_tool_errors) == (1, 1)
    assert s[1].n_tool_errors >= 1 and s[1].n_turns > 1  # the malformed call got an observation and more turns
    assert logged["episodes/unscorable_rate"] == pytest.approx(1 / 8)
    assert logged["episodes/masked_truncated_rate"] == pytest.approx(1 / 8)
    # whether a right answer came with a zoom on the target, against a guess, reaches TRL's log
    assert logged["episodes/on_target_rate"] == pytest.approx(sum(x.on_target for x in s.values()) / 8)
    assert logged["episodes/correct_on_target_rate"] == pytest.approx(
        sum(x.on_target and x.correct for x in s.values()) / 8)
    assert logged["episodes/guess_rate"] == pytest.approx(1 / len(sample["choices"]))

    # tool tokens never carry loss: every tool-masked token lies inside a tool turn, and the tool turns
    # (image pads, observation text) are all masked
    inp = captured["inputs"]
    tok = trainer.processing_class.tokenizer
    ids, cmask, tmask = inp["completion_ids"], inp["completion_mask"], inp["tool_mask"]
    # TRL shuffles the generation batch before the loss: find rollout 0's row by its marker
    row = next(r for r in range(ids.shape[0]) if "<think>r0</think>" in tok.decode(ids[r], skip_special_tokens=False))
    masked_text = tok.decode(ids[row][(tmask[row] == 0) & (cmask[row] == 1)], skip_special_tokens=False)
    kept_text = tok.decode(ids[row][(tmask[row] == 1) & (cmask[row] == 1)], skip_special_tokens=False)
    assert "<|image_pad|>" in masked_text and "obs_1" in masked_text and "<|im_start|>tool" in masked_text
    assert "<|image_pad|>" not in kept_text and "obs_1" not in kept_text
    assert "zoom_in" in kept_text and f"<answer>{sample['answer']}</answer>" in kept_text
    # the policy moved
    delta = sum((p.detach() - b).abs().sum().item() for p, b in zip(trainer.model.parameters(), before, strict=True))
    assert delta > 0


def test_step_fails_above_failure_rate(task, tmp_path):
    cfg = _cfg(task, tmp_path / "out", num_generations=2, per_device_train_batch_size=2, max_failure_rate=0.4)
    sample = _sample(task)
    run = build_run(cfg)
    run = build_run(cfg, backend=RaisingBackend(run.backend))
    bad = ['<think>r0</think><tool_call>{"name": "zoom_in", "arguments": {"bbox": [66, 66, 99, 99]}}</tool_call>',
           f"<answer>{sample['answer']}</answer>"]
    script_policy(run.trainer, [bad, [f"<think>r1</think><answer>{sample['answer']}</answer>"]])
    with pytest.raises(RolloutFailureError, match="max_failure_rate"):
        run.trainer.train()


def test_nonfinite_gradients_skip_the_update(task, tmp_path):
    cfg = _cfg(task, tmp_path / "out", num_generations=2, per_device_train_batch_size=2)
    sample = _sample(task)
    run = build_run(cfg)
    script_policy(run.trainer, [[f"<think>r0</think>{VALID}", f"<answer>{sample['answer']}</answer>"],
                                ["<think>r1</think><answer>Z</answer>"]])
    model = run.trainer.model
    first = next(p for p in model.parameters() if p.requires_grad)
    first.register_hook(lambda g: torch.full_like(g, float("nan")))
    before = [p.detach().clone() for p in model.parameters()]
    run.trainer.train()
    assert run.counters.get("nonfinite_skipped") == 1
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.detach(), b)


def test_a_length_truncated_rollout_with_a_crop_leaves_the_loss_not_the_attention(task, tmp_path):
    """Fix 5 of rl/trainer.py through TRL's real tool loop: rollout 0 zooms, then rambles past
    max_completion_length (TRL cuts it: no stop token), the others zoom and answer. With TRL's own
    mask_truncated_completions the cut rollout's crop tokens left the attention mask and the step crashed in
    Qwen2.5-VL's get_rope_index; here it trains, the cut row carries no loss and keeps its attention."""
    sample = _sample(task)
    ramble = "<think>" + "the view shows some ships near the dock " * 60
    rollouts = [[f"<think>r0</think>{VALID}", ramble]]
    rollouts += [[f"<think>r{k}</think>{VALID}", f"<answer>{sample['answer']}</answer>"] for k in range(1, 8)]
    run = build_run(_cfg(task, tmp_path / "out", max_completion_length=240, mask_length_truncated=True))
    trainer = run.trainer
    script_policy(trainer, rollouts)
    captured = capture_first_loss_inputs(trainer)
    trainer.train()
    inputs = captured["inputs"]
    ids, mask, loss_mask = inputs["completion_ids"], inputs["completion_mask"], inputs["tool_mask"]
    pad = trainer.processing_class.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    with_crop = (ids == pad).any(dim=1)
    cut = [i for i in range(ids.shape[0]) if int(mask[i].sum()) == ids.shape[1]]  # fills the whole budget
    assert cut and all(bool(with_crop[i]) for i in cut)
    for i in cut:
        assert int(loss_mask[i].sum()) == 0 and int(mask[i].sum()) > 0  # out of the loss, still attended
    assert int((mask * loss_mask).sum()) > 0 and int(inputs["num_items_in_batch"]) == int((mask * loss_mask).sum())


def test_prompts_of_different_lengths_without_a_crop_keep_their_image_positions(task, tmp_path):
    """Two prompts of different lengths in one batch, and no rollout opens a view: TRL then takes the image
    token types of its loss forward from the processor, which pads as its tokenizer says, while the prompt ids
    are left-padded. The tiny model's tokenizer pads on the right (transformers' default where a config names no
    side), so the shorter prompt's image positions were shifted by its padding: get_rope_index crashed ("shape
    mismatch: value tensor of shape [3, 749] ...", `knowzoom ablate`'s RL-only variant, whose random model never
    zooms) or placed the image at the wrong tokens. rl.stage gives TRL a left-padding processor, as TRL's own loading does."""
    sample = _sample(task)
    short = dict(sample, id="short")
    long = dict(sample, id="long", question=sample["question"] + " Look closely at every part of the image before"
                " you answer, and name the one option that fits best.")
    data = tmp_path / "two.jsonl"
    data.write_text(json.dumps(long) + "\n" + json.dumps(short) + "\n")
    run = build_run(_cfg(task, tmp_path / "out", train_data=str(data), max_samples=2, num_generations=4,
                         max_failure_rate=1.0))
    trainer = run.trainer
    script_policy(trainer, [[f"<think>r{k}</think><answer>{sample['answer']}</answer>"] for k in range(8)])
    seen: list = []
    model = trainer.model
    orig = model.model.get_rope_index

    def spy(input_ids=None, mm_token_type_ids=None, *args, **kwargs):
        seen.append((input_ids.clone(), None if mm_token_type_ids is None else mm_token_type_ids.clone(),
                     kwargs.get("attention_mask")))
        return orig(input_ids, mm_token_type_ids, *args, **kwargs)

    model.model.get_rope_index = spy
    train_worker(run.cfg, run=run)
    assert trainer.processing_class.tokenizer.padding_side == "left"
    saved = json.loads((tmp_path / "out" / "model" / "tokenizer_config.json").read_text())
    assert saved.get("padding_side", "right") == "right"  # the saved model pads as the input model did
    pad = trainer.processing_class.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    lengths = set()
    for ids, mm, mask in seen:
        assert mm is not None
        assert torch.equal(mm == 1, ids == pad)  # every image token typed as image, and nothing else
        if mask is not None:
            lengths |= {int(n) for n in mask.sum(dim=1)}
    assert len(lengths) > 1  # the batch did mix prompt lengths
