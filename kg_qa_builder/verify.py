"""Verification of QA against the graph: template QA (by node ids) and teacher QA (by entity linking).

A QA passes when every evidence triple is a graph edge, the evidence forms one chain from an anchor named in
the question to the answer, the answer is in the graph's answer set (and the only one for fill-in and
free-form), no MCQ distractor satisfies the relation, and a true/false label matches the graph. Each
rejection carries a reason code and a message.
"""

from __future__ import annotations

import re
from typing import Any

from kg_qa_builder.generate import LETTERS, Generator, Plan, Step, qa_id
from kg_qa_builder.graph import KnowledgeGraph, norm
from kg_qa_builder.quality import acceptable
from kg_qa_builder.verdict import Verdict
from pipeline.core.records import TEXT_QTYPES, TextQA

_OPT_RE = re.compile(r"^\s*\(?([A-H])[).:]\s*(.+)$")


def _reject(reason: str, detail: str = "") -> Verdict:
    return Verdict(False, reason, detail)


class Verifier:
    """Checks QA items on a finalized graph (shares the Generator's graph semantics)."""

    def __init__(self, kg: KnowledgeGraph, gen: Generator | None = None, max_ngram: int = 48):
        self.kg = kg
        self.gen = gen or Generator(kg, allowed=set(), seed=0)
        self.rel_alias = kg.schema.relation_by_alias()
        self.max_ngram = max_ngram

    def verify(self, qa: TextQA) -> Verdict:
        """Verify a generated item: template QA by its graph path, scenario QA by facts and arithmetic."""
        if qa.source == "kg-scenario":
            from kg_qa_builder.scenarios import verify_scenario

            return verify_scenario(self.kg, qa)
        return self.verify_template(qa)

    # ---------------- template QA ----------------
    def verify_template(self, qa: TextQA) -> Verdict:
        """Re-check a generated item from its node-id evidence (independent of how it was rendered)."""
        m = qa.meta
        ev = [tuple(t) for t in m.get("evidence_ids", [])]
        if not ev:
            return _reject("no_evidence", "template QA without evidence ids")
        for h, r, t in ev:
            if not self.kg.has(h, r, t):
                return _reject("unsupported_triple", f"{h} {r} {t} is not in the graph")
        steps = []
        for (h, r, t), nxt in zip(ev[:-1], ev[1:], strict=False):
            steps.append(Step((h, r, t), forward=t in (nxt[0], nxt[2])))
        main = Step(ev[-1], bool(m.get("forward", True)))
        anchor = m.get("anchor")
        if not isinstance(anchor, str):
            return _reject("no_evidence", "template QA without an anchor node id")
        plan = Plan(anchor=anchor, desc=steps, main=main)
        if plan.answer != m.get("answer_node"):
            return _reject("answer_not_supported", "answer node is not the end of the evidence chain")
        return self._check_answers(qa, plan, self.gen.resolve(plan) or [], m)

    def _check_answers(self, qa: TextQA, plan: Plan, answers: list[str], m: dict[str, Any]) -> Verdict:
        kg = self.kg
        if not answers or plan.answer not in answers:
            return _reject("answer_not_supported", "the graph does not support the answer along the path")
        spec = kg.schema.relations[plan.main.triple[1]]
        ans_name = kg.name(plan.answer)
        if qa.qtype in ("fill", "free"):
            if len(answers) != 1:
                return _reject("answer_not_unique", f"{len(answers)} nodes satisfy the question")
            if norm(qa.answer) != norm(ans_name):
                return _reject("answer_mismatch", f"answer {qa.answer!r} != graph {ans_name!r}")
        elif qa.qtype == "mcq":
            if not spec.complete:
                return _reject("open_relation", f"{spec.name} is open-world; distractors cannot be verified")
            opts = _parse_choices(qa.choices)
            if opts is None or qa.answer not in opts:
                return _reject("bad_choices", "choices must be '(A) text' and the answer one of their letters")
            if norm(opts[qa.answer]) != norm(ans_name) and not any(
                norm(opts[qa.answer]) == norm(kg.name(a)) for a in answers
            ):
                return _reject("answer_mismatch", f"option {qa.answer} is not a graph answer")
            bad = {norm(kg.name(a)) for a in answers}
            for letter, text in opts.items():
                if letter != qa.answer and norm(text) in bad:
                    return _reject("distractor_is_correct", f"option {letter} {text!r} also satisfies the question")
            kind = str(m.get("value_kind") or ("colour" if kg.type(plan.answer) == "colour" else
                                               "quantity" if kg.type(plan.answer) == "quantity" else "text"))
            for letter, text in opts.items():
                if letter != qa.answer and acceptable(opts[qa.answer], text, kind):
                    return _reject("distractor_acceptable", f"option {letter} {text!r} would also be accepted")
            if len({norm(t) for t in opts.values()}) != len(opts):
                return _reject("duplicate_options", "two options have the same text")
        elif qa.qtype == "tf":
            if qa.answer not in ("true", "false"):
                return _reject("bad_answer", "tf answer must be 'true' or 'false'")
            claim = m.get("claimed_node")
            if claim is None:
                return _reject("no_claim", "tf item without the claimed node")
            truth = claim in answers
            if truth != (qa.answer == "true"):
                return _reject("wrong_label", f"statement is {truth} on the graph, labelled {qa.answer}")
            if not truth and not spec.complete:
                return _reject("open_relation", f"{spec.name} is open-world; a false statement cannot be verified")
        else:
            return _reject("bad_qtype", f"qtype {qa.qtype!r}")
        return Verdict(True)

    # ---------------- teacher QA ----------------
    def spans(self, text: str) -> list[tuple[int, int, str]]:
        """Maximal mentions: (start, end, node id) for names/aliases occurring as token n-grams of `text`;
        a plural 's' on the last token is tolerated; mentions inside a longer mention are dropped."""
        toks = norm(text).split()
        found: list[tuple[int, int, str]] = []
        for i in range(len(toks)):
            for j in range(i + 1, min(len(toks), i + self.max_ngram) + 1):
                key = " ".join(toks[i:j])
                nodes = self.kg.alias.get(key) or (self.kg.alias.get(key[:-1]) if key.endswith("s") else None) or ()
                if nodes and len(key) <= 2:  # short symbols ("A", "N") must match case-sensitively as words
                    nodes = [n for n in nodes if any(
                        norm(a) == key and re.search(rf"(?<![\w-]){re.escape(a)}(?![\w-])", text)
                        for a in {self.kg.name(n), *self.kg.g.nodes[n]["aliases"]})]
                found.extend((i, j, n) for n in nodes)
        return [m for m in found if not any(o[0] <= m[0] and m[1] <= o[1] and (o[1] - o[0]) > (m[1] - m[0])
                                            for o in found)]

    def mentions(self, text: str, types: set[str] | None = None) -> set[str]:
        """Node ids mentioned in `text` (maximal mentions, optionally of given types)."""
        return {n for _, _, n in self.spans(text) if types is None or self.kg.type(n) in types}

    def link_triple(self, h: str, r: str, t: str) -> tuple[str, str, str] | Verdict:
        rel = self.rel_alias.get(norm(r)) or (r if r in self.kg.schema.relations else "")
        if not rel:
            return _reject("unknown_relation", f"relation {r!r} is not in the schema")
        spec = self.kg.schema.relations[rel]
        hs = [n for n in self.kg.link(h) if self.kg.type(n) in spec.domain]
        ts = [n for n in self.kg.link(t) if self.kg.type(n) in spec.range]
        if not hs or not ts:
            missing = h if not hs else t
            return _reject("unlinked_entity", f"{missing!r} does not link to a {rel} {'head' if not hs else 'tail'}")
        for a in hs:
            for b in ts:
                if self.kg.has(a, rel, b):
                    return (a, rel, b)
        return _reject("unsupported_triple", f"({h}, {rel}, {t}) is not in the graph")

    def verify_teacher(self, item: dict[str, Any], split: str = "train") -> tuple[TextQA | None, Verdict]:
        """Verify one teacher-written item; returns the TextQA (source='teacher') when it passes."""
        kg = self.kg
        try:
            q = str(item["question"]).strip()
            qtype = str(item["qtype"]).strip().lower()
            answer = str(item["answer"]).strip()
            evidence = item.get("evidence") or []
            choices = [str(c) for c in item.get("choices") or []]
            rationale = [str(s) for s in item.get("rationale") or []]
        except (KeyError, TypeError) as e:
            return None, _reject("malformed", f"missing field {e}")
        if qtype not in TEXT_QTYPES or not q or not answer:
            return None, _reject("malformed", f"qtype {qtype!r} / empty question or answer")
        if not isinstance(evidence, list) or not evidence or len(evidence) > 3:
            return None, _reject("no_evidence", "1 to 3 evidence triples [head, relation, tail] are required")
        linked = []
        for tr in evidence:
            if not isinstance(tr, (list, tuple)) or len(tr) != 3:
                return None, _reject("malformed", f"evidence item {tr!r} is not [head, relation, tail]")
            res = self.link_triple(*map(str, tr))
            if isinstance(res, Verdict):
                return None, res
            linked.append(res)
        # the chain: consecutive triples share a node; the last triple's free end is the answer
        steps: list[Step] = []
        for a, b in zip(linked[:-1], linked[1:], strict=False):
            shared = {a[0], a[2]} & {b[0], b[2]}
            if not shared:
                return None, _reject("disconnected_evidence", "evidence triples do not form a chain")
            steps.append(Step(a, forward=a[2] in shared))
        last = linked[-1]
        if steps:
            prev = steps[-1].triple
            pivot = prev[2] if steps[-1].forward else prev[0]
            if pivot not in (last[0], last[2]):
                return None, _reject("disconnected_evidence", "evidence triples do not form a chain")
            main = Step(last, forward=last[0] == pivot)
            first = steps[0]
            anchor = first.triple[0] if first.forward else first.triple[2]
        else:
            # 1 hop: the end named in the question is the anchor; the other end is the answer
            ment = self.mentions(q)
            if last[0] in ment and (qtype == "tf" or last[2] not in ment):
                main = Step(last, True)
            elif last[2] in ment and (qtype == "tf" or last[0] not in ment):
                main = Step(last, False)
            elif qtype != "tf" and last[0] in ment:
                main = Step(last, True)
            else:
                return None, _reject("anchor_not_in_question", "the question names neither end of the evidence")
            anchor = last[0] if main.forward else last[2]
        plan = Plan(anchor=anchor, desc=steps, main=main)
        if anchor not in self.mentions(q):
            return None, _reject("anchor_not_in_question", f"{kg.name(anchor)!r} is not named in the question")
        answers = self.gen.resolve(plan)
        if answers is None:
            return None, _reject("ambiguous_description", "an intermediate description is not unique")
        meta: dict[str, Any] = {"relation": main.triple[1], "forward": main.forward, "anchor": anchor,
                                "answer_node": plan.answer, "evidence_ids": [list(t) for t in plan.evidence],
                                "teacher_item": item}
        atype = kg.type(plan.answer)
        if qtype == "tf":
            sp = self.spans(q)
            anchor_spans = [(a, b) for a, b, n in sp if n == anchor][:1]  # the subject of the statement
            said = {n for a, b, n in sp if n != anchor and kg.type(n) == atype
                    and not any(x <= a and b <= y for x, y in anchor_spans)}
            if answer.lower() not in ("true", "false"):
                return None, _reject("bad_answer", "tf answer must be 'true' or 'false'")
            answer = answer.lower()
            if not said:
                return None, _reject("claim_not_found", "the statement names no value of the asked type")
            right = [n for n in said if n in answers]
            wrong = [n for n in said if n not in answers and not (set(kg.link(kg.name(n))) & set(answers))]
            if right and not wrong:
                meta["claimed_node"] = right[0]
            elif wrong and not right:
                meta["claimed_node"] = wrong[0]
            else:
                return None, _reject("ambiguous_claim", "the statement names both right and wrong values")
        elif qtype == "mcq":
            opts = _parse_choices(choices)
            if opts is None or answer.upper()[:1] not in opts:
                return None, _reject("bad_choices", "choices must be '(A) text' and the answer a letter")
            answer = answer.upper()[:1]
            for letter, text in opts.items():
                if letter != answer and not [n for n in kg.link(text) if kg.type(n) == atype]:
                    return None, _reject("unverifiable_distractor", f"option {letter} {text!r} is not a known {atype}")
        else:
            if norm(answer) != norm(kg.name(plan.answer)) and plan.answer not in kg.link(answer):
                return None, _reject("answer_not_supported", f"answer {answer!r} is not the end of the evidence chain")
            answer = kg.name(plan.answer)
            rest = f" {norm(q)} "
            for a_name in {kg.name(anchor), *kg.g.nodes[anchor]["aliases"]}:
                rest = rest.replace(f" {norm(a_name)} ", " ")
            if len(norm(answer)) >= 4 and f" {norm(answer)} " in rest:
                return None, _reject("answer_leak", "the question contains its answer")
        qa = TextQA(id=qa_id(qtype, q, answer, choices), question=q, qtype=qtype, answer=answer, choices=choices,
                    rationale=rationale or [f"{kg.name(h)} {r} {kg.name(t)}." for h, r, t in plan.evidence],
                    evidence=[[kg.name(h), r, kg.name(t)] for h, r, t in plan.evidence], hops=len(plan.evidence),
                    source="teacher", split=split, domain="", meta=meta)
        v = self._check_answers(qa, plan, answers, meta)
        return (qa if v.ok else None), v


def _parse_choices(choices: list[str]) -> dict[str, str] | None:
    out: dict[str, str] = {}
    for i, c in enumerate(choices):
        m = _OPT_RE.match(c)
        if not m or m.group(1) != LETTERS[i]:
            return None
        out[m.group(1)] = m.group(2).strip()
    return out if len(out) >= 2 else None
