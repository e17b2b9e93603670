"""Template QA generation from 1-3 hop graph paths, with answers and distractors checked on the graph.

A question asks one *main* triple (h, r, t): forward (give h, ask t) or backward (give t, ask h). The given
entity (the anchor) is named directly (1 hop) or described through further triples ("the formula of the
spectral index whose full name is X": 2-3 hops). Every description must pick out exactly one node in the
whole graph, counting nodes that share the anchor's surface name (so "BAI" and "BaI" are ambiguous).
Answers of fill-in/free-form questions must be unique; MCQ distractors and false statements come from
values the relation takes elsewhere that the graph says are wrong (relations declared complete only) and
that a knowledgeable reader would not accept beside the answer.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from kg_qa_builder.graph import KnowledgeGraph, RelationSpec, norm
from kg_qa_builder.quality import acceptable
from pipeline.core.records import TextQA

LETTERS = "ABCDEFGH"
Triple = tuple[str, str, str]


@dataclass
class Step:
    """One hop: `triple` (h, r, t); `forward` means we move from h to t."""

    triple: Triple
    forward: bool


@dataclass
class Plan:
    """A question plan: description steps (anchor → ... → pivot) then the main step (pivot → answer)."""

    anchor: str
    desc: list[Step]
    main: Step
    answers: list[str] = field(default_factory=list)  # the full answer set on the graph

    @property
    def evidence(self) -> list[Triple]:
        return [s.triple for s in self.desc] + [self.main.triple]

    @property
    def answer(self) -> str:
        h, _, t = self.main.triple
        return t if self.main.forward else h


def _plural_unsafe(tpl: str, slot: str) -> bool:
    """Templates like '{h}s are ...' or 'a {h}' only read well with a plain name in the slot."""
    return f"{slot}s" in tpl or f"a {slot}" in tpl or f"an {slot}" in tpl


_BEFORE_OK = {"of", "does", "is", "by", "from", "to", "in", "with", "has", "have", "uses", "use", "for", "do", "than"}
_AFTER_OK = {"is", "has", "was", "belongs", "uses", "can", "corresponds", "orbits", "flies", "carries", "lies",
             "occurs", "comes", "operates", "stand", "measure", "produces", "converts", "appears", "have",
             "belong", "use", "operate", "reach", "revisit", "typically", "measures", "starts", "ends", "in", "as",
             "at", "from", "mainly", "a", "data", "be", "commonly"}


def desc_fits(tpl: str, slot: str) -> bool:
    """Whether a noun-phrase description ("the formula of X") reads well in the template's slot."""
    i = tpl.find(slot)
    if i < 0:
        return False
    before = tpl[:i].split()
    after = tpl[i + len(slot):]
    if before and before[-1].lower() not in _BEFORE_OK and not (len(before) == 1 and before[0].endswith(":")):
        if not (len(before) >= 2 and before[-2].lower() + ":" == before[-1].lower()):
            return False
    nxt = after.split()[0].strip("?.,").lower() if after.split() else ""
    return not nxt or nxt in _AFTER_OK or after[:1] in "?.,"


def qa_id(qtype: str, question: str, answer: str, choices: list[str]) -> str:
    return hashlib.sha1("\x1f".join([qtype, norm(question), answer, *choices]).encode()).hexdigest()[:16]


