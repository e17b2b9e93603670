"""Record types shared by every stage, stored as JSONL (one JSON object per line).

`TextQA`: text question answering from the knowledge graph (cold-start SFT).
`VQASample`: an image question (XLRS-Bench style), optionally with the target region to zoom to.
`Trajectory`: one agent episode: chat messages with tool calls, observation references, reward components.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, overload

from pipeline.core.errors import RecordError

T = TypeVar("T")

TEXT_QTYPES = ("mcq", "tf", "fill", "free")
VQA_QTYPES = ("single", "multi", "tf", "numeric", "text")


@dataclass
class TextQA:
    """A text QA item generated from (and verified against) the knowledge graph."""

    id: str
    question: str
    qtype: str  # one of TEXT_QTYPES
    answer: str  # option letter for mcq ("B"), "true"/"false" for tf, text otherwise
    choices: list[str] = field(default_factory=list)  # ["(A) NDVI", "(B) ..."] for mcq
    rationale: list[str] = field(default_factory=list)  # reasoning steps following the graph path
    evidence: list[list[str]] = field(default_factory=list)  # [[head, relation, tail], ...]
    hops: int = 1
    source: str = "kg-template"  # "kg-template" | "teacher"
    split: str = "train"  # "train" | "val" | "test"
    domain: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.qtype not in TEXT_QTYPES:
            raise RecordError(f"TextQA {self.id}: qtype {self.qtype!r} not in {TEXT_QTYPES}")
        if self.qtype == "mcq" and len(self.choices) < 2:
            raise RecordError(f"TextQA {self.id}: an mcq needs at least 2 choices")
        if not self.question.strip() or not str(self.answer).strip():
            raise RecordError(f"TextQA {self.id}: question and answer must be non-empty")


ON_TARGET_COVER = 0.5  # a zoom is "on target" when its window covers half of a target box (eval and RL alike)


@dataclass
class TargetRegion:
    """Where the evidence is: image index and a box [x0, y0, x1, y1] in native pixels of that image."""

    image: int
    bbox: list[float]


@dataclass
class VQASample:
    """An image question. `images` are image-store ids; choices are labelled "(A) ..."."""

    id: str
    images: list[str]
    question: str
    answer: str  # letters for single/multi ("B", "AC"), "true"/"false", a number, or text
    qtype: str = "single"  # one of VQA_QTYPES
    choices: list[str] = field(default_factory=list)
    category: str = ""  # "Task/Subtask", e.g. "Perception/Object color"
    l2_category: str = ""
    targets: list[TargetRegion] = field(default_factory=list)
    tolerance: float = 0.0  # numeric answers: accepted absolute error
    split: str = "test"
    meta: dict[str, Any] = field(default_factory=dict)
    # A last line of the user turn, after the instruction (empty: none). The tiny world names the question's
    # site there ("Site: column 7, row 3."), the same number of tokens before the answer for every template
    # (docs/tiny_model.md); benchmark items leave it empty, so their prompts are the official ones.
    hint: str = ""

    def validate(self) -> None:
        for name in ("id", "question", "answer", "qtype", "category", "hint"):  # a number here crashed eval's viewer
            if not isinstance(getattr(self, name), str):
                raise RecordError(f"VQASample {str(self.id)[:60]}: {name} must be a JSON string (e.g. \"B\" or "
                                  f"\"42\"), got {type(getattr(self, name)).__name__}; quote it")
        for name in ("images", "choices"):
            v = getattr(self, name)
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise RecordError(f"VQASample {str(self.id)[:60]}: {name} must be a list of strings")
        if self.qtype not in VQA_QTYPES:
            raise RecordError(f"VQASample {self.id}: qtype {self.qtype!r} not in {VQA_QTYPES}")
        if not self.images:
            raise RecordError(f"VQASample {self.id}: needs at least one image id")
        if self.qtype in ("single", "multi") and len(self.choices) < 2:
            raise RecordError(f"VQASample {self.id}: a {self.qtype}-choice question needs choices")
        for t in self.targets:
            if not 0 <= t.image < len(self.images) or len(t.bbox) != 4:
                raise RecordError(f"VQASample {self.id}: bad target region {t}")

    def guess_rate(self) -> float:
        """Expected accuracy of a uniform guess: 1/k of k choices (single), 1/(2^k - 1) (multi: any non-empty
        set), 1/2 (true/false); 0 for numeric and text answers."""
        if self.qtype == "single" and self.choices:
            return 1.0 / len(self.choices)
        if self.qtype == "multi" and self.choices:
            return 1.0 / (2 ** len(self.choices) - 1)
        return 0.5 if self.qtype == "tf" else 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VQASample:
        d = dict(d)
        d["targets"] = [t if isinstance(t, TargetRegion) else TargetRegion(**t) for t in d.get("targets", [])]
        return cls(**d)


@dataclass
class Trajectory:
    """One agent episode. `messages` are chat messages in the tool protocol; images are referenced by
    observation name ("image_0", "obs_1"), described in `observations` (image id + native window)."""

    sample_id: str
    messages: list[dict[str, Any]]
    observations: list[dict[str, Any]] = field(default_factory=list)
    final_text: str = ""
    prediction: str | None = None  # extracted answer, None = parse failure
    correct: bool = False
    rewards: dict[str, float] = field(default_factory=dict)
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    truncated: bool = False  # cut by max_turns
    error: str | None = None  # set when the episode raised (unscorable)
    meta: dict[str, Any] = field(default_factory=dict)


def to_dict(record: Any) -> dict[str, Any]:
    return dataclasses.asdict(record)


def from_dict(cls: type[T], d: dict[str, Any]) -> T:
    """Build a record, with an error that names unknown or missing fields."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]  # T is a record dataclass
    unknown = set(d) - names
    if unknown:
        raise RecordError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    try:
        # hasattr does not narrow type[T] for mypy
        rec = cls.from_dict(d) if hasattr(cls, "from_dict") else cls(**d)  # type: ignore[attr-defined]
    except TypeError as e:
        raise RecordError(f"{cls.__name__}: {e}") from e
    if hasattr(rec, "validate"):
        rec.validate()
    return rec


