"""The strict answer verifier, shared by the RL reward and evaluation (import it, never copy it).

Two steps: `extract_answer` finds the final answer (the last `<answer>…</answer>`, else a clearly marked
final-answer phrase such as "The answer is C" / "Answer: C" / `\\boxed{C}`, else — only for short replies
— the whole reply), then `verify` matches it against the truth for the question type:

- single choice (`single`, `mcq`): exactly one option, given as its letter ("C", "(C)", "C.") or its letter
  followed by that option's own text ("(C) Red"), or the option text alone. "A B C D", "A or B", a sentence
  that merely starts with "A", or a list of every option are not one option → parse failure.
- multiple choice (`multi`): an exact set match of letters ("A C", "A, C", "AC", "A and C"); "or" hedges fail.
- true/false (`tf`): exactly one of true/yes/correct vs false/no/incorrect (or the option letter).
- numeric (`numeric`): exactly one number (digits or a small number word) within `tolerance`.
- short text (`text`, `fill`, `free`): normalised exact match (case, articles, punctuation, whitespace).

Harness bugs this module must not reproduce (see tests/test_verifier_*.py): "Answer: C" read as {A, C, E},
"The best option is B" read as {B, E}, "A B C D" credited as A, "A large…" read as option A, any-overlap
matching for single-answer questions. Answers of `max_chars` characters or more never get credit.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

MAX_ANSWER_CHARS = 1000  # the reference reward gives no accuracy credit to answers this long or longer
MAX_BARE_CHARS = 200  # a reply with no tag and no marker is only read as an answer when this short

QTYPE_ALIASES = {
    "single": "single",
    "mcq": "single",
    "multi": "multi",
    "tf": "tf",
    "numeric": "numeric",
    "text": "text",
    "fill": "text",
    "free": "text",
}

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)
_OPEN_ANSWER_AT_END = re.compile(r"<answer>((?:(?!<answer>|</answer>).)*)$", re.S | re.I)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
# A clearly marked final answer: "(the) (final|correct|best) answer/option/choice is|: X".
_MARKER = re.compile(
    r"(?:^|(?<=[\s.,;:!?(\[*]))(?:my\s+|the\s+)?(?:final\s+|correct\s+|best\s+|right\s+)?"
    r"(?:answer|option|choice)(?:\(s\))?\s*(?:is|are|would\s+be|:)\s*[:\-]?\s*",
    re.I,
)
_LABEL = re.compile(r"^\s*\(?([A-Za-z])\)\s*(.*)$|^\s*([A-Z])[.:]\s+(.*)$", re.S)
_LETTER_ONLY = re.compile(r"^\(?([A-Z])\)?[.:]?$")
_LETTER_THEN_TEXT = re.compile(r"^(?:\(([A-Z])\)|([A-Z])[.:)]|([A-Z]))\s+(.+)$", re.S)
_LETTER_LIST = re.compile(r"^\(?[A-Z]\)?(?:\s*(?:,|;|/|&|\+|\band\b|\s)\s*\(?[A-Z]\)?)*$")
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")
_WORD_NUMBERS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty".split()
    )
}
_TRUE = {"true", "yes", "correct", "t", "y", "right"}
_FALSE = {"false", "no", "incorrect", "f", "n", "wrong"}
_ARTICLES = re.compile(r"\b(?:a|an|the)\b", re.I)
_PUNCT = re.compile(r"[^\w\s%.,\-]|\.(?!(?<=\d\.)\d)|,(?!(?<=\d,)\d)|-(?!\d)")
_PURE_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


@dataclass
class VerifyResult:
    """Outcome of checking one reply: `prediction` is the normalised answer read (None = none read)."""

    correct: bool
    prediction: str | None
    parse_failure: bool
    reason: str


def _strip_wrappers(s: str) -> str:
    s = s.strip()
    # markdown emphasis / quotes / trailing full stop around a short answer
    s = re.sub(r"^[*_`\"']+|[*_`\"']+$", "", s).strip()
    return s


def _after_last_marker(text: str) -> str | None:
    """Text after the last clearly-marked final-answer phrase, up to the end of its line."""
    last = None
    for m in _MARKER.finditer(text):
        last = m
    if last is None:
        return None
    rest = text[last.end():]
    line = rest.split("\n", 1)[0].strip()
    return line or None


def extract_answer(text: str | None, *, allow_bare: bool = True, max_bare_chars: int = MAX_BARE_CHARS) -> str | None:
    """The final answer in a reply, or None. Order: last `<answer>…</answer>` (several that disagree → None),
    an `<answer>` left open at the end (generation stopped at the stop string), `\\boxed{…}`, a marked final
    answer ("The answer is …", "Answer: …"), then the bare reply when `allow_bare` and it is short."""
    if text is None:
        return None
    text = str(text)
    tagged = [t.strip() for t in _ANSWER_TAG.findall(text)]
    if tagged:
        distinct = {t for t in tagged}
        if len(distinct) > 1:
            return None
        inner = tagged[-1]
        marked = _after_last_marker(inner)
        return marked if marked is not None else (inner or None)
    m = _OPEN_ANSWER_AT_END.search(text)
    if m:
        inner = m.group(1).strip()
        marked = _after_last_marker(inner)
        return marked if marked is not None else (inner or None)
    if "<answer>" in text.lower() or "</answer>" in text.lower():
        return None  # unbalanced tags: a format error, not an answer
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1].strip() or None
    marked = _after_last_marker(text)
    if marked is not None:
        return marked
    if not allow_bare:
        return None
    bare = re.sub(r"<think>.*?</think>", "", text, flags=re.S | re.I).strip()
    if not bare or len(bare) > max_bare_chars or "<tool_call>" in bare:
        return None
    return bare


def parse_choices(choices: list[str] | None) -> dict[str, str]:
    """Map option letters to option texts; "(A) Red" / "A. Red" labels are read, unlabelled ones get A, B…"""
    out: dict[str, str] = {}
    for i, c in enumerate(choices or []):
        m = _LABEL.match(str(c))
        if m and (m.group(1) or m.group(3)):
            letter = (m.group(1) or m.group(3)).upper()
            body = m.group(2) if m.group(1) else m.group(4)
            out[letter] = (body or "").strip()
        else:
            out[chr(ord("A") + i)] = str(c).strip()
    return out


def normalize_text(s: str) -> str:
    """Lower-case, drop articles and punctuation (keeping decimal points and minus signs), squeeze spaces."""
    s = s.lower().strip()
    s = _PUNCT.sub(" ", s)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _letters_of_truth(answer: str) -> set[str]:
    return set(re.findall(r"[A-Z]", str(answer).upper()))


def _option_by_text(cand: str, options: dict[str, str]) -> str | None:
    norm = normalize_text(cand)
    if not norm:
        return None
    hits = [k for k, v in options.items() if normalize_text(v) == norm]
    return hits[0] if len(hits) == 1 else None


def _read_single(cand: str, options: dict[str, str]) -> tuple[str | None, str]:
    """One option letter from a candidate, or (None, why)."""
    c = _strip_wrappers(cand).rstrip(".").strip()
    if not c:
        return None, "empty answer"
    m = _LETTER_ONLY.match(c) or (re.match(r"^\(?([a-z])\)?$", c) if len(c) <= 3 else None)
    if m:
        letter = m.group(1).upper()
        if options and letter not in options:
            return None, f"{letter} is not an option"
        return letter, "letter"
    m = _LETTER_THEN_TEXT.match(c)
    if m:
        letter = m.group(1) or m.group(2) or m.group(3)
        body = m.group(4)
        if letter in options and normalize_text(body) == normalize_text(options[letter]):
            return letter, "letter with its option text"
    hit = _option_by_text(c, options)
    if hit is not None:
        return hit, "option text"
    if _LETTER_LIST.match(c):
        return None, "several options given for a single-choice question"
    return None, "no single option could be read"


def _read_multi(cand: str, options: dict[str, str]) -> tuple[set[str] | None, str]:
    """A set of option letters, or (None, why). Hedges ("A or B") and unknown letters fail."""
    c = _strip_wrappers(cand).rstrip(".").strip()
    if not c:
        return None, "empty answer"
    if re.search(r"\bor\b", c, re.I):
        return None, "hedged answer ('or')"
    letters: list[str] | None = None
    if _LETTER_LIST.match(c):
        letters = re.findall(r"[A-Z]", c)
    elif re.fullmatch(r"[A-Z]{2,}", c):
        letters = list(c)
    else:
        parts = [p for p in re.split(r"\s*(?:[,;\n]|\band\b)\s*", c) if p.strip()]
        got = []
        for p in parts:
            letter, _ = _read_single(p, options)
            if letter is None:
                return None, f"could not read an option from {p[:40]!r}"
            got.append(letter)
        letters = got
    if not letters:
        return None, "no options read"
    if options and any(letter not in options for letter in letters):
        return None, "a letter that is not an option"
    return set(letters), "letters"


def _read_bool(cand: str, options: dict[str, str]) -> tuple[bool | None, str]:
    c = normalize_text(_strip_wrappers(cand))
    if c in _TRUE:
        return True, "word"
    if c in _FALSE:
        return False, "word"
    if options:
        letter, _ = _read_single(cand, options)
        if letter is not None:
            t = normalize_text(options[letter])
            if t in _TRUE:
                return True, "option letter"
            if t in _FALSE:
                return False, "option letter"
    return None, "not exactly one of true/false"


def _truth_bool(answer: str, options: dict[str, str]) -> bool | None:
    b, _ = _read_bool(str(answer), options)
    return b


def _read_number(cand: str) -> tuple[float | None, str]:
    c = _strip_wrappers(cand)
    nums = _NUMBER.findall(c)
    words = [w for w in re.findall(r"[a-z]+", c.lower()) if w in _WORD_NUMBERS]
    if len(nums) + len(words) != 1:
        return None, "not exactly one number" if nums or words else "no number"
    if nums:
        try:
            v = float(nums[0].replace(",", ""))
        except ValueError:
            return None, "unreadable number"
    else:
        v = float(_WORD_NUMBERS[words[0]])
    if not math.isfinite(v):
        return None, "non-finite number"
    return v, "number"


def _fmt_number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(v)


def verify(
    text: str | None,
    answer: str,
    qtype: str,
    choices: list[str] | None = None,
    tolerance: float = 0.0,
    *,
    max_chars: int = MAX_ANSWER_CHARS,
    allow_bare: bool = True,
) -> VerifyResult:
    """Check a model reply against the truth. Never raises on model output; an unknown qtype is a
    programming error (ValueError)."""
    kind = QTYPE_ALIASES.get(qtype)
    if kind is None:
        raise ValueError(f"unknown qtype {qtype!r}; use one of {sorted(QTYPE_ALIASES)}")
    cand = extract_answer(text, allow_bare=allow_bare)
    if cand is None:
        return VerifyResult(False, None, True, "no final answer found")
    if len(cand) >= max_chars:
        return VerifyResult(False, None, False, f"answer of {len(cand)} chars >= max_chars {max_chars}: no credit")
    options = parse_choices(choices)
    if kind == "single":
        letter, why = _read_single(cand, options)
        if letter is None:
            return VerifyResult(False, None, True, why)
        truth = _letters_of_truth(answer)
        return VerifyResult(truth == {letter}, letter, False, why)
    if kind == "multi":
        got, why = _read_multi(cand, options)
        if got is None:
            return VerifyResult(False, None, True, why)
        return VerifyResult(got == _letters_of_truth(answer), "".join(sorted(got)), False, why)
    if kind == "tf":
        b, why = _read_bool(cand, options)
        if b is None:
            return VerifyResult(False, None, True, why)
        truth_b = _truth_bool(answer, options)
        return VerifyResult(truth_b is not None and b == truth_b, "true" if b else "false", False, why)
    if kind == "numeric":
        v, why = _read_number(cand)
        if v is None:
            return VerifyResult(False, None, True, why)
        t, _ = _read_number(str(answer))
        ok = t is not None and abs(v - t) <= max(0.0, float(tolerance)) + 1e-9
        return VerifyResult(ok, _fmt_number(v), False, why)
    # short text
    norm = normalize_text(_strip_wrappers(cand))
    if not norm:
        return VerifyResult(False, None, True, "empty answer")
    truth_n = normalize_text(str(answer))
    ok = norm == truth_n
    if not ok and _PURE_NUMBER.fullmatch(norm) and _PURE_NUMBER.fullmatch(truth_n):
        # numbers written differently ("3.0" vs "3", "1,200" vs "1200") still match
        ok = abs(float(norm.replace(",", "")) - float(truth_n.replace(",", ""))) <= max(0.0, float(tolerance)) + 1e-9
    return VerifyResult(ok, norm, False, "normalised text")


def verify_sample(text: str | None, sample: Any, **kw: Any) -> VerifyResult:
    """`verify` with the truth, type, choices and tolerance of a `VQASample` or `TextQA`."""
    return verify(
        text,
        str(sample.answer),
        sample.qtype,
        list(getattr(sample, "choices", []) or []),
        float(getattr(sample, "tolerance", 0.0) or 0.0),
        **kw,
    )


__all__ = [
    "VerifyResult",
    "extract_answer",
    "verify",
    "verify_sample",
    "parse_choices",
    "normalize_text",
    "MAX_ANSWER_CHARS",
    "QTYPE_ALIASES",
]
