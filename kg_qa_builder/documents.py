"""`knowzoom build-kg-docs`: a folder of documents + a teacher endpoint → verified, typed graph facts.

Documents (.txt, .md, .pdf) are cut into chunks at sentence ends (page and character offsets kept). An
OpenAI-compatible teacher is asked, per chunk, for typed triples each with the exact supporting span. Every
triple is checked before it may enter the graph:
  1. grounding: the span occurs verbatim (after whitespace normalisation) in the chunk, and the head and the
     tail are both named in the span;
  2. schema: the relation is known, head and tail types fit its domain and range, no number or identifier
     stands for a non-literal entity, and a functional relation gets one tail per head across the documents;
  3. conflicts with the existing graph: a functional relation whose graph value differs, or a new tail for a
     head whose relation the schema declares complete (closed world).
Accepted facts are merged into a copy of the graph (names and aliases linked to existing nodes, new nodes
typed) with provenance (document, page, offsets, span); rejections are kept with reason codes. Teacher calls
reuse kg_qa_builder.teacher (concurrent, retried, resumable: raw replies are keyed by a hash of the prompt
and the chunk, so a rerun sends only unanswered chunks). Finally the teacher writes QA from the passages and
their accepted facts, and each item is verified on the merged graph by Verifier.verify_teacher.

Over 500 lines on purpose: chunking, the three checks, entity linking and the resumable teacher loop are one
pipeline whose stages pass the same chunk and provenance records; apart, each would only be called from here.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kg_qa_builder.errors import KGLoadError
from kg_qa_builder.graph import KnowledgeGraph, RelationSpec, Schema, norm
from kg_qa_builder.importers import nid
from kg_qa_builder.teacher import SYSTEM_PROMPT as QA_SYSTEM_PROMPT
from kg_qa_builder.teacher import TeacherRequest
from pipeline.core.config import StageConfig, hfield
from pipeline.core.records import read_jsonl, write_jsonl

PROMPT_VERSION = "docs-kg-1"
DOC_SUFFIXES = (".txt", ".md", ".markdown", ".pdf")

# ---------------------------------------------------------------- documents and chunks


@dataclass
class Page:
    """The text of one document page (text and Markdown files are one page: page = None)."""

    doc: str
    page: int | None
    text: str


@dataclass
class Chunk:
    """A run of whole sentences of one page; start/end are character offsets in the page text."""

    doc: str
    page: int | None
    start: int
    end: int
    text: str

    def where(self) -> str:
        return f"{self.doc}" + (f" p.{self.page}" if self.page is not None else "") + f" [{self.start}:{self.end}]"


def _read_pdf(path: Path, rel: str) -> list[Page]:
    try:
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError
    except ImportError as e:  # pragma: no cover - pypdf is a declared dependency
        raise KGLoadError(f"{rel}: reading PDF needs pypdf (pip install pypdf)") from e
    try:
        reader = PdfReader(str(path))
        if reader.is_encrypted:
            raise KGLoadError(f"{rel}: the PDF is encrypted; give a decrypted copy")
        return [Page(rel, i + 1, p.extract_text() or "") for i, p in enumerate(reader.pages)]
    except (PdfReadError, ValueError, KeyError, TypeError) as e:
        raise KGLoadError(f"{rel}: not a readable PDF ({type(e).__name__}: {e})") from e


def load_documents(docs_dir: str | Path) -> list[Page]:
    """Every .txt/.md/.pdf under docs_dir (sorted, recursive) as pages; PDF pages keep their numbers."""
    root = Path(docs_dir)
    if not root.is_dir():
        raise KGLoadError(f"docs_dir {docs_dir!r} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in DOC_SUFFIXES)
    if not files:
        raise KGLoadError(f"docs_dir {docs_dir!r} holds no {', '.join(DOC_SUFFIXES)} files")
    pages: list[Page] = []
    for p in files:
        rel = p.relative_to(root).as_posix()
        if p.suffix.lower() == ".pdf":
            pages.extend(_read_pdf(p, rel))
        else:
            try:
                pages.append(Page(rel, None, p.read_text(encoding="utf-8")))
            except UnicodeDecodeError as e:
                raise KGLoadError(f"{rel}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    return pages


_BOUNDARY_RE = re.compile(r"(?<=[.!?;:])[\"')\]]*\s+|\n\s*\n|\n(?=\s*(?:#|[-*+] |\d+[.)] ))")


def chunk_pages(pages: list[Page], chunk_chars: int) -> list[Chunk]:
    """Greedy chunks of whole sentences up to chunk_chars (a longer sentence is cut at whitespace)."""
    out: list[Chunk] = []
    for pg in pages:
        text = pg.text
        ends = [m.end() for m in _BOUNDARY_RE.finditer(text)] + [len(text)]
        start = 0
        while start < len(text):
            limit = start + chunk_chars
            i = bisect.bisect_right(ends, limit) - 1
            cut = ends[i] if i >= 0 and ends[i] > start else 0
            if cut == 0:  # one sentence longer than a chunk: cut at the last whitespace before the limit
                ws = text.rfind(" ", start + 1, limit)
                cut = ws if ws > start else min(limit, len(text))
            body = text[start:cut]
            lead = len(body) - len(body.lstrip())
            if body.strip():
                s = start + lead
                out.append(Chunk(pg.doc, pg.page, s, s + len(body.strip()), body.strip()))
            start = cut
    return out


# ---------------------------------------------------------------- prompt and requests


def extraction_prompt(schema: Schema) -> str:
    """System prompt: the schema's types and relations and the required JSON shape."""
    types = ", ".join(sorted(schema.types))
    lines = []
    for r in schema.relations.values():
        flags = [f for f, on in (("one tail per head", r.functional), ("open world", not r.closed)) if on]
        lines.append(f"- {r.name}: {'/'.join(r.domain)} -> {'/'.join(r.range)}"
                     + (f" ({', '.join(flags)})" if flags else ""))
    return (
        "You extract knowledge-graph facts from a passage of an Earth-observation text. Use ONLY what the "
        "passage states. Return a JSON list; each item has: head, head_type, relation, tail, tail_type, span. "
        "span is the exact sentence or clause of the passage that states the fact, copied character for "
        "character; head and tail must both be written in the span as they appear there. relation is one of "
        "the names below; head_type and tail_type are node types that fit the relation. Never use a number, "
        "code or identifier as an entity unless the relation's type is a value (quantity, code, label). "
        f"Return [] when the passage states no such fact.\nNode types: {types}\nRelations (head types -> tail "
        "types):\n" + "\n".join(lines)
    )


