"""The tool protocol: the ONE module for every model-facing string and parser.

Text format (Qwen2.5-VL style): optional `<think>...</think>`, then either one
`<tool_call>{"name": "zoom_in", "arguments": {"bbox": [x0, y0, x1, y1], "source": "image_0"}}</tool_call>`
or a final `<answer>...</answer>`. Generation stops at `</tool_call>` / `</answer>` (`STOP_STRINGS`; the stop
string may be stripped by the backend, so an unclosed final `<tool_call>` is accepted). Here: the system
prompt, tool schema, image and text-QA prompts and targets, observation texts, tool-call formatting and
parsing (`parse_turn`, and the text form of API `tool_calls`), `<answer>`/`<think>` tag reading (the answer
verifier, rl/verifier.py, reads the answer through it), stop strings, and the `Episode` that runs calls.
TRL, SFT data, evaluation, the build-qa exports and the HTTP API all import this module, so a prompt and
a box mean the same thing everywhere. (Over 500 lines on purpose: one home for everything the model reads
or writes is the contract; split up, the pieces would have to be kept in step again.)
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tools.errors import (
    BoxOutsideError,
    LimitError,
    MultipleToolCallsError,
    ToolCallParseError,
    ToolError,
    UnknownSourceError,
    UnknownToolError,
)
from tools.store import ImageStore
from tools.zoom import FRAMES, Observation, ZoomConfig, check_box, read_overview, read_region

if TYPE_CHECKING:
    from pipeline.core.records import TextQA

TOOL_NAME = "zoom_in"

_FRAME_TEXT = {
    "shown_pixels": "absolute pixel coordinates of that image as you see it",
    "norm1000": "coordinates normalised to 0-1000 on both axes of that image",
    "lonlat": "longitude/latitude degrees [west, south, east, north]",
}

DEFAULT_INSTRUCTION = (
    "Select the best answer for the multiple-choice question based on the image(s). "
    "Answer with the option letter(s) inside <answer></answer>."
)


def zoom_tool_schema(frame: str = "shown_pixels", strict: bool = False) -> dict[str, Any]:
    """The zoom_in tool in OpenAI tools format. `strict=True` gives the same tool in the form OpenAI's strict
    function calling accepts (every property required, no extra properties, no `default`)."""
    _check_frame(frame)
    if strict:
        fn = zoom_tool_schema(frame)["function"]
        params = fn["parameters"]
        props = {k: {kk: vv for kk, vv in v.items() if kk != "default"} for k, v in params["properties"].items()}
        return {"type": "function", "function": {
            **fn, "strict": True,
            "parameters": {**params, "properties": props, "required": list(props), "additionalProperties": False},
        }}
    return {
        "type": "function",
        "function": {
            "name": TOOL_NAME,
            "description": (
                "Zoom into a region of an image or of an earlier zoomed view and return it at higher "
                f"resolution. bbox is [x0, y0, x1, y1] in {_FRAME_TEXT[frame]}."
            ),
            "parameters": {
                "type": "object",
                "properties": {
                    "bbox": {
                        "type": "array",
                        "items": {"type": "number"},
                        "minItems": 4,
                        "maxItems": 4,
                        "description": f"[x0, y0, x1, y1] in {_FRAME_TEXT[frame]}",
                    },
                    "source": {
                        "type": "string",
                        "description": "The view the box refers to: image_0, image_1, ... or an earlier obs_N.",
                        "default": "image_0",
                    },
                },
                "required": ["bbox"],
            },
        },
    }


def system_prompt(frame: str = "shown_pixels", *, native_tools: bool = False) -> str:
    """Short system prompt describing the tool and the answer format (short: tiny models pay per token).
    `native_tools`: the variant for chat APIs that receive `zoom_in` as a native tool (OpenAI `tools`), which
    asks for a tool call instead of describing the `<tool_call>` text format."""
    _check_frame(frame)
    if native_tools:
        return (
            "You answer questions about very large remote-sensing images. Small objects are invisible in the "
            f"overview; zoom in first by calling the zoom_in tool with bbox in {_FRAME_TEXT[frame]} named by "
            "source (image_0, image_1, or an earlier obs_N). You may think inside <think></think>. When sure, "
            "reply with <answer>letter(s)</answer>."
        )
    return (
        "You answer questions about very large remote-sensing images. Small objects are invisible in the "
        "overview; zoom in first. To zoom, reply with "
        '<tool_call>{"name": "zoom_in", "arguments": {"bbox": [x0, y0, x1, y1], "source": "image_0"}}</tool_call> '
        f"where bbox is in {_FRAME_TEXT[frame]} named by source (image_0, image_1, or an earlier obs_N). "
        "You may think inside <think></think>. When sure, reply with <answer>letter(s)</answer>."
    )


def _check_frame(frame: str) -> None:
    if frame not in FRAMES:
        raise ValueError(f"frame {frame!r} not in {FRAMES}")


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass
class ParsedTurn:
    think: str | None
    tool_call: ToolCall | None
    answer: str | None
    error: ToolError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


_THINK = re.compile(r"<think>(.*?)</think>", re.S)
_THINK_ANY_CASE = re.compile(r"<think>.*?</think>", re.S | re.I)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_ANSWER_ANY_CASE = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)
_OPEN_ANSWER_AT_END = re.compile(r"<answer>((?:(?!<answer>|</answer>).)*)$", re.S | re.I)
_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.S)
_CALL_BLOCK = re.compile(r"<tool_call>.*?(?:</tool_call>|\Z)", re.S)

# Generation stops after a tool call or an answer (the stop string is kept; see trim_at_stop/close_stopped).
STOP_STRINGS = ["</tool_call>", "</answer>"]


_TAGS = ("think", "tool_call", "answer")


def tags_balanced(turn: str) -> bool:
    """Each of <think>, <tool_call>, <answer> opens and closes the same number of times, in order (the RL
    format reward's first check)."""
    for tag in _TAGS:
        opens = [m.start() for m in re.finditer(f"<{tag}>", turn)]
        closes = [m.start() for m in re.finditer(f"</{tag}>", turn)]
        if len(opens) != len(closes) or any(c < o for o, c in zip(opens, closes, strict=False)):
            return False
    return True


def answer_tags(text: str, *, ignore_case: bool = False) -> list[str]:
    """The bodies of every `<answer>…</answer>` of a text, in order, unstripped. `parse_turn` reads the exact
    tags (the format reward); the answer verifier reads them in any letter case (`ignore_case`)."""
    return (_ANSWER_ANY_CASE if ignore_case else _ANSWER).findall(text)


def open_answer_at_end(text: str) -> str | None:
    """The body of an `<answer>` (any case) left open at the end of a text: generation stopped at the stop
    string `</answer>` and the engine dropped it. None when there is none."""
    m = _OPEN_ANSWER_AT_END.search(text)
    return m.group(1) if m else None


def strip_think(text: str) -> str:
    """The text without its `<think>…</think>` blocks (any case)."""
    return _THINK_ANY_CASE.sub("", text)


def format_answer(answer: str) -> str:
    """The final-answer text: `<answer>answer</answer>` (what SFT targets teach and the verifier reads)."""
    return f"<answer>{answer}</answer>"


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


def _loads(text: str, what: str) -> Any:
    """json.loads that maps every failure on model text to ToolCallParseError: bad JSON, nesting deeper
    than the interpreter's recursion limit (RecursionError) and over-long integers (ValueError)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise ToolCallParseError(detail=f"bad {what} JSON: {type(e).__name__}") from None


def parse_arguments(args: Any) -> dict[str, Any]:
    """Tool arguments as a dict: an object, or the JSON string OpenAI tool calls carry."""
    if isinstance(args, str):  # OpenAI style: arguments as a JSON string
        args = _loads(args, "arguments")
    if not isinstance(args, dict):
        raise ToolCallParseError(detail="'arguments' must be an object")
    return args


def _parse_call(body: str) -> ToolCall:
    d = _loads(body.strip(), "tool call")
    if not isinstance(d, dict) or not isinstance(d.get("name"), str):
        raise ToolCallParseError(detail="tool call must be an object with a string 'name'")
    return ToolCall(name=d["name"], arguments=parse_arguments(d.get("arguments", d.get("parameters", {}))))


def parse_turn(text: str) -> ParsedTurn:
    """Split one assistant turn into think / tool call / answer; format problems go to `error`."""
    if not isinstance(text, str):
        return ParsedTurn(None, None, None, ToolCallParseError(detail="turn is not text"))
    m = _THINK.search(text)
    think = m.group(1).strip() if m else None
    answers = answer_tags(text)
    answer = answers[-1].strip() if answers else None
    calls = _CALL.findall(text)
    if len(calls) > 1:
        return ParsedTurn(think, None, answer, MultipleToolCallsError())
    if calls and answer is not None:
        return ParsedTurn(think, None, answer, ToolCallParseError(
            "Give either one tool call or an answer in a turn, not both."))
    if not calls:
        return ParsedTurn(think, None, answer, None)
    try:
        call = _parse_call(calls[0])
    except ToolCallParseError as e:
        return ParsedTurn(think, None, None, e)
    if call.name != TOOL_NAME:
        return ParsedTurn(think, call, None, UnknownToolError())
    return ParsedTurn(think, call, None, None)


def turn_budget(max_zooms: int) -> int:
    """Assistant turns of an episode allowed `max_zooms` zoom calls: one turn per call plus the answer turn.
    The one meaning of the zoom limit: SFT trajectories hold at most max_zooms calls, mining and eval give the
    agent turn_budget(max_zooms) turns, RL gives TRL max_tool_calling_iterations = max_zooms (so
    max_zooms + 1 generations), and the tool refuses call max_zooms + 1 in all of them."""
    if max_zooms < 0:
        raise ValueError("max_zooms must be >= 0")
    return int(max_zooms) + 1


def turn_error_result(parsed: ParsedTurn) -> ToolResult | None:
    """The observation for a turn whose call cannot be run at all (bad JSON, several calls, a call and an answer
    together): the error text, for the model to read before its next turn. None when the turn is fine or names
    a tool (an unknown tool goes to `Episode.execute`, which counts it as a call). Eval and RL both use this."""
    if parsed.error is None or parsed.tool_call is not None:
        return None
    return ToolResult(text=parsed.error.model_message(), observation=None, error=parsed.error)


def _num(v: float) -> int | float:
    return int(v) if float(v).is_integer() else round(float(v), 2)


def format_tool_call(bbox: Any, source: str = "image_0") -> str:
    """The canonical tool-call text (what SFT trajectories teach and parse_turn reads back)."""
    return tool_call_text(TOOL_NAME, {"bbox": [_num(v) for v in bbox], "source": source})


def format_box(bbox: Any) -> str:
    """A box as the tool call writes it (`[741, 341, 759, 359]`), for reasoning texts that name it."""
    return json.dumps([_num(v) for v in bbox])


def tool_call_text(name: Any, arguments: Any) -> str:
    """One call in the text protocol, `<tool_call>{"name": ..., "arguments": ...}</tool_call>`, e.g. from an
    API's `message.tool_calls`: string arguments are parsed; arguments that are not JSON stay a string, which
    `parse_turn` then reports as the model's parse error."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def raw_tool_call(text: str) -> tuple[str, str] | None:
    """(name, arguments string) of the one `<tool_call>` of a turn whose arguments are an unparsed string
    (what `tool_call_text` wrote for arguments that were not JSON); None otherwise."""
    blocks = _CALL.findall(text)
    if len(blocks) != 1:
        return None
    try:
        d = json.loads(blocks[0].strip())
    except json.JSONDecodeError:
        return None
    if isinstance(d, dict) and isinstance(d.get("name"), str) and isinstance(d.get("arguments"), str):
        return d["name"], d["arguments"]
    return None


def strip_tool_calls(text: str) -> str:
    """The text without its `<tool_call>` blocks (a last unclosed one included)."""
    return _CALL_BLOCK.sub("", text)


@dataclass
class ToolResult:
    text: str
    observation: Observation | None = None
    error: ToolError | None = None


def _box_text(box: Any) -> str:
    """A box for messages; a coordinate of 1e9 or more in scientific notation (a float such as 1e295 written
    out is 296 digits, and an error naming it must stay a one-line message)."""
    return "[" + ", ".join(str(_num(v)) if abs(float(v)) < 1e9 else f"{float(v):.3g}" for v in box) + "]"


class Episode:
    """The observations of one question and the zoom calls made on them (frames kept exact)."""

    def __init__(self, store: ImageStore, image_ids: list[str], cfg: ZoomConfig | None = None):
        self.store = store
        self.cfg = cfg or ZoomConfig()
        self.cfg.check()
        self.image_ids = list(image_ids)
        self.observations: dict[str, Observation] = {}
        for k, iid in enumerate(self.image_ids):
            obs = read_overview(store, iid, self.cfg, name=f"image_{k}", image_index=k)
            self.observations[obs.name] = obs
        self.n_calls = 0
        self.n_errors = 0
        self._next_obs = 1

    def initial_observations(self) -> list[Observation]:
        return [self.observations[f"image_{k}"] for k in range(len(self.image_ids))]

    def zoom_in(self, bbox: Any, source: str = "image_0") -> Observation:
        """Map `bbox` from `source`'s frame to native pixels and read it; raises ToolError."""
        if self.n_calls >= self.cfg.max_turns:
            self.n_calls += 1
            self.n_errors += 1
            raise LimitError(f"No zoom calls left (limit {self.cfg.max_turns}); answer now.")
        self.n_calls += 1
        try:
            box = check_box(bbox, wrap_x=self.cfg.frame == "lonlat")  # lon/lat may cross the antimeridian
            if not isinstance(source, str) or source not in self.observations:
                raise UnknownSourceError(
                    f"Unknown source {str(source)[:40]!r}; use one of {', '.join(self.observations)}.")
            src = self.observations[source]
            native = src.frame_to_native(box)
            wx0, wy0, wx1, wy1 = src.window
            clipped = (max(native[0], wx0), max(native[1], wy0), min(native[2], wx1), min(native[3], wy1))
            if clipped[0] >= clipped[2] or clipped[1] >= clipped[3]:
                raise BoxOutsideError(f"bbox {_box_text(box)} lies outside {source}.")
            name = f"obs_{self._next_obs}"
            obs = read_region(self.store, src.image_id, clipped, self.cfg, name=name,
                              image_index=src.image_index, parent=source, source_box=[float(v) for v in box])
        except ToolError:
            self.n_errors += 1
            raise
        self._next_obs += 1
        self.observations[name] = obs
        return obs

    def execute(self, call: ToolCall) -> ToolResult:
        """Run a parsed call; every ToolError becomes a text-only result the model reads."""
        try:
            if call.name != TOOL_NAME:
                self.n_calls += 1
                self.n_errors += 1
                raise UnknownToolError()
            args = call.arguments if isinstance(call.arguments, dict) else {}
            bbox = args.get("bbox", args.get("bbox_2d"))
            if bbox is None:
                self.n_calls += 1
                self.n_errors += 1
                raise ToolCallParseError("zoom_in needs a 'bbox' argument [x0, y0, x1, y1].")
            source = args.get("source", "image_0")
            if "source" not in args and "image_index" in args:
                source = f"image_{args['image_index']}"
            obs = self.zoom_in(bbox, source)
        except ToolError as e:
            return ToolResult(text=e.model_message(), observation=None, error=e)
        return ToolResult(text=observation_text(obs), observation=obs, error=None)

    def oracle_bbox(self, image_index: int, native_box: Any) -> list[float]:
        """The box (in image_k's frame) that zooms onto `native_box`; pixel frames round outward to ints."""
        obs = self.observations[f"image_{image_index}"]
        x0, y0, x1, y1 = obs.native_to_frame(native_box)
        if obs.frame == "lonlat":
            return [round(v, 6) for v in (x0, y0, x1, y1)]
        w, h = obs.image.size if obs.frame == "shown_pixels" else (1000, 1000)
        return [
            float(max(0, math.floor(x0 + 1e-6))), float(max(0, math.floor(y0 + 1e-6))),
            float(min(w, math.ceil(x1 - 1e-6))), float(min(h, math.ceil(y1 - 1e-6))),
        ]

    def observation_list(self) -> list[dict[str, Any]]:
        """JSON-able descriptions of all observations (for Trajectory.observations)."""
        return [o.to_dict() for o in self.observations.values()]


def observation_text(obs: Observation) -> str:
    """The text accompanying a zoomed view: its name, what it shows and its size."""
    w, h = obs.image.size
    return f"{obs.name}: zoom of {obs.parent} {_box_text(obs.source_box or [])}, shown at {w}x{h}."


def user_message(question: str, choices: list[str], n_images: int, instruction: str | None = None,
                 sizes: list[tuple[int, int]] | None = None, hint: str = "") -> dict[str, Any]:
    """The user turn: one image placeholder per input image (named image_k), question, choices, instruction,
    and the sample's hint line if it has one."""
    content: list[dict[str, Any]] = []
    for k in range(n_images):
        label = f"image_{k}" + (f" ({sizes[k][0]}x{sizes[k][1]})" if sizes else "") + ":"
        content.append({"type": "text", "text": label})
        content.append({"type": "image"})
    text = question.strip()
    if choices:
        text += "\nThe choices are listed below:\n" + "\n".join(c.strip() for c in choices)
    text += "\n" + (instruction if instruction is not None else DEFAULT_INSTRUCTION)
    if hint.strip():
        text += "\n" + hint.strip()
    content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def tool_message(result: ToolResult) -> dict[str, Any]:
    """The tool turn: the new view (image placeholder + its text) or the error text alone."""
    if result.observation is None:
        return {"role": "tool", "content": [{"type": "text", "text": result.text}]}
    return {"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": result.text}]}


