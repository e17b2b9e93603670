"""The knowledge graph: a typed networkx multi-digraph with a declared schema and provenance.

Nodes carry `type`, `name` and `aliases`; edges carry `rel`, `source` and `line` (provenance). The schema
(data/schema.yaml) declares node types and relations (domain/range, functional, closed-world, templates).
Every load collects *all* problems (file:line, unknown type/relation, domain/range violations,
contradictions on functional relations) and raises one `KGLoadError` listing them.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import networkx as nx
import yaml

from kg_qa_builder.errors import KGLoadError, SchemaError

_NORM_RE = re.compile(r"[^a-z0-9+\-.%/°#*()^=<>≥≤]+")


@lru_cache(maxsize=1)
def _combining_re() -> re.Pattern[str]:
    """A character class of every combining character (unicodedata.combining != 0): one C-level `sub` removes
    them, instead of a Python-level test per character."""
    cps = [c for c in range(0x300, sys.maxunicode + 1) if unicodedata.combining(chr(c))]
    ranges, start, prev = [], cps[0], cps[0]
    for c in cps[1:]:
        if c != prev + 1:
            ranges.append((start, prev))
            start = c
        prev = c
    ranges.append((start, prev))
    return re.compile("[" + "".join(f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges) + "]")


@lru_cache(maxsize=1 << 18)
def norm(text: str) -> str:
    """Normalise a surface form for linking and dedup: NFKD, ASCII-fold, lower case, collapse punctuation."""
    text = str(text)
    if text.isascii():  # fast path (most questions): NFKD and the dash/micro replacements change nothing
        t = text.lower()
    else:
        t = _combining_re().sub("", unicodedata.normalize("NFKD", text)).lower()
        t = t.replace("–", "-").replace("—", "-").replace("µ", "u")
    return " ".join(_NORM_RE.sub(" ", t).split()).strip(" .")


@dataclass
class RelationSpec:
    """A typed relation with its templates (see data/schema.yaml for the meaning of each field)."""

    name: str
    domain: list[str]
    range: list[str]
    functional: bool = False
    closed: bool = False
    qa: bool = True
    trivia: bool = False
    interp: bool = False
    aliases: list[str] = field(default_factory=list)
    statement: str = ""
    ask_tail: list[str] = field(default_factory=list)
    ask_head: list[str] = field(default_factory=list)
    tail_of: str = ""
    head_by: str = ""
    weight: float = 1.0
    also_answered_by: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Closed world holds: declared complete, or functional (a head's one value excludes all others)."""
        return self.closed or self.functional


@dataclass
class Schema:
    """Node types (name → label, literal flag) and relation specs."""

    types: dict[str, dict[str, Any]]
    relations: dict[str, RelationSpec]

    def type_label(self, t: str) -> str:
        return str(self.types.get(t, {}).get("label", t.replace("_", " ")))

    def is_literal(self, t: str) -> bool:
        return bool(self.types.get(t, {}).get("literal", False))

    def is_identifier(self, t: str) -> bool:
        """Literal values and catalogue identifiers (band codes, spectrum ids): never chained through."""
        return self.is_literal(t) or bool(self.types.get(t, {}).get("identifier", False))

    def relation_by_alias(self) -> dict[str, str]:
        """Map normalised relation names and aliases → relation name (ambiguous aliases map to '')."""
        out: dict[str, str] = {}
        for r in self.relations.values():
            for a in [r.name, r.name.replace("_", " "), *r.aliases]:
                k = norm(a)
                out[k] = r.name if out.get(k, r.name) == r.name else ""
        return out