@dataclass
class ExtractRequest:
    """One extraction call (duck-types TeacherRequest for TeacherClient: id, split, messages())."""

    id: str
    system: str
    text: str
    split: str = "extract"

    def messages(self) -> list[dict[str, str]]:
        user = f"Passage:\n<<<\n{self.text}\n>>>\nReply with the JSON list of facts only."
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]


def request_key(system: str, text: str) -> str:
    """Cache key of a chunk: prompt version + system prompt (schema) + chunk text."""
    return "x-" + hashlib.sha256(f"{PROMPT_VERSION}\n{system}\n{text}".encode()).hexdigest()[:24]


@dataclass
class PassageQARequest(TeacherRequest):
    """A teacher.py QA request whose user message also shows the passage the facts came from."""

    passage: str = ""

    def messages(self) -> list[dict[str, str]]:
        msgs = super().messages()
        msgs[1]["content"] = f"Passage:\n<<<\n{self.passage}\n>>>\n\n" + msgs[1]["content"]
        return msgs


# ---------------------------------------------------------------- triple verification


@dataclass
class Rejection:
    reason: str
    detail: str = ""


@dataclass
class Candidate:
    """A triple that passed the per-item checks; linked ids (new nodes not yet in the graph)."""

    h: str
    rel: str
    t: str
    new_nodes: dict[str, tuple[str, str]]  # id -> (type, name)
    prov: dict[str, Any]
    order: tuple[int, int]


_WS_RE = re.compile(r"\s+")
_DOI_RE = re.compile(r"^(doi:\s*)?10\.\d{3,9}/\S+$", re.I)
_HEX_RE = re.compile(r"^#?[0-9a-f]{6}$", re.I)
_URL_RE = re.compile(r"^(https?://|www\.)", re.I)
_NUMBER_RE = re.compile(r"^[~≈<>≤≥+\-]?\s*\d[\d.,]*\s*(?:-|–|to)?\s*[\d.,]*\s*(?:%|°\w?|[a-zµ/²³]{1,5})?$", re.I)
_ID_RE = re.compile(r"^(?:id|no|nr|ref|#)\s*[:.#-]?\s*\w*\d\w*$", re.I)