@overload
def read_jsonl(path: str | os.PathLike, cls: None = None) -> Iterator[dict[str, Any]]: ...
@overload
def read_jsonl(path: str | os.PathLike, cls: type[T]) -> Iterator[T]: ...
def read_jsonl(path: str | os.PathLike, cls: type[T] | None = None) -> Iterator[T | dict[str, Any]]:
    """Yield records (or dicts when cls is None); a truncated last line (killed writer) is skipped."""
    path = Path(path)
    if not path.exists():
        from pipeline.core.errors import DatasetNotFoundError

        raise DatasetNotFoundError(f"{path} does not exist")
    with path.open(encoding="utf-8") as f:
        lines = f.readlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) and not line.endswith("\n"):
                return  # partial last line of a killed append
            raise RecordError(f"{path}:{i}: invalid JSON ({e})") from e
        try:
            yield from_dict(cls, d) if cls is not None else d
        except RecordError as e:
            raise RecordError(f"{path}:{i}: {e}") from e


def read_records(paths: str | os.PathLike | Iterable[str | os.PathLike], cls: type[T], limit: int | None = None,
                 keep: Callable[[T], bool] | None = None) -> list[T]:
    """Records of one or more JSONL files in file order, those `keep` accepts, at most `limit`: the one loop
    behind read_vqa and sft's read_text_qa."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[T] = []
    for p in paths:
        for rec in read_jsonl(p, cls):
            if keep is not None and not keep(rec):
                continue
            out.append(rec)
            if limit is not None and len(out) >= limit:
                return out
    return out


def read_vqa(paths: str | os.PathLike | Iterable[str | os.PathLike], limit: int | None = None) -> list[VQASample]:
    """VQASamples of one or more JSONL files in file order, at most `limit`: the one VQA loader (evaluation,
    SFT and RL read their questions through it; each says itself what an empty set means)."""
    return read_records(paths, VQASample, limit)


def write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> int:
    """Write all records atomically (temp file + rename). Returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r if isinstance(r, dict) else to_dict(r), ensure_ascii=False) + "\n")
            n += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return n


class JsonlAppender:
    """Durable append-only JSONL (one fsync'd line per record) for resumable jobs.

    On open, a partial last line left by a kill is truncated away, so resumed runs never duplicate or
    corrupt records. `keys()` returns the values of `key` already written."""

    def __init__(self, path: str | os.PathLike, key: str = "id"):
        self.path = Path(path)
        self.key = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair()
        self._f = self.path.open("a", encoding="utf-8")

    def _repair(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            with self.path.open("r+b") as f:
                f.truncate(cut)

    def keys(self) -> set[str]:
        out: set[str] = set()
        if self.path.exists():
            for d in read_jsonl(self.path):
                if self.key in d:
                    out.add(str(d[self.key]))
        return out

    def append(self, record: Any) -> None:
        d = record if isinstance(record, dict) else to_dict(record)
        self._f.write(json.dumps(d, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "TextQA",
    "VQASample",
    "TargetRegion",
    "Trajectory",
    "read_jsonl",
    "read_records",
    "read_vqa",
    "write_jsonl",
    "JsonlAppender",
    "from_dict",
    "to_dict",
    "TEXT_QTYPES",
    "VQA_QTYPES",
]
