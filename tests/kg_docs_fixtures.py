"""Fixtures of the documents → graph tests: a small schema and base graph, generated documents (.txt, .md and a
hand-built PDF) with planted facts, and a fake OpenAI-compatible teacher on loopback.

Every sentence of the documents is known to the fake teacher together with the triples it should answer for
it: good ones (true to the sentence and the schema) and bad ones of known kinds. Each triple carries `_pid`
(its id) and the fake keeps `planted[pid] = (good, kind)`, so a test can count kept and rejected triples.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

SCHEMA = """
types:
  object_type: {label: object type}
  object_category: {label: object category}
  scene_context: {label: scene context}
  land_cover: {label: land cover}
  platform: {label: satellite platform}
  sensor: {label: sensor}
  organisation: {label: organisation}
  quantity: {label: value, literal: true}
  visual_cue: {label: visual cue, literal: true}
relations:
  typically_found_in:
    domain: [object_type]
    range: [scene_context]
    closed: false
    aliases: [found in, occurs in]
    statement: "{h} is typically found in {t}"
    ask_tail: ["Where is a {h} typically found?"]
    tail_of: "the usual setting of {h}"
    head_by: "the object typically found in {t}"
  object_category:
    domain: [object_type]
    range: [object_category]
    functional: true
    aliases: [category]
    statement: "{h} belongs to the category {t}"
    ask_tail: ["Which object category does {h} belong to?"]
    tail_of: "the category of {h}"
    head_by: "the object of category {t}"
  typical_size:
    domain: [object_type]
    range: [quantity]
    functional: true
    aliases: [size]
    statement: "{h} is typically {t} long"
    ask_tail: ["How long is a typical {h}?"]
    tail_of: "the typical size of {h}"
    head_by: "the object {t} long"
  part_of_land_cover:
    domain: [scene_context]
    range: [land_cover]
    functional: true
    statement: "{h} lies in {t}"
    ask_tail: ["In which land cover does {h} lie?"]
    tail_of: "the land cover of {h}"
    head_by: "the setting in {t}"
  carries_sensor:
    closed: true   # declared complete in this test schema (open-world is the default since build-qa #15)
    domain: [platform]
    range: [sensor]
    statement: "{h} carries {t}"
    ask_tail: ["Which sensor does {h} carry?"]
    tail_of: "the sensor of {h}"
    head_by: "the platform carrying {t}"
  operated_by:
    domain: [platform]
    range: [organisation]
    functional: true
    statement: "{h} is operated by {t}"
    ask_tail: ["Who operates {h}?"]
    tail_of: "the operator of {h}"
    head_by: "the platform operated by {t}"
  has_visual_cue:
    domain: [object_type, land_cover]
    range: [visual_cue]
    closed: false
    qa: false
"""

BASE = """
source: test-base
declare:
  object_category: [maritime vessel, road vehicle, storage structure, lifting equipment, aircraft]
  scene_context: [harbour, airport, industrial park]
  land_cover: [water, urban]
  organisation: [ESA, NASA]
  sensor: [C-SAR, OLI, MSI]
entities:
  ship: {type: object_type, aliases: [vessel], object_category: maritime vessel, typically_found_in: harbour}
  Sentinel-1A: {type: platform, carries_sensor: C-SAR, operated_by: ESA}
  Landsat 8: {type: platform, carries_sensor: OLI, operated_by: NASA}
  harbour: {type: scene_context, part_of_land_cover: water}