def identifier_like(text: str) -> bool:
    """A number, quantity, DOI, URL, hex colour or catalogue id: never a name of a non-literal entity."""
    s = text.strip()
    letters = sum(c.isalpha() for c in s)
    digits = sum(c.isdigit() for c in s)
    return (letters == 0 or bool(_NUMBER_RE.match(s) or _DOI_RE.match(s) or _HEX_RE.match(s)
                                 or _URL_RE.match(s) or _ID_RE.match(s)) or (digits >= 4 and digits > 2 * letters))


def _ws(text: str) -> tuple[str, list[int]]:
    """NFKC + whitespace-collapsed text and, per output character, its index in the input."""
    out, idx = [], []
    prev_space = True
    for i, c in enumerate(text):
        for c2 in unicodedata.normalize("NFKC", c):
            if c2.isspace():
                if not prev_space:
                    out.append(" ")
                    idx.append(i)
                prev_space = True
            else:
                out.append(c2)
                idx.append(i)
                prev_space = False
    s = "".join(out)
    if s.endswith(" "):
        s, idx = s[:-1], idx[:-1]
    return s, idx


def _named_in(name: str, span_tokens: list[str]) -> bool:
    """`name` occurs in the span as a run of normalised tokens (a plural 's' on the span side tolerated)."""
    toks = norm(name).split()
    if not toks:
        return False
    n = len(toks)
    for i in range(len(span_tokens) - n + 1):
        window = span_tokens[i:i + n]
        if window[:-1] == toks[:-1] and window[-1] in (toks[-1], toks[-1] + "s", toks[-1] + "es"):
            return True
    return False


