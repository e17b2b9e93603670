"""Documents → knowledge graph (issue #15 item 4): planted good/bad triples, provenance, resume, CLI errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kg_docs_fixtures import FakeDocTeacher, extraction_users, make_corpus, pdf_bytes

from kg_qa_builder.documents import (
    BuildKGDocsConfig,
    Chunk,
    TripleChecker,
    chunk_pages,
    identifier_like,
    load_documents,
    run,
)
from kg_qa_builder.graph import load_schema
from kg_qa_builder.importers import build_graph
from pipeline.core.records import read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def _cfg(root: Path, url: str, out: str = "out", **kw: object) -> BuildKGDocsConfig:
    fields: dict[str, object] = {"chunk_chars": 1200, "teacher_max_retries": 1, "teacher_backoff_s": 0.01,
                                 "teacher_concurrency": 4, **kw}
    cfg = BuildKGDocsConfig(output_dir=str(root / out), docs_dir=str(root / "docs"), teacher_url=url,
                            graph_sources=["curated"], curated_files=[str(root / "base.yaml")],
                            schema_path=str(root / "schema.yaml"), **fields)  # type: ignore[arg-type]
    cfg.check()
    return cfg


def _kept_pids(out: Path) -> set[str]:
    raw = {r["id"]: r for r in read_jsonl(out / "extract_raw.jsonl")}
    return {raw[p["chunk"]]["items"][p["index"]]["_pid"] for f in read_jsonl(out / "doc_triples.jsonl")
            for p in f["provenance"]}


def test_planted_triples_rejected_and_kept(tmp_path: Path) -> None:
    pl = make_corpus(tmp_path)
    with FakeDocTeacher(pl) as fake:
        summary = run(_cfg(tmp_path, fake.url))
    good = [p for p, (g, _) in pl.planted.items() if g]
    bad = [p for p, (g, _) in pl.planted.items() if not g]
    assert len(good) >= 100 and len(bad) >= 200
    assert fake.sent == set(pl.planted)  # every planted triple was really answered by the teacher
    kept = _kept_pids(tmp_path / "out")
    good_kept = sum(p in kept for p in good) / len(good)
    bad_rejected = sum(p not in kept for p in bad) / len(bad)
    print(f"\nplanted good kept: {good_kept:.1%} of {len(good)}; planted bad rejected: {bad_rejected:.1%} of {len(bad)}")
    assert bad_rejected >= 0.99, [pl.planted[p] for p in bad if p in kept]
    assert good_kept >= 0.90
    # every bad kind that reaches the checks is rejected for its own reason
    reasons = {r["item"]["_pid"]: r["reason"] for r in read_jsonl(tmp_path / "out" / "doc_rejections.jsonl")
               if r["item"] and "_pid" in r["item"]}
    expect = {"span_not_in_text": "span_not_in_text", "head_not_in_span": "head_not_in_span",
              "tail_not_in_span": "tail_not_in_span", "unknown_relation": "unknown_relation",
              "wrong_domain": "domain_violation", "wrong_range": "range_violation",
              "functional_conflict_with_graph": "conflicts_with_graph",
              "closed_relation_contradiction": "contradicts_closed_relation",
              "duplicate_different_tail": "functional_conflict", "doi_as_entity": "identifier_as_entity",
              "number_as_entity": "identifier_as_entity", "quantity_as_entity": "identifier_as_entity",
              "malformed_item": "malformed", "self_loop": "self_loop", "unknown_type": "unknown_type"}
    for pid in bad:
        kind = pl.planted[pid][1]
        if kind in expect:
            assert reasons.get(pid) == expect[kind], (kind, reasons.get(pid))
    assert summary["rejections"]["teacher_reply_invalid"] == 1  # the appendix chunk got broken JSON
    # provenance: offsets point at the span in the document text; PDF facts carry their page
    facts = list(read_jsonl(tmp_path / "out" / "doc_triples.jsonl"))
    pages = {(p.doc, p.page): p.text for p in load_documents(tmp_path / "docs")}
    for f in facts:
        for p in f["provenance"]:
            assert " ".join(pages[(p["doc"], p["page"])][p["start"]:p["end"]].split()) == p["span"]
    assert {p["page"] for f in facts for p in f["provenance"] if p["doc"] == "survey.pdf"} == {1, 2, 3}
    # entity linking: "harbour" and "lifting equipment" are the graph's nodes, new ones are typed
    by = {(f["head"], f["relation"]): f for f in facts}
    assert by[("floating pier", "typically_found_in")]["tail_id"] == "scene_context:harbour"
    assert not by[("floating pier", "typically_found_in")]["tail_new"]
    assert by[("floating pier", "typically_found_in")]["head_id"] == "object_type:floating pier"
    assert by[("ship", "typically_found_in")]["status"] == "confirmed"  # "Ships" linked to the graph's ship
    assert summary["facts_new"] == summary["facts_accepted"] - 1
    # the curated-YAML export loads with the base graph into the same merged graph (build-qa's curated_files)
    from kg_qa_builder.importers import build_graph

    base = build_graph(["curated"], [tmp_path / "base.yaml"], tmp_path / "schema.yaml")
    both = build_graph(["curated"], [tmp_path / "base.yaml", tmp_path / "out" / "doc_facts.yaml"], tmp_path / "schema.yaml")
    assert both.n_edges == summary["graph"]["edges"] == base.n_edges + summary["facts_new"]
    assert both.has("object_type:floating pier", "typically_found_in", "scene_context:harbour")
    # QA from the passages is verified on the merged graph: planted-true kept, planted-false all rejected
    qa = list(read_jsonl(tmp_path / "out" / "qa_docs.jsonl"))
    qids = [q["meta"]["teacher_item"]["_qid"] for q in qa]
    assert qids and all(fake.qa_planted[q] for q in qids)
    assert summary["qa"]["kept"] == sum(fake.qa_planted.values())
    assert all(q["meta"]["passage"]["doc"] for q in qa)


def test_checks_units() -> None:
    assert identifier_like("10.1016/j.rse.2020.111") and identifier_like("4521") and identifier_like("#1f77b4")
    assert identifier_like("12 m") and identifier_like("ID-88213") and identifier_like("https://x.org/a")
    assert not identifier_like("Sentinel-2") and not identifier_like("Landsat 8") and not identifier_like("F-16")
    assert not identifier_like("A380") and identifier_like("XJ-20715")
    from kg_qa_builder.graph import KnowledgeGraph

    kg = KnowledgeGraph(load_schema()).finalize()
    ck = TripleChecker(kg)
    chunk = Chunk("a.txt", None, 100, 160, "Oil   tanks\nare usually found in\nrefineries. Other text.")
    rel = next(r for r, s in kg.schema.relations.items() if s.domain == ["object_type"] and not s.functional
               and s.range == ["scene_context"])
    ok = ck.check({"head": "oil tank", "head_type": "object_type", "relation": rel, "tail": "refineries",
                   "tail_type": "scene_context", "span": "Oil tanks are usually found in refineries."}, chunk, (0, 0))
    assert not hasattr(ok, "reason"), ok
    assert ok.prov["start"] == 100 and ok.prov["end"] == 100 + len("Oil   tanks\nare usually found in\nrefineries.")


def test_chunks_end_at_sentences(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    text = " ".join(f"Sentence number {i} says something about ports." for i in range(60))
    (tmp_path / "d" / "a.txt").write_text(text, encoding="utf-8")
    (tmp_path / "d" / "b.pdf").write_bytes(pdf_bytes([["Page one line."], ["Page two line."]]))
    pages = load_documents(tmp_path / "d")
    assert [(p.doc, p.page) for p in pages] == [("a.txt", None), ("b.pdf", 1), ("b.pdf", 2)]
    assert pages[2].text.strip() == "Page two line."
    chunks = chunk_pages(pages, 300)
    for c in chunks:
        src = pages[0].text if c.doc == "a.txt" else None
        if src is not None:
            assert src[c.start:c.end] == c.text and c.text.endswith(".") and len(c.text) <= 300
    assert "".join(c.text for c in chunks if c.doc == "a.txt").replace(" ", "") == text.replace(" ", "")


def test_resume_after_kill(tmp_path: Path) -> None:
    """A run killed midway is resumed: answered chunks are not asked again, and the outputs equal a fresh run."""
    pl = make_corpus(tmp_path)
    with FakeDocTeacher(pl, delay_s=0.3) as fake:
        cfg = _cfg(tmp_path, fake.url, out="killed", teacher_concurrency=2)
        args = [sys.executable, "-m", "pipeline", "build-kg-docs"] + [
            a for k, v in cfg.to_dict().items() for a in (f"--{k}", json.dumps(v) if isinstance(v, list) else str(v))]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        raw = tmp_path / "killed" / "extract_raw.jsonl"
        t0 = time.time()
        while time.time() - t0 < 60 and (not raw.exists() or len(raw.read_text().splitlines()) < 3):
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        answered = {r["id"] for r in read_jsonl(raw)}  # a line cut by the kill is not an answer
        assert 3 <= len(answered) < 11, len(answered)
        before = len(fake.users)
        fake.delay_s = 0.0
        run(cfg)
        rerun_users = extraction_users(fake.users[before:])
        # the 11 chunks are distinct: the rerun asks exactly the unanswered ones (the broken-JSON chunk twice:
        # one retry), never one answered before the kill
        assert len(set(rerun_users)) == 11 - len(answered)
        assert len(rerun_users) - len(set(rerun_users)) <= 1
        run(_cfg(tmp_path, fake.url, out="fresh"))
        n = len(fake.users)
        run(cfg)  # a third run of a finished folder sends nothing
        assert len(fake.users) == n
    for name in ("doc_triples.jsonl", "doc_rejections.jsonl", "qa_docs.jsonl", "qa_rejections.jsonl"):
        assert (tmp_path / "killed" / name).read_text() == (tmp_path / "fresh" / name).read_text(), name


@pytest.mark.parametrize("extra, message", [
    ([], "docs_dir: empty"),
    (["--docs_dir", "/nonexistent/x"], "is not a folder"),
    (["--docs_dir", "."], "teacher_url: empty"),
])
def test_cli_bad_input(extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli import main

    rc = main(["build-kg-docs", "--output_dir", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


def test_bad_pdf_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli import main

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.pdf").write_bytes(b"%PDF-1.4\nnot really a pdf")
    rc = main(["build-kg-docs", "--output_dir", str(tmp_path / "o"), "--docs_dir", str(tmp_path / "d"),
               "--teacher_url", "http://127.0.0.1:9/v1", "--graph_sources", '["curated"]'])
    err = capsys.readouterr().err
    assert rc == 2 and "x.pdf" in err and "Traceback" not in err


def test_prompt_lists_packaged_schema() -> None:
    """The extraction prompt lists every packaged relation with its types (the stage's default schema)."""
    from kg_qa_builder.documents import extraction_prompt

    schema = load_schema()
    p = extraction_prompt(schema)
    for r, spec in schema.relations.items():
        assert f"- {r}: {'/'.join(spec.domain)} -> {'/'.join(spec.range)}" in p


def test_tiny_config_validates(tmp_path: Path) -> None:
    from pipeline.core.config import load_config

    cfg = load_config(BuildKGDocsConfig, ROOT / "configs/tiny/build_kg_docs.yaml",
                      ["--docs_dir", str(tmp_path), "--teacher_url", "http://127.0.0.1:8000/v1",
                       "--output_dir", str(tmp_path / "o")])
    assert cfg.chunk_chars == 2000 and cfg.teacher_temperature == 0.0


def test_linking_grounding_and_reply_shapes(tmp_path: Path) -> None:
    """Grounding through a graph alias, teacher-written type labels, a {"triples": [...]} reply, and ids."""
    from kg_qa_builder.documents import extract_facts

    make_corpus(tmp_path)
    kg = build_graph(["curated"], [tmp_path / "base.yaml"], tmp_path / "schema.yaml")
    text = "Each vessel is usually found in the harbour area. The A380 is found in the airport area."
    chunk = Chunk("a.md", None, 0, len(text), text)
    items = [  # "ship" is not written in the span, but its graph alias "vessel" is
        {"head": "ship", "head_type": "Object type", "relation": "typically found in", "tail": "harbour",
         "tail_type": "scene context", "span": "Each vessel is usually found in the harbour area."},
        {"head": "A380", "head_type": "object_type", "relation": "typically_found_in", "tail": "airport",
         "tail_type": "scene_context", "span": "The A380 is found in the airport area."},
    ]
    facts, rej, _ = extract_facts(kg, [chunk], {"k": {"id": "k", "items": [{"triples": items}]}}, ["k"], 64)
    assert not rej, rej
    assert [(f["head_id"], f["status"]) for f in facts] == [("object_type:ship", "confirmed"), ("object_type:a380", "new")]


def test_retry_failed_asks_only_failed_chunks(tmp_path: Path) -> None:
    pl = make_corpus(tmp_path)
    with FakeDocTeacher(pl) as fake:
        run(_cfg(tmp_path, fake.url, qa_items_per_chunk=0))
        n = len(fake.users)
        run(_cfg(tmp_path, fake.url, qa_items_per_chunk=0, teacher_retry_failed=True))
        again = extraction_users(fake.users[n:])
    assert len(set(again)) == 1 and "MALFORMED" in again[0]  # only the chunk whose reply was broken JSON
