"""Quality rules and measured targets of a QA build (what stats.md prints, what the tests assert).

The rules are shared by the generators (to reject an item before it is kept) and by the stats (to measure
a finished build), so the numbers in stats.md are the same checks the build applied:
- `acceptable(answer, option, kind)`: would a knowledgeable reader also accept `option` for a question
  whose answer is `answer`? Colours by hue family ("dark green" ~ "green"), quantities by overlapping or
  close ranges (60 m ~ 55-65 m), text by word containment ("harbour" ~ "fishing harbour").
- `answer_leak(q)`: the question states its own answer.
- `measure(items)`: the metrics table of the issue (share of image-interpretation items, sub-task shares,
  rationale steps/tokens, repeated questions, MCQs with two right options, leaks, catalogue trivia).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from kg_qa_builder.graph import norm
from pipeline.core.records import TextQA

# XLRS-Bench-lite sub-tasks (short codes as its lmms-eval task names them).
TASKS = ("OC", "RC", "OLUC", "RLUC", "OCC", "OCL", "OMS", "OSR", "AD", "ECR", "RP", "RCCD", "CCR")

# hue families: two colours conflict (both acceptable) when their families intersect
COLOUR_FAMILY: dict[str, set[str]] = {
    "red": {"red"}, "dark red": {"red"}, "maroon": {"red", "brown"}, "pink": {"red", "pink"},
    "orange": {"orange", "red", "yellow"}, "yellow": {"yellow"}, "tan": {"brown", "yellow", "beige"},
    "beige": {"beige", "white", "brown"}, "cream": {"beige", "white"}, "light brown": {"brown", "beige"},
    "brown": {"brown"}, "dark brown": {"brown", "black"}, "green": {"green"}, "dark green": {"green"},
    "light green": {"green"}, "olive": {"green", "brown"}, "blue": {"blue"}, "dark blue": {"blue"},
    "light blue": {"blue", "cyan"}, "navy": {"blue"}, "cyan": {"cyan", "blue", "green"},
    "turquoise": {"cyan", "blue", "green"}, "purple": {"purple", "blue", "red"}, "white": {"white"},
    "off-white": {"white", "beige"}, "silver": {"grey", "white"}, "light grey": {"grey", "white"},
    "grey": {"grey"}, "dark grey": {"grey", "black"}, "black": {"black"}, "gray": {"grey"},
}
_NUM = re.compile(r"(\d+(?:\.\d+)?)(?:\s*(?:-|–|to)\s*(\d+(?:\.\d+)?))?")
_UNIT = re.compile(r"\d\s*(km|m|cm|mm|nm|um|µm|px|pixels?|days?|years?|°|degrees?|%|t|ha|months?)\b")
_TOKEN = re.compile(r"\w+|[^\w\s]")
_STOP = {"a", "an", "the", "of", "and", "or", "with", "in", "on", "for", "to", "s"}


def colour_family(name: str) -> set[str]:
    n = norm(name)
    if n in COLOUR_FAMILY:
        return COLOUR_FAMILY[n]
    words = n.split()
    return set().union(*(COLOUR_FAMILY.get(w, set()) for w in words)) if words else set()


def _ranges(text: str) -> list[tuple[float, float]]:
    out = []
    for a, b in _NUM.findall(text):
        lo, hi = float(a), float(b) if b else float(a)
        out.append((min(lo, hi), max(lo, hi)))
    return out


def _unit(text: str) -> str:
    m = _UNIT.search(text)
    return m.group(1).rstrip("s") if m else ""


def tokens(text: str) -> int:
    """Token count estimate (words and punctuation marks), close to a BPE count for English prose."""
    return len(_TOKEN.findall(text))


def _content(text: str) -> list[str]:
    return [w.rstrip("s") if len(w) > 3 else w for w in norm(text).split() if w not in _STOP]


@lru_cache(maxsize=1 << 16)  # pure; generators ask the same (answer, option) pairs again and again
def acceptable(answer: str, option: str, kind: str = "text") -> bool:
    """Whether `option` would also be accepted by a knowledgeable reader when `answer` is right."""
    a, o = norm(answer), norm(option)
    if a == o:
        return True
    if kind == "exact":  # counts, directions, route labels: only the same value is right
        return False
    if kind == "colour":
        fa, fo = colour_family(a), colour_family(o)
        return bool(fa & fo) if fa and fo else a in o or o in a
    ra, ro = _ranges(a), _ranges(o)
    if kind == "quantity" or (ra and ro and kind != "text"):
        if not ra or not ro:
            return False
        if _unit(a) != _unit(o):
            return False
        (alo, ahi), (olo, ohi) = ra[0], ro[0]
        if alo <= ohi and olo <= ahi:
            return True
        # close values: within 20% of each other
        am, om = (alo + ahi) / 2, (olo + ohi) / 2
        return abs(am - om) <= 0.2 * max(abs(am), abs(om), 1e-9)
    ca, co = _content(a), _content(o)
    if not ca or not co:
        return False
    sa, so = " ".join(ca), " ".join(co)
    return f" {sa} " in f" {so} " or f" {so} " in f" {sa} "


def answer_leak(q: TextQA) -> bool:
    """The question (stem) contains the answer text (4+ characters, whole words). True/false excluded."""
    if q.qtype == "tf":
        return False
    ans = q.answer
    if q.qtype == "mcq":
        opts = {c[1]: c[4:] for c in q.choices if len(c) > 4}
        ans = opts.get(q.answer, "")
    a = norm(ans)
    if len(a) < 4 or not a.strip("0123456789. "):
        return False
    return f" {a} " in f" {norm(q.question)} "


def two_right_options(q: TextQA) -> bool:
    """An MCQ whose correct option is also 'acceptable' as another option under the value-kind rule."""
    if q.qtype != "mcq":
        return False
    kind = str(q.meta.get("value_kind", "text"))
    opts = {c[1]: c[4:] for c in q.choices if len(c) > 4}
    right = opts.get(q.answer, "")
    return any(acceptable(right, t, kind) for k, t in opts.items() if k != q.answer)


def is_interp(q: TextQA) -> bool:
    return q.meta.get("task", "general") != "general" or bool(q.meta.get("interp"))


def measure(items: Iterable[TextQA]) -> dict[str, Any]:
    """The issue's metrics over a list of items (one split or the whole build)."""
    items = list(items)
    n = max(1, len(items))
    qs = Counter(norm(q.question) for q in items)
    tasks = Counter(q.meta.get("task", "general") for q in items)
    steps = [len(q.rationale) for q in items]
    toks = [tokens(" ".join(q.rationale)) for q in items]
    mcq = [q for q in items if q.qtype == "mcq"]
    free = sum(q.qtype == "free" for q in items)
    return {
        "items": len(items),
        "distinct questions": len(qs),
        "repeated question strings %": round(100 * (len(items) - len(qs)) / n, 2),
        "image-interpretation share %": round(100 * sum(map(is_interp, items)) / n, 1),
        "sub-task shares %": {t: round(100 * tasks.get(t, 0) / n, 1) for t in (*TASKS, "general")},
        "min sub-task share %": round(100 * min(tasks.get(t, 0) for t in TASKS) / n, 1),
        "mean rationale steps": round(sum(steps) / n, 2),
        "mean rationale tokens": round(sum(toks) / n, 1),
        "free-form share %": round(100 * free / n, 1),
        "MCQs with two right options %": round(100 * sum(map(two_right_options, mcq)) / max(1, len(mcq)), 2),
        "answer leaks %": round(100 * sum(map(answer_leak, items)) / n, 2),
        "catalogue trivia %": round(100 * sum(bool(q.meta.get("trivia")) for q in items) / n, 2),
    }