class TripleChecker:
    """Per-item checks of teacher triples against a chunk, the schema and the base graph."""

    def __init__(self, kg: KnowledgeGraph):
        self.kg = kg
        self.schema = kg.schema
        self.rel_alias = kg.schema.relation_by_alias()
        self.new_index: dict[tuple[str, str], str] = {}  # (type, norm name) -> new node id
        self.new_type: dict[str, str] = {}  # norm name -> the type of its first new node
        self._ws_cache: tuple[Any, str, list[int]] = (None, "", [])
        self.type_names = {norm(k): k for k in self.schema.types}
        self.type_names.update({norm(str(v.get("label", k))): k for k, v in self.schema.types.items()
                                if norm(str(v.get("label", k))) not in self.type_names})

    def node_type(self, given: str) -> str:
        """A type as the teacher wrote it ('object type', 'Object_Type', a label) → schema type name."""
        g = given.strip()
        return g if g in self.schema.types else self.type_names.get(norm(g.replace("_", " ")), g)

    def grounded(self, name: str, span_tokens: list[str]) -> bool:
        """The name is in the span, or it links to a graph node one of whose names/aliases is in the span."""
        if _named_in(name, span_tokens):
            return True
        return any(_named_in(a, span_tokens) for n in self._link(name)
                   for a in {self.kg.name(n), *self.kg.g.nodes[n]["aliases"]})

    def relation(self, r: str) -> str:
        if r in self.schema.relations:
            return r
        return self.rel_alias.get(norm(r), "")

    def _link(self, name: str) -> list[str]:
        k = norm(name)
        found = list(self.kg.alias.get(k, []))
        for suffix in ("s", "es"):
            if not found and k.endswith(suffix):
                found = list(self.kg.alias.get(k[: -len(suffix)], []))
        return found

    def _resolve(self, name: str, given_type: str, spec: RelationSpec, end: str) -> tuple[str, str] | Rejection:
        """(node id, type) of one end: an existing node of an allowed type, or a new typed node."""
        allowed = spec.domain if end == "head" else spec.range
        what = "domain" if end == "head" else "range"
        literal_allowed = [t for t in allowed if self.schema.is_literal(t)]
        if given_type and given_type not in self.schema.types:
            return Rejection("unknown_type", f"{end} type {given_type!r} is not a node type of the schema")
        if given_type and given_type not in allowed:
            return Rejection(f"{what}_violation", f"{spec.name} needs a {'/'.join(allowed)} {end}, got {given_type}")
        linked = [n for n in self._link(name) if self.kg.type(n) in allowed]
        if linked:
            exact = [n for n in linked if not given_type or self.kg.type(n) == given_type] or linked
            return exact[0], self.kg.type(exact[0])
        other = sorted({self.kg.type(n) for n in self._link(name)} - set(literal_allowed))
        if other and not literal_allowed:
            return Rejection(f"{what}_violation", f"{name!r} is a {'/'.join(other)} in the graph; "
                                                  f"{spec.name} needs a {'/'.join(allowed)} {end}")
        typ = given_type or (allowed[0] if len(allowed) == 1 else "")
        if not typ:
            return Rejection("untyped_entity", f"new {end} {name!r} needs a type among {allowed}")
        if self.schema.is_literal(typ):
            if typ == "quantity" and not any(c.isdigit() for c in name):
                return Rejection(f"{what}_violation", f"{name!r} is not a value (quantity needs a number)")
        elif identifier_like(name):
            return Rejection("identifier_as_entity", f"{name!r} is a number or identifier, not a {typ}")
        key = (typ, norm(name))
        clash = typ if self.schema.is_literal(typ) else self.new_type.setdefault(key[1], typ)
        if clash != typ:
            return Rejection("type_clash", f"{name!r} is already a new {clash} in these documents, not a {typ}")
        for k in (key, (typ, norm(name)[:-1]) if norm(name).endswith("s") else key):
            if k in self.new_index:
                return self.new_index[k], typ
        node = nid(typ, " ".join(name.split()))
        self.new_index[key] = node
        return node, typ

    def check(self, item: Any, chunk: Chunk, order: tuple[int, int]) -> Candidate | Rejection:
        if not isinstance(item, dict):
            return Rejection("malformed", "item is not an object")
        vals = {}
        for f in ("head", "relation", "tail", "span"):
            v = item.get(f)
            if not isinstance(v, str) or not v.strip():
                return Rejection("malformed", f"field {f!r} missing or not a non-empty string")
            vals[f] = v.strip()
        ht, tt = item.get("head_type") or "", item.get("tail_type") or ""
        if not isinstance(ht, str) or not isinstance(tt, str):
            return Rejection("malformed", "head_type/tail_type must be strings")
        ht, tt = self.node_type(ht), self.node_type(tt)
        # 1. grounding
        span_n, _ = _ws(vals["span"])
        if self._ws_cache[0] is not chunk:  # items of one chunk come together: normalise its text once
            self._ws_cache = (chunk, *_ws(chunk.text))
        _, text_n, idx = self._ws_cache
        pos = text_n.find(span_n)
        if len(span_n) < 8 or pos < 0:
            return Rejection("span_not_in_text", "the span is not a verbatim part of the passage")
        span_tokens = norm(span_n).split()
        for end in ("head", "tail"):
            if not self.grounded(vals[end], span_tokens):
                return Rejection(f"{end}_not_in_span", f"{vals[end]!r} is not named in the span")
        # 2. schema
        rel = self.relation(vals["relation"])
        if not rel:
            return Rejection("unknown_relation", f"relation {vals['relation']!r} is not in the schema")
        spec = self.schema.relations[rel]
        if norm(vals["head"]) == norm(vals["tail"]):
            return Rejection("self_loop", "head and tail are the same name")
        h = self._resolve(vals["head"], ht.strip(), spec, "head")
        if isinstance(h, Rejection):
            return h
        t = self._resolve(vals["tail"], tt.strip(), spec, "tail")
        if isinstance(t, Rejection):
            return t
        if h[0] == t[0]:
            return Rejection("self_loop", "head and tail are the same entity")
        # 3. conflicts with the graph
        if h[0] in self.kg.g and not self.kg.has(h[0], rel, t[0]):
            known = self.kg.tails(h[0], rel)
            if known and spec.functional:
                return Rejection("conflicts_with_graph", f"{rel} is functional and the graph gives "
                                                         f"{self.kg.name(known[0])!r} for {self.kg.name(h[0])!r}")
            if known and spec.closed:
                return Rejection("contradicts_closed_relation",
                                 f"{rel} is declared complete and the graph lists {[self.kg.name(k) for k in known]} "
                                 f"for {self.kg.name(h[0])!r}")
        new = {n: (typ, vals[end]) for (n, typ), end in ((h, "head"), (t, "tail")) if n not in self.kg.g}
        a = chunk.start + idx[pos]
        b = chunk.start + idx[pos + len(span_n) - 1] + 1
        prov = {"doc": chunk.doc, "page": chunk.page, "start": a, "end": b, "span": span_n}
        return Candidate(h[0], rel, t[0], new, prov, order)