def load_schema(path: str | Path | None = None) -> Schema:
    """Read and check the schema YAML (default: the packaged data/schema.yaml)."""
    text = (
        Path(path).read_text(encoding="utf-8")
        if path
        else resources.files("kg_qa_builder").joinpath("data/schema.yaml").read_text(encoding="utf-8")
    )
    where = str(path or "kg_qa_builder/data/schema.yaml")
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise SchemaError(f"{where}: not valid YAML: {e}") from e
    types = raw.get("types") or {}
    problems: list[str] = []
    rels: dict[str, RelationSpec] = {}
    fields = set(RelationSpec.__dataclass_fields__)
    for name, spec in (raw.get("relations") or {}).items():
        unknown = set(spec) - fields
        if unknown:
            problems.append(f"{where}: relation {name}: unknown keys {sorted(unknown)}")
            continue
        r = RelationSpec(name=name, **spec)
        for t in [*r.domain, *r.range]:
            if t not in types:
                problems.append(f"{where}: relation {name}: unknown node type {t!r}")
        if r.qa and (not r.statement or not r.ask_tail or not r.tail_of or not r.head_by):
            problems.append(f"{where}: relation {name}: needs statement, ask_tail, tail_of and head_by")
        for tpl in [r.statement, *r.ask_tail, r.tail_of]:
            if tpl and "{h}" not in tpl:
                problems.append(f"{where}: relation {name}: template {tpl!r} lacks {{h}}")
        for tpl in [*r.ask_head, r.head_by]:
            if tpl and "{t}" not in tpl:
                problems.append(f"{where}: relation {name}: template {tpl!r} lacks {{t}}")
        rels[name] = r
    for r in rels.values():
        for other in r.also_answered_by:
            o = rels.get(other)
            if o is None or set(o.domain) != set(r.domain) or set(o.range) != set(r.range):
                problems.append(f"{where}: relation {r.name}: also_answered_by {other!r} must be a relation with "
                                "the same domain and range")
    if problems:
        raise SchemaError("invalid KG schema:\n" + "\n".join(f"  - {p}" for p in problems))
    return Schema(types=types, relations=rels)


