"""Scenario QA: text questions that mirror the XLRS-Bench-lite sub-tasks in words, solved on the graph.

Each scenario is a small described image (GSD, pixel measurements, positions, cues) whose answer follows
from graph facts plus arithmetic. A scenario kind has two functions: `make` draws parameters (JSON values)
and `solve` derives, from the parameters and the graph alone, the answer, the facts used (evidence triples),
the arithmetic (`calcs`: op, inputs, result) and which option texts are right. Rendering turns that into a
question and a 3-5 step rationale that states the principle, shows the arithmetic and cites the facts.
`verify_scenario` re-runs `solve` on the stored parameters and checks every fact is a graph edge, every
calculation recomputes, every result is shown in the rationale, and the answer (and, for MCQs, each
option) is what the graph and arithmetic give. Sub-task codes follow XLRS-Bench-lite (meta.task).

Over 500 lines on purpose: each of the 13 kinds is a make / solve / text triple over the same `Facts` indexes
and arithmetic ops, and `verify_scenario` re-runs them all; the KINDS table at the end is the map.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from kg_qa_builder.generate import fix_articles, indefinite_article
from kg_qa_builder.graph import KnowledgeGraph, norm
from kg_qa_builder.quality import acceptable, answer_leak
from kg_qa_builder.verdict import Verdict
from pipeline.core.records import TextQA

LETTERS = "ABCDEFGH"
Triple = tuple[str, str, str]
GSDS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.31, 0.4, 0.5, 0.6, 0.75, 0.8, 1.0)
_RANGE = re.compile(r"^\s*(\d+(?:\.\d+)?)(?:\s*-\s*(\d+(?:\.\d+)?))?\s*m\s*$")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")


class ScenarioError(ValueError):
    """A scenario that cannot be posed (not unique, no fitting distractors): the sample is dropped."""


def an(phrase: str) -> str:
    """'a ship' / 'an aircraft' / 'an M1' / 'a unit' (generate.indefinite_article: by how the word is spoken)."""
    return indefinite_article(phrase) + " " + phrase


def an_cap(phrase: str) -> str:
    a = an(phrase)
    return a[:1].upper() + a[1:]


def plural(phrase: str) -> str:
    """English plural of the last word of a noun phrase (ferry → ferries, bus → buses)."""
    if phrase.endswith(("s", "sh", "ch", "x")):
        return phrase + "es"
    if phrase.endswith("y") and phrase[-2:-1] not in "aeiou":
        return phrase[:-1] + "ies"
    return phrase + "s"


def fmt(x: float) -> str:
    """Numbers as printed in questions and rationales (at most 2 decimals, no trailing zeros)."""
    s = f"{x:.2f}".rstrip("0").rstrip(".")
    return s if s != "-0" else "0"


@lru_cache(maxsize=1 << 14)
def qrange(text: str) -> tuple[float, float] | None:
    """'34.1-35.8 m' → (34.1, 35.8); '155 m' → (155, 155); other quantities → None."""
    m = _RANGE.match(text)
    if not m:
        return None
    lo = float(m.group(1))
    hi = float(m.group(2)) if m.group(2) else lo
    return (min(lo, hi), max(lo, hi))


def fits(x: float, rng: tuple[float, float], tol: float = 0.03) -> bool:
    return rng[0] * (1 - tol) <= x <= rng[1] * (1 + tol)


def pick_gsd(rng: random.Random, F: Facts, p: dict[str, Any], choices: tuple[float, ...] = GSDS) -> None:
    """Half of the time the GSD is given by naming the platform (its finest resolution is a graph fact)."""
    if F.vhr and rng.random() < 0.5:
        pl = rng.choice(F.vhr)
        p["platform"], p["gsd"] = pl, F.rng_of(pl, "finest_resolution")[0]
    else:
        p["gsd"] = rng.choice(choices)


def gsd_evidence(F: Facts, p: dict[str, Any], sol: Solution) -> None:
    """Check a platform-given GSD against the graph and cite it."""
    if p.get("platform"):
        r = F.rng(p["platform"], "finest_resolution")
        if not r or abs(r[0] - p["gsd"]) > 1e-9:
            raise ScenarioError("platform GSD differs from the graph")
        sol.evidence.append(F.tr(p["platform"], "finest_resolution"))


def gsd_phrase(F: Facts, p: dict[str, Any]) -> str:
    if p.get("platform"):
        return f"a {F.kg.name(p['platform'])} image at the platform's finest resolution"
    return f"an image with a ground sample distance (GSD) of {fmt(p['gsd'])} m"


def gsd_step(F: Facts, p: dict[str, Any]) -> str:
    if p.get("platform"):
        return (f"The finest resolution of {F.kg.name(p['platform'])} is {fmt(p['gsd'])} m, so one pixel spans "
                f"{fmt(p['gsd'])} m on the ground. ")
    return ""


def add_area(rng: random.Random, p: dict[str, Any], lo: int, hi: int) -> None:
    """An extent in pixels (w × h) whose ground area the rationale works out (more distinct scenes, and the
    GSD arithmetic that area estimates need)."""
    p["area_px"] = [rng.randrange(lo, hi), rng.randrange(lo, hi)]
    p.setdefault("gsd", rng.choice(GSDS))


def area_calcs(sol: Solution, p: dict[str, Any]) -> None:
    if p.get("area_px"):
        w = sol.calc("mul", p["area_px"][0], p["gsd"], digits=1)
        h = sol.calc("mul", p["area_px"][1], p["gsd"], digits=1)
        m2 = sol.calc("mul", w, h, digits=0)
        sol.calc("div", m2, 10000, digits=2)


def area_step(p: dict[str, Any], sol: Solution, what: str) -> str:
    w, h, m2, ha = (c["result"] for c in sol.calcs[-4:])
    return (f"Extent of the {what}: {p['area_px'][0]} px × {fmt(p['gsd'])} m = {fmt(w)} m by {p['area_px'][1]} px × "
            f"{fmt(p['gsd'])} m = {fmt(h)} m, so {fmt(m2)} m² = {fmt(ha)} ha (1 ha = 10,000 m²).")


OPS: dict[str, Callable[..., float]] = {
    "mul": lambda a, b: a * b, "div": lambda a, b: a / b, "add": lambda *a: sum(a), "sub": lambda a, b: a - b,
    "hypot": lambda a, b: math.hypot(a, b), "atan_deg": lambda a, b: math.degrees(math.atan2(a, b)),
    "floor_div": lambda a, b: float(math.floor(a / b + 1e-9)), "circle_area": lambda d: math.pi * (d / 2) ** 2,
}


@dataclass
class Solution:
    """What the graph and the arithmetic say about a scenario."""

    answer: str
    evidence: list[Triple]
    calcs: list[dict[str, Any]] = field(default_factory=list)
    right: Callable[[str], bool] | None = None  # is an option text right? (default: equals the answer)
    kind: str = "text"  # value kind of the options (quality.acceptable)
    unique: bool = True  # free-form/fill allowed only when the answer is the only one
    pool: list[str] = field(default_factory=list)  # wrong options the scenario proposes (filtered later)
    direction: str = ""  # compass sector of a bearing answer (osr), quoted by its rationale

    def calc(self, op: str, *args: float, digits: int = 2) -> float:
        r = round(OPS[op](*args), digits)
        self.calcs.append({"op": op, "args": [round(a, 4) for a in args], "result": r, "digits": digits})
        return r

    def is_right(self, text: str) -> bool:
        return self.right(text) if self.right else norm(text) == norm(self.answer)


class Facts:
    """Indexes of the interpretation tables used by the scenarios (built once per graph)."""

    def __init__(self, kg: KnowledgeGraph):
        self.kg = kg
        one = self.one
        self.sized: dict[str, list[str]] = defaultdict(list)  # object category → objects with a length range
        for o in kg.by_type["object_type"]:
            cat = one(o, "object_category")
            ln = one(o, "length_range")
            if cat and ln and qrange(kg.name(ln)):
                self.sized[cat].append(o)
        self.land_uses = [u for u in kg.by_type["land_use"] if kg.tails(u, "indicated_by_cue")]
        self.roofs = [h for h in sorted({h for h, r, _ in kg.triples if r == "roof_colour"})]
        self.calendars = [c for c in kg.by_type["crop_calendar"] if one(c, "sowing_period") and one(c, "harvest_period")]
        self.anomalies = [a for a in kg.by_type["anomaly"] if kg.tails(a, "indicated_by_cue")]
        self.hazards = [h for h in kg.by_type["hazard"] if kg.tails(h, "optical_signature")]
        self.conditions = [c for c in kg.by_type["condition"] if kg.tails(c, "indicated_by_cue")]
        self.movers = [o for o in kg.by_type["object_type"] if kg.tails(o, "motion_cue") and kg.tails(o, "at_rest_cue")
                       and one(o, "length_range")]
        self.lane = next((o for o in kg.by_type["object_type"] if kg.name(o) == "motorway traffic lane"), None)
        self.tall = [o for o in kg.by_type["object_type"] if one(o, "height_range")]
        self.by_name = {norm(kg.name(n)): n for n in sorted(kg.g.nodes) if kg.type(n) in (
            "object_type", "land_use", "anomaly", "condition", "hazard", "roof_material")}
        self.vhr = []  # optical platforms whose finest resolution is a plain value under 1 m (the GSD of a scene)
        for pl in kg.by_type["platform"]:
            r = self.rng(pl, "finest_resolution")
            mod = [kg.name(m) for m in kg.tails(pl, "has_modality")]
            if r and r[0] == r[1] and r[0] < 1 and not any("radar" in m for m in mod):
                self.vhr.append(pl)
        grouped = {"storage tank", "grain silo", "settling basin"}  # round objects that stand in regular groups
        self.circles = [o for o in kg.by_type["object_type"] if one(o, "diameter_range") and one(o, "has_shape")
                        and kg.name(one(o, "has_shape") or "") == "circle"
                        and kg.name(one(o, "kind_of") or "") in grouped]

    def restricted(self, keep: Callable[[str], bool]) -> Facts:
        """A view whose entity lists hold only entities `keep` accepts (what a split may draw scenarios from);
        solving still uses the whole graph."""
        view = object.__new__(Facts)
        view.__dict__.update(self.__dict__)
        view.sized = defaultdict(list, {c: [o for o in v if keep(o)] for c, v in self.sized.items()})
        for name in ("land_uses", "roofs", "calendars", "anomalies", "hazards", "conditions", "movers", "tall",
                     "circles"):
            setattr(view, name, [x for x in getattr(self, name) if keep(x)])
        return view

    def one(self, h: str, rel: str) -> str | None:
        ts = self.kg.tails(h, rel)
        return ts[0] if ts else None

    def rng(self, h: str, rel: str) -> tuple[float, float] | None:
        t = self.one(h, rel)
        return qrange(self.kg.name(t)) if t else None

    def rng_of(self, h: str, rel: str) -> tuple[float, float]:
        """`rng` of a fact the scenario chose `h` for having; its absence is a ScenarioError (no question)."""
        r = self.rng(h, rel)
        if r is None:
            raise ScenarioError(f"{h} has no {rel}")
        return r

    def tr(self, h: str, rel: str, t: str | None = None) -> Triple:
        t = t or self.one(h, rel)
        assert t is not None
        return (h, rel, t)


def _cue_heads(kg: KnowledgeGraph, rel: str, cue: str, types: set[str]) -> list[str]:
    return [h for h in kg.heads(rel, cue) if kg.type(h) in types]


# ---------------------------------------------------------------- scenario kinds
# make(rng, F) -> params (JSON) ; solve(F, params) -> Solution ; text(F, params, sol) -> (setting, ask, steps)
# `steps` are the rationale steps before the conclusion; `ask` is the question sentence(s).


def _px_pair(rng: random.Random, r: tuple[float, float], gsd: float) -> int:
    true = rng.uniform(*r) if r[1] > r[0] else r[0] * rng.uniform(0.99, 1.01)
    return max(2, round(true / gsd))


# ---- OCC: object class from measured size, shape and context
def make_occ(rng: random.Random, F: Facts) -> dict[str, Any]:
    cat = rng.choice(sorted(c for c in F.sized if len(F.sized[c]) >= 4))
    obj = rng.choice(F.sized[cat])
    p: dict[str, Any] = {"obj": obj}
    pick_gsd(rng, F, p)
    gsd = p["gsd"]
    p["px_len"] = _px_pair(rng, F.rng_of(obj, "length_range"), gsd)
    for rel in ("wingspan", "width_range"):
        r2 = F.rng(obj, rel)
        if r2:
            p["dim2"], p["px_2"] = rel, _px_pair(rng, r2, gsd)
            break
    cues = F.kg.tails(obj, "has_visual_cue")
    p["cue"] = rng.choice(cues) if cues else None
    ctx = F.kg.tails(obj, "typically_found_in")
    p["ctx"] = rng.choice(ctx) if ctx else None
    return p


def solve_occ(F: Facts, p: dict[str, Any]) -> Solution:
    kg, obj = F.kg, p["obj"]
    cat = F.one(obj, "object_category") or ""  # F.sized is a defaultdict: no category, no candidates
    sol = Solution(kg.name(obj), [F.tr(obj, "object_category")])
    length = sol.calc("mul", p["px_len"], p["gsd"])
    dim2 = sol.calc("mul", p["px_2"], p["gsd"]) if p.get("dim2") else None

    def ok(o: str) -> bool:
        r = F.rng(o, "length_range")
        if not r or not fits(length, r):
            return False
        if dim2 is not None:  # p["dim2"] is set
            r2 = F.rng(o, p["dim2"])
            if not r2 or not fits(dim2, r2):
                return False
        return not p.get("cue") or kg.has(o, "has_visual_cue", p["cue"])

    fitting = [o for o in F.sized[cat] if ok(o)]
    if fitting != [obj]:
        raise ScenarioError("size and cue do not single out the object")
    sol.evidence.append(F.tr(obj, "length_range"))
    if p.get("dim2"):
        sol.evidence.append(F.tr(obj, p["dim2"]))
    if p.get("cue"):
        sol.evidence.append((obj, "has_visual_cue", p["cue"]))
    if p.get("ctx"):
        sol.evidence.append((obj, "typically_found_in", p["ctx"]))
    gsd_evidence(F, p, sol)
    names = {norm(kg.name(o)): o for o in F.sized[cat]}
    sol.right = lambda text: names.get(norm(text)) == obj
    sol.pool = [kg.name(o) for o in F.sized[cat] if o != obj and not ok(o)]
    return sol


def text_occ(F: Facts, p: dict[str, Any], sol: Solution) -> tuple[str, str, list[str]]:
    kg, obj = F.kg, p["obj"]
    cat = kg.name(F.one(obj, "object_category") or "")
    length = sol.calcs[0]["result"]
    d2 = {"wingspan": "wingspan", "width_range": "width"}.get(p.get("dim2", ""), "")
    where = f" (setting: {kg.name(p['ctx'])})" if p.get("ctx") else ""
    g = gsd_phrase(F, p)
    setting = (f"{g[0].upper() + g[1:]} shows {an(cat)}{where}. It is "
               f"{p['px_len']} px long" + (f" and its {d2} spans {p['px_2']} px" if d2 else "") +
               (f"; it shows {kg.name(p['cue'])}" if p.get("cue") else "") + ".")
    ask = f"Which type of {cat} is it most likely?"
    steps = [f"{gsd_step(F, p)}Scale principle: a ground length equals the pixel count times the GSD, so measure "
             f"before naming the object. Length: {p['px_len']} px × {fmt(p['gsd'])} m = {fmt(length)} m" +
             (f"; {d2}: {p['px_2']} px × {fmt(p['gsd'])} m = {fmt(sol.calcs[1]['result'])} m." if d2 else ".")]
    lr = kg.name(F.one(obj, "length_range") or "")
    s2 = f"{an_cap(kg.name(obj))} is typically {lr} long"
    if d2:
        s2 += f" with {an(d2)} of {kg.name(F.one(obj, p['dim2']) or '')}"
    steps.append(s2 + f", which matches the measured {fmt(length)} m; other {cat} types of the catalogue are too "
                 "long or too short, or differ in the second dimension.")
    if p.get("cue"):
        steps.append(f"The cue '{kg.name(p['cue'])}' is typical of {an(kg.name(obj))}, which confirms the size match"
                     + (f", and {an(kg.name(p['ctx']))} is a usual setting for it." if p.get("ctx") else "."))
    return setting, ask, steps


# ---- OCL: colour of a surface identified by its cue or its standard size
def make_ocl(rng: random.Random, F: Facts) -> dict[str, Any]:
    h = rng.choice(F.roofs)
    p: dict[str, Any] = {"obj": h, "gsd": rng.choice(GSDS)}
    if F.kg.type(h) == "object_type" and F.rng(h, "length_range"):
        p["px_len"] = _px_pair(rng, F.rng_of(h, "length_range"), p["gsd"])
        if F.rng(h, "width_range"):
            p["px_2"] = _px_pair(rng, F.rng_of(h, "width_range"), p["gsd"])
    elif _round(F, h):  # a round roof (tank, dome): a diameter, never a rectangular extent
        p["px_d"] = _px_pair(rng, F.rng_of(h, "diameter_range"), p["gsd"])
    cues = F.kg.tails(h, "roof_cue") or F.kg.tails(h, "has_visual_cue")
    p["cue"] = rng.choice(cues) if cues else None
    if not p.get("px_len") and not p.get("px_d"):
        add_area(rng, p, 20, 240)
    return p


def _round(F: Facts, h: str) -> bool:
    """An object known by its diameter alone (round tanks, bins, silos, domes): its plan is a circle, so its
    roof area is π (d/2)², not length × width."""
    return F.kg.type(h) == "object_type" and not F.rng(h, "length_range") and bool(F.rng(h, "diameter_range"))


def solve_ocl(F: Facts, p: dict[str, Any]) -> Solution:
    kg, h = F.kg, p["obj"]
    colour = F.one(h, "roof_colour")
    if colour is None:
        raise ScenarioError("no colour")
    sol = Solution(kg.name(colour), [F.tr(h, "roof_colour")], kind="colour")
    if p.get("px_len"):
        length = sol.calc("mul", p["px_len"], p["gsd"])
        if not fits(length, F.rng_of(h, "length_range")):
            raise ScenarioError("size")
        sol.evidence.append(F.tr(h, "length_range"))
        if p.get("px_2"):
            sol.calc("mul", p["px_2"], p["gsd"])
            sol.evidence.append(F.tr(h, "width_range"))
    elif _round(F, h):
        if p.get("area_px") or not p.get("px_d"):
            raise ScenarioError("a round roof has a diameter, not a rectangular extent")
        d = sol.calc("mul", p["px_d"], p["gsd"], digits=1)
        if not fits(d, F.rng(h, "diameter_range")):  # type: ignore[arg-type]
            raise ScenarioError("size")
        sol.evidence.append(F.tr(h, "diameter_range"))
        sol.calc("circle_area", d, digits=0)
    if p.get("cue"):
        rel = "roof_cue" if kg.has(h, "roof_cue", p["cue"]) else "has_visual_cue"
        sol.evidence.append((h, rel, p["cue"]))
    sol.right = lambda text: acceptable(kg.name(colour), text, "colour")
    sol.pool = [kg.name(c) for c in kg.by_type["colour"]]
    area_calcs(sol, p)
    return sol


def text_ocl(F: Facts, p: dict[str, Any], sol: Solution) -> tuple[str, str, list[str]]:
    kg, h = F.kg, p["obj"]
    if p.get("px_len"):
        dims = f"{p['px_len']} px" + (f" by {p['px_2']} px" if p.get("px_2") else "")
        setting = (f"In a {fmt(p['gsd'])} m GSD natural-colour image, a flat surface measuring {dims} shows "
                   f"{kg.name(p['cue'])}." if p.get("cue") else
                   f"In a {fmt(p['gsd'])} m GSD natural-colour image, a flat surface measures {dims}.")
        ask = "What colour is its surface most likely to appear?"
        c = sol.calcs
        steps = [f"Convert to ground size: {p['px_len']} px × {fmt(p['gsd'])} m = {fmt(c[0]['result'])} m"
                 + (f" and {p['px_2']} px × {fmt(p['gsd'])} m = {fmt(c[1]['result'])} m" if len(c) > 1 else "")
                 + ". Standard playing surfaces have fixed sizes, so the size is a strong identifier.",
                 f"{an_cap(kg.name(h))} is typically {kg.name(F.one(h, 'length_range') or '')} long"
                 + (f" and {kg.name(F.one(h, 'width_range') or '')} wide" if len(c) > 1 else "")
                 + ", which matches the measurement" + (f", and it shows {kg.name(p['cue'])}" if p.get("cue") else "") + "."]
    elif p.get("px_d"):
        d, area = sol.calcs[0]["result"], sol.calcs[1]["result"]
        setting = (f"In a {fmt(p['gsd'])} m GSD natural-colour image, a round roof {p['px_d']} px across "
                   + (f"shows {kg.name(p['cue'])}." if p.get("cue") else "is seen."))
        ask = "What colour does this roof most likely appear in the image?"
        steps = [f"Convert to ground size: {p['px_d']} px × {fmt(p['gsd'])} m = {fmt(d)} m across. The roof is a "
                 f"circle, so its area is π × (d / 2)² = π × ({fmt(d)} / 2)² = {fmt(area)} m² (not length × width: "
                 "the plan is round).",
                 f"{an_cap(kg.name(h))} is typically {kg.name(F.one(h, 'diameter_range') or '')} across and round "
                 "from above, which matches the measurement"
                 + (f", and it shows {kg.name(p['cue'])}" if p.get("cue") else "") + "."]
    else:
        size = f" measuring {p['area_px'][0]} × {p['area_px'][1]} px" if p.get("area_px") else ""
        setting = (f"In a {fmt(p['gsd'])} m GSD natural-colour image of a built-up area, one roof{size} shows "
                   f"{kg.name(p['cue'])}." if p.get("cue") else f"A roof{size} is seen in a natural-colour image.")
        ask = "What colour does this roof most likely appear in the image?"
        steps = [f"Colour in a natural-colour image depends on the surface material, so first identify the "
                 f"material from texture and form: {kg.name(p['cue'])} points to {an(kg.name(h))}."
                 if p.get("cue") else f"The roof is {an(kg.name(h))}."]
        if p.get("area_px"):
            steps.append(area_step(p, sol, "roof"))
    steps.append("Judge the colour on the sunlit part of the surface: shadowed faces look darker and haze adds a "
                 "blue-grey cast, so neither should change the reading.")
    steps.append(f"Tone and colour are interpretation elements tied to the material: {an(kg.name(h))} usually "
                 f"appears {sol.answer} (source: {F.kg.refs.get(F.tr(h, 'roof_colour'), 'curated table')}).")
    return setting, ask, steps


# ---- OMS: moving or stationary
def make_oms(rng: random.Random, F: Facts) -> dict[str, Any]:
    o = rng.choice(F.movers)
    moving = rng.random() < 0.5
    cue = rng.choice(F.kg.tails(o, "motion_cue" if moving else "at_rest_cue"))
    gsd = rng.choice(GSDS)
    return {"obj": o, "cue": cue, "gsd": gsd, "px_len": _px_pair(rng, F.rng_of(o, "length_range"), gsd),
            "moving": moving}


def solve_oms(F: Facts, p: dict[str, Any]) -> Solution:
    kg, o = F.kg, p["obj"]
    mv = kg.has(o, "motion_cue", p["cue"])
    rest = kg.has(o, "at_rest_cue", p["cue"])
    if mv == rest:
        raise ScenarioError("cue is not decisive")
    sol = Solution("moving" if mv else "stationary", [(o, "motion_cue" if mv else "at_rest_cue", p["cue"])], kind="exact")
    length = sol.calc("mul", p["px_len"], p["gsd"])
    if not fits(length, F.rng_of(o, "length_range")):
        raise ScenarioError("size")
    sol.evidence.append(F.tr(o, "length_range"))
    sol.pool = ["moving" if not mv else "stationary"]
    return sol


def text_oms(F: Facts, p: dict[str, Any], sol: Solution) -> tuple[str, str, list[str]]:
    kg, o = F.kg, p["obj"]
    cat = kg.name(F.one(o, "object_category") or o)
    setting = (f"In a {fmt(p['gsd'])} m GSD image, {an(cat)} {p['px_len']} px long is seen. Observed cue: "
               f"{kg.name(p['cue'])}.")
    ask = f"What is the motion state of this {cat}: in motion or at rest?"
    length = sol.calcs[0]["result"]
    steps = [f"Size first: {p['px_len']} px × {fmt(p['gsd'])} m = {fmt(length)} m, consistent with a "
             f"{kg.name(o)} ({kg.name(F.one(o, 'length_range') or '')} long), so the cues of that type apply.",
             "A single image has no time axis, so motion must be read from side effects of motion (wakes, "
             "blur, detached shadows, lane position) or from signs of rest (mooring, parking, stands); one clear "
             "cue of either kind decides the state.",
             f"For {an(kg.name(o))}, {kg.name(p['cue'])} is a sign that it is "
             f"{'moving' if sol.answer == 'moving' else 'at rest'}; the opposite state would show "
             f"{kg.name(kg.tails(o, 'at_rest_cue' if sol.answer == 'moving' else 'motion_cue')[0])} instead."]
    return setting, ask, steps


# ---- OSR: direction and distance between two objects
_COMPASS = ("east", "north-east", "north", "north-west", "west", "south-west", "south", "south-east")


def make_osr(rng: random.Random, F: Facts) -> dict[str, Any]:
    a, b = rng.sample(F.sized[rng.choice(sorted(c for c in F.sized if len(F.sized[c]) >= 2))], 2)
    gsd = rng.choice(GSDS)
    size = 8000
    ax, ay, bx, by = (rng.randrange(200, size - 200) for _ in range(4))
    return {"a": a, "b": b, "gsd": gsd, "pa": [ax, ay], "pb": [bx, by]}


def solve_osr(F: Facts, p: dict[str, Any]) -> Solution:
    (ax, ay), (bx, by) = p["pa"], p["pb"]
    sol = Solution("", [F.tr(p["a"], "object_category"), F.tr(p["b"], "object_category")], kind="exact")
    dx = sol.calc("sub", bx, ax, digits=0)
    dy = sol.calc("sub", ay, by, digits=0)  # image rows grow southwards
    dpx = sol.calc("hypot", dx, dy, digits=1)
    dist = sol.calc("mul", dpx, p["gsd"], digits=0)
    ang = sol.calc("atan_deg", dy, dx, digits=1)
    sector = int(((ang % 360) + 22.5) // 45) % 8
    if abs(((ang % 45) + 22.5) % 45 - 22.5) < 4 or dpx < 100:  # too close to a sector edge / too near
        raise ScenarioError("ambiguous direction")
    sol.answer = f"{_COMPASS[sector]}, about {fmt(dist)} m"
    sol.direction = _COMPASS[sector]
    sol.right = lambda text: norm(text.split(",")[0]) == norm(_COMPASS[sector])
    sol.pool = [f"{c}, about {fmt(dist)} m" for c in _COMPASS if c != _COMPASS[sector]]
    sol.unique = True
    return sol


def text_osr(F: Facts, p: dict[str, Any], sol: Solution) -> tuple[str, str, list[str]]:
    a, b = F.kg.name(p["a"]), F.kg.name(p["b"])
    c = {x["op"]: x["result"] for x in sol.calcs}
    dx, dy = sol.calcs[0]["result"], sol.calcs[1]["result"]
    setting = (f"A north-up image of 8000 × 8000 px at {fmt(p['gsd'])} m GSD shows {an(a)} centred at pixel "
               f"(x={p['pa'][0]}, y={p['pa'][1]}) and {an(b)} centred at (x={p['pb'][0]}, y={p['pb'][1]}); "
               f"x grows to the east and y grows to the south.")
    ask = f"In which direction and at about what distance is the {b} from the {a}?"
    steps = [f"In a north-up image up is north and right is east, so bearings follow from pixel offsets and "
             f"distances from the offsets times the GSD. Offsets in pixels: east = {p['pb'][0]} − {p['pa'][0]} = {fmt(dx)} px; north = {p['pa'][1]} − "
             f"{p['pb'][1]} = {fmt(dy)} px (rows count downwards, so north is minus y).",
             f"Distance: √({fmt(abs(dx))}² + {fmt(abs(dy))}²) = {fmt(c['hypot'])} px, times the GSD {fmt(p['gsd'])} m = "
             f"about {fmt(c['mul'])} m on the ground.",
             f"Bearing: the angle atan2(north, east) = {fmt(c['atan_deg'])}° from east (counter-clockwise) falls in "
             f"the {sol.direction} sector of the 8-point compass (45° sectors centred on each direction)."]
    return setting, ask, steps


# ---- counting kinds (OC, RC, RCCD, CCR)
def make_oc(rng: random.Random, F: Facts) -> dict[str, Any]:
    o = rng.choice(F.circles)
    p: dict[str, Any] = {"obj": o}
    pick_gsd(rng, F, p)
    p["px_d"] = _px_pair(rng, F.rng_of(o, "diameter_range"), p["gsd"])
    p["groups"] = [[rng.randint(2, 6), rng.randint(2, 8), rng.randint(0, 3)] for _ in range(rng.randint(2, 3))]
    return p


def solve_oc(F: Facts, p: dict[str, Any]) -> Solution:
    o = p["obj"]
    sol = Solution("", [F.tr(o, "diameter_range"), F.tr(o, "has_shape")], kind="exact")
    gsd_evidence(F, p, sol)
    d = sol.calc("mul", p["px_d"], p["gsd"], digits=1)
    if not fits(d, F.rng_of(o, "diameter_range")):
        raise ScenarioError("size")
    subs = []
    for r, c, k in p["groups"]:
        full = sol.calc("mul", r, c, digits=0)
        subs.append(sol.calc("sub", full, k, digits=0))
    total = sol.calc("add", *subs, digits=0)
    sol.answer = fmt(total)
    sol.pool = [fmt(total + x) for x in (-2, -1, 1, 2, 3, -3) if total + x > 0]
    return sol


def text_oc(F: Facts, p: dict[str, Any], sol: Solution) -> tuple[str, str, list[str]]:
    kg, o = F.kg, p["obj"]
    g = "; ".join(f"group {i + 1}: {r} rows of {c} positions with {k} empty" for i, (r, c, k) in enumerate(p["groups"]))
    gp = gsd_phrase(F, p)
    setting = (f"{gp[0].upper() + gp[1:]} of {an(kg.name(F.one(o, 'typically_found_in') or 'site'))} shows "
               f"circular objects about {p['px_d']} px across, laid out in groups ({g}).")
    ask = f"How many {plural(kg.name(o))} are in the image in total?"
    cs = sol.calcs
    per = ", ".join(f"{r} × {c} = {fmt(cs[1 + 2 * i]['result'])}, minus {k} = {fmt(cs[2 + 2 * i]['result'])}"
                    for i, (r, c, k) in enumerate(p["groups"]))
    steps = [f"{gsd_step(F, p)}Identify the objects: {p['px_d']} px × {fmt(p['gsd'])} m = {fmt(cs[0]['result'])} m across; a "
             f"{kg.name(o)} is typically {kg.name(F.one(o, 'diameter_range') or '')} across and circular from above, "
             "so every circle counts.",
             f"Count each regular group as rows × positions minus empty positions: {per}.",
             f"Sum the groups: {' + '.join(fmt(cs[2 + 2 * i]['result']) for i in range(len(p['groups'])))} = {sol.answer}.",
             "Counting in a very large image is done by regular blocks rather than one by one: rows × columns "
             "minus gaps is exact when the layout is a grid, and only circles of the measured size are counted, "
             "so smaller round structures nearby are not included."]
    return setting, ask, steps


def make_rc(rng: random.Random, F: Facts) -> dict[str, Any]:
    cat = rng.choice(sorted(c for c in F.sized if len(F.sized[c]) >= 4))
    target = rng.choice(F.sized[cat])
    gsd = rng.choice(GSDS)
    objs = []
    for _ in range(rng.randint(6, 10)):
        o = target if rng.random() < 0.4 else rng.choice(F.sized[cat])
        objs.append([rng.randrange(100, 8000), rng.randrange(100, 8000), _px_pair(rng, F.rng_of(o, "length_range"), gsd)])
    return {"target": target, "gsd": gsd, "objs": objs, "quad": rng.choice(["north-west", "north-east", "south-west", "south-east"])}


def _in_quad(x: int, y: int, quad: str) -> bool:
    return (y < 4000) == quad.startswith("north") and (x >= 4000) == quad.endswith("east")


def solve_rc(F: Facts, p: dict[str, Any]) -> Solution:
    t = p["target"]
    r = F.rng_of(t, "length_range")
    sol = Solution("", [F.tr(t, "length_range"), F.tr(t, "object_category")], kind="exact")
    n = 0
    for x, y, px in p["objs"]:
        if _in_quad(x, y, p["quad"]):
            m = sol.calc("mul", px, p["gsd"], digits=1)
            n += fits(m, r, 0.0)
    if not any(_in_quad(x, y, p["quad"]) for x, y, _ in p["objs"]):
        raise ScenarioError("empty region")
    sol.answer = str(n)
    sol.pool = [str(n + d) for d in (-2, -1, 1, 2, 3) if n + d >= 0]
    return sol


def text_rc(F: Facts, p: dict[str, Any], sol: Solution) -> tuple[str, str, list[str]]:
    kg, t = F.kg, p["target"]
    cat = kg.name(F.one(t, "object_category") or "")
    lst = "; ".join(f"({x}, {y}) {px} px" for x, y, px in p["objs"])
    setting = (f"An 8000 × 8000 px north-up image at {fmt(p['gsd'])} m GSD contains {plural(cat)} listed as (x, y) "
               f"centre and length: {lst}. Rows (y) grow southwards; the image is split into quadrants at x = 4000 "
               "and y = 4000.")
    ask = f"How many {plural(cat)} in the {p['quad']} quadrant have a length within the typical range of {an(kg.name(t))}?"
    inside = [(x, y, px) for x, y, px in p["objs"] if _in_quad(x, y, p["quad"])]
    conv = "; ".join(f"{px} px × {fmt(p['gsd'])} = {fmt(c['result'])} m" for (x, y, px), c in zip(inside, sol.calcs, strict=False))
    rng_txt = kg.name(F.one(t, "length_range") or "")
    steps = [f"Regional counting filters by place first, then applies the class rule; the rule is in metres, so "
             f"each length is converted with the GSD. Keep only the objects in the {p['quad']} quadrant ({'y < 4000' if p['quad'].startswith('north') else 'y ≥ 4000'}"
             f", {'x ≥ 4000' if p['quad'].endswith('east') else 'x < 4000'}): {len(inside)} of {len(p['objs'])}.",
             f"Convert their lengths to metres: {conv}.",
             f"{an_cap(kg.name(t))} is typically {rng_txt} long; {sol.answer} of the converted lengths fall in that range. "
             "Objects outside the quadrant or outside the size range are not counted, even if they are of the "
             "same category, because the question restricts both place and size."]
    return setting, ask, steps


def make_rccd(rng: random.Random, F: Facts) -> dict[str, Any]:
    return {"before": rng.randint(20, 120), "new": rng.randint(1, 25), "demolished": rng.randint(0, 12),
            "year1": rng.randint(2012, 2018), "year2": rng.randint(2019, 2024),
            "ask": rng.choice(["new", "after", "net"])}


def solve_rccd(F: Facts, p: dict[str, Any]) -> Solution:
    kg = F.kg
    bc = next(c for c in kg.by_type["change_process"] if kg.name(c) == "building construction")
    bd = next(c for c in kg.by_type["change_process"] if kg.name(c) == "building demolition")
    sol = Solution("", [F.tr(bc, "after_signature"), F.tr(bd, "after_signature")], kind="exact")
    if p["demolished"] > p["before"]:
        raise ScenarioError("bad counts")
    after = sol.calc("sub", sol.calc("add", p["before"], p["new"], digits=0), p["demolished"], digits=0)
    net = sol.calc("sub", after, p["before"], digits=0)
    sol.answer = fmt({"new": p["new"], "after": after, "net": net}[p["ask"]])
    v = float(sol.answer)
    sol.pool = [fmt(v + d) for d in (-3, -2, -1, 1, 2, 4)]
    return sol


def text_rccd(F: Facts, p: dict[str, Any], sol: Solution) -> tuple[str, str, list[str]]:
    kg = F.kg
    sig_new = kg.name(sol.evidence[0][2])
    sig_dem = kg.name(sol.evidence[1][2])
    setting = (f"Two co-registered images of the same district, taken in {p['year1']} and {p['year2']}, are compared. "
               f"The {p['year1']} image shows {p['before']} buildings. In the {p['year2']} image, {p['new']} plots "
               f"that were bare graded soil now show {sig_new}, and {p['demolished']} plots that had buildings now "
               f"show {sig_dem}.")
    ask = {"new": f"How many buildings were built between {p['year1']} and {p['year2']}?",
           "after": f"How many buildings does the {p['year2']} image show?",
           "net": f"What is the net change in the number of buildings between {p['year1']} and {p['year2']}?"}[p["ask"]]
    c = sol.calcs
    steps = ["Change counting compares the same plots in co-registered images: bare soil to roof is a new "
             "building and roof to bare plot a demolished one, while unchanged plots are not counted as change. "
             f"Read the change signatures: after building construction an image typically shows {sig_new}, and "
             f"after building demolition it shows {sig_dem}; so there are {p['new']} new and {p['demolished']} "
             "removed buildings.",
             f"Buildings in {p['year2']}: {p['before']} + {p['new']} = {fmt(c[0]['result'])}, minus {p['demolished']} "
             f"demolished = {fmt(c[1]['result'])}.",
             f"Net change: {fmt(c[1]['result'])} − {p['before']} = {fmt(c[2]['result'])}; a positive value means the "
             "district gained buildings, a negative value that demolition outpaced construction."]
    return setting, ask, steps


def make_ccr(rng: random.Random, F: Facts) -> dict[str, Any]:
    ships = [o for o in F.sized.get("object_category:maritime vessel", []) if (F.rng(o, "length_range") or (0, 0))[0] >= 100]
    o = rng.choice(ships)
    gsd = rng.choice((0.3, 0.5, 0.6, 0.8, 1.0))
    quay_m = rng.randrange(300, 2000, 10)
    return {"obj": o, "gsd": gsd, "quay_px": round(quay_m / gsd), "gap": rng.choice((15, 20, 25, 30))}


def solve_ccr(F: Facts, p: dict[str, Any]) -> Solution:
    o = p["obj"]
    r = F.rng_of(o, "length_range")
    sol = Solution("", [F.tr(o, "length_range"), (o, "typically_found_in", F.kg.tails(o, "typically_found_in")[0])],
                   kind="exact")
    quay = sol.calc("mul", p["quay_px"], p["gsd"], digits=1)
    per = sol.calc("add", r[1], p["gap"], digits=1)
    n = sol.calc("floor_div", sol.calc("add", quay, p["gap"], digits=1), per, digits=0)
    if n < 1:
        raise ScenarioError("quay too short")
    sol.answer = fmt(n)
    sol.pool = [fmt(n + d) for d in (-2, -1, 1, 2, 3) if n + d >= 0]
    return sol


def text_ccr(F: Facts, p: dict[str, Any], sol: Solution) -> tuple[str, str, list[str]]:
    kg, o = F.kg, p["obj"]
    r = kg.name(F.one(o, "length_range") or "")
    hi = fmt(F.rng_of(o, "length_range")[1])
    c = sol.calcs
    setting = (f"A straight quay measures {p['quay_px']} px in a {fmt(p['gsd'])} m GSD image. Ships moor end to "
               f"end along it with a clear gap of {p['gap']} m between neighbours.")
    ask = f"At most how many {plural(kg.name(o))} of the largest typical size can berth along the quay at once?"
    steps = [f"Capacity combines a measured length (pixels × GSD) with a known object size; using the upper end of "
             f"the size range keeps the answer safe for the largest ship of the type. Quay length on the ground: "
             f"{p['quay_px']} px × {fmt(p['gsd'])} m = {fmt(c[0]['result'])} m.",
             f"{an_cap(kg.name(o))} is typically {r} long; plan for the largest, {hi} m, so each ship needs {hi} + "
             f"{p['gap']} = {fmt(c[1]['result'])} m of quay including its gap.",
             f"n ships need n × {hi} + (n − 1) × {p['gap']} m, so n = floor(({fmt(c[0]['result'])} + {p['gap']}) / "
             f"{fmt(c[1]['result'])}) = floor({fmt(c[2]['result'])} / {fmt(c[1]['result'])}) = {sol.answer}."]
    return setting, ask, steps


# ---- cue → class kinds (OLUC, RLUC, AD, ECR)
def _make_cues(rng: random.Random, F: Facts, heads: list[str], rel: str, k: int) -> dict[str, Any]:
    h = rng.choice(heads)
    cues = F.kg.tails(h, rel)
    return {"head": h, "cues": rng.sample(cues, min(k, len(cues))), "rel": rel}


def _solve_cues(F: Facts, p: dict[str, Any], types: set[str], pool: list[str]) -> Solution:
    kg, h = F.kg, p["head"]
    sol = Solution(kg.name(h), [(h, p["rel"], c) for c in p["cues"]])
    owners = set()
    for c in p["cues"]:
        owners.update(_cue_heads(kg, p["rel"], c, types))
    if owners != {h}:
        raise ScenarioError("cue shared")
    names = {norm(kg.name(x)): x for x in pool}
    sol.right = lambda text: names.get(norm(text)) == h or norm(text) == norm(kg.name(h))
    sol.pool = [kg.name(x) for x in pool if x != h]
    return sol


def make_oluc(rng: random.Random, F: Facts) -> dict[str, Any]:
    p = _make_cues(rng, F, F.land_uses, "indicated_by_cue", rng.choice((2, 3)))
    p["gsd"] = rng.choice(GSDS)
    return p


def solve_oluc(F: Facts, p: dict[str, Any]) -> Solution:
    sol = _solve_cues(F, p, {"land_use"}, F.land_uses)
    side = sol.calc("div", sol.calc("mul", 8000, p["gsd"], digits=0), 1000, digits=2)
    sol.calc("mul", side, side, digits=2)
    return sol


def text_oluc(F: Facts, p: dict[str, Any], sol: Solution) -> tuple[str, str, list[str]]:
    kg = F.kg
    cues = [kg.name(c) for c in p["cues"]]
    setting = f"Across most of an 8000 × 8000 px image at {fmt(p['gsd'])} m GSD, the interpreter sees: " + "; ".join(cues) + "."
    ask = "Which land use dominates the image?"
    steps = ["Land use is what people use the land for, so it is read from the arrangement of objects and "
             "activities, not only from the cover (grass, roofs or water).",
             *[f"'{c}' is a recognised cue of the land use '{sol.answer}'." for c in cues[:2]],
             f"Scale of the judgement: 8000 px × {fmt(p['gsd'])} m = {fmt(sol.calcs[0]['result'])} m = "
             f"{fmt(sol.calcs[1]['result'])} km per side, {fmt(sol.calcs[1]['result'])}² = "
             f"{fmt(sol.calcs[2]['result'])} km², large enough for the dominant use to show in many blocks.",
             f"The cues agree and none of them is a cue of another land use in the catalogue, so the image is mainly "
             f"{sol.answer}" + (f"; typical objects such as {', '.join(plural(kg.name(o)) for o in kg.tails(p['head'], 'typical_object')[:3])}"
                                " would further support it." if kg.tails(p["head"], "typical_object") else ".")]
    return setting, ask, steps


def make_rluc(rng: random.Random, F: Facts) -> dict[str, Any]:
    p = _make_cues(rng, F, F.land_uses, "indicated_by_cue", 1)
    p["quad"] = rng.choice(["north-west", "north-east", "south-west", "south-east", "central"])
    p["gsd"] = rng.choice(GSDS)
    p["box"] = [rng.randrange(800, 4000, 50), rng.randrange(800, 4000, 50)]
    objs = F.kg.tails(p["head"], "typical_object")
    p["obj"] = rng.choice(objs) if objs else None
    return p


def solve_rluc(F: Facts, p: dict[str, Any]) -> Solution:
    sol = _solve_cues(F, p, {"land_use"}, F.land_uses)
    if p.get("obj"):
        sol.evidence.append((p["head"], "typical_object", p["obj"]))
    w = sol.calc("mul", p["box"][0], p["gsd"], digits=0)
    h = sol.calc("mul", p["box"][1], p["gsd"], digits=0)
    ha = fmt(sol.calc("div", sol.calc("mul", w, h, digits=0), 10000, digits=1))
    name = F.kg.name(p["head"])
    sol.answer = f"{name}, about {ha} ha"
    sol.right = lambda text: norm(text.split(",")[0]) == norm(name)
    sol.pool = [f"{x}, about {ha} ha" for x in sol.pool]
    sol.kind = "exact"
    return sol


def text_rluc(F: Facts, p: dict[str, Any], sol: Solution) -> tuple[str, str, list[str]]:
    kg = F.kg
    cue = kg.name(p["cues"][0])
    extra = f" Several {plural(kg.name(p['obj']))} are visible there." if p.get("obj") else ""
    setting = (f"A {fmt(p['gsd'])} m GSD image mixes several land uses. Its {p['quad']} part, a block of "
               f"{p['box'][0]} × {p['box'][1]} px, shows {cue}.{extra}")
    ask = f"What is the land use of the {p['quad']} block, and about how large is it?"
    c = sol.calcs
    use = kg.name(p["head"])
    steps = [f"Regional land use is judged only from the evidence inside the region ({p['quad']} part) at the "
             "scale of blocks and parcels, "
             "ignoring the uses of the rest of the scene; land use is what the land is used for, read from objects "
             "and their arrangement rather than from cover alone.",
             f"'{cue}' is a recognised cue of the land use '{use}' and of no other use in the catalogue."]
    if p.get("obj"):
        steps.append(f"{plural(kg.name(p['obj'])).capitalize()} are typical objects of the land use '{use}', "
                     "which agrees.")
    steps.append(f"Size of the block: {p['box'][0]} px × {fmt(p['gsd'])} m = {fmt(c[0]['result'])} m by {p['box'][1]} px × "
                 f"{fmt(p['gsd'])} m = {fmt(c[1]['result'])} m, so {fmt(c[2]['result'])} m² = {fmt(c[3]['result'])} ha "
                 "(1 ha = 10,000 m²).")
    return setting, ask, steps


def make_ad(rng: random.Random, F: Facts) -> dict[str, Any]:
    p = _make_cues(rng, F, F.anomalies, "indicated_by_cue", 1)
    ctx = F.kg.tails(p["head"], "anomaly_context")
    p["ctx"] = rng.choice(ctx) if ctx else None
    p["gsd"] = rng.choice(GSDS)
    p["ref"] = [rng.randrange(200, 7800), rng.randrange(200, 7800)]
    p["at"] = [rng.randrange(200, 7800), rng.randrange(200, 7800)]
    return p


def solve_ad(F: Facts, p: dict[str, Any]) -> Solution:
    sol = _solve_cues(F, p, {"anomaly"}, F.anomalies)
    if p.get("ctx"):
        sol.evidence.append((p["head"], "anomaly_context", p["ctx"]))
    dpx = sol.calc("hypot", p["at"][0] - p["ref"][0], p["at"][1] - p["ref"][1], digits=1)
    d = fmt(sol.calc("mul", dpx, p["gsd"], digits=0))
    name = F.kg.name(p["head"])
    sol.answer = f"{name}, about {d} m from the reference point"
    sol.right = lambda text: norm(text.split(",")[0]) == norm(name)
    sol.pool = [f"{x}, about {d} m from the reference point" for x in sol.pool]
    sol.kind = "exact"
    return sol


def text_ad(F: Facts, p: dict[str, Any], sol: Solution) -> tuple[str, str, list[str]]:
    kg = F.kg
    ctx = kg.name(p["ctx"]) if p.get("ctx") else "scene"
    cue = kg.name(p["cues"][0])
    setting = (f"A {fmt(p['gsd'])} m GSD image of {an(ctx)} is checked for anything unusual. The spot at pixel "
               f"(x={p['at'][0]}, y={p['at'][1]}) shows {cue}. The reference point of the site is at (x={p['ref'][0]}, "
               f"y={p['ref'][1]}).")
    ask = "What anomaly does this observation indicate, and how far from the reference point is it?"
    c = sol.calcs
    steps = [f"Anomaly detection compares what is seen with the normal layout of {an(ctx)}: objects in their usual "
             "places, usual states and usual patterns.",
             f"'{cue}' departs from that normal pattern and is the recognised sign of: {kg.name(p['head'])}."]
    if p.get("ctx"):
        steps.append(f"{an_cap(ctx)} is one of the settings where {kg.name(p['head'])} is a known anomaly to look for.")
    steps.append(f"Locate it for the report: √({abs(p['at'][0] - p['ref'][0])}² + {abs(p['at'][1] - p['ref'][1])}²) = "
                 f"{fmt(c[0]['result'])} px × {fmt(p['gsd'])} m = about {fmt(c[1]['result'])} m from the reference point. To "
                 "confirm, compare with an earlier image: a feature that persists for years is part of the normal "
                 "layout, while a new one is the anomaly.")
    return setting, ask, steps


def make_ecr(rng: random.Random, F: Facts) -> dict[str, Any]:
    mode = rng.choice(["sun", "sun", "sun", "crop", "crop", "condition", "hazard"])
    if mode == "sun":
        o = rng.choice(F.tall)
        gsd = rng.choice(GSDS)
        h = rng.uniform(*F.rng_of(o, "height_range"))
        elev = rng.choice([rng.uniform(12, 26), rng.uniform(64, 80)])
        return {"mode": mode, "obj": o, "gsd": gsd, "height": round(h), "shadow_px": max(2, round(h / math.tan(math.radians(elev)) / gsd))}
    if mode == "crop":
        c = rng.choice(F.calendars)
        p = {"mode": mode, "cal": c, "month": rng.randrange(12)}
        add_area(rng, p, 300, 2500)
        return p
    if mode == "condition":
        p = {"mode": mode, **_make_cues(rng, F, F.conditions, "indicated_by_cue", 1)}
    else:
        p = {"mode": mode, **_make_cues(rng, F, F.hazards, "optical_signature", 1)}
    add_area(rng, p, 500, 6000)
    return p


def _months(text: str) -> list[int]:
    """'September to November' → [8, 9, 10]; 'late May to June' → [4, 5]; 'October' → [9] (0-based)."""
    names = [m for m in re.findall(r"[A-Z][a-z]+", text) if m in MONTHS]
    if not names:
        raise ScenarioError(f"no months in {text!r}")
    a, b = MONTHS.index(names[0]), MONTHS.index(names[-1])
    return [(a + i) % 12 for i in range((b - a) % 12 + 1)]


def crop_state(sow: list[int], harvest: list[int], month: int) -> str:
    """Field state in a month from a crop calendar: sowing, growing, harvest or fallow (between seasons)."""
    if month in harvest:
        return "ripe crop or harvest under way"
    if month in sow:
        return "freshly tilled or sown soil with little green cover"
    m = sow[-1]
    while True:
        m = (m + 1) % 12
        if m in harvest:
            return "fallow: stubble or bare soil between seasons"
        if m == month:
            return "crop growing in the field"


def solve_ecr(F: Facts, p: dict[str, Any]) -> Solution:
    kg = F.kg
    if p["mode"] == "sun":
        o = p["obj"]
        if not fits(p["height"], F.rng_of(o, "height_range"), 0.0):
            raise ScenarioError("height")
        sol = Solution("", [F.tr(o, "height_range")])
        L = sol.calc("mul", p["shadow_px"], p["gsd"], digits=1)
        elev = sol.calc("atan_deg", p["height"], L, digits=1)
        if 30 <= elev <= 60:
            raise ScenarioError("middling sun")
        cond = next(c for c in kg.by_type["condition"] if kg.name(c) == ("low sun elevation" if elev < 30 else "high sun elevation"))
        sol.evidence.append((cond, "indicated_by_cue", kg.tails(cond, "indicated_by_cue")[0]))
        sol.answer = kg.name(cond)
        sol.pool = ["high sun elevation" if elev < 30 else "low sun elevation"]
        return sol
    if p["mode"] == "crop":
        c = p["cal"]
        t_sow, t_har = F.tr(c, "sowing_period"), F.tr(c, "harvest_period")
        sol = Solution(crop_state(_months(kg.name(t_sow[2])), _months(kg.name(t_har[2])), p["month"]),
                       [t_sow, t_har, F.tr(c, "calendar_crop"), F.tr(c, "calendar_region")])
        sol.pool = [s for s in ("ripe crop or harvest under way", "freshly tilled or sown soil with little green cover",
                                "fallow: stubble or bare soil between seasons", "crop growing in the field") if s != sol.answer]
        area_calcs(sol, p)
        return sol
    types = {"condition"} if p["mode"] == "condition" else {"hazard"}
    pool = F.conditions if p["mode"] == "condition" else F.hazards
    sol = _solve_cues(F, p, types, pool)
    effs = kg.tails(p["head"], "interpretation_effect")
    if effs:
        sol.evidence.append((p["head"], "interpretation_effect", effs[0]))
    area_calcs(sol, p)
    return sol


def text_ecr(F: Facts, p: dict[str, Any], sol: Solution) -> tuple[str, str, list[str]]:
    kg = F.kg
    if p["mode"] == "sun":
        o = kg.name(p["obj"])
        L, e = sol.calcs[0]["result"], sol.calcs[1]["result"]
        setting = (f"In a {fmt(p['gsd'])} m GSD image taken close to nadir, {an(o)} known to be {p['height']} m tall casts a shadow "
                   f"{p['shadow_px']} px long on flat ground.")
        ask = "Was the image taken with a low or a high sun elevation?"
        steps = [f"Shadow length on the ground: {p['shadow_px']} px × {fmt(p['gsd'])} m = {fmt(L)} m.",
                 f"On flat ground tan(sun elevation) = height / shadow length, so elevation = atan({p['height']} / "
                 f"{fmt(L)}) = {fmt(e)}°.",
                 f"Below about 30° the sun is low (long shadows, morning, evening or winter at mid-latitudes); above about "
                 f"60° it is high; {fmt(e)}° means {sol.answer}, with the cue '{kg.name(sol.evidence[-1][2])}'.",
                 "The shadow also points away from the sun, so its direction gives the sun azimuth; near nadir and on "
                 "flat ground this height-shadow relation holds for any object whose height is known."]
        return setting, ask, steps
    if p["mode"] == "crop":
        c = p["cal"]
        crop, region = kg.name(F.one(c, "calendar_crop") or ""), kg.name(F.one(c, "calendar_region") or "")
        sow, har = kg.name(F.one(c, "sowing_period") or ""), kg.name(F.one(c, "harvest_period") or "")
        setting = (f"A field of {crop} in {region}, {p['area_px'][0]} × {p['area_px'][1]} px in a {fmt(p['gsd'])} m "
                   f"GSD image, is imaged in {MONTHS[p['month']]}.") if p.get("area_px") else \
            f"A field of {crop} in {region} is imaged in {MONTHS[p['month']]}."
        ask = "What state is the field most likely in?"
        steps = ["Crop appearance follows the crop calendar of the region, so place the date in the calendar.",
                 f"In {region}, {crop} is sown or planted in {sow} and harvested in {har}.",
                 f"{MONTHS[p['month']]} falls " + {
                     "ripe crop or harvest under way": "in the harvest period",
                     "freshly tilled or sown soil with little green cover": "in the sowing period",
                     "fallow: stubble or bare soil between seasons": "after the harvest and before the next sowing",
                     "crop growing in the field": "between sowing and harvest"}[sol.answer] +
                 f", so the field most likely shows: {sol.answer}."]
        cues = kg.tails(F.one(c, "calendar_crop") or "", "crop_cue")
        if cues:
            steps.append(f"Cross-check with how {crop} fields look: {kg.name(cues[0])}; the seasonal state decides which "
                         "of these cues can be seen on the date of the image.")
        if p.get("area_px"):
            steps.append(area_step(p, sol, "field"))
        return setting, ask, steps
    cue = kg.name(p["cues"][0])
    kind = "condition of the image" if p["mode"] == "condition" else "event"
    setting = (f"A {fmt(p['gsd'])} m GSD optical image shows {cue} over an area of {p['area_px'][0]} × "
               f"{p['area_px'][1]} px." if p.get("area_px") else f"A very-high-resolution optical image shows {cue}.")
    ask = f"Which {kind} does this indicate?"
    steps = ["Environmental conditions are read from their signatures in the image (tone, texture, shape and "
             "position relative to other features), then their effect on what can be interpreted is taken into "
             "account.",
             f"'{cue}' is the recognised signature of {sol.answer}."]
    if len(sol.evidence) > 1:
        steps.append(f"Its effect on interpretation: {kg.name(sol.evidence[-1][2])}.")
    if p.get("area_px"):
        steps.append(area_step(p, sol, "affected area"))
    best = kg.tails(p["head"], "best_observed_with")
    if best:
        steps.append(f"For this reason {sol.answer} is best observed with {' or '.join(kg.name(b) for b in best)} "
                     "data, and conclusions drawn from a single optical image should note the limitation.")
    else:
        steps.append("Other objects in the scene must be read with this in mind: tones, contrast and visible detail "
                     "all change, so confidence in small or faint objects should be lowered.")
    return setting, ask, steps


# ---- RP: route choice by road class read from widths
def make_rp(rng: random.Random, F: Facts) -> dict[str, Any]:
    gsd = rng.choice((0.3, 0.5, 0.6, 0.8, 1.0))
    routes = []
    for _ in range(3):
        lanes = rng.choice((2, 4, 6))
        routes.append([round(rng.uniform(1.5, 9.0) * 1000 / gsd), round(lanes * rng.uniform(3.4, 3.7) / gsd)])
    return {"gsd": gsd, "routes": routes, "v": {"2": rng.choice((30, 40)), "4": rng.choice((50, 60)), "6": rng.choice((80, 90, 100))}}


def solve_rp(F: Facts, p: dict[str, Any]) -> Solution:
    lane = F.lane
    if lane is None:
        raise ScenarioError("no lane fact")
    sol = Solution("", [F.tr(lane, "width_range")], kind="exact")
    lw = (F.rng(lane, "width_range") or (3.5, 3.75))
    times = []
    for length_px, width_px in p["routes"]:
        km = sol.calc("div", sol.calc("mul", length_px, p["gsd"], digits=0), 1000, digits=2)
        w = sol.calc("mul", width_px, p["gsd"], digits=1)
        nl = sol.calc("div", w, (lw[0] + lw[1]) / 2, digits=1)
        lanes = min((2, 4, 6), key=lambda n: abs(n - nl))
        v = p["v"][str(lanes)]
        times.append(sol.calc("mul", sol.calc("div", km, v, digits=4), 60, digits=1))
    best = min(range(3), key=lambda i: times[i])
    if sorted(times)[1] - times[best] < 0.5:
        raise ScenarioError("tie")
    sol.answer = f"route {LETTERS[best]}, about {fmt(times[best])} min"
    sol.right = lambda text: norm(text).startswith(norm(f"route {LETTERS[best]}"))
    sol.pool = [f"route {LETTERS[i]}, about {fmt(times[i])} min" for i in range(3) if i != best]
    return sol


def text_rp(F: Facts, p: dict[str, Any], sol: Solution) -> tuple[str, str, list[str]]:
    rs = "; ".join(f"route {LETTERS[i]} follows one road {lp} px long and {wp} px wide" for i, (lp, wp) in enumerate(p["routes"]))
    setting = (f"In a {fmt(p['gsd'])} m GSD image, three alternative routes join the same two points: {rs}. Assume "
               f"{p['v']['2']} km/h on 2-lane roads, {p['v']['4']} km/h on 4-lane roads and {p['v']['6']} km/h on 6-lane roads.")
    ask = "Which route is fastest?"
    c = sol.calcs
    # F.lane is set whenever an rp scenario exists (its params are made from the lane)
    lw = F.kg.name(F.one(F.lane, "width_range") or "")  # type: ignore[arg-type]
    per = []
    for i, (lp, wp) in enumerate(p["routes"]):
        k = i * 6
        nl = c[k + 3]["result"]
        lanes = min((2, 4, 6), key=lambda n: abs(n - nl))
        per.append(f"{LETTERS[i]}: {lp} px = {fmt(c[k]['result'])} m = {fmt(c[k + 1]['result'])} km; {wp} px = "
                   f"{fmt(c[k + 2]['result'])} m wide ≈ {fmt(nl)} lanes, a {lanes}-lane road at {p['v'][str(lanes)]} km/h; "
                   f"{fmt(c[k + 1]['result'])} / {p['v'][str(lanes)]} = {fmt(c[k + 4]['result'])} h = {fmt(c[k + 5]['result'])} min")
    steps = [f"Convert pixels to metres with the GSD ({fmt(p['gsd'])} m) and read the road class from the width: a traffic "
             f"lane is typically {lw} wide, so lanes ≈ width / lane width.",
             "Per route (length, width, lanes, speed, time = length / speed): " + " | ".join(per) + ".",
             f"The shortest travel time wins: {sol.answer}."]
    return setting, ask, steps


@dataclass
class Kind:
    task: str
    make: Callable[[random.Random, Facts], dict[str, Any]]
    solve: Callable[[Facts, dict[str, Any]], Solution]
    text: Callable[[Facts, dict[str, Any], Solution], tuple[str, str, list[str]]]
    weight: float = 1.0


KINDS: dict[str, Kind] = {
    "occ-size": Kind("OCC", make_occ, solve_occ, text_occ, 1.6),
    "ocl-surface": Kind("OCL", make_ocl, solve_ocl, text_ocl, 1.3),
    "oms-cue": Kind("OMS", make_oms, solve_oms, text_oms),
    "osr-bearing": Kind("OSR", make_osr, solve_osr, text_osr, 1.3),
    "oc-grid": Kind("OC", make_oc, solve_oc, text_oc),
    "rc-quadrant": Kind("RC", make_rc, solve_rc, text_rc),
    "oluc-cues": Kind("OLUC", make_oluc, solve_oluc, text_oluc),
    "rluc-cue": Kind("RLUC", make_rluc, solve_rluc, text_rluc),
    "ad-cue": Kind("AD", make_ad, solve_ad, text_ad),
    "ecr-mixed": Kind("ECR", make_ecr, solve_ecr, text_ecr, 1.2),
    "rp-lanes": Kind("RP", make_rp, solve_rp, text_rp),
    "rccd-buildings": Kind("RCCD", make_rccd, solve_rccd, text_rccd),
    "ccr-berths": Kind("CCR", make_ccr, solve_ccr, text_ccr),
}


def sid(*parts: Any) -> str:
    return hashlib.sha1("\x1f".join(map(str, parts)).encode()).hexdigest()[:16]


class ScenarioGenerator:
    """Samples scenario QA. `subjects` (entity split) limits which graph entities a split may ask about."""

    def __init__(self, kg: KnowledgeGraph, *, seed: int = 0, subjects: Callable[[str], bool] | None = None,
                 qtype_weights: dict[str, float] | None = None, kinds: dict[str, float] | None = None):
        self.kg = kg
        self.F = facts_of(kg)
        self.rng = random.Random(seed)
        self.subjects = subjects or (lambda s: True)
        self.pick = self.F.restricted(self.subjects) if subjects else self.F
        self.qtype_weights = qtype_weights or {"free": 0.6, "mcq": 0.3, "tf": 0.1}
        names = [k for k in KINDS if (kinds or {}).get(k, KINDS[k].weight) > 0]
        self.kinds = names
        self.kind_w = [(kinds or {}).get(k, KINDS[k].weight) for k in names]

    def sample(self) -> TextQA | None:
        rng = self.rng
        name = rng.choices(self.kinds, self.kind_w)[0]
        kind = KINDS[name]
        try:
            params = kind.make(rng, self.pick)
        except (IndexError, ValueError):  # nothing of this kind in the split
            return None
        qts = list(self.qtype_weights)
        qtype = rng.choices(qts, [self.qtype_weights[q] for q in qts])[0]
        try:
            return render(self.kg, self.F, name, params, qtype, rng, self.subjects)
        except ScenarioError:
            return None


PARAM_SUBJECT = {"rccd-buildings", "rp-lanes", "osr-bearing"}
# general tools of interpretation used by scenarios of every split (not facts about the entity asked about):
# the leakage check lets val/test scenarios use them (meta.principle_ids)
PRINCIPLE_HEADS = {"building construction", "building demolition", "motorway traffic lane", "low sun elevation",
                   "high sun elevation"}


def subject_of(name: str, sol: Solution, params: dict[str, Any]) -> str:
    """The entity the item is about (for the entity split): the first evidence head, or for scenarios about a
    general principle (counting change, route timing, bearings) the scenario itself."""
    if name in PARAM_SUBJECT or not sol.evidence:
        return f"scenario:{name}:{sid(sorted(params.items()))}"
    return sol.evidence[0][0]


def render(kg: KnowledgeGraph, F: Facts, name: str, params: dict[str, Any], qtype: str, rng: random.Random,
           subjects: Callable[[str], bool] = lambda s: True) -> TextQA:
    kind = KINDS[name]
    sol = kind.solve(F, params)
    subject = subject_of(name, sol, params)
    principle = [list(t) for t in sol.evidence if kg.name(t[0]) in PRINCIPLE_HEADS]
    heads = {t[0] for t in sol.evidence if kg.name(t[0]) not in PRINCIPLE_HEADS}
    if not subjects(subject) or not all(subjects(h) for h in heads):
        raise ScenarioError("an entity of the scenario belongs to another split")
    setting, ask, steps = kind.text(F, params, sol)
    pool = [x for x in getattr(sol, "pool", []) if not sol.is_right(x) and not acceptable(sol.answer, x, sol.kind)]
    choices: list[str] = []
    meta: dict[str, Any] = {"task": kind.task, "template": name, "params": params, "subject": subject,
                            "evidence_ids": [list(t) for t in sol.evidence], "calcs": sol.calcs, "interp": True,
                            "value_kind": sol.kind, "principle_ids": principle,
                            # the cap of 2 items per fact and question type applies to a scenario as a whole:
                            # its facts, its answer and its parameters (each sample is a new parameterisation)
                            "fact_key": [name, sol.answer, sid(sorted(sol.evidence), sorted(params.items()))]}
    if qtype == "tf" and pool:
        truth = rng.random() < 0.5
        claim = sol.answer if truth else rng.choice(pool)
        q = f"{setting} True or false: the answer to '{ask}' is: {claim}."
        answer = "true" if truth else "false"
        meta["claim"] = claim
        final = (f"So the statement is {'true' if truth else 'false'}: the answer is {sol.answer}"
                 + ("." if truth else f", not {claim}."))
    elif qtype == "mcq" or (qtype == "tf") or not sol.unique:
        uniq: list[str] = []
        for x in rng.sample(pool, len(pool)):
            if all(not acceptable(x, y, sol.kind) for y in uniq):
                uniq.append(x)
            if len(uniq) == 3:
                break
        if len(uniq) < 1:
            raise ScenarioError("no distractors")
        opts = [sol.answer, *uniq]
        rng.shuffle(opts)
        choices = [f"({LETTERS[i]}) {o}" for i, o in enumerate(opts)]
        answer = LETTERS[opts.index(sol.answer)]
        q = f"{setting} {ask}"
        qtype = "mcq"
        final = f"So the answer is ({answer}) {sol.answer}."
    else:
        q = f"{setting} {ask} Explain your reasoning."
        answer = sol.answer
        qtype = "free"
        final = f"So the answer is {sol.answer}."
    if choices:
        wrong = [c[4:] for c in choices if c[1] != answer]
        steps = [*steps, why_not(F, name, params, sol, wrong)]
    elif qtype == "tf" and meta.get("claim") and answer == "false":
        steps = [*steps, why_not(F, name, params, sol, [meta["claim"]])]
    while len(steps) > 5:  # 2-5 steps: merge the two shortest neighbours
        i = min(range(len(steps) - 1), key=lambda j: len(steps[j]) + len(steps[j + 1]))
        steps[i:i + 2] = [steps[i] + " " + steps[i + 1]]
    rationale = [fix_articles(f"Step {i}: {s}") for i, s in enumerate(steps, 1)] + [fix_articles(final)]
    q = fix_articles(q)
    if qtype == "free":
        meta["explanation"] = " ".join(rationale)
    ev = [[kg.name(h), r, kg.name(t)] for h, r, t in sol.evidence]
    qa = TextQA(id=sid(qtype, q, answer, *choices), question=q, qtype=qtype, answer=answer, choices=choices,
                  rationale=rationale, evidence=ev, hops=min(3, max(1, len(sol.evidence))), source="kg-scenario",
                  domain="image interpretation", meta=meta)
    if answer_leak(qa):
        raise ScenarioError("the question states its answer")
    return qa


def why_not(F: Facts, name: str, p: dict[str, Any], sol: Solution, wrong: list[str]) -> str:
    """One step that rules out the wrong options with the facts or the arithmetic."""
    kg = F.kg
    by_name = F.by_name
    parts = []
    for w in wrong:
        n = by_name.get(norm(w)) or by_name.get(norm(w.split(",")[0]))
        if name == "occ-size" and n is not None and F.one(n, "length_range"):
            extra = ""
            if p.get("dim2") and F.one(n, p["dim2"]):
                extra = f" and {kg.name(F.one(n, p['dim2']) or '')} across"
            parts.append(f"{an(w)} is typically {kg.name(F.one(n, 'length_range') or '')} long{extra}")
        elif name in ("oluc-cues", "rluc-cue", "ad-cue", "ecr-mixed") and n is not None and (
                kg.tails(n, "indicated_by_cue") or kg.tails(n, "optical_signature")):
            cue = (kg.tails(n, "indicated_by_cue") or kg.tails(n, "optical_signature"))[0]
            parts.append(f"{w} would instead show {kg.name(cue)}")
        elif name == "ocl-surface":
            parts.append(f"{w} is not the usual colour of this surface")
        else:
            parts.append(f"{w} contradicts the measurements and arithmetic above")
    return "Rule out the other options: " + "; ".join(parts) + "."


_FACTS_CACHE: dict[int, Facts] = {}


def facts_of(kg: KnowledgeGraph) -> Facts:
    """The (read-only) scenario indexes of a graph, built once per graph and shared by generators and checks."""
    F = _FACTS_CACHE.get(id(kg))
    if F is None or F.kg is not kg:
        F = _FACTS_CACHE[id(kg)] = Facts(kg)
    return F


def verify_scenario(kg: KnowledgeGraph, qa: TextQA) -> Any:
    """Re-solve the scenario from its parameters on the graph and check facts, arithmetic and answer."""
    m = qa.meta
    kind = KINDS.get(str(m.get("template")))
    if kind is None:
        return Verdict(False, "unknown_template", str(m.get("template")))
    F = facts_of(kg)
    try:
        sol = kind.solve(F, m.get("params") or {})
    except (ScenarioError, KeyError, TypeError, ValueError, StopIteration) as e:
        return Verdict(False, "unsolvable", str(e)[:200])
    for h, r, t in m.get("evidence_ids", []):
        if not kg.has(h, r, t):
            return Verdict(False, "unsupported_triple", f"{h} {r} {t} is not in the graph")
    if [list(t) for t in sol.evidence] != m.get("evidence_ids"):
        return Verdict(False, "evidence_mismatch", "evidence differs from the graph solution")
    text = " ".join(qa.rationale)
    for c in m.get("calcs", []):
        r = round(OPS[c["op"]](*c["args"]), c["digits"])
        if abs(r - c["result"]) > 1e-6 * max(1.0, abs(r)):
            return Verdict(False, "bad_arithmetic", f"{c['op']}{tuple(c['args'])} = {r}, not {c['result']}")
    if m.get("calcs") != sol.calcs:
        return Verdict(False, "bad_arithmetic", "calculations differ from the graph solution")
    shown = {fmt(c["result"]) for c in sol.calcs}
    missing = [s for s in shown if s not in text]
    if missing:
        return Verdict(False, "arithmetic_not_shown", f"results {missing[:3]} are not in the rationale")
    if qa.qtype == "free":
        if norm(qa.answer) != norm(sol.answer):
            return Verdict(False, "answer_mismatch", f"{qa.answer!r} != {sol.answer!r}")
    elif qa.qtype == "tf":
        claim = str(m.get("claim", ""))
        if sol.is_right(claim) != (qa.answer == "true"):
            return Verdict(False, "wrong_label", f"claim {claim!r} labelled {qa.answer}")
    elif qa.qtype == "mcq":
        opts = {c[1]: c[4:] for c in qa.choices}
        rights = [k for k, v in opts.items() if sol.is_right(v)]
        if rights != [qa.answer]:
            return Verdict(False, "distractor_is_correct" if len(rights) > 1 else "answer_mismatch",
                           f"right options {rights}, labelled {qa.answer}")
        for k, v in opts.items():
            if k != qa.answer and acceptable(opts[qa.answer], v, sol.kind):
                return Verdict(False, "distractor_acceptable", f"option {k} {v!r} would also be accepted")
    else:
        return Verdict(False, "bad_qtype", qa.qtype)
    return Verdict(True)