def resolve_functional(cands: list[Candidate], schema: Schema) -> tuple[list[Candidate], list[tuple[Candidate, str]]]:
    """One tail per head for functional relations across all documents: the tail stated in the most distinct
    spans wins, ties go to the earliest statement; the others are rejected as conflicting duplicates."""
    groups: dict[tuple[str, str], list[Candidate]] = defaultdict(list)
    for c in cands:
        if schema.relations[c.rel].functional:
            groups[(c.h, c.rel)].append(c)
    losers: dict[int, str] = {}
    for (_h, _rel), cs in groups.items():
        support: dict[str, set[tuple[Any, ...]]] = defaultdict(set)
        first: dict[str, tuple[int, int]] = {}
        for c in cs:
            support[c.t].add((c.prov["doc"], c.prov["page"], c.prov["start"]))
            first[c.t] = min(first.get(c.t, c.order), c.order)
        if len(support) < 2:
            continue
        win = min(support, key=lambda t: (-len(support[t]), first[t]))
        for c in cs:
            if c.t != win:
                losers[id(c)] = win
    kept = [c for c in cands if id(c) not in losers]
    return kept, [(c, losers[id(c)]) for c in cands if id(c) in losers]


def merge(kg: KnowledgeGraph, facts: list[dict[str, Any]]) -> KnowledgeGraph:
    """A new finalized graph: the base graph plus the accepted document facts (source doc:<file>)."""
    out = KnowledgeGraph(kg.schema)
    for n, d in kg.g.nodes(data=True):
        out.add_node(n, d["type"], d["name"], d["aliases"], d.get("where", ""))
    for h, t, d in kg.g.edges(data=True):
        out.add_edge(h, d["rel"], t, d["source"], d.get("where", ""))
    for f in facts:
        for end in ("head", "tail"):
            if f[f"{end}_new"]:
                out.add_node(f[f"{end}_id"], f[f"{end}_type"], f[end], (), f"doc:{f['provenance'][0]['doc']}")
        p = f["provenance"][0]
        where = (f"p{p['page']}:" if p["page"] is not None else "") + f"{p['start']}-{p['end']}"
        out.add_edge(f["head_id"], f["relation"], f["tail_id"], f"doc:{p['doc']}", where)
    return out.finalize()


def write_curated(path: Path, kg: KnowledgeGraph, facts: list[dict[str, Any]]) -> dict[str, int]:
    """The new facts as a curated YAML file (the format of kg_qa_builder/data/*.yaml), so build-qa can load
    them through `curated_files`; each value carries its document span as a comment. An entity key naming
    two types in one file cannot be written; such facts are counted, not written."""
    rows: dict[str, dict[str, Any]] = {}
    counts: Counter[str] = Counter()
    for f in facts:
        key = f["head_id"].split(":", 1)[1]
        row = rows.setdefault(key, {"type": f["head_type"], "rels": defaultdict(list)})
        if row["type"] != f["head_type"]:
            counts["skipped_key_clash"] += 1
            continue
        p = f["provenance"][0]
        note = f"{p['doc']}" + (f" p.{p['page']}" if p["page"] is not None else "") + f" [{p['start']}:{p['end']}]"
        row["rels"][f["relation"]].append((f["tail_id"].split(":", 1)[1], note))
        counts["facts"] += 1
    for f in facts:  # new tails that head no fact of their own still need a declaration
        if f["tail_new"] and not kg.schema.is_literal(f["tail_type"]):
            rows.setdefault(f["tail_id"].split(":", 1)[1], {"type": f["tail_type"], "rels": defaultdict(list)})
    lines = ["# written by knowzoom build-kg-docs: facts extracted from documents and verified on the graph",
             "source: documents", "entities:"]
    for key, row in rows.items():
        lines.append(f"  {json.dumps(key, ensure_ascii=False)}:")
        lines.append(f"    type: {row['type']}")
        for rel, vals in row["rels"].items():
            lines.append(f"    {rel}:")
            lines += [f"      - {json.dumps(v, ensure_ascii=False)}  # {note}" for v, note in vals]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    counts["entities"] = len(rows)
    return dict(counts)


# ---------------------------------------------------------------- the stage


