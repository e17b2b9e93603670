"""The strict answer verifier, shared by the RL reward and evaluation (import it, never copy it).

Two steps: `extract_answer` finds the final answer (the last `<answer>…</answer>`, else `\\boxed{…}`, else a
clearly marked final-answer phrase such as "The answer is C" / "Answer: C" / "答案：C" / "I choose C", else a
claim such as "C is the best answer", else — only for short replies — the whole reply), then `verify` matches it
against the truth for the question type:

- single choice (`single`, `mcq`): exactly one option, given as its letter ("C", "(C)", "C.", "Option C",
  unambiguous lower case "c"), its letter followed by that option's own text ("(C) Red") or by an explanation
  ("C. The hull is green."), the option text alone, or a short answer that contains the text of exactly one
  option and no negation or hedge. A label whose text is another option's ("(A) Green" when Green is C) is a
  contradiction, not an answer. "A B C D", "A or B", a sentence that merely starts with the article "A", or a
  list of every option are not one option → parse failure.
- multiple choice (`multi`): an exact set match of letters ("A C", "A, C", "AC", "A and C", "(A)(C)", "A、C",
  letters followed by an explanation, or labelled options whose texts agree); "or" hedges fail.
- true/false (`tf`): exactly one of true/yes/correct vs false/no/incorrect (a leading "Yes, …" counts; the
  option letter too).
- numeric (`numeric`): exactly one number (digits or a small number word) within `tolerance`.
- short text (`text`, `fill`, `free`): normalised exact match (case, articles, punctuation, whitespace).

Full-width punctuation and letters (`：`, `。`, `、`, `（C）`, `Ｃ`) are read as their ASCII forms first.
Harness bugs this module must not reproduce (see tests/test_verifier_*.py): "Answer: C" read as {A, C, E},
"The best option is B" read as {B, E}, "A B C D" credited as A, "A large…" read as option A, any-overlap
matching for single-answer questions, and the article rule swallowing a standalone letter "A" ("(A) Green"
credited as the option whose text is Green). Answers of `max_chars` characters or more never get credit.

Over 500 lines on purpose: the one answer contract (extract + match per question type) reads best in one
place; tests/test_verifier_table.py is its table of cases.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.core.records import TextQA, VQASample

from tools.protocol import answer_tags, open_answer_at_end, strip_think

MAX_ANSWER_CHARS = 1000  # the reference reward gives no accuracy credit to answers this long or longer
MAX_BARE_CHARS = 200  # a reply with no tag and no marker is only read as an answer when this short
MAX_CONTAINS_CHARS = 160  # an answer is searched for option texts only when this short

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

# full-width ASCII (U+FF01-FF5E) and CJK punctuation → ASCII, so "答案：（Ｃ）。" reads like "答案:(C)."
_WIDE = {i: i - 0xFEE0 for i in range(0xFF01, 0xFF5F)}
_WIDE.update({0x3000: 0x20, 0x3002: ord("."), 0x3001: ord(","), 0xFF64: ord(","), 0x3010: ord("["),
              0x3011: ord("]"), 0x201C: ord('"'), 0x201D: ord('"'), 0x2018: ord("'"), 0x2019: ord("'")})

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
# A clearly marked final answer: "(the) (final|correct|best) answer(s)/option/choice is|are|: X", "答案：X",
# "I (would) choose/pick/select/go with X".
_MARKER = re.compile(
    r"(?:(?:^|(?<=[\s.,;:!?(\[*]))(?:my\s+|the\s+)?(?:final\s+|correct\s+|best\s+|right\s+)?"
    r"(?:answer|option|choice)(?:s|\(s\))?\s*(?:(?:is|are)(?:\s*\((?:is|are)\))?|would\s+be|should\s+be|:"
    r"|(?=\s+[-–—]\s))\s*[:\-–—]?\s*"
    r"|(?:^|(?<=[\s.,;:!?(\[*]))i(?:\s+would|\s+will|'d|'ll)?\s+(?:choose|pick|select|go\s+with)\s+"
    r"|(?:^|(?<=[\s.,;:!?*]))(?:therefore|hence|thus|so)\s*,?\s+(?=\(?[A-Z]\)?\.?[ \t]*(?:\n|$))"
    r"|(?:正确)?答案\s*(?:是|为|:)?\s*:?\s*)",
    re.I,
)
# A claim about one or more letters: "C is the best answer", "(C) Green is correct", "A and C are correct".
_CLAIM = re.compile(
    r"(?:^|(?<=[\s,;:*]))((?:option\s+|choice\s+)?\(?[A-Z]\)?(?:\s*(?:,|and|&)\s*\(?[A-Z]\)?)*)"
    r"(?:[.:]?\s+([^\n.]{1,40}?))?\s+(?:is|are|would\s+be|seems\s+to\s+be)\s+(?:the\s+)?"
    r"(?:correct|best|right|most\s+likely|answer)\b",
)
_LABEL = re.compile(r"^\s*\(?([A-Za-z])\)\s*(.*)$|^\s*([A-Z])[.:]\s+(.*)$", re.S)
_OPTION_WORD = re.compile(r"^(?:option|choice)s?\s*[:\-]?\s*(?=\(?[A-Za-z](?![A-Za-z]))", re.I)
_PAREN_LABEL = re.compile(r"^\(([A-Za-z])\)\s*(.*)$", re.S)
_PUNCT_LABEL = re.compile(r"^([A-Z])(?:[.:)]|\s*[,;]|\s+[-–—]|[ \t]*\n)\s*(.*)$", re.S)
_LOWER_LABEL = re.compile(r"^([a-z])[.:)]\s*(.*)$", re.S)
_BARE_LABEL = re.compile(r"^([A-Z])\s+(.*)$", re.S)
_CONNECTIVE = re.compile(r"^(?:because|since|as|given|due\s+to|which|[-–—])(?:\s|$)", re.I)
_STANDALONE = re.compile(r"(?<![A-Za-z0-9'])(\()?([A-Z])(\))?(?![A-Za-z0-9'])|\(([a-z])\)")
_LIST_TOKEN = re.compile(r"\s*(?:\(([A-Za-z])\)|([A-Z])(?![A-Za-z])|([a-z])(?![A-Za-z]))\s*\.?")
_LIST_SEP = re.compile(r"\s*(?:,|;|/|&|\+|\band\b|和|以及)?\s*")
_LETTERS_THEN_TEXT = re.compile(
    r"^((?:\(?[A-Z]\)?)(?:\s*(?:,|;|/|&|\+|\band\b|\s)?\s*\(?[A-Z]\)?)*)"
    r"(?:[.:;]\s+|\s*\n|\s+[-–—]\s+|,?\s+(?=(?:because|since|as)\b))(.+)$", re.S)
_NEGATION = re.compile(r"\b(?:not|no|never|neither|nor|none|except|isn't|aren't|wasn't|doesn't|don't|cannot|"
                       r"can't|unlikely|rather\s+than|instead\s+of|unclear|unsure|uncertain)\b|n't\b", re.I)
_HEDGE = re.compile(r"\b(?:or|either|maybe|perhaps|possibly|probably|might|guess|hard\s+to\s+say)\b", re.I)
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")
_WORD_NUMBERS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty".split()
    )
}
_WORD_NUMBERS["dozen"] = 12
_TRUE = {"true", "yes", "correct", "t", "y", "right", "是", "对", "正确"}
_FALSE = {"false", "no", "incorrect", "f", "n", "wrong", "否", "错", "错误", "不是", "不对"}
_LEAD_BOOL = re.compile(r"^(yes|no|true|false|correct|incorrect)\s*(?:[,.;:!]|\s[-–—])\s*(.*)$", re.I | re.S)
_BOOL_CLAIM = re.compile(r"(?:^|[,;:]\s*|\bso\s+)(?:the\s+)?(?:statement|claim)\s+is\s+(true|false|correct|incorrect)"
                         r"\s*[.!]?\s*$", re.I)
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


def canonical_text(s: str) -> str:
    """Full-width letters, digits and punctuation (and CJK full stop / enumeration comma) as ASCII."""
    return s.translate(_WIDE)


def _strip_wrappers(s: str) -> str:
    s = s.strip()
    # markdown emphasis / quotes around a short answer
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


def _claimed(text: str) -> str | None:
    """The letters (and option text) of "C is the best answer"-style claims, when all claims agree."""
    found = set()
    for m in _CLAIM.finditer(text):
        head = _OPTION_WORD.sub("", m.group(1).strip())
        found.add(head + (f" {m.group(2).strip()}" if m.group(2) else ""))
    return found.pop() if len(found) == 1 else None


def extract_answer(text: str | None, *, allow_bare: bool = True, max_bare_chars: int = MAX_BARE_CHARS) -> str | None:
    """The final answer in a reply, or None. Order: last `<answer>…</answer>` (several that disagree → None),
    an `<answer>` left open at the end (generation stopped at the stop string), `\\boxed{…}`, a marked final
    answer ("The answer is …", "Answer: …"), a claim ("C is the best answer"), then the bare reply when
    `allow_bare` and it is short."""
    if text is None:
        return None
    text = canonical_text(str(text))
    tagged = [t.strip() for t in answer_tags(text, ignore_case=True)]
    if tagged:
        distinct = {t for t in tagged}
        if len(distinct) > 1:
            return None
        inner = tagged[-1]
        marked = _after_last_marker(inner)
        return marked if marked is not None else (inner or None)
    open_inner = open_answer_at_end(text)
    if open_inner is not None:
        inner = open_inner.strip()
        marked = _after_last_marker(inner)
        return marked if marked is not None else (inner or None)
    if "<answer>" in text.lower() or "</answer>" in text.lower():
        return None  # unbalanced tags: a format error, not an answer
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1].strip() or None
    body = strip_think(text)
    marked = _after_last_marker(body)
    if marked is not None:
        return marked
    claim = _claimed(body)
    if claim is not None:
        return claim
    if not allow_bare:
        return None
    bare = body.strip()
    if not bare or len(bare) > max_bare_chars or "<tool_call>" in bare:
        return None
    return bare


def parse_choices(choices: list[str] | None) -> dict[str, str]:
    """Map option letters to option texts; "(A) Red" / "A. Red" labels are read, unlabelled ones get A, B…"""
    out: dict[str, str] = {}
    for i, c in enumerate(choices or []):
        m = _LABEL.match(canonical_text(str(c)))
        if m and (m.group(1) or m.group(3)):
            letter = (m.group(1) or m.group(3)).upper()
            body = m.group(2) if m.group(1) else m.group(4)
            out[letter] = (body or "").strip()
        else:
            out[chr(ord("A") + i)] = str(c).strip()
    return out


def normalize_text(s: str) -> str:
    """Lower-case, drop articles and punctuation (keeping decimal points and minus signs), squeeze spaces.
    For free text only: option letters are read before this runs, so the article rule never eats a letter A."""
    s = canonical_text(s).lower().strip()
    s = _PUNCT.sub(" ", s)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _letters_of_truth(answer: str) -> set[str]:
    return set(re.findall(r"[A-Z]", str(answer).upper()))


def _clean(cand: str) -> str:
    """A candidate without wrappers, a leading "Option"/"Choice" word and trailing full stops."""
    c = _strip_wrappers(canonical_text(cand))
    c = _OPTION_WORD.sub("", c)
    return c.strip().rstrip(".").strip()


def _option_by_text(cand: str, options: dict[str, str]) -> str | None:
    """The one option whose whole text the candidate is (normalised), else None."""
    norm = normalize_text(cand)
    if not norm:
        return None
    if norm in _WORD_NUMBERS:  # "Three." for the option "3"
        norm = str(_WORD_NUMBERS[norm])
    hits = [k for k, v in options.items() if normalize_text(v) == norm]
    return hits[0] if len(hits) == 1 else None


def _options_in(cand: str, options: dict[str, str]) -> list[str]:
    """Options whose text occurs as whole words in the candidate; a text inside a longer matched one (Green in
    Dark green) does not count on its own."""
    norm = f" {normalize_text(cand)} "
    texts = {k: normalize_text(v) for k, v in options.items()}
    hits = [k for k, t in texts.items() if t and f" {t} " in norm]
    return [k for k in hits if not any(j != k and f" {texts[k]} " in f" {texts[j]} " and texts[j] != texts[k]
                                       for j in hits)]


def _other_letters(text: str, letters: set[str], options: dict[str, str]) -> set[str]:
    """Option letters standing alone in `text` other than `letters` ("A"/"I" before a lower-case word are
    read as the article / pronoun)."""
    out = set()
    for m in _STANDALONE.finditer(text):
        if m.group(4):
            letter = m.group(4).upper()
        else:
            letter = m.group(2)
            paren = m.group(1) or m.group(3)
            if letter in ("A", "I") and not paren and re.match(r"\s+[a-z]", text[m.end():]):
                continue
        if letter not in letters and (not options or letter in options):
            out.add(letter)
    return out


def _split_label(c: str) -> tuple[str | None, str, str]:
    """(letter, rest, kind) of a leading option label: kind paren "(C) …", punct "C. …", lower "c. …",
    bare "C …"; (None, c, "") when there is none."""
    for kind, rx in (("paren", _PAREN_LABEL), ("punct", _PUNCT_LABEL), ("lower", _LOWER_LABEL),
                     ("bare", _BARE_LABEL)):
        m = rx.match(c)
        if m:
            return m.group(1), m.group(2).strip(), kind
    return None, c, ""


def _read_letter_list(c: str) -> list[str] | None:
    """Letters of a pure list ("A C", "A, C", "(A)(C)", "A and C", "a, c"), else None."""
    pos, out = 0, []
    while pos < len(c):
        m = _LIST_TOKEN.match(c, pos)
        if not m or m.end() == pos:
            return None
        out.append((m.group(1) or m.group(2) or m.group(3)).upper())
        pos = m.end()
        s = _LIST_SEP.match(c, pos)
        pos = s.end() if s else pos
    return out or None


def _read_single(cand: str, options: dict[str, str], *, loose: bool = True) -> tuple[str | None, str]:
    """One option letter from a candidate, or (None, why). `loose` also reads a letter followed by an
    explanation and an answer containing exactly one option's text (not for the parts of a multi answer)."""
    c = _clean(cand)
    if not c:
        return None, "empty answer"
    m = re.fullmatch(r"\(?([A-Z])\)?[.:]?|\(?([a-z])\)?", c)
    if m:
        letter = (m.group(1) or m.group(2)).upper()
        if options and letter not in options:
            return None, f"{letter} is not an option"
        return letter, "letter"
    label, rest, kind = _split_label(c)
    if label is not None and options and label.upper() not in options:
        label, rest, kind = None, c, ""  # "I count 3 tanks": the pronoun, not a label
    if label is not None:
        letter = label.upper()
        if _other_letters(rest, {letter}, options):
            return None, "several options given for a single-choice question"
        head = re.split(r"[,.;:!?]|\s+(?:because|since|as)\s+", rest, maxsplit=1)[0]
        hit = _option_by_text(rest, options) or _option_by_text(head, options)
        if hit is not None and hit != letter:
            return None, f"letter {letter} given with the text of option {hit}"
        if hit == letter:
            return letter, "letter with its option text"
        if loose and (kind in ("paren", "punct") or (kind == "bare" and _CONNECTIVE.match(rest))):
            return letter, "letter with an explanation"
    hit = _option_by_text(c, options)
    if hit is not None and (label is None or kind == "lower" or hit == label.upper()):
        return hit, "option text"
    if _read_letter_list(c) is not None or re.fullmatch(r"[A-Z]{2,}", c):
        return None, "several options given for a single-choice question"
    if loose and len(c) <= MAX_CONTAINS_CHARS and not _NEGATION.search(c) and not _HEDGE.search(c):
        # a leading letter ("A large building") could be the article or a label: never guess which
        hits = _options_in(c, options) if label is None else []
        if len(hits) == 1 and not _other_letters(c, {hits[0]}, options):
            return hits[0], "the text of exactly one option"
    return None, "no single option could be read"