TARGETS: dict[str, tuple[str, Any]] = {  # (">=" | "<=", bound) or ("in", (low, high))
    "image-interpretation share %": (">=", 60.0), "min sub-task share %": (">=", 3.0),
    "mean rationale steps": (">=", 2.5), "mean rationale tokens": ("in", (150.0, 300.0)),
    "repeated question strings %": ("<=", 1.0), "MCQs with two right options %": ("<=", 0.0),
    "answer leaks %": ("<=", 0.5), "catalogue trivia %": ("<=", 10.0),
}


def check_targets(m: dict[str, Any]) -> dict[str, bool]:
    """Which targets a metrics dict meets."""
    out = {}
    for k, (op, v) in TARGETS.items():
        x = m[k]
        out[k] = (x >= v if op == ">=" else x <= v if op == "<=" else v[0] <= x <= v[1])
    return out


def markdown(m: dict[str, Any], title: str) -> list[str]:
    """The metrics as a markdown table with target and pass/fail."""
    ok = check_targets(m)
    lines = [f"## {title}", "", "| metric | value | target | met |", "|---|---:|---|---|"]
    for k, v in m.items():
        if k == "sub-task shares %":
            continue
        tgt = TARGETS.get(k)
        t = "" if tgt is None else (f"{tgt[0]} {tgt[1]}" if tgt[0] != "in" else f"{tgt[1][0]:g}–{tgt[1][1]:g}")
        lines.append(f"| {k} | {v} | {t} | {'' if k not in ok else ('yes' if ok[k] else 'NO')} |")
    lines += ["", "| sub-task | share % |", "|---|---:|"]
    lines += [f"| {t} | {s} |" for t, s in m["sub-task shares %"].items()]
    return lines