@dataclass
class BuildKGDocsConfig(StageConfig):
    """Config of `knowzoom build-kg-docs`."""

    output_dir: str = hfield("runs/tiny/kg_docs", help="Folder for doc_triples.jsonl, doc_rejections.jsonl, QA, raw replies.")
    docs_dir: str = hfield("", help="Folder of .txt, .md and .pdf documents (searched recursively).")
    teacher_url: str = hfield("", help="OpenAI-compatible base URL of the extracting teacher (e.g. http://host:8000/v1).")
    teacher_model: str = hfield("teacher", help="Model name sent to the teacher endpoint.")
    teacher_api_key_env: str = hfield("OPENAI_API_KEY", help="Environment variable holding the teacher API key (optional).")
    teacher_concurrency: int = hfield(8, help="Concurrent teacher calls.")
    teacher_timeout_s: float = hfield(120.0, help="Timeout of one teacher call in seconds.")
    teacher_max_retries: int = hfield(3, help="Retries per teacher call (exponential backoff).")
    teacher_backoff_s: float = hfield(0.5, help="First retry delay in seconds (doubles per retry).")
    teacher_retry_failed: bool = hfield(False, help="On a rerun, ask again the chunks whose reply failed after all retries "
                                                    "(default: a failed chunk stays failed, like build-qa's teacher path).")
    teacher_temperature: float = hfield(0.0, help="Sampling temperature for extraction and QA.")
    teacher_max_tokens: int = hfield(2048, help="Teacher max new tokens per call.")
    chunk_chars: int = hfield(2000, help="Maximum characters per chunk (chunks end at sentence ends).")
    max_triples_per_chunk: int = hfield(64, help="Triples beyond this many in one reply are rejected (runaway replies).")
    graph_sources: list[str] = hfield(["spyndex", "climaclass", "earthlib", "curated"],
                                      help="Base graph sources the document facts are checked against and merged into.")
    curated_files: list[str] = hfield([], help="Curated fact YAML files; empty = the packaged kg_qa_builder/data/*.yaml.")
    schema_path: str = hfield("", help="Schema YAML; empty = the packaged kg_qa_builder/data/schema.yaml.")
    max_spectra: int = hfield(-1, help="Cap on earthlib spectra imported (-1 = all).")
    qa_items_per_chunk: int = hfield(2, help="Teacher QA asked per chunk with accepted facts (0 = no QA step).")
    qa_split: str = hfield("train", help="Split written into the verified QA records.")

    def validate(self) -> list[str]:
        p = super().validate()
        if not self.docs_dir:
            p.append("docs_dir: empty; give the folder of documents (--docs_dir DIR)")
        elif not Path(self.docs_dir).is_dir():
            p.append(f"docs_dir: {self.docs_dir!r} is not a folder")
        if not self.teacher_url:
            p.append("teacher_url: empty; give an OpenAI-compatible base URL (--teacher_url http://host:port/v1)")
        elif not re.match(r"^https?://", self.teacher_url):
            p.append(f"teacher_url: {self.teacher_url!r} must start with http:// or https://")
        if self.chunk_chars < 200:
            p.append("chunk_chars: must be >= 200")
        if self.teacher_concurrency < 1 or self.teacher_timeout_s <= 0 or self.teacher_max_retries < 0:
            p.append("teacher_concurrency >= 1, teacher_timeout_s > 0, teacher_max_retries >= 0 required")
        if self.max_triples_per_chunk < 1 or self.qa_items_per_chunk < 0:
            p.append("max_triples_per_chunk >= 1 and qa_items_per_chunk >= 0 required")
        bad = set(self.graph_sources) - {"spyndex", "climaclass", "earthlib", "curated"}
        if bad:
            p.append(f"graph_sources: unknown {sorted(bad)}; use spyndex, climaclass, earthlib, curated")
        if self.schema_path and not Path(self.schema_path).is_file():
            p.append(f"schema_path: {self.schema_path!r} is not a file")
        return p


def _client(cfg: BuildKGDocsConfig) -> Any:
    from kg_qa_builder.teacher import TeacherClient

    return TeacherClient(cfg.teacher_url, cfg.teacher_model, os.environ.get(cfg.teacher_api_key_env) or None,
                         cfg.teacher_concurrency, cfg.teacher_timeout_s, cfg.teacher_max_retries, cfg.teacher_backoff_s,
                         temperature=cfg.teacher_temperature, max_tokens=cfg.teacher_max_tokens)


def drop_failed(raw: Path) -> int:
    """Remove failed replies from a raw reply file (atomically), so the next call asks those chunks again."""
    if not raw.exists():
        return 0
    recs = list(read_jsonl(raw))
    keep = [r for r in recs if not r.get("error")]
    if len(keep) != len(recs):
        write_jsonl(raw, keep)
    return len(recs) - len(keep)