class KnowledgeGraph:
    """Typed multi-digraph + indexes for generation and verification.

    Build with `add_node` / `add_edge` (problems are collected, not raised), then call `finalize()`, which
    raises one KGLoadError listing every problem, and builds the (head, rel) → tails and (rel, tail) → heads
    indexes and the alias table used for entity linking."""

    def __init__(self, schema: Schema):
        self.schema = schema
        self.g = nx.MultiDiGraph()
        self.problems: list[str] = []
        self.out: dict[tuple[str, str], list[str]] = defaultdict(list)
        self.inc: dict[tuple[str, str], list[str]] = defaultdict(list)
        self.by_type: dict[str, list[str]] = defaultdict(list)
        self.range_pool: dict[str, list[str]] = {}
        self.alias: dict[str, list[str]] = defaultdict(list)
        self.triples: list[tuple[str, str, str]] = []
        self._prov: dict[tuple[str, str, str], str] = {}
        self.refs: dict[tuple[str, str, str], str] = {}  # published reference of a curated fact
        self._names: dict[str, str] = {}  # node id → display name, filled by finalize (hot in rendering)

    # ---- building ----
    def add_node(self, nid: str, type: str, name: str, aliases: Iterable[str] = (), where: str = "") -> str:  # noqa: A002
        if type not in self.schema.types:
            self.problems.append(f"{where}: node {nid!r}: unknown type {type!r}")
            return nid
        if nid in self.g:
            old = self.g.nodes[nid]
            if old["type"] != type:
                self.problems.append(f"{where}: node {nid!r} declared as {type!r}, already {old['type']!r} ({old['where']})")
            old["aliases"] = sorted(set(old["aliases"]) | set(aliases))
            return nid
        self.g.add_node(nid, type=type, name=str(name), aliases=sorted(set(map(str, aliases))), where=where)
        return nid

    def add_edge(self, h: str, rel: str, t: str, source: str, where: str = "") -> None:
        spec = self.schema.relations.get(rel)
        if spec is None:
            close = [r for r in self.schema.relations if r.split("_")[0] == rel.split("_")[0]][:3]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            self.problems.append(f"{where}: unknown relation {rel!r}{hint}")
            return
        for end, allowed, what in ((h, spec.domain, "domain"), (t, spec.range, "range")):
            if end not in self.g:
                self.problems.append(f"{where}: {rel}: unknown entity {end!r}")
                return
            et = self.g.nodes[end]["type"]
            if et not in allowed:
                self.problems.append(
                    f"{where}: {rel}: {what} violation: {self.name(end)!r} is a {et}, expected one of {allowed}"
                )
                return
        key = (h, rel, t)
        if key in self._prov:
            return  # the same fact from two places is not a contradiction
        self._prov[key] = f"{source}@{where}"
        self.g.add_edge(h, t, key=rel, rel=rel, source=source, where=where)

    # ---- queries ----
    def name(self, nid: str) -> str:
        n = self._names.get(nid)
        if n is not None:
            return n
        return self.g.nodes[nid]["name"] if nid in self.g else nid

    def type(self, nid: str) -> str:
        return self.g.nodes[nid]["type"]

    def tails(self, h: str, rel: str) -> list[str]:
        return self.out.get((h, rel), [])

    def heads(self, rel: str, t: str) -> list[str]:
        return self.inc.get((rel, t), [])

    def has(self, h: str, rel: str, t: str) -> bool:
        return (h, rel, t) in self._prov

    def provenance(self, h: str, rel: str, t: str) -> str:
        return self._prov[(h, rel, t)]

    def link(self, text: str) -> list[str]:
        """Entity linking: node ids whose name or alias normalises to `text`."""
        return self.alias.get(norm(text), [])

    @property
    def n_nodes(self) -> int:
        return self.g.number_of_nodes()

    @property
    def n_edges(self) -> int:
        return self.g.number_of_edges()

    def finalize(self) -> KnowledgeGraph:
        """Check functional relations and build indexes; raise one KGLoadError listing every problem."""
        problems = list(self.problems)
        out: dict[tuple[str, str], list[str]] = defaultdict(list)
        for h, t, d in self.g.edges(data=True):
            out[(h, d["rel"])].append(t)
        for (h, rel), ts in sorted(out.items()):
            if self.schema.relations[rel].functional and len(ts) > 1:
                where = "; ".join(self._prov[(h, rel, t)] for t in ts)
                problems.append(
                    f"contradiction: {rel} is functional but {self.name(h)!r} has {len(ts)} values "
                    f"{[self.name(t) for t in ts]} ({where})"
                )
        if problems:
            raise KGLoadError(f"knowledge graph has {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))
        self.out = defaultdict(list, {k: sorted(v) for k, v in out.items()})
        inc: dict[tuple[str, str], list[str]] = defaultdict(list)
        pools: dict[str, set[str]] = defaultdict(set)
        triples = []
        for (h, rel), ts in self.out.items():
            for t in ts:
                inc[(rel, t)].append(h)
                pools[rel].add(t)
                triples.append((h, rel, t))
        self.inc = defaultdict(list, {k: sorted(v) for k, v in inc.items()})
        self.range_pool = {r: sorted(v) for r, v in pools.items()}
        self.triples = sorted(triples)
        self.by_type = defaultdict(list)
        self.alias = defaultdict(list)
        self._names = {n: d["name"] for n, d in self.g.nodes(data=True)}
        for n, d in sorted(self.g.nodes(data=True)):
            self.by_type[d["type"]].append(n)
            for a in {d["name"], *d["aliases"]}:
                k = norm(a)
                if k and n not in self.alias[k]:
                    self.alias[k].append(n)
        return self

    def stats(self) -> dict[str, Any]:
        from collections import Counter

        return {
            "nodes": self.n_nodes,
            "edges": self.n_edges,
            "node_types": dict(Counter(d["type"] for _, d in self.g.nodes(data=True)).most_common()),
            "relations": dict(Counter(d["rel"] for _, _, d in self.g.edges(data=True)).most_common()),
            "sources": dict(Counter(d["source"] for _, _, d in self.g.edges(data=True)).most_common()),
        }