def _read_multi(cand: str, options: dict[str, str]) -> tuple[set[str] | None, str]:
    """A set of option letters, or (None, why). Hedges ("A or B") and unknown letters fail."""
    c = _clean(cand)
    if not c:
        return None, "empty answer"
    if re.search(r"\bor\b", c, re.I):
        return None, "hedged answer ('or')"
    letters = _read_letter_list(c)
    if letters is None and re.fullmatch(r"[A-Z]{2,}", c):
        letters = list(c)
    if letters is None:
        m = _LETTERS_THEN_TEXT.match(c)
        if m:
            got = re.findall(r"[A-Z]", m.group(1))
            if not _other_letters(m.group(2), set(got), options):
                letters = got
    if letters is None:
        parts = [p for p in re.split(r"\s*(?:[,;\n]|\band\b)\s*", c) if p.strip()]
        got = []
        for p in parts:
            letter, _ = _read_single(p, options, loose=False)
            if letter is None:
                return None, f"could not read an option from {p[:40]!r}"
            got.append(letter)
        letters = got
    if not letters:
        return None, "no options read"
    if options and any(letter not in options for letter in letters):
        return None, "a letter that is not an option"
    return set(letters), "letters"


def _bool_word(w: str) -> bool | None:
    w = w.lower()
    return True if w in _TRUE else False if w in _FALSE else None