def _replies(raw: Path, wanted: set[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if raw.exists():
        for rec in read_jsonl(raw):
            if rec["id"] in wanted and rec["id"] not in out:
                out[rec["id"]] = rec
    return out


def reply_items(rec: dict[str, Any]) -> list[Any]:
    """The triples of a raw reply; a single {"triples": [...]} / {"facts": [...]} object is unwrapped."""
    items = rec.get("items") or []
    if len(items) == 1 and isinstance(items[0], dict):
        for k in ("triples", "facts", "relations"):
            if isinstance(items[0].get(k), list):
                return list(items[0][k])
    return list(items)


def extract_facts(kg: KnowledgeGraph, chunks: list[Chunk], replies: dict[str, dict[str, Any]], keys: list[str],
                  max_items: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Counter]:
    """Check every reply item of every chunk (in document order); returns facts, rejections, counts."""
    checker = TripleChecker(kg)
    cands: list[Candidate] = []
    rejections: list[dict[str, Any]] = []
    counts: Counter = Counter()

    def reject(ci: int, j: int | None, item: Any, reason: str, detail: str) -> None:
        c = chunks[ci]
        counts[reason] += 1
        rejections.append({"chunk": keys[ci], "index": j, "doc": c.doc, "page": c.page, "start": c.start,
                           "end": c.end, "reason": reason, "detail": detail, "item": item})

    for ci, (chunk, key) in enumerate(zip(chunks, keys, strict=True)):
        rec = replies.get(key)
        if rec is None:
            reject(ci, None, None, "no_reply", "the teacher has not answered this chunk")
            continue
        if rec.get("error"):
            reject(ci, None, None, "teacher_reply_invalid", str(rec["error"]))
            continue
        for j, item in enumerate(reply_items(rec)):
            if j >= max_items:
                reject(ci, j, item, "too_many_triples", f"more than {max_items} triples in one reply")
                continue
            res = checker.check(item, chunk, (ci, j))
            if isinstance(res, Rejection):
                reject(ci, j, item, res.reason, res.detail)
            else:
                res.prov.update(chunk=key, index=j)
                cands.append(res)
    kept, losers = resolve_functional(cands, kg.schema)
    for c, win in losers:
        ci, j = c.order
        reject(ci, j, reply_items(replies[keys[ci]])[j], "functional_conflict",
               f"{c.rel} is functional; the documents state {win!r} for this head more often or earlier")
    facts: dict[tuple[str, str, str], dict[str, Any]] = {}
    for c in kept:
        key3 = (c.h, c.rel, c.t)
        if key3 not in facts:
            names = {end: (c.new_nodes[n][1] if n in c.new_nodes else kg.name(n)) for end, n in (("head", c.h), ("tail", c.t))}
            types = {end: (c.new_nodes[n][0] if n in c.new_nodes else kg.type(n)) for end, n in (("head", c.h), ("tail", c.t))}
            facts[key3] = {"head": names["head"], "head_id": c.h, "head_type": types["head"], "head_new": c.h in c.new_nodes,
                           "relation": c.rel, "tail": names["tail"], "tail_id": c.t, "tail_type": types["tail"],
                           "tail_new": c.t in c.new_nodes, "status": "confirmed" if kg.has(c.h, c.rel, c.t) else "new",
                           "provenance": []}
        facts[key3]["provenance"].append(c.prov)
        counts["accepted_items"] += 1
    return list(facts.values()), rejections, counts


def run(cfg: BuildKGDocsConfig) -> dict[str, Any]:
    """Documents → chunks → teacher triples → checks → merged graph (+ verified passage QA)."""
    from kg_qa_builder.importers import build_graph

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    chunks = chunk_pages(load_documents(cfg.docs_dir), cfg.chunk_chars)  # bad documents fail before the graph build
    kg = build_graph(cfg.graph_sources, cfg.curated_files or None, cfg.schema_path or None,
                     max_spectra=None if cfg.max_spectra < 0 else cfg.max_spectra)
    write_jsonl(out / "chunks.jsonl", [{"doc": c.doc, "page": c.page, "start": c.start, "end": c.end} for c in chunks])
    system = extraction_prompt(kg.schema)
    keys = [request_key(system, c.text) for c in chunks]
    reqs = list({k: ExtractRequest(k, system, c.text) for k, c in zip(keys, chunks, strict=True)}.values())
    client = _client(cfg)
    raw = out / "extract_raw.jsonl"
    retried = drop_failed(raw) if cfg.teacher_retry_failed else 0
    calls = {**client.run(reqs, raw), "retried_failed": retried}
    replies = _replies(raw, set(keys))
    facts, rejections, counts = extract_facts(kg, chunks, replies, keys, cfg.max_triples_per_chunk)
    merged = merge(kg, [f for f in facts if f["status"] == "new"])
    write_jsonl(out / "doc_triples.jsonl", facts)
    write_jsonl(out / "doc_rejections.jsonl", rejections)
    curated = write_curated(out / "doc_facts.yaml", kg, [f for f in facts if f["status"] == "new"])
    (out / "graph_stats.json").write_text(json.dumps(merged.stats(), indent=1), encoding="utf-8")
    summary: dict[str, Any] = {
        "documents": len({c.doc for c in chunks}), "chunks": len(chunks), "extract_calls": calls,
        "facts_accepted": len(facts), "facts_new": sum(f["status"] == "new" for f in facts),
        "nodes_new": merged.n_nodes - kg.n_nodes, "triples_kept": counts.pop("accepted_items", 0),
        "rejections": dict(sorted(counts.items())),
        "graph": {"nodes": merged.n_nodes, "edges": merged.n_edges}, "curated_yaml": curated,
    }
    if cfg.qa_items_per_chunk > 0:
        summary["qa"] = passage_qa(cfg, merged, chunks, keys, facts)
    (out / "kg_docs_summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary


def passage_qa(cfg: BuildKGDocsConfig, merged: KnowledgeGraph, chunks: list[Chunk], keys: list[str],
               facts: list[dict[str, Any]]) -> dict[str, Any]:
    """Teacher QA from each passage and its accepted facts, verified on the merged graph.

    Hook: the items use teacher.py's QA format (SYSTEM_PROMPT) and are checked by the build-qa teacher path,
    `Verifier(merged).verify_teacher(item, split)`; accepted QA go to qa_docs.jsonl with provenance."""
    from kg_qa_builder.verify import Verifier

    by_chunk: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for f in facts:
        for p in f["provenance"]:
            if f not in by_chunk[p["chunk"]]:
                by_chunk[p["chunk"]].append(f)
    reqs: dict[str, PassageQARequest] = {}
    where: dict[str, Chunk] = {}
    for c, k in zip(chunks, keys, strict=True):
        fs = by_chunk.get(k)
        if not fs:
            continue
        ctx = [[merged.name(f["head_id"]), f["relation"], merged.name(f["tail_id"])] for f in fs]
        rid = "q-" + hashlib.sha256(json.dumps([PROMPT_VERSION, QA_SYSTEM_PROMPT, c.text, ctx]).encode()).hexdigest()[:24]
        anchor = ctx[0][0]
        reqs.setdefault(rid, PassageQARequest(rid, cfg.qa_split, anchor, ctx, cfg.qa_items_per_chunk, passage=c.text))
        where.setdefault(rid, c)
    out = Path(cfg.output_dir)
    raw = out / "qa_raw.jsonl"
    retried = drop_failed(raw) if cfg.teacher_retry_failed else 0
    calls = {**_client(cfg).run(list(reqs.values()), raw), "retried_failed": retried}
    replies = _replies(raw, set(reqs))
    verifier = Verifier(merged)
    kept, rej, reasons = [], [], Counter[str]()
    for rid in reqs:
        rec = replies.get(rid)
        c = where[rid]
        if rec is None or rec.get("error"):
            reasons["teacher_reply_invalid"] += 1
            rej.append({"request": rid, "doc": c.doc, "page": c.page, "reason": "teacher_reply_invalid",
                        "detail": str((rec or {}).get("error", "no reply")), "item": None})
            continue
        for item in rec["items"]:
            qa, v = verifier.verify_teacher(item, cfg.qa_split)
            if qa is None:
                reasons[v.reason] += 1
                rej.append({"request": rid, "doc": c.doc, "page": c.page, "reason": v.reason, "detail": v.detail,
                            "item": item})
                continue
            qa.meta["passage"] = {"doc": c.doc, "page": c.page, "start": c.start, "end": c.end}
            kept.append(qa)
    write_jsonl(out / "qa_docs.jsonl", kept)
    write_jsonl(out / "qa_rejections.jsonl", rej)
    return {"requests": len(reqs), "calls": calls, "kept": len(kept), "rejected": dict(sorted(reasons.items()))}


__all__ = ["BuildKGDocsConfig", "Chunk", "Page", "TripleChecker", "chunk_pages", "extract_facts", "extraction_prompt",
           "identifier_like", "load_documents", "merge", "run"]
