"""THE agent loop (evaluation, hard-example mining, scripted checks): question + overview → generate → parse a
tool call → run the real zoom tool → append the observation → … → answer, for up to `max_turns` turns.

All episodes of a call advance in lockstep, one generation per turn, so every backend sees batches (the
transformers backend pads them, vLLM and HTTP backends run them concurrently). Prompts, observations and
call parsing come from `tools.protocol` (the one renderer); answers are scored by `rl.verifier`. A tool error
or a format error goes back to the model as the tool's response; an exception inside one episode ends that
episode with `Trajectory.error` set and never the batch.

Two protocols: "zoom" (the tool protocol, system prompt with the zoom_in tool) and "direct" (the official
XLRS-Bench lmms-eval prompt: images + question + options, one turn, no tools).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image

from pipeline.core.errors import KnowZoomError
from pipeline.core.records import Trajectory, VQASample
from rl.verifier import MAX_ANSWER_CHARS, verify_sample
from tools.zoom import ZoomConfig

log = logging.getLogger(__name__)

STOP_STRINGS = ["</tool_call>", "</answer>"]
PROTOCOLS = ("zoom", "direct")


class BackendError(KnowZoomError):
    """A generation backend failed (engine error, HTTP error after retries, bad response)."""


@dataclass
class AgentConfig:
    """Generation and episode limits of the agent loop (zoom limits live in `zoom`)."""

    max_turns: int = 5  # assistant turns per episode (tool calls + the answer): tools.protocol.turn_budget
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    protocol: str = "zoom"  # "zoom" | "direct"
    batch_size: int = 8  # conversations per backend.generate call
    max_answer_chars: int = MAX_ANSWER_CHARS  # verifier: answers this long get no credit
    seed: int = 0  # base seed; each rollout's turns are seeded from (seed, item id, rollout, turn)
    zoom: ZoomConfig = field(default_factory=ZoomConfig)

    def problems(self) -> list[str]:
        p = []
        if self.max_turns < 1:
            p.append("max_turns: must be >= 1 (one turn = one generation)")
        if self.max_new_tokens < 1:
            p.append("max_new_tokens: must be >= 1")
        if self.temperature < 0:
            p.append("temperature: must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            p.append("top_p: must be in (0, 1]")
        if self.protocol not in PROTOCOLS:
            p.append(f"protocol: {self.protocol!r} unknown; use one of {PROTOCOLS}")
        if self.batch_size < 1:
            p.append("batch_size: must be >= 1")
        if self.max_answer_chars < 1:
            p.append("max_answer_chars: must be >= 1")
        return p


class Backend(Protocol):
    """Generates one assistant turn for each conversation. `images[i]` are the PIL images of
    conversation i in the order their {"type": "image"} placeholders appear. Returned texts keep the stop
    string that ended them ("…</tool_call>"). `seeds[i]` (from `rollout_seed`) seeds conversation i's
    sampling on its own, so a rollout never depends on which other rollouts share its batch."""

    def generate(self, conversations: list[list[dict]], images: list[list[Image.Image]], *,
                 max_new_tokens: int, temperature: float, top_p: float, stop: list[str],
                 seeds: list[int] | None = None) -> list[str]: ...


def rollout_seed(base: int, item_id: str, rollout: int, turn: int = 0) -> int:
    """The sampling seed of one turn of one rollout: a hash of (base seed, item id, rollout index, turn), so
    rollouts of an item differ, a rerun or a resumed run repeats them, and batching cannot change them.
    63 bits (what torch generators and vLLM's SamplingParams.seed accept)."""
    digest = hashlib.sha256(f"{int(base)}|{item_id}|{int(rollout)}|{int(turn)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def trim_at_stop(text: str, stop: list[str]) -> str:
    """Cut a generation just after the first stop string (kept), so a turn never holds two calls."""
    cut = None
    for s in stop:
        i = text.find(s)
        if i >= 0 and (cut is None or i + len(s) < cut):
            cut = i + len(s)
    return text if cut is None else text[:cut]


def close_stopped(text: str) -> str:
    """Re-append a stop string an engine dropped: an open `<tool_call>`/`<answer>` at the end gets closed."""
    for open_t, close_t in (("<tool_call>", "</tool_call>"), ("<answer>", "</answer>")):
        i = text.rfind(open_t)
        if i >= 0 and text.find(close_t, i) < 0:
            return text + close_t
    return text


def _placeholders(content: Any) -> int:
    if isinstance(content, list):
        return sum(1 for c in content if isinstance(c, dict) and c.get("type") == "image")
    return 0


def _with_refs(message: dict, names: list[str]) -> dict:
    """Copy of a chat message whose image placeholders name their observation (for the stored record)."""
    m = dict(message)
    if isinstance(m.get("content"), list):
        it = iter(names)
        m["content"] = [dict(c, observation=next(it, None)) if c.get("type") == "image" else dict(c)
                        for c in m["content"]]
    return m


@dataclass
class _Live:
    """One running episode."""

    sample: VQASample
    rollout: int
    messages: list[dict]
    images: list[Image.Image]
    record: list[dict]
    episode: Any = None
    observations: list[dict] = field(default_factory=list)
    turns: int = 0
    done: bool = False
    truncated: bool = False
    final_text: str = ""
    error: str | None = None
    texts: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)


def _start(sample: VQASample, rollout: int, store: Any, cfg: AgentConfig) -> _Live:
    from tools import protocol

    if cfg.protocol == "direct":
        from pipeline.core.datasets import official_prompt

        content = [{"type": "image"} for _ in sample.images] + [{"type": "text", "text": official_prompt(sample)}]
        msg = {"role": "user", "content": content}
        from tools.zoom import read_overview

        obs = [read_overview(store, im, cfg.zoom, name=f"image_{k}", image_index=k)
               for k, im in enumerate(sample.images)]
        live = _Live(sample, rollout, [msg], [o.image for o in obs], [_with_refs(msg, [o.name for o in obs])])
        live.observations = [o.to_dict() for o in obs]
        return live
    episode = protocol.Episode(store, list(sample.images), cfg.zoom)
    obs = episode.initial_observations()
    messages = protocol.build_prompt_messages(sample, cfg.zoom.frame, sizes=[o.image.size for o in obs])
    names = [o.name for o in obs]
    if sum(_placeholders(m.get("content")) for m in messages) != len(obs):
        raise BackendError(f"prompt for {sample.id} has image placeholders that do not match its {len(obs)} images")
    live = _Live(sample, rollout, list(messages), [o.image for o in obs],
                 [_with_refs(m, names) if m.get("role") == "user" else dict(m) for m in messages], episode)
    live.observations = [o.to_dict() for o in obs]
    return live


def _step(live: _Live, text: str, cfg: AgentConfig) -> None:
    """Apply one generated turn: answer → done; tool call → run it and append the observation."""
    from tools import protocol

    live.turns += 1
    live.texts.append(text)
    assistant = {"role": "assistant", "content": text}
    live.messages.append(assistant)
    live.record.append(dict(assistant))
    live.final_text = text
    if cfg.protocol == "direct":
        live.done = True
        return
    parsed = protocol.parse_turn(text)
    if parsed.error is None and parsed.tool_call is None:
        live.done = True  # an answer, or plain text with neither a call nor an answer (the verifier decides)
        return
    if live.turns >= cfg.max_turns:
        # a call on the last allowed turn is not run (TRL's tool loop stops the same way): cut by the limit
        live.done = live.truncated = True
        return
    result = protocol.turn_error_result(parsed)
    if result is not None:
        live.episode.n_errors += 1  # a malformed turn: the error goes back to the model, another turn follows
    else:
        result = live.episode.execute(parsed.tool_call)  # unknown tools are counted as a call and an error
    msg = protocol.tool_message(result)
    names = []
    if result.observation is not None:
        live.images.append(result.observation.image)
        live.observations.append(result.observation.to_dict())
        names = [result.observation.name]
    live.messages.append(msg)
    live.record.append(_with_refs(msg, names))


def _finish(live: _Live, cfg: AgentConfig) -> Trajectory:
    ep = live.episode
    traj = Trajectory(
        sample_id=live.sample.id,
        messages=live.record,
        observations=live.observations,
        final_text=live.final_text,
        turns=live.turns,
        tool_calls=int(getattr(ep, "n_calls", 0) or 0),
        tool_errors=int(getattr(ep, "n_errors", 0) or 0),
        truncated=live.truncated,
        error=live.error,
        meta={"rollout": live.rollout, "protocol": cfg.protocol, "seconds": round(time.perf_counter() - live.started, 3)},
    )
    if live.error is None:
        text = live.final_text if not live.truncated else ""
        r = verify_sample(text, live.sample, max_chars=cfg.max_answer_chars,
                          allow_bare=cfg.protocol == "direct")
        traj.prediction = r.prediction
        traj.correct = r.correct
        traj.meta.update(parse_failure=r.parse_failure, verify_reason=r.reason)
    return traj


def run_episodes(
    backend: Backend,
    samples: list[VQASample],
    store: Any,
    cfg: AgentConfig,
    n: int = 1,
    *,
    on_done: Callable[[Trajectory], None] | None = None,
    progress: bool = False,
    rollout_ids: list[int] | None = None,
) -> list[Trajectory]:
    """Run `n` rollouts of each sample; returns trajectories ordered sample-major (s0 r0, s0 r1, …).
    Never raises per sample: setup, tool and backend failures set `Trajectory.error`. `on_done` is called
    as each trajectory finishes (for durable caching). `rollout_ids` (with n=1) labels episode i as rollout
    rollout_ids[i] (`meta["rollout"]`), so a resumed job can run just the missing rollouts."""
    problems = cfg.problems()
    if problems:
        from pipeline.core.errors import ConfigError

        raise ConfigError("invalid AgentConfig:\n" + "\n".join(f"  - {p}" for p in problems))
    if rollout_ids is not None and (n != 1 or len(rollout_ids) != len(samples)):
        raise ValueError("rollout_ids needs n=1 and one id per sample")
    lives: list[_Live] = []
    for j, s in enumerate(samples):
        for k in ([rollout_ids[j]] if rollout_ids is not None else range(n)):
            try:
                lives.append(_start(s, k, store, cfg))
            except Exception as e:  # noqa: BLE001 — a bad sample must not stop the others
                live = _Live(s, k, [], [], [])
                live.error, live.done = f"setup: {type(e).__name__}: {e}", True
                lives.append(live)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(lives), desc="episodes", unit="ep")
    finished: dict[int, Trajectory] = {}

    def finish(i: int) -> None:
        finished[i] = _finish(lives[i], cfg)
        if on_done is not None:
            on_done(finished[i])
        if bar is not None:
            bar.update(1)

    for i, live in enumerate(lives):
        if live.done:
            finish(i)
    for _turn in range(cfg.max_turns):
        active = [i for i, live in enumerate(lives) if not live.done]
        if not active:
            break
        for b in range(0, len(active), cfg.batch_size):
            chunk = active[b:b + cfg.batch_size]
            try:
                texts = backend.generate(
                    [lives[i].messages for i in chunk], [lives[i].images for i in chunk],
                    max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                    stop=list(STOP_STRINGS),
                    seeds=[rollout_seed(cfg.seed, lives[i].sample.id, lives[i].rollout, lives[i].turns)
                           for i in chunk],
                )
                if len(texts) != len(chunk):
                    raise BackendError(f"backend returned {len(texts)} texts for {len(chunk)} conversations")
            except Exception as e:  # noqa: BLE001
                log.warning("generation failed for %d episodes: %s", len(chunk), e)
                for i in chunk:
                    lives[i].error, lives[i].done = f"backend: {type(e).__name__}: {e}", True
                    finish(i)
                continue
            for i, text in zip(chunk, texts, strict=True):
                live = lives[i]
                try:
                    _step(live, trim_at_stop(close_stopped(str(text)), STOP_STRINGS), cfg)
                except Exception as e:  # noqa: BLE001
                    live.error, live.done = f"step: {type(e).__name__}: {e}", True
                if live.done:
                    finish(i)
    for i, live in enumerate(lives):  # turn budget spent without an answer
        if i not in finished:
            live.truncated, live.done = True, True
            finish(i)
    if bar is not None:
        bar.close()
    return [finished[i] for i in range(len(lives))]


__all__ = [
    "AgentConfig",
    "Backend",
    "BackendError",
    "STOP_STRINGS",
    "PROTOCOLS",
    "run_episodes",
    "rollout_seed",
    "trim_at_stop",
    "close_stopped",
]