def build_prompt_messages(sample: Any, frame: str = "shown_pixels", *, instruction: str | None = None,
                          system: bool = True, sizes: list[tuple[int, int]] | None = None) -> list[dict[str, Any]]:
    """System + user messages for a VQASample (images are passed separately, in order)."""
    msgs: list[dict[str, Any]] = []
    if system:
        msgs.append({"role": "system", "content": system_prompt(frame)})
    msgs.append(user_message(sample.question, list(sample.choices), len(sample.images), instruction, sizes,
                             sample.hint))
    return msgs


# -- text QA (the cold start; the build-qa exports render the same conversation) -------------------------
TEXT_INSTRUCTIONS = {
    "mcq": "Think step by step inside <think></think>, then give the letter of the correct option inside "
           "<answer></answer>.",
    "tf": "Think step by step inside <think></think>, then answer true or false inside <answer></answer>.",
    "fill": "Think step by step inside <think></think>, then give the missing term inside <answer></answer>.",
    "free": "Think step by step inside <think></think>, then give a short final answer inside "
            "<answer></answer>.",
}


def text_user_prompt(qa: TextQA) -> str:
    """The user turn of a text question: question, options (mcq), instruction."""
    parts = [qa.question.strip()]
    if qa.choices:
        parts.append("\n".join(qa.choices))
    parts.append(TEXT_INSTRUCTIONS.get(qa.qtype, TEXT_INSTRUCTIONS["free"]))
    return "\n".join(parts)


