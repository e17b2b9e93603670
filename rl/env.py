"""The zoom environment for TRL's `GRPOTrainer(environment_factory=...)`.

One `ZoomEnv` per rollout. `reset(sample=...)` opens the sample's images through a tool backend (in-process
`tools.protocol.Episode`s, or Ray actors that keep the rasters open — `rl.ray_pool`) and returns the user
turn (overviews + question, rendered by `tools.protocol.user_message`) that TRL appends to the prompt;
`zoom_in(bbox, source)` is the one public tool method TRL exposes (schema from its signature and docstring,
which repeat `tools.protocol.zoom_tool_schema`); it returns the crop as an image content block. Tool errors
come back as text observations; anything else that raises marks the episode unscorable (`stats.failure`).

Parsing: `install_protocol_parser` makes TRL read each generated turn, up to its first stop string as eval's
engines cut it, with `tools.protocol.parse_turn` (the parser of evaluation, mining and the server) instead of
TRL's own: a malformed turn (bad JSON, several calls,
a call and an answer together) gets the error observation and another turn exactly as in `rl.agent`, an unknown
tool or a missing argument goes to the tool as in eval, and a turn without a call ends the episode.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from pipeline.core.records import VQASample
from rl.rewards import EpisodeScore, EpisodeStats

if TYPE_CHECKING:
    from tools.store import ImageStore
    from tools.zoom import ZoomConfig

log = logging.getLogger(__name__)


class EpisodeBackend(Protocol):
    """Where episodes live and crops are read. Keys are unique per rollout."""

    def start(self, key: str, image_ids: list[str]) -> list[Any]: ...  # initial Observations
    def execute(self, key: str, name: str, arguments: dict) -> Any: ...  # tools.protocol.ToolResult
    def close(self, key: str) -> None: ...


class LocalEpisodes:
    """In-process episodes over one shared `ImageStore` (its readers are cached across rollouts)."""

    def __init__(self, store: ImageStore, zoom_cfg: ZoomConfig):
        self.store = store
        self.zoom_cfg = zoom_cfg
        self._episodes: dict[str, Any] = {}

    def start(self, key: str, image_ids: list[str]) -> list[Any]:
        from tools.protocol import Episode

        ep = Episode(self.store, list(image_ids), self.zoom_cfg)
        self._episodes[key] = ep
        return list(ep.initial_observations())

    def execute(self, key: str, name: str, arguments: dict) -> Any:
        from tools.protocol import ToolCall

        return self._episodes[key].execute(ToolCall(name=name, arguments=dict(arguments)))

    def close(self, key: str) -> None:
        self._episodes.pop(key, None)


TURN_KEY = "__turn__"  # zoom_in(bbox={TURN_KEY: ...}) carries a turn parsed by tools.protocol (see below)


def protocol_tool_calls(text: str) -> list[dict] | None:
    """The tool calls TRL should run for one assistant turn, decided by `tools.protocol.parse_turn` (eval's
    parser): None when the turn answers or holds no call (the episode ends); else one call of `zoom_in` whose
    `bbox` carries the parsed turn, so `ZoomEnv.zoom_in` does what eval's agent loop does with it — a call
    (valid, aliased or to an unknown tool) goes to the tool, a malformed turn gets the error observation."""
    from tools.protocol import TOOL_NAME, parse_turn, turn_error_result

    parsed = parse_turn(text)
    if parsed.error is None and parsed.tool_call is None:
        return None
    err = turn_error_result(parsed)
    turn = {"error": err.text} if err is not None else {  # no error and not None above: a tool call
        "name": parsed.tool_call.name, "arguments": dict(parsed.tool_call.arguments)}  # type: ignore[union-attr]
    return [{"type": "function", "function": {"name": TOOL_NAME, "arguments": {"bbox": {TURN_KEY: turn}}}}]


class ProtocolParser:
    """`tokenizer.parse_response` for TRL: decode one generated turn, read it up to its first stop string (eval's
    engines stop there; TRL's generation does not), and return the assistant message with the tool calls
    `protocol_tool_calls` decides (the reward's format score still sees the whole turn). A class, not a
    closure, so a tokenizer carrying it still pickles (Ray workers, dataloader processes)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ends = [e for e in dict.fromkeys([getattr(tokenizer, "eos_token", None), "<|im_end|>",
                                               "<|endoftext|>"]) if e]

    def __call__(self, ids: Any, prefix: Any = None, tools: Any = None) -> dict:
        from tools.protocol import STOP_STRINGS, trim_at_stop

        text = self.tokenizer.decode(list(ids), skip_special_tokens=False)
        cuts = [i for i in (text.find(e) for e in self.ends) if i >= 0]
        text = text[:min(cuts)] if cuts else text
        msg: dict[str, Any] = {"role": "assistant", "content": text}
        calls = protocol_tool_calls(trim_at_stop(text, STOP_STRINGS))
        if calls:
            msg["tool_calls"] = calls
        return msg


def install_protocol_parser(processor: Any) -> Any:
    """Make TRL's `parse_response` (it calls `tokenizer.parse_response(ids, ...)`) parse every generated turn
    with `protocol_tool_calls`, so RL and eval share one parser and one answer to malformed calls."""
    tok = getattr(processor, "tokenizer", processor)
    tok.parse_response = ProtocolParser(tok)
    return processor


def _image_block(image: Any) -> dict:
    return {"type": "image", "image": image}


def fill_images(content: list[dict], images: list[Any]) -> list[dict]:
    """Put PIL images into the `{"type": "image"}` placeholders of a protocol message, in order."""
    it = iter(images)
    out = []
    for part in content:
        if isinstance(part, dict) and part.get("type") == "image":
            img = next(it, None)
            if img is None:
                raise ValueError("more image placeholders than images")
            out.append(_image_block(img))
        else:
            out.append(dict(part))
    if next(it, None) is not None:
        raise ValueError("more images than image placeholders")
    return out


class ZoomEnv:
    """One rollout of the zoom task. Public methods are TRL tools: keep helpers private (leading `_`)."""

    backend: EpisodeBackend
    frame: str = "shown_pixels"
    instruction: str | None = None
    counters: dict[str, int] | None = None  # shared across instances (failures counted once per process)

    def __init__(self) -> None:
        self.key: str | None = None
        self.sample: VQASample | None = None
        self.stats = EpisodeStats()
        self.score: EpisodeScore | None = None

    def reset(self, sample: str | dict | VQASample | None = None, **kwargs: Any) -> list[dict]:
        """Start a new episode for `sample` (a VQASample or its JSON); return the user turn's content blocks."""
        from tools.protocol import user_message

        if self.key is not None:
            self._close()
        self.stats = EpisodeStats()
        self.score = None
        self.key = uuid.uuid4().hex
        if isinstance(sample, str):
            loaded: dict[str, Any] = json.loads(sample)
            sample = loaded
        self.sample = sample if isinstance(sample, VQASample) else VQASample.from_dict(sample or {})
        observations = None
        try:
            observations = self.backend.start(self.key, list(self.sample.images))
        except Exception as e:  # unreadable image, dead backend: this rollout is unscorable, the batch goes on
            self._fail("reset", e)
        # the same user turn as eval, mining and the SFT pre-warm render: overview sizes included
        msg = user_message(self.sample.question, list(self.sample.choices), len(self.sample.images),
                           self.instruction, [o.image.size for o in observations] if observations else None,
                           self.sample.hint)
        if observations is None:
            return [{"type": "text", "text": " ".join(p.get("text", "") for p in msg["content"]
                                                       if p.get("type") == "text")}]
        return fill_images(msg["content"], [o.image for o in observations])

    def zoom_in(self, bbox: list[float], source: str = "image_0") -> list[dict] | str:
        """Zoom into a region of an image to see it in more detail.

        Args:
            bbox: The region to zoom into as [x0, y0, x1, y1], in the coordinates of the image named by `source` as you see it.
            source: Which image the box refers to: "image_0" (the first image), "image_1", or an earlier zoom result such as "obs_1".

        Returns:
            The zoomed-in view of the region as a new image.
        """
        from tools.protocol import tool_message

        name, arguments = "zoom_in", {"bbox": bbox, "source": source}
        if isinstance(bbox, dict) and TURN_KEY in bbox:  # a turn read by protocol_tool_calls
            turn = bbox[TURN_KEY]
            if "error" in turn:  # malformed: the error observation, counted as an error, not a call (as eval)
                self.stats.n_errors += 1
                return [{"type": "text", "text": str(turn["error"])}]
            name, arguments = str(turn["name"]), dict(turn["arguments"])
        if self.key is None or self.stats.failure is not None:
            self.stats.n_calls += 1
            self.stats.n_errors += 1
            return "Error: the episode is not available; answer with what you have seen."
        self.stats.n_calls += 1
        try:
            result = self.backend.execute(self.key, name, arguments)
        except Exception as e:
            self._fail("zoom_in", e)
            return "Error: the zoom tool failed; answer with what you have seen."
        msg = tool_message(result)
        if result.error is not None or result.observation is None:
            self.stats.n_errors += 1
            return msg["content"] if isinstance(msg["content"], str) else [dict(p) for p in msg["content"]]
        obs = result.observation
        wx0, wy0, wx1, wy1 = (float(v) for v in obs.window)
        self.stats.zooms.append((int(obs.image_index), (wx0, wy0, wx1, wy1)))
        content = msg["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        return fill_images(content, [obs.image])

    def _fail(self, where: str, e: BaseException) -> None:
        self.stats.failure = f"{where}: {type(e).__name__}: {e}"
        log.warning("episode %s unscorable: %s", self.key, self.stats.failure)
        if self.counters is not None:
            self.counters["episode_failures"] = self.counters.get("episode_failures", 0) + 1

    def _close(self) -> None:
        try:
            self.backend.close(self.key)  # type: ignore[arg-type]  # only called while an episode is open
        except Exception as e:  # closing is best effort
            log.debug("close %s: %s", self.key, e)


def make_env_factory(backend: EpisodeBackend, frame: str = "shown_pixels", instruction: str | None = None,
                     counters: dict[str, int] | None = None) -> Callable[[], ZoomEnv]:
    """A zero-argument factory for TRL: a ZoomEnv subclass bound to this backend and frame.

    The subclass's `zoom_in` docstring is rewritten from `tools.protocol.zoom_tool_schema(frame)` so the
    schema the model sees in the prompt is the protocol's (TRL derives tool schemas from docstrings)."""
    attrs: dict[str, Any] = {"backend": backend, "frame": frame, "instruction": instruction,
                             "counters": counters if counters is not None else {}}

    def zoom_in(self: ZoomEnv, bbox: list[float], source: str = "image_0") -> list[dict] | str:
        return ZoomEnv.zoom_in(self, bbox, source)

    zoom_in.__doc__ = tool_docstring(frame)
    zoom_in.__annotations__ = dict(ZoomEnv.zoom_in.__annotations__)
    attrs["zoom_in"] = zoom_in
    cls = type(f"ZoomEnv_{frame}", (ZoomEnv,), attrs)
    return cls


def tool_docstring(frame: str) -> str:
    """A Google-style docstring carrying the protocol's tool description and argument descriptions."""
    from tools.protocol import TOOL_NAME, zoom_tool_schema

    schema = zoom_tool_schema(frame)
    fn = schema.get("function", schema)
    if fn.get("name") != TOOL_NAME:
        raise ValueError(f"protocol tool is named {fn.get('name')!r}, expected {TOOL_NAME!r}")
    props = fn.get("parameters", {}).get("properties", {})
    lines = [" ".join(str(fn.get("description", "Zoom into a region of an image.")).split()), "", "Args:"]
    for arg in ("bbox", "source"):
        desc = " ".join(str(props.get(arg, {}).get("description", arg)).split())
        lines.append(f"    {arg}: {desc}")
    lines += ["", "Returns:", "    The zoomed-in view of the region as a new image."]
    return "\n".join(lines)