class Generator:
    """Samples plans from a set of allowed triples (a split's partition) and renders TextQA items."""

    def __init__(self, kg: KnowledgeGraph, allowed: set[Triple] | None = None, *, seed: int = 0,
                 hop_weights: tuple[float, float, float] = (0.6, 0.3, 0.1),
                 qtype_weights: dict[str, float] | None = None,
                 relation_weights: dict[str, float] | None = None, n_distractors: int = 3):
        self.kg = kg
        self.rng = random.Random(seed)
        self.hop_weights = hop_weights
        self.qtype_weights = qtype_weights or {"mcq": 0.3, "tf": 0.2, "fill": 0.2, "free": 0.3}
        self.n_distractors = n_distractors
        self.allowed = allowed if allowed is not None else set(kg.triples)
        self.by_rel: dict[str, list[Triple]] = defaultdict(list)
        # allowed triples indexed by node, for description steps
        self.by_node: dict[str, list[Triple]] = defaultdict(list)
        for tr in sorted(self.allowed):
            self.by_rel[tr[1]].append(tr)
            self.by_node[tr[0]].append(tr)
            self.by_node[tr[2]].append(tr)
        rw = relation_weights or {}
        specs = kg.schema.relations
        self.rels = [r for r in sorted(self.by_rel) if specs[r].qa and rw.get(r, specs[r].weight) > 0]
        self.rel_w = [rw.get(r, specs[r].weight) for r in self.rels]
        self._name_key: dict[str, tuple[str, str]] = {}
        self.same_name: dict[tuple[str, str], list[str]] = defaultdict(list)
        for n, d in kg.g.nodes(data=True):
            k = (d["type"], norm(d["name"]))
            self._name_key[n] = k
            self.same_name[k].append(n)
        pools: dict[str, set[str]] = defaultdict(set)
        for h, r, _t in kg.triples:
            pools[r].add(h)
        self.head_pool = {r: sorted(v) for r, v in pools.items()}

    # ---------------- graph semantics ----------------
    def surface_set(self, node: str) -> list[str]:
        """Nodes a reader cannot tell apart from `node` by its name (same type, same normalised name)."""
        return self.same_name[self._name_key[node]]

    def step_set(self, nodes: list[str], rel: str, forward: bool) -> list[str]:
        out: set[str] = set()
        for n in nodes:
            out.update(self.kg.tails(n, rel) if forward else self.kg.heads(rel, n))
        return sorted(out)

    def resolve(self, plan: Plan) -> list[str] | None:
        """Answer set of a plan on the whole graph; None when a description is not unique."""
        cur = self.surface_set(plan.anchor)
        if len(cur) != 1 and plan.desc:
            return None
        for s in plan.desc:
            cur = self.step_set(cur, s.triple[1], s.forward)
            if len(cur) != 1:
                return None
        cur = self.step_set(cur, plan.main.triple[1], plan.main.forward)
        return cur

    # ---------------- sampling ----------------
    def sample_plan(self) -> Plan | None:
        rng = self.rng
        rel = rng.choices(self.rels, self.rel_w)[0]
        spec = self.kg.schema.relations[rel]
        main = rng.choice(self.by_rel[rel])
        forward = not spec.ask_head or rng.random() < 0.65
        pivot = main[0] if forward else main[2]
        hops = rng.choices((1, 2, 3), self.hop_weights)[0]
        templates = spec.ask_tail + [spec.statement] if forward else spec.ask_head + [spec.statement]
        slot = "{h}" if forward else "{t}"
        if any(_plural_unsafe(t, slot) for t in templates):
            hops = 1
        desc: list[Step] = []
        node = pivot
        used = {main}
        for _ in range(hops - 1):
            step = self._describe(node, used)
            if step is None:
                break
            desc.insert(0, step)
            used.add(step.triple)
            node = step.triple[0] if step.forward else step.triple[2]
        plan = Plan(anchor=node, desc=desc, main=Step(main, forward))
        ans = self.resolve(plan)
        if not ans:
            return None
        plan.answers = ans
        return plan

    def _describe(self, node: str, used: set[Triple]) -> Step | None:
        """A triple that identifies `node` uniquely from a neighbour (the neighbour becomes the anchor).

        Never through numbers, codes or identifiers: neither the node, the neighbour nor the relation may be
        a literal value, a catalogue identifier or catalogue trivia ("the platform with the band 10 nm wide")."""
        schema = self.kg.schema
        if schema.is_identifier(self.kg.type(node)):
            return None  # never chain through a shared literal ("21" as a Koppen number and a CORINE code)
        cands = [tr for tr in self.by_node.get(node, ()) if tr not in used]
        self.rng.shuffle(cands)
        for tr in cands[:6]:
            h, r, t = tr
            spec = schema.relations[r]
            if not spec.qa or spec.trivia:
                continue
            other = h if t == node else t
            if schema.is_identifier(self.kg.type(other)):
                continue
            if t == node:  # node = tail of (h r t): "the <tail_of> of h"; h is the new anchor
                if _plural_unsafe(spec.tail_of, "{h}"):
                    continue
                if self.step_set(self.surface_set(h), r, True) == [node]:
                    return Step(tr, True)
            else:  # node = head of (h r t): "the <head_by> t"
                if self.step_set(self.surface_set(t), r, False) == [node]:
                    return Step(tr, False)
        return None

    # ---------------- rendering ----------------
    def describe_text(self, plan: Plan) -> str:
        text = self.kg.name(plan.anchor)
        for s in plan.desc:
            spec = self.kg.schema.relations[s.triple[1]]
            text = spec.tail_of.format(h=text) if s.forward else spec.head_by.format(t=text)
        return text

    def statement(self, tr: Triple, h_text: str | None = None, t_text: str | None = None) -> str:
        spec = self.kg.schema.relations[tr[1]]
        return spec.statement.format(h=h_text or self.kg.name(tr[0]), t=t_text or self.kg.name(tr[2]))

    def source_of(self, tr: Triple) -> str:
        """The reference behind a fact: the curated row's citation, else the catalogue it came from."""
        ref = self.kg.refs.get(tr)
        if ref:
            return ref
        src = self.kg.provenance(*tr).split("@")[0]
        return src.replace("curated:", "curated table ")

    def rationale(self, plan: Plan, final: str, qtype: str = "free", others: list[str] | None = None) -> list[str]:
        """2-5 steps: what is asked, each fact used (with its source), why wrong options fail, the answer."""
        kg = self.kg
        spec = kg.schema.relations[plan.main.triple[1]]
        asked = kg.schema.type_label(kg.type(plan.answer))
        given = kg.name(plan.anchor)
        pattern = self.statement(("{h}", spec.name, "{t}"), "X", "Y")
        if qtype == "tf":
            steps = [f"The statement is a claim of the form \"{pattern}\"; check it against what is known "
                     f"about {given}."]
        else:
            steps = [f"The question starts from {given} and asks for the {asked} that fits the pattern "
                     f"\"{pattern}\"."]
        facts = [f"{_cap(self.statement(s))} (source: {self.source_of(s)})" for s in plan.evidence]
        if len(facts) > 1:
            steps.append("Follow the chain of facts: " + "; then ".join(facts) + ".")
        else:
            steps.append(f"The relevant fact: {facts[0]}.")
        kind = ("single-valued (one value per subject)" if spec.functional else
                "listed completely for each subject" if spec.closed else "open (the graph lists typical values, not all)")
        steps.append(f"Check the evidence: the {spec.name.replace('_', ' ')} relation is {kind}, and the fact"
                     f"{'s come' if len(plan.evidence) > 1 else ' comes'} from a cited source, so the answer rests on "
                     "recorded knowledge rather than on a guess from the wording.")
        if others:
            why = ("is a single-valued relation, so one value excludes all others" if spec.functional else
                   "is listed completely in the graph, so a value not listed is wrong")
            steps.append(f"{spec.name.replace('_', ' ').capitalize()} {why}: {_join(others)} "
                         f"{'does' if len(others) == 1 else 'do'} not fit.")
        steps.append(final)
        return steps

    def value_kind(self, node: str) -> str:
        """How options of this node's type compare (see quality.acceptable): colour, quantity or text."""
        t = self.kg.type(node)
        return "colour" if t == "colour" else "quantity" if t == "quantity" else "text"

    def distractors(self, plan: Plan, k: int) -> list[str] | None:
        """k wrong options of the answer's type, drawn only from values the relation takes elsewhere in the
        graph (so a band code is never offered as a radar band), that the graph says are wrong (the relation
        is complete) and that no knowledgeable reader would accept beside the answer (quality.acceptable)."""
        rel = plan.main.triple[1]
        ans = plan.answer
        pool = self.kg.range_pool.get(rel, []) if plan.main.forward else self.head_pool.get(rel, [])
        bad = set(plan.answers)
        right_names = [self.kg.name(a) for a in plan.answers]
        kind = self.value_kind(ans)
        out: list[str] = []
        seen = {norm(n) for n in right_names}
        tries = 0
        while pool and len(out) < k and tries < 16 * k:
            tries += 1
            c = pool[self.rng.randrange(len(pool))]
            nm = self.kg.name(c)
            if c in bad or norm(nm) in seen or self.kg.type(c) != self.kg.type(ans):
                continue
            # a same-named node that is a correct answer would make the option ambiguous
            if any(x in bad for x in self.surface_set(c)):
                continue
            if any(acceptable(r, nm, kind) for r in right_names) or any(
                    acceptable(self.kg.name(o), nm, kind) for o in out):
                continue
            seen.add(norm(nm))
            out.append(c)
        return out if len(out) == k else None

    def _pick(self, templates: list[str], slot: str, multi: bool) -> str | None:
        ok = [t for t in templates if not multi or desc_fits(t, slot)]
        return self.rng.choice(ok) if ok else None

    def render(self, plan: Plan, qtype: str) -> TextQA | None:
        kg, rng = self.kg, self.rng
        spec: RelationSpec = kg.schema.relations[plan.main.triple[1]]
        ans = plan.answer
        unique = len(plan.answers) == 1
        desc = self.describe_text(plan)
        forward = plan.main.forward
        h_text, t_text = (desc, None) if forward else (None, desc)
        ans_name = kg.name(ans)
        ev = [list(t) for t in plan.evidence]
        meta: dict[str, Any] = {"relation": spec.name, "forward": forward, "anchor": plan.anchor, "answer_node": ans,
                                "evidence_ids": ev, "task": "general", "subject": plan.main.triple[0],
                                "value_kind": self.value_kind(ans), "trivia": spec.trivia,
                                "interp": spec.interp}
        choices: list[str] = []
        slot = "{h}" if forward else "{t}"
        multi = bool(plan.desc)
        if qtype in ("tf", "fill") and multi and not desc_fits(spec.statement, slot):
            return None
        if qtype in ("fill", "free") and not unique:
            return None
        if qtype in ("mcq", "tf") and not spec.complete:
            return None  # open-world relation: a node missing from the graph is not known to be wrong
        if qtype == "mcq":
            ds = self.distractors(plan, self.n_distractors)
            if ds is None:
                return None
            opts = [ans, *ds]
            rng.shuffle(opts)
            choices = [f"({LETTERS[i]}) {kg.name(o)}" for i, o in enumerate(opts)]
            letter = LETTERS[opts.index(ans)]
            tpl = self._pick(spec.ask_tail if forward else spec.ask_head, slot, multi)
            if tpl is None:
                return None
            q = tpl.format(h=desc) if forward else tpl.format(t=desc)
            if not unique:
                q = _which_of(q)
            answer = letter
            meta["distractor_nodes"] = ds
            final = f"So the answer is ({letter}) {ans_name}."
        elif qtype == "tf":
            truth = rng.random() < 0.5
            claim = ans
            if not truth:
                ds = self.distractors(plan, 1)
                if ds is None:
                    return None
                claim = ds[0]
            claim_name = kg.name(claim)
            stmt = spec.statement.format(h=h_text or claim_name, t=t_text or claim_name)
            q = f"True or false: {_cap(stmt)}."
            answer = "true" if truth else "false"
            meta["claimed_node"] = claim
            final = (f"So the statement is true: the answer is {ans_name}." if truth else
                     f"So the statement is false: the answer is {ans_name}, not {claim_name}.")
        elif qtype == "fill":
            blank = "____"
            stmt = spec.statement.format(h=h_text or blank, t=t_text or blank)
            q = f"Fill in the blank: {_cap(stmt)}."
            answer = ans_name
            final = f"So the blank is {ans_name}."
        else:  # free
            tpl = self._pick(spec.ask_tail if forward else spec.ask_head, slot, multi)
            if tpl is None:
                return None
            q = (tpl.format(h=desc) if forward else tpl.format(t=desc)) + " Explain your reasoning briefly."
            answer = ans_name
            final = f"So the answer is {ans_name}."
        q = fix_articles(_cap(q))
        others = [kg.name(d) for d in meta.get("distractor_nodes", [])] or (
            [kg.name(meta["claimed_node"])] if qtype == "tf" and meta.get("claimed_node") != ans else [])
        rationale = [fix_articles(x) for x in self.rationale(plan, final, qtype, others)]
        if qtype == "free":
            meta["explanation"] = " ".join(rationale)
        names = [[kg.name(h), r, kg.name(t)] for h, r, t in plan.evidence]
        return TextQA(id=qa_id(qtype, q, answer, choices), question=q, qtype=qtype, answer=answer, choices=choices,
                      rationale=rationale, evidence=names, hops=len(plan.evidence), source="kg-template",
                      domain=_domain(kg, plan), meta=meta)

    def sample(self) -> TextQA | None:
        plan = self.sample_plan()
        if plan is None:
            return None
        qts = list(self.qtype_weights)
        qtype = self.rng.choices(qts, [self.qtype_weights[q] for q in qts])[0]
        return self.render(plan, qtype)