def _read_bool(cand: str, options: dict[str, str]) -> tuple[bool | None, str]:
    cleaned = _clean(cand)
    # no article rule here: "(A) False" must not become "false"
    c = " ".join(_PUNCT.sub(" ", cleaned.lower()).split())
    if c in _TRUE:
        return True, "word"
    if c in _FALSE:
        return False, "word"
    m = _LEAD_BOOL.match(cleaned)
    if m:
        v = _bool_word(m.group(1))
        rest_words = {_bool_word(w) for w in re.findall(r"[a-z]+", m.group(2).lower())
                      if w in ("yes", "no", "true", "false", "incorrect")}
        if v is not None and (not v) not in rest_words and "or" not in m.group(2).lower().split():
            return v, "leading word"
    if options:
        letter, why = _read_single(cand, options, loose=False)
        if letter is not None:
            t = normalize_text(options[letter])
            if t in _TRUE:
                return True, "option letter"
            if t in _FALSE:
                return False, "option letter"
        label = _split_label(cleaned)[0]
        if label is not None and label.upper() in options:
            return None, why  # a labelled answer is read by its label only ("(A) False" is a contradiction)
    m = _BOOL_CLAIM.search(cleaned)  # "No wake, so the statement is false." (a negation before the claim is fine)
    if m and len(cleaned) <= MAX_CONTAINS_CHARS and not _HEDGE.search(cleaned):
        v = _bool_word(m.group(1))
        before = {_bool_word(w) for w in re.findall(r"[a-z]+", cleaned[:m.start(1)].lower())
                  if w in ("yes", "no", "true", "false", "correct", "incorrect")}
        if (not v) not in before:  # "Yes, the statement is false" contradicts itself
            return v, "the statement's value"
    words = set(c.split())
    polarity = {_bool_word(w) for w in words if w in ("yes", "no", "true", "false", "correct", "incorrect")}
    if len(cleaned) <= MAX_CONTAINS_CHARS and not _NEGATION.search(cleaned) and not _HEDGE.search(cleaned) \
            and len(polarity) == 1:
        if "true" in words:
            return True, "the word true"
        if "false" in words:
            return False, "the word false"
    return None, "not exactly one of true/false"


def _truth_bool(answer: str, options: dict[str, str]) -> bool | None:
    b, _ = _read_bool(str(answer), options)
    return b


def _read_number(cand: str) -> tuple[float | None, str]:
    c = _strip_wrappers(cand)
    nums = _NUMBER.findall(c)
    words = [w for w in re.findall(r"[a-z]+", c.lower()) if w in _WORD_NUMBERS]
    if not nums and not words:
        return None, "no number"
    try:
        values = {float(n.replace(",", "")) for n in nums} | {float(_WORD_NUMBERS[w]) for w in words}
    except ValueError:
        return None, "unreadable number"
    if len(values) != 1:  # "12 (twelve)" is one number; "12 or 13" is not
        return None, "not exactly one number"
    v = values.pop()
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


def verify_sample(text: str | None, sample: TextQA | VQASample, **kw: Any) -> VerifyResult:
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
