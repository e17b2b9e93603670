"""Verifiable rewards for agentic GRPO with the zoom tool (the paper's defaults).

reward = 0.8 · accuracy + 0.2 · format + 1.2 · tool bonus (+ optional region reward), each a separate TRL
reward function so TRL logs `rewards/<name>/mean` on its own; the weights live in `GRPOConfig.reward_weights`.

- accuracy: the strict verifier (`rl.verifier.verify_sample`) on the final turn; answers of
  `max_answer_chars` characters or more get no credit.
- format: 1 when every turn is well formed (`tools.protocol.parse_turn`), the last turn answers and the
  others call the tool; 0 on a format error (bad call JSON, unknown tool, several calls, a tool call and an
  answer in one turn, no answer) and, with `tool_errors_break_format` (the default), when the tool rejected
  a call (arguments it cannot run: `{"name": [...]}` for `{"bbox": [...]}`, an inverted or outside box, an
  unknown source); −1 when `<think>`/`<tool_call>`/`<answer>` tags are unbalanced. Without the rejected
  calls in it nothing in the reward tells a call the tool ran from one it refused unless the answer was
  right, and GRPO let the tiny model's change-pair calls drift to 100 % rejected (docs/tiny_model.md).
- tool bonus: 1 only when the answer is right AND at least one zoom succeeded.
- region (optional, weight 0 by default): the largest share of a target region covered by a successful zoom.

Beside the rewards each batch logs whether the answer depends on the view: the accuracy of the rollouts whose
zoom covered the target (`pipeline.core.records.ON_TARGET_COVER`, as the eval counts it) and of the others, against a uniform guess
(`episodes/on_target_rate`, `episodes/correct_on_target_rate`, `episodes/guess_rate`). When the first is no
better than a guess, a right answer is luck, and GRPO rewards letters rather than reading (rl/plots.py).

Episodes that raised are unscorable (every reward function returns None → TRL gives them zero advantage);
episodes cut by the turn limit are masked the same way when `mask_truncated_episodes` is on (not punished).
Scores are computed once per episode and cached on the environment (`env.score`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rl.errors import RolloutFailureError

if TYPE_CHECKING:
    from pipeline.core.records import VQASample

TURN_END = "<|im_end|>"
ASSISTANT_START = "<|im_start|>assistant\n"


@dataclass
class RewardSettings:
    """Reward weights and limits (copied from `RLConfig`)."""

    accuracy_weight: float = 0.8
    format_weight: float = 0.2
    tool_bonus_weight: float = 1.2
    region_weight: float = 0.0
    max_answer_chars: int = 1000
    mask_truncated_episodes: bool = True
    max_failure_rate: float = 0.25
    tool_errors_break_format: bool = True

    def weights(self) -> list[float]:
        """Weights in the order of `ZoomRewards.functions()`."""
        w = [self.accuracy_weight, self.format_weight, self.tool_bonus_weight]
        return w + [self.region_weight] if self.region_weight else w


@dataclass
class EpisodeStats:
    """What the environment saw: calls, errors, successful zoom windows (native px), and any crash."""

    n_calls: int = 0
    n_errors: int = 0
    zooms: list[tuple[int, tuple[float, float, float, float]]] = field(default_factory=list)  # (image, window)
    failure: str | None = None  # set when the episode raised: unscorable


@dataclass
class EpisodeScore:
    """All reward components of one episode plus what explains them."""

    accuracy: float = 0.0
    format: float = 0.0
    tool_bonus: float = 0.0
    region: float = 0.0
    on_target: bool = False  # region >= ON_TARGET_COVER
    guess_rate: float = 0.0  # what a uniform guess at the sample's answer would score
    correct: bool = False
    prediction: str | None = None
    parse_failure: bool = False
    format_errors: list[str] = field(default_factory=list)
    n_turns: int = 0
    n_tool_calls: int = 0
    n_tool_errors: int = 0
    n_zooms_ok: int = 0
    truncated: bool = False
    unscorable: bool = False  # the episode raised
    masked: bool = False  # unscorable or (truncated and masking is on): every reward is None

    def component(self, name: str) -> float | None:
        return None if self.masked else float(getattr(self, name))


def split_assistant_turns(text: str, turn_end: str = TURN_END, assistant_start: str = ASSISTANT_START) -> list[str]:
    """Raw assistant turns of a decoded multi-turn completion (tool responses dropped).

    The completion starts inside the first assistant turn (the generation prompt is part of the prompt);
    later assistant turns follow the tool-response suffix that ends with `assistant_start`."""
    turns = [part.split(turn_end, 1)[0] for part in text.split(assistant_start)]
    return [t.strip("\n") for t in turns]


def format_score(turns: Sequence[str]) -> tuple[float, list[str], bool]:
    """(score, errors, truncated): 1 well formed, 0 format error, −1 unbalanced tags.

    `truncated` is True when the last turn is a clean tool call: the episode was cut by the turn limit."""
    from tools.protocol import parse_turn, tags_balanced  # lazy: rl.stage (config) stays free of rasterio

    errors: list[str] = []
    if not turns:
        return 0.0, ["empty completion"], False
    for i, t in enumerate(turns):
        if not tags_balanced(t):
            errors.append(f"turn {i}: unbalanced tags")
    if errors:
        return -1.0, errors, False
    truncated = False
    for i, t in enumerate(turns):
        parsed = parse_turn(t)
        last = i == len(turns) - 1
        if parsed.error is not None:
            errors.append(f"turn {i}: {type(parsed.error).__name__}: {parsed.error}")
            continue
        if last:
            if parsed.tool_call is not None and parsed.answer is None:
                truncated = True
                errors.append(f"turn {i}: ends with a tool call (cut by the turn limit)")
            elif parsed.answer is None:
                errors.append(f"turn {i}: no <answer>")
        elif parsed.tool_call is None:
            errors.append(f"turn {i}: neither a tool call nor the last turn")
    return (0.0 if errors else 1.0), errors, truncated


def region_coverage(zooms: Sequence[tuple[int, Sequence[float]]], targets: Sequence[Any]) -> float:
    """Largest share of a target box (same image) covered by one successful zoom window, in [0, 1]."""
    best = 0.0
    for t in targets:
        tx0, ty0, tx1, ty1 = (float(v) for v in t.bbox)
        area = max(tx1 - tx0, 0.0) * max(ty1 - ty0, 0.0)
        if area <= 0:
            continue
        for image, (x0, y0, x1, y1) in zooms:
            if image != t.image:
                continue
            w = min(x1, tx1) - max(x0, tx0)
            h = min(y1, ty1) - max(y0, ty0)
            if w > 0 and h > 0:
                best = max(best, w * h / area)
    return min(best, 1.0)


def score_episode(turns: Sequence[str], sample: VQASample, stats: EpisodeStats,
                  settings: RewardSettings) -> EpisodeScore:
    """Every reward component of one episode, from its raw assistant turns and the environment's stats."""
    from pipeline.core.records import ON_TARGET_COVER
    from rl.verifier import verify_sample

    s = EpisodeScore(n_turns=len(turns), n_tool_calls=stats.n_calls, n_tool_errors=stats.n_errors,
                     n_zooms_ok=len(stats.zooms), guess_rate=sample.guess_rate())
    if stats.failure is not None:
        s.unscorable = s.masked = True
        s.format_errors = [f"episode raised: {stats.failure}"]
        return s
    s.format, s.format_errors, s.truncated = format_score(turns)
    if settings.tool_errors_break_format and stats.n_errors and s.format > 0:
        s.format = 0.0
        s.format_errors.append(f"{stats.n_errors} tool call(s) rejected by the tool")
    final = turns[-1] if turns else ""
    res = verify_sample(final, sample, max_chars=settings.max_answer_chars)
    s.correct, s.prediction, s.parse_failure = bool(res.correct), res.prediction, bool(res.parse_failure)
    s.accuracy = 1.0 if s.correct else 0.0
    s.tool_bonus = 1.0 if (s.correct and s.n_zooms_ok >= 1) else 0.0
    s.region = region_coverage(stats.zooms, getattr(sample, "targets", []) or [])
    s.on_target = s.region >= ON_TARGET_COVER
    if s.truncated and settings.mask_truncated_episodes:
        s.masked = True
    return s