_A_AN = re.compile(r"\b([Aa]) (?=[aeioAEIO]|[Uu]n(?!i))")


def fix_articles(text: str) -> str:
    """'a offshore wind turbine' → 'an offshore wind turbine' (templates say 'a {h}')."""
    return _A_AN.sub(lambda m: m.group(1) + "n ", text)


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:] if s else s


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _which_of(q: str) -> str:
    """Turn 'Which X ...?' into 'Which of the following X ...?' when several answers exist on the graph."""
    if q.lower().startswith("which of the following") or q.lower().startswith("which of these"):
        return q
    if q.startswith("Which "):
        return "Which of the following " + q[len("Which "):]
    return q.rstrip("?") + "? Choose the option that is correct."


DOMAIN_OF_TYPE = {
    "spectral_index": "spectral indices", "band": "sensors and bands", "sensor_band": "sensors and bands",
    "sensor": "sensors and bands", "platform": "sensors and bands", "constant": "spectral indices",
    "koppen_zone": "climate", "koppen_group": "climate", "life_zone": "climate", "life_zone_belt": "climate",
    "humidity_province": "climate", "spectrum": "spectral libraries", "surface_class": "spectral libraries",
    "object_type": "UHR objects", "scene_context": "UHR objects", "land_cover": "land cover",
    "legend": "land-cover legends", "legend_class": "land-cover legends", "change_process": "change detection",
}


def _domain(kg: KnowledgeGraph, plan: Plan) -> str:
    h = plan.main.triple[0]
    return DOMAIN_OF_TYPE.get(kg.type(h), "earth science")