def text_target(qa: TextQA, think: bool = True) -> str:
    """The assistant turn: `<think>` rationale steps `</think><answer>answer</answer>`."""
    answer = format_answer(qa.answer)
    if not think:
        return answer
    rationale = " ".join(s.strip() for s in qa.rationale if s.strip()) or "The answer follows from the question."
    return f"<think>{rationale}</think>{answer}"


def text_prompt_messages(qa: TextQA, system: str | None = None) -> list[dict[str, Any]]:
    """Prompt-only messages (for generation/evaluation of text QA)."""
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": text_user_prompt(qa)}]


def text_qa_messages(qa: TextQA, *, think: bool = True, system: str | None = None) -> list[dict[str, Any]]:
    """Full training conversation of a TextQA record (what SFT trains on and build-qa exports)."""
    return text_prompt_messages(qa, system) + [{"role": "assistant", "content": text_target(qa, think)}]


# -- the oracle trajectories' reasoning texts (SFT pre-warm) --------------------------------------------
ZOOM_THINK = "<think>The evidence is small in the overview, so I zoom in on it.</think>"
# when a sample names where to look (meta "zoom_on", e.g. "column 7, row 3" from make-scenes), the zoom think
# restates it and works out the box from it ("Zoom in on column 7, row 3: [741, 341, 759, 359]."): each step is
# a short copy (site -> think, a few tokens -> box digits, box -> the call's box), which the tiny model learns in
# one 300-step run; with the site alone in the think the box digits stayed at chance (docs/tiny_model.md)
ZOOM_THINK_AT = "<think>Zoom in on {where}: {box}.</think>"
ANSWER_THINK = "<think>The zoomed view shows the evidence.</think>"
# when a sample states what its zooms show (meta "sees", e.g. "3 red ships on water" from make-scenes), the answer
# think says it first: reading the crop becomes one target that every question about a site shares, and the
# letter then follows from those words and the options (docs/tiny_model.md)
ANSWER_THINK_SEES = "<think>I see {sees}.</think>"
# and, when it also states the asked part in the options' words (meta "asks", e.g. "Colour: red"), the think ends
# with it: the letter is then one step from the word before it, and the part asked (the only thing the answer
# turn needs from the question, ~150 tokens back) is a target of its own (docs/tiny_model.md, "The answer turn")
ANSWER_THINK_SEES_ASKS = "<think>I see {sees}. {asks}.</think>"