"""

ADJ = ["floating", "covered", "circular", "narrow", "twin", "rusted", "offshore", "inland", "elevated", "temporary"]
NOUN = ["pier", "silo", "gantry", "barge", "hangar", "shed", "dock", "pontoon"]
CONTEXTS = ["harbour", "airport", "industrial park", "rail yard", "river bank", "quarry", "lagoon", "free zone"]
CATS = ["maritime vessel", "road vehicle", "storage structure", "lifting equipment", "aircraft"]


def _obj(i: int) -> str:
    return f"{ADJ[i % len(ADJ)]} {NOUN[(i // len(ADJ)) % len(NOUN)]}"


class Planter:
    """Builds the documents' sentences and the teacher's planted answers for each sentence."""

    def __init__(self) -> None:
        self.by_sentence: dict[str, list[dict[str, Any]]] = {}
        self.planted: dict[str, tuple[bool, str]] = {}

    def add(self, sentence: str, good: bool, kind: str, **triple: Any) -> None:
        pid = f"p{len(self.planted):04d}"
        self.planted[pid] = (good, kind)
        self.by_sentence.setdefault(sentence, []).append({**triple, "_pid": pid})

    def object_sentences(self, i: int) -> list[str]:
        """Two or three sentences about one object, with 2 good and about 4 bad triples planted."""
        o, ctx, cat = _obj(i), CONTEXTS[i % len(CONTEXTS)], CATS[i % len(CATS)]
        other_cat = CATS[(i + 2) % len(CATS)]
        wrong = other_cat if other_cat != "maritime vessel" else "aircraft"  # differs from the graph's ship
        size = f"{12 + i} m"
        s1 = f"The {o} is usually found in the {ctx} area."
        s2 = f"From above, each {o} is classed as {cat}, about {size} long."
        sents = [s1, s2]
        self.add(s1, True, "good", head=o, head_type="object_type", relation="typically_found_in", tail=ctx,
                 tail_type="scene_context", span=s1)
        self.add(s2, True, "good", head=o, head_type="object_type", relation="object_category", tail=cat,
                 tail_type="object_category", span=f"each {o} is classed as {cat}")
        if i % 2 == 0:  # quantities are values: a good literal triple
            self.add(s2, True, "good", head=o, head_type="object_type", relation="typical_size", tail=size,
                     tail_type="quantity", span=s2)
        k = i % 9
        if k == 0:
            self.add(s1, False, "span_not_in_text", head=o, head_type="object_type", relation="typically_found_in",
                     tail="quarry", tail_type="scene_context", span=f"The {o} is rarely found in the quarry area.")
            self.add(s2, False, "numeric_entity", head=o, head_type="object_type", relation="typically_found_in",
                     tail=size, tail_type="scene_context", span=s2)
        elif k == 1:
            self.add(s1, False, "head_not_in_span", head=_obj(i + 1), head_type="object_type",
                     relation="typically_found_in", tail=ctx, tail_type="scene_context", span=s1)
            self.add(s2, False, "tail_not_in_span", head=o, head_type="object_type", relation="object_category",
                     tail=other_cat, tail_type="object_category", span=s2)
        elif k == 2:
            self.add(s1, False, "unknown_relation", head=o, head_type="object_type", relation="is_loved_by",
                     tail=ctx, tail_type="scene_context", span=s1)
            self.add(s2, False, "unknown_type", head=o, head_type="gadget", relation="object_category", tail=cat,
                     tail_type="object_category", span=s2)
        elif k == 3:
            self.add(s1, False, "wrong_domain", head=ctx, head_type="scene_context", relation="typically_found_in",
                     tail=o, tail_type="object_type", span=s1)
            self.add(s2, False, "wrong_range", head=o, head_type="object_type", relation="typical_size", tail=cat,
                     tail_type="object_category", span=s2)
        elif k == 4:
            s3 = f"Some older charts list the {o} as {other_cat} instead."
            sents.append(s3)
            self.add(s3, False, "duplicate_different_tail", head=o, head_type="object_type",
                     relation="object_category", tail=other_cat, tail_type="object_category", span=s3)
            self.add(s1, False, "malformed_item", head=o, relation=["typically_found_in"], tail=ctx, span=s1)
        elif k == 5:
            s3 = f"Catalogue entry 10.5194/kz-{4400 + i} shows the {o} in the {ctx} area as record {7000 + i}."
            sents.append(s3)
            self.add(s3, False, "doi_as_entity", head=f"10.5194/kz-{4400 + i}", head_type="object_type",
                     relation="typically_found_in", tail=ctx, tail_type="scene_context", span=s3)
            self.add(s3, False, "number_as_entity", head=o, head_type="object_type", relation="typically_found_in",
                     tail=f"{7000 + i}", tail_type="scene_context", span=s3)
        elif k == 6:
            s3 = f"Near the {o}, a ship is often classed as {wrong} by mistake."
            sents.append(s3)
            self.add(s3, False, "functional_conflict_with_graph", head="ship", head_type="object_type",
                     relation="object_category", tail=wrong, tail_type="object_category", span=s3)
            self.add(s1, False, "missing_span", head=o, head_type="object_type", relation="typically_found_in",
                     tail=ctx, tail_type="scene_context", span="")
        elif k == 7:
            s3 = f"Sentinel-1A also carries the MSI camera used to image the {o}."
            sents.append(s3)
            self.add(s3, False, "closed_relation_contradiction", head="Sentinel-1A", head_type="platform",
                     relation="carries_sensor", tail="MSI", tail_type="sensor", span=s3)
            self.add(s1, False, "span_not_in_text", head=o, head_type="object_type", relation="typically_found_in",
                     tail=ctx, tail_type="scene_context", span=s1.replace("usually", "always"))
        else:
            self.add(s1, False, "self_loop", head=o, head_type="object_type", relation="typically_found_in",
                     tail=o, tail_type="scene_context", span=s1)
            s3 = f"Every vessel moored at the {o} counts as {wrong} in that survey."
            sents.append(s3)  # "vessel" is an alias of the graph's ship
            self.add(s3, False, "functional_conflict_with_graph", head="vessel", head_type="object_type",
                     relation="object_category", tail=wrong, tail_type="object_category", span=s3)
        # two more bad triples for every object: a fabricated span and an identifier head
        self.add(s1, False, "span_not_in_text", head=o, head_type="object_type", relation="typically_found_in",
                 tail="lagoon", tail_type="scene_context", span=f"A {o} sits in a lagoon.")
        self.add(s2, False, "quantity_as_entity", head=size, head_type="object_type", relation="object_category",
                 tail=cat, tail_type="object_category", span=s2)
        return sents


def pdf_bytes(pages: list[list[str]]) -> bytes:
    """A minimal valid PDF (Helvetica, one text line per list item, xref with exact offsets)."""
    objs: list[bytes] = []
    n_pages = len(pages)
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(n_pages))
    font_id = 3 + 2 * n_pages
    objs.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objs.append(f"<< /Type /Pages /Kids [{kids}] /Count {n_pages} >>".encode())
    for i, lines in enumerate(pages):
        def esc(s: str) -> str:
            return s.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        body = "BT /F1 9 Tf 11 TL 40 800 Td " + " ".join(f"({esc(s)}) Tj T*" for s in lines) + " ET"
        stream = body.encode("latin-1")
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 1200 842] /Resources << /Font << /F1 {font_id} 0 R >> >> "
                    f"/Contents {4 + 2 * i} 0 R >>".encode())
        objs.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    objs.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for k, o in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{k} 0 obj\n".encode() + o + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{off:010d} 00000 n \n".encode() for off in offsets)
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def make_corpus(root: Path, n_objects: int = 51) -> Planter:
    """Write schema.yaml, base.yaml and docs/ (a .txt, a .md, a 3-page .pdf, a note that gets malformed
    replies); return the planter with the expected answers."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "schema.yaml").write_text(SCHEMA, encoding="utf-8")
    (root / "base.yaml").write_text(BASE, encoding="utf-8")
    docs = root / "docs"
    (docs / "notes").mkdir(parents=True, exist_ok=True)
    pl = Planter()
    third = n_objects // 3
    txt = []
    for i in range(third):
        txt.append(" ".join(pl.object_sentences(i)))
    known = "Ships are usually found in the harbour area."  # a graph fact restated, named in the plural
    pl.add(known, True, "good_confirms_graph", head="Ships", head_type="object_type", relation="typically_found_in",
           tail="harbour", tail_type="scene_context", span=known)
    txt.append(known)
    (docs / "harbours.txt").write_text("Port structures seen from above\n\n" + "\n\n".join(txt) + "\n", encoding="utf-8")
    md = ["# Industrial objects", ""]
    for i in range(third, 2 * third):
        md += [f"## Object {i}", "", " ".join(pl.object_sentences(i)), ""]
    (docs / "industry.md").write_text("\n".join(md), encoding="utf-8")
    pages: list[list[str]] = [[], [], []]
    for i in range(2 * third, n_objects):
        pages[(i - 2 * third) * 3 // (n_objects - 2 * third)].extend(pl.object_sentences(i))
    (docs / "survey.pdf").write_bytes(pdf_bytes(pages))
    # malformed replies: the fake answers any chunk holding "MALFORMED" with broken JSON
    bad = [f"MALFORMED note {i} says the covered dock is usually found in the lagoon area." for i in range(3)]
    for s in bad:
        pl.add(s, False, "malformed_reply", head="covered dock", head_type="object_type",
               relation="typically_found_in", tail="lagoon", tail_type="scene_context", span=s)
    (docs / "notes" / "appendix.md").write_text("\n\n".join(bad) + "\n", encoding="utf-8")
    return pl


def _wsn(s: str) -> str:
    return " ".join(s.split())


class FakeDocTeacher:
    """Serves /v1/chat/completions on 127.0.0.1: planted triples for extraction prompts, planted QA (one true
    fill-in per functional fact, one wrong answer and one fabricated fact per reply) for QA prompts."""

    def __init__(self, planter: Planter, delay_s: float = 0.0):
        self.pl = planter
        self.delay_s = delay_s
        self.users: list[str] = []
        self.qa_planted: dict[str, bool] = {}
        self.sent: set[str] = set()
        self.lock = threading.Lock()

    def answer(self, body: dict[str, Any]) -> str:
        system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
        with self.lock:
            self.users.append(user)
        if self.delay_s:
            time.sleep(self.delay_s)
        if system.startswith("You extract knowledge-graph facts"):
            passage = _wsn(user.split("<<<", 1)[1].rsplit(">>>", 1)[0])
            items = [it for s, its in self.pl.by_sentence.items() if _wsn(s) in passage for it in its]
            with self.lock:
                self.sent.update(it["_pid"] for it in items)
            if "MALFORMED" in passage:
                return "```json\n" + json.dumps(items)[:-40] + "\n```"
            return "```json\n" + json.dumps(items) + "\n```"
        facts = [line.split(" | ") for line in user.split("\n") if line.count(" | ") == 2]
        items = []
        for h, r, t in facts:
            if r == "object_category":
                qid = f"{h}|{t}|true"
                self.qa_planted[qid] = True
                items.append({"question": f"Which object category does the {h} belong to?", "qtype": "fill",
                              "answer": t, "evidence": [[h, r, t]], "_qid": qid})
                qid = f"{h}|{t}|wrong_answer"
                self.qa_planted[qid] = False
                items.append({"question": f"Which object category does the {h} belong to?", "qtype": "fill",
                              "answer": "aircraft" if t != "aircraft" else "road vehicle", "evidence": [[h, r, t]],
                              "_qid": qid})
                qid = f"{h}|{t}|fabricated"
                self.qa_planted[qid] = False
                items.append({"question": f"Which object category does the {h} belong to?", "qtype": "fill",
                              "answer": "spacecraft", "evidence": [[h, r, "spacecraft"]], "_qid": qid})
        return json.dumps(items)

    def __enter__(self) -> FakeDocTeacher:
        fake = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": fake.answer(body)}}]}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client was killed mid-request (resume test)
                    pass

            def log_message(self, *a: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 128
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def extraction_users(users: list[str]) -> list[str]:
    return [u for u in users if re.match(r"^Passage:\n<<<", u) and "Reply with the JSON list of facts" in u]
