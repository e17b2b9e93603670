"""XLRS-Bench-lite loader on files built here in the published format (parquet and JSON per question)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core.datasets import (
    XLRS_SUBTASKS,
    DatasetFormatError,
    load_vqa_jsonl,
    load_xlrs,
    official_prompt,
    save_vqa_jsonl,
    subtask_name,
)
from pipeline.core.errors import DatasetNotFoundError
from pipeline.core.records import VQASample

OPTS = ["(A) Red", "(B) Blue", "(C) Green", "(D) White"]


def _png(seed: int, size: int = 64, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def xlrs_rows() -> list[dict]:
    """Rows as published: OLUC multi-answer, a bi-temporal change-detection question, shared images."""
    return [
        {"index": 0, "question": "What color is the ship near the dock?", "multi-choice options": OPTS,
         "answer": "C", "category": "Object properties/Object color", "l2-category": "Perception/Attribute",
         "path": "P0001.png", "image": [{"bytes": _png(1), "path": "P0001.png"}]},
        {"index": 1, "question": "Which land-use types are present?",
         "multi-choice options": ["(A) Farmland", "(B) Forest", "(C) Urban", "(D) Water"],
         "answer": "AC", "category": "Land use classification/Overall Land use classification",
         "l2-category": "Perception/Land use", "path": "P0001.png",
         "image": [{"bytes": _png(1), "path": "P0001.png"}]},
        {"index": 2, "question": "How many new buildings appeared?",
         "multi-choice options": ["(A) 1", "(B) 2", "(C) 3", "(D) 4"], "answer": "B",
         "category": "Counting/Counting with changing detection", "l2-category": "Reasoning/Change",
         "path": "T1_0007.jpg",
         "image": [{"bytes": _png(2, fmt="JPEG"), "path": "T1_0007.jpg"},
                   {"bytes": _png(3, fmt="JPEG"), "path": "T2_0007.jpg"}]},
    ]


def write_parquet(folder: Path, rows: list[dict]) -> Path:
    import datasets

    feats = datasets.Features({
        "index": datasets.Value("int64"),
        "question": datasets.Value("string"),
        "multi-choice options": datasets.Sequence(datasets.Value("string")),
        "answer": datasets.Value("string"),
        "category": datasets.Value("string"),
        "l2-category": datasets.Value("string"),
        "path": datasets.Value("string"),
        "image": datasets.Sequence(datasets.Image()),
    })
    ds = datasets.Dataset.from_list(rows, features=feats)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "data" / "train-00000-of-00001.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(out))
    return folder


def write_json_layout(folder: Path, rows: list[dict]) -> Path:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for r in rows:
        names = []
        for im in r["image"]:
            (folder / "images" / im["path"]).write_bytes(im["bytes"])
            names.append(im["path"])
        d = {k: v for k, v in r.items() if k != "image"}
        d["image"] = names
        (folder / f"{r['index']}.json").write_text(json.dumps(d))
    return folder


@pytest.mark.parametrize("layout", ["parquet", "json"])
def test_load_xlrs_layouts(tmp_path, layout):
    rows = xlrs_rows()
    root = (write_parquet if layout == "parquet" else write_json_layout)(tmp_path / "xlrs", rows)
    samples, raw = load_xlrs(root, tmp_path / "work")
    by_id = {s.id: s for s in samples}
    assert set(by_id) == {"0", "1", "2"}
    assert by_id["0"].qtype == "single" and by_id["0"].answer == "C" and by_id["0"].choices == OPTS
    assert by_id["1"].qtype == "multi" and by_id["1"].answer == "AC"
    assert by_id["2"].images == ["T1_0007", "T2_0007"]  # two images for change detection
    assert by_id["0"].images == by_id["1"].images == ["P0001"]  # shared image written once
    assert by_id["0"].l2_category == "Perception/Attribute"
    assert by_id["2"].meta["subtask"] == "RCCD"
    files = sorted(p.name for p in raw.iterdir())
    assert files == ["P0001.png", "T1_0007.jpg", "T2_0007.jpg"]
    assert (raw / "P0001.png").read_bytes() == rows[0]["image"][0]["bytes"]


def test_filters_and_limit(tmp_path):
    root = write_parquet(tmp_path / "xlrs", xlrs_rows())
    samples, _ = load_xlrs(root, tmp_path / "w", categories=["OLUC"])
    assert [s.id for s in samples] == ["1"]
    samples, _ = load_xlrs(root, tmp_path / "w", limit=2)
    assert len(samples) == 2


def test_name_clash_gets_a_hash_suffix(tmp_path):
    rows = xlrs_rows()[:1] + [dict(xlrs_rows()[0], index=5, image=[{"bytes": _png(9), "path": "P0001.png"}])]
    samples, raw = load_xlrs(write_parquet(tmp_path / "x", rows), tmp_path / "w")
    assert samples[0].images == ["P0001"] and samples[1].images[0].startswith("P0001_")
    assert len(list(raw.iterdir())) == 2


def test_official_prompt_snapshot(tmp_path):
    samples, _ = load_xlrs(write_parquet(tmp_path / "x", xlrs_rows()), tmp_path / "w")
    by_id = {s.id: s for s in samples}
    assert official_prompt(by_id["0"]) == (
        "What color is the ship near the dock?The choices are listed below:\n(A) Red\n(B) Blue\n(C) Green\n"
        "(D) White\n\nSelect the best answer for the multiple-choice question based on the image. Only respond "
        "with the letter corresponding to the correct answer (A, B, C, D).\nThe answer is:"
    )
    assert official_prompt(by_id["1"]).endswith("with multiple choices separated by spaces.The answer(s) is(are):")


def test_official_prompt_never_depends_on_the_key():
    """lmms-eval picks the instruction by category: a two-letter key elsewhere keeps the single instruction,
    and the land-use category keeps the multi one whatever its key."""
    from pipeline.core.datasets import MULTI_ANSWER_CATEGORY

    base = dict(id="q", images=["i"], question="Q?", choices=["(A) x", "(B) y", "(C) z"])
    colour = "Object properties/Object color"
    prompts = {official_prompt(VQASample(**base, answer=key, qtype=qt, category=colour))
               for key, qt in (("A", "single"), ("AC", "multi"), ("BC", "multi"))}
    assert len(prompts) == 1 and prompts.pop().endswith("The answer is:")
    multi = {official_prompt(VQASample(**base, answer=key, qtype=qt, category=MULTI_ANSWER_CATEGORY))
             for key, qt in (("A", "single"), ("AC", "multi"))}
    assert len(multi) == 1 and multi.pop().endswith("The answer(s) is(are):")


def test_bad_inputs_raise_typed_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="cannot be downloaded"):
        load_xlrs(tmp_path / "missing", tmp_path / "w")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError):
        load_xlrs(tmp_path / "empty", tmp_path / "w")
    bad = xlrs_rows()[:1]
    bad[0] = {k: v for k, v in bad[0].items() if k != "answer"}
    root = write_json_layout(tmp_path / "j", bad)
    with pytest.raises(DatasetFormatError, match="missing XLRS-Bench fields"):
        load_xlrs(root, tmp_path / "w")
    (tmp_path / "j2").mkdir()
    (tmp_path / "j2" / "0.json").write_text("{not json")
    with pytest.raises(DatasetFormatError, match="not valid JSON"):
        load_xlrs(tmp_path / "j2", tmp_path / "w")
    (tmp_path / "j3").mkdir()
    (tmp_path / "j3" / "0.json").write_text(json.dumps(dict(xlrs_rows()[0], image=["nope.png"])))
    with pytest.raises(DatasetNotFoundError, match="nope.png"):
        load_xlrs(tmp_path / "j3", tmp_path / "w")


def test_subtask_names_cover_13():
    assert len(XLRS_SUBTASKS) == 13
    assert subtask_name("Object properties/Object color") == "OCL"
    assert subtask_name("Ours/Colour") == "Colour"


def test_our_jsonl_roundtrip(tmp_path):
    samples, _ = load_xlrs(write_parquet(tmp_path / "x", xlrs_rows()), tmp_path / "w")
    save_vqa_jsonl(tmp_path / "s.jsonl", samples)
    back = load_vqa_jsonl(tmp_path / "s.jsonl")
    assert [s.id for s in back] == ["0", "1", "2"] and back[1].answer == "AC"
    assert len(load_vqa_jsonl(tmp_path / "s.jsonl", limit=1)) == 1