class ZoomRewards:
    """The TRL reward functions (one per component) over the rollouts' environments.

    Each function reads `environments` (passed by TRL) and the completion token ids; the first call of a batch
    scores every episode once (cached on the env), counts failures and raises `RolloutFailureError` when the
    share of unscorable rollouts exceeds `max_failure_rate`."""

    def __init__(self, tokenizer: Any, settings: RewardSettings, on_batch: Callable[[dict], None] | None = None,
                 episode_log: str | None = None, episodes_per_batch: int = 2):
        self.tokenizer = tokenizer
        self.settings = settings
        self.on_batch = on_batch
        self.episode_log = episode_log  # JSONL of a few scored episodes per batch (what the policy writes)
        self.episodes_per_batch = episodes_per_batch
        self.totals = {"episodes": 0, "unscorable": 0, "masked_truncated": 0, "tool_calls": 0, "tool_errors": 0,
                       "format_errors": 0, "correct": 0, "failed_steps": 0, "on_target": 0,
                       "correct_on_target": 0, "guess_rate_sum": 0.0}
        self.last_batch: dict[str, float] = {}

    def functions(self) -> list[Callable[..., list[float | None]]]:
        names = ["accuracy", "format", "tool_bonus"] + (["region"] if self.settings.region_weight else [])
        return [self._make(n) for n in names]

    def _make(self, name: str) -> Callable[..., list[float | None]]:
        def reward(completions: list, completion_ids: list | None = None, environments: list | None = None,
                   log_metric: Callable | None = None, trainer_state: Any = None, **kwargs: Any) -> list[float | None]:
            step = int(getattr(trainer_state, "global_step", 0) or 0) + 1
            scores = self.score_batch(environments or [], completion_ids or [], log_metric, step)
            return [s.component(name) for s in scores]

        reward.__name__ = name
        return reward

    def decode_turns(self, ids: Sequence[int]) -> list[str]:
        text = self.tokenizer.decode(list(ids), skip_special_tokens=False)
        return split_assistant_turns(text)

    def score_batch(self, environments: Sequence[Any], completion_ids: Sequence[Sequence[int]],
                    log_metric: Callable | None = None, step: int = 0) -> list[EpisodeScore]:
        """Score (once) every episode of the batch; log the batch's rates; enforce the failure rate."""
        if len(environments) != len(completion_ids):
            raise ValueError(f"{len(environments)} environments for {len(completion_ids)} completions")
        fresh = [env for env in environments if getattr(env, "score", None) is None]
        logged: list[dict[str, Any]] = []
        for env, ids in zip(environments, completion_ids, strict=True):
            if getattr(env, "score", None) is None:
                turns: list[str] = []
                try:
                    turns = self.decode_turns(ids)
                    env.score = score_episode(turns, env.sample, env.stats, self.settings)
                except Exception as e:  # a broken episode must not take the batch down
                    env.score = EpisodeScore(unscorable=True, masked=True, format_errors=[f"scoring raised: {e!r}"])
                if len(logged) < self.episodes_per_batch:
                    logged.append({"step": step, "sample": getattr(env.sample, "id", None), "turns": turns,
                                   "score": dataclasses.asdict(env.score)})
        scores = [env.score for env in environments]
        if fresh:
            if self.episode_log and logged:
                with open(self.episode_log, "a", encoding="utf-8") as f:
                    f.writelines(json.dumps(r) + "\n" for r in logged)
            self._account(scores, log_metric)
        return scores

    def _account(self, scores: list[EpisodeScore], log_metric: Callable | None) -> None:
        n = max(len(scores), 1)
        unscorable = sum(s.unscorable for s in scores)
        batch = {
            "episodes/unscorable_rate": unscorable / n,
            "episodes/masked_truncated_rate": sum(s.masked and not s.unscorable for s in scores) / n,
            "episodes/tool_call_rate": sum(s.n_tool_calls > 0 for s in scores) / n,
            "episodes/zoom_ok_rate": sum(s.n_zooms_ok > 0 for s in scores) / n,
            "episodes/tool_error_rate": sum(s.n_tool_errors for s in scores) / max(sum(s.n_tool_calls for s in scores), 1),
            "episodes/format_ok_rate": sum(s.format == 1.0 and not s.unscorable for s in scores) / n,
            "episodes/accuracy": sum(s.correct for s in scores) / n,
            "episodes/parse_failure_rate": sum(s.parse_failure for s in scores) / n,
            "episodes/mean_turns": sum(s.n_turns for s in scores) / n,
            # does the answer depend on the view? (rl/plots.py: cumulative accuracy on / off target vs a guess)
            "episodes/on_target_rate": sum(s.on_target for s in scores) / n,
            "episodes/correct_on_target_rate": sum(s.on_target and s.correct for s in scores) / n,
            "episodes/guess_rate": sum(s.guess_rate for s in scores) / n,
        }
        self.last_batch = batch
        t = self.totals
        t["episodes"] += len(scores)
        t["unscorable"] += unscorable
        t["masked_truncated"] += sum(s.masked and not s.unscorable for s in scores)
        t["tool_calls"] += sum(s.n_tool_calls for s in scores)
        t["tool_errors"] += sum(s.n_tool_errors for s in scores)
        t["format_errors"] += sum(bool(s.format_errors) and not s.unscorable for s in scores)
        t["correct"] += sum(s.correct for s in scores)
        t["on_target"] += sum(s.on_target for s in scores)
        t["correct_on_target"] += sum(s.on_target and s.correct for s in scores)
        t["guess_rate_sum"] += sum(s.guess_rate for s in scores)
        if log_metric is not None:
            for k, v in batch.items():
                log_metric(k, float(v))
        if self.on_batch is not None:
            self.on_batch(batch)
        if unscorable / n > self.settings.max_failure_rate:
            t["failed_steps"] += 1
            raise RolloutFailureError(
                f"{unscorable}/{len(scores)} rollouts raised (rate {unscorable / n:.2f} > max_failure_rate "
                f"{self.settings.max_failure_rate}); first error: "
                + next((s.format_errors[0] for s in scores if s.unscorable and s.format_errors), "?")
            )