def answer_think(sees: str, asks: str | None = None) -> str:
    """The oracle's answer think for a view described by `sees` (and the asked part, `asks`)."""
    return ANSWER_THINK_SEES_ASKS.format(sees=sees, asks=asks) if asks else ANSWER_THINK_SEES.format(sees=sees)


def reads_view(final_text: str | None, sees: str) -> bool:
    """Does an answer turn's think name exactly what the view shows (what eval's "read %" counts)?"""
    return bool(final_text) and f"<think>I see {sees}." in str(final_text)
DIRECT_THINK = "<think>The overview shows the evidence.</think>"


__all__ = [
    "TOOL_NAME",
    "DEFAULT_INSTRUCTION",
    "zoom_tool_schema",
    "system_prompt",
    "ToolCall",
    "ParsedTurn",
    "parse_turn",
    "parse_arguments",
    "turn_budget",
    "turn_error_result",
    "format_box",
    "format_tool_call",
    "tool_call_text",
    "raw_tool_call",
    "strip_tool_calls",
    "STOP_STRINGS",
    "trim_at_stop",
    "close_stopped",
    "answer_tags",
    "tags_balanced",
    "open_answer_at_end",
    "strip_think",
    "format_answer",
    "ToolResult",
    "Episode",
    "observation_text",
    "user_message",
    "tool_message",
    "build_prompt_messages",
    "TEXT_INSTRUCTIONS",
    "text_user_prompt",
    "text_target",
    "text_prompt_messages",
    "text_qa_messages",
    "ZOOM_THINK",
    "ZOOM_THINK_AT",
    "ANSWER_THINK_SEES",
    "ANSWER_THINK_SEES_ASKS",
    "answer_think",
    "reads_view",
    "ANSWER_THINK",
    "DIRECT_THINK",
]
