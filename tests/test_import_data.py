"""`knowzoom import-data` on files generated here in each published layout (names, nesting, image encodings),
including malformed rows; resumable and bit-identical; images prepared once."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main as cli_main
from pipeline.core.datasets import DatasetFormatError
from pipeline.core.records import TextQA, VQASample, read_jsonl
from pipeline.importers import ImportDataConfig, classify, run, split_reply


def _webp(seed: int, size: int = 96) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="WEBP")
    return buf.getvalue()


def _png(seed: int, size: int = 96) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(seed: int, size: int = 96) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


# -- the three layouts ------------------------------------------------------------------------------------
TBV_ROWS = [
    {"messages": [{"role": "user", "content": "Which index uses the near-infrared and red bands?\n(A) NDWI\n"
                                              "(B) NDVI\n(C) NBR\n(D) NDSI"},
                  {"role": "assistant", "content": "<think>NDVI contrasts NIR reflectance with red absorption by "
                                                   "chlorophyll.\nSo it uses NIR and red.</think><answer>B</answer>"}],
     "images": []},
    {"messages": [{"role": "system", "content": "You are an Earth-science expert."},
                  {"role": "user", "content": "True or false: permafrost is ground frozen for two or more years."},
                  {"role": "assistant", "content": "By definition permafrost stays frozen at least two consecutive "
                                                   "years.\n\nThe answer is true."}]},
    {"messages": [{"role": "user", "content": "Fill in the blank: the Köppen code for a tropical rainforest is ___."},
                  {"role": "assistant", "content": "Tropical, no dry season: group A, precipitation f.\n\nAf"}]},
    {"messages": [{"role": "user", "content": "Why do coastal fogs form over cold currents?"},
                  {"role": "assistant", "content": "Warm moist air moves over cold water and cools to its dew "
                                                   "point, so water vapour condenses near the surface."}]},
]
TBV_FROM_VALUE = [{"conversations": [{"from": "human", "value": "Is basalt an igneous rock?"},
                                     {"from": "gpt", "value": "<think>It forms from lava.</think><answer>yes</answer>"}]}]


def make_tbv(d: Path, malformed: bool = False) -> Path:
    rows = list(TBV_ROWS)
    if malformed:
        rows.insert(2, {"msgs": []})
    (d / "text_148k_sft.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    (d / "extra.jsonl").write_text("\n".join(json.dumps(r) for r in TBV_FROM_VALUE) + "\n", encoding="utf-8")
    return d


def make_geollava(d: Path, malformed: bool = False) -> Path:
    """LLaVA raw format under an image folder + one sharegpt row (TBV's geollava_superrs.json style)."""
    img = d / "jpg_images"
    (img / "sub").mkdir(parents=True)
    (img / "sub" / "P0001.jpg").write_bytes(_jpeg(1))
    (img / "P0002.png").write_bytes(_png(2))
    rows = [
        {"id": "P0001_q1", "image": "sub/P0001.jpg",
         "conversations": [{"from": "human", "value": "<image>\nWhat colour is the roof of the largest building?\n"
                                                      "A. red\nB. blue\nC. green\nD. white\nAnswer with the option's "
                                                      "letter from the given choices directly."},
                           {"from": "gpt", "value": "B"},
                           {"from": "human", "value": "How many ships are docked?"},
                           {"from": "gpt", "value": "12"}]},
        {"id": "P0002_q1", "image": "P0002.png",
         "conversations": [{"from": "human", "value": "<image>\nDescribe the scene."},
                           {"from": "gpt", "value": "A dense residential district with narrow streets, a river "
                                                    "crossing from north to south and two bridges."}]},
        {"id": "b64_q", "image": base64.b64encode(_png(3, 300)).decode(),
         "conversations": [{"from": "human", "value": "<image>\nIs there a runway?"}, {"from": "gpt", "value": "No."}]},
        {"id": "webp_q", "image": "data:image/webp;base64," + base64.b64encode(_webp(4)).decode(),
         "conversations": [{"from": "human", "value": "<image>\nHow many pools?"}, {"from": "gpt", "value": "2"}]},
        {"messages": [{"role": "user", "content": "<image>Which side of the river is the stadium on?\n(A) east\n(B) west"},
                      {"role": "assistant", "content": "(A) east"}],
         "images": ["jpg_images/sub/P0001.jpg"]},
    ]
    if malformed:
        rows.insert(1, {"id": "bad", "image": "missing.jpg",
                        "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}]})
    (d / "ft3_whole_shuffle.json").write_text(json.dumps(rows), encoding="utf-8")
    return d


def make_deepeyes(d: Path, malformed: bool = False) -> Path:
    """Two shards with DeepEyes' parquet nesting: prompt list<struct<content, role>>, images
    list<struct<bytes, path>>, reward_model struct<ground_truth, style>, extra_info struct<...>."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def row(i: int, source: str, question: str, gt: str | None, n_images: int = 1) -> dict:
        return {
            "data_source": source,
            "prompt": [{"content": "You are a helpful assistant with a zoom tool.", "role": "system"},
                       {"content": "<image>\n" + question + "\nThink first, call image_zoom_in_tool if needed, "
                                   "then answer.", "role": "user"}],
            "images": [{"bytes": _jpeg(100 + i + k), "path": f"img_{i}_{k}.jpg"} for k in range(n_images)],
            "ability": "vl_chart" if source == "chart" else "vl_visual_search",
            "env_name": "visual_toolbox_v2",
            "reward_model": {"ground_truth": gt, "style": "model"},
            "extra_info": {"answer": gt, "index": i, "question": question, "split": "train"},
        }

    shard1 = [
        row(0, "vstar", "What is the color of the umbrella?\n(A) red\n(B) yellow\n(C) blue\n(D) black", "C"),
        row(1, "vstar", "Is the woman to the left or to the right of the man?", "The woman is to the left of the man "
                                                                                "who is holding the camera."),
        row(2, "vstar", "What colour is the bus?", "red"),
    ]
    shard2 = [
        row(3, "chart", "What is the value of the tallest bar?", "1,250", n_images=1),
        row(4, "thinklite_eureka", "Is the triangle isosceles?", "Yes"),
        row(5, "chart", "Which option is the trend?\n(A) rising\n(B) falling", "E"),
    ]
    if malformed:
        shard2.insert(1, row(9, "chart", "Broken row", None))
    schema = pa.schema([
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
        ("ability", pa.string()),
        ("env_name", pa.string()),
        ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
        ("extra_info", pa.struct([("answer", pa.string()), ("index", pa.int64()), ("question", pa.string()),
                                  ("split", pa.string())])),
    ])
    pq.write_table(pa.Table.from_pylist(shard1, schema=schema), d / "data_0.1.2_visual_toolbox_v2.parquet")
    pq.write_table(pa.Table.from_pylist(shard2, schema=schema), d / "data_v0.8_visual_toolbox_v2.parquet")
    return d


def _cfg(fmt: str, src: Path, out: Path, **kw) -> ImportDataConfig:
    return ImportDataConfig(format=fmt, path=str(src), output_dir=str(out), progress=False, **kw)


# -- answers ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("question,answer,qtype,truth", [
    ("Q?\n(A) x\n(B) y", "B", "single", "B"), ("Q?\nA. x\nB. y\nC. z", "(C) z", "single", "C"),
    ("Q?\n(A) x\n(B) y\n(C) z", "A, C", "multi", "AC"), ("Q?\n(A) x\n(B) y\n(C) z", "CA", "multi", "AC"), ("Q?\n(A) cat\n(B) dog", "dog", "single", "B"),
    ("Is it?", "Yes.", "tf", "true"), ("How many?", "1,250", "numeric", "1250"), ("Colour?", "dark red", "text", "dark red"),
])
def test_classify_to_strict_types(question: str, answer: str, qtype: str, truth: str) -> None:
    p = classify(question, answer, max_text_words=5)
    assert not isinstance(p, str) and (p.qtype, p.answer) == (qtype, truth)


def test_classify_rejects_what_a_strict_verifier_cannot_score() -> None:
    assert "free-form" in classify("Where?", "It is on the left side of the large building.", max_text_words=5)
    assert "none of the options" in classify("Q?\n(A) x\n(B) y", "E", max_text_words=5)


def test_split_reply_separates_rationale_and_answer() -> None:
    assert split_reply("<think>a\nb</think><answer>B</answer>") == (["a", "b"], "B", "tag")
    steps, ans, how = split_reply("step one.\n\nThe answer is true.")
    assert ans == "true" and how == "marker" and steps == ["step one."]
    assert split_reply("reasoning\n\nAf")[1:] == ("Af", "last_paragraph")


# -- formats ---------------------------------------------------------------------------------------------------
def test_tbv_text_to_textqa(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    src = make_tbv(tmp_path / "src")
    r = run(_cfg("tbv-text", src, tmp_path / "out"))
    assert r["records"] == 5 and r["rejected"] == 0
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "x.json").write_text(json.dumps([{**TBV_ROWS[0], "images": ["a.png"]}]))
    with pytest.raises(DatasetFormatError, match="x.json row 0: has images"):
        run(_cfg("tbv-text", tmp_path / "img", tmp_path / "out_img"))
    qas = list(read_jsonl(tmp_path / "out" / "text_qa.jsonl", TextQA))
    by_type = {q.qtype: q for q in qas}
    assert set(by_type) == {"mcq", "tf", "fill", "free"}
    mcq = by_type["mcq"]
    assert mcq.answer == "B" and mcq.choices[1] == "(B) NDVI" and "NIR" in mcq.rationale[0]
    assert mcq.question == "Which index uses the near-infrared and red bands?"
    assert by_type["fill"].answer == "Af" and by_type["tf"].answer in ("true",)
    basalt = next(q for q in qas if q.meta["row"] == "extra.jsonl row 0")  # the from/value layout is read too
    assert basalt.qtype == "tf" and basalt.answer == "true" and basalt.rationale == ["It forms from lava."]
    # the records feed the text cold start as they are
    from sft.data import text_qa_messages

    assert text_qa_messages(mcq)[-1]["content"].endswith("<answer>B</answer>")


def test_geollava_llava_and_sharegpt_layouts(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    src = make_geollava(tmp_path / "src")
    r = run(_cfg("superrs-vqa", src / "ft3_whole_shuffle.json", tmp_path / "out", image_root=str(src / "jpg_images")))
    samples = {s.id: s for s in read_jsonl(tmp_path / "out" / "vqa.jsonl", VQASample)}
    assert samples["P0001_q1.0"].qtype == "single" and samples["P0001_q1.0"].answer == "B"
    assert samples["P0001_q1.0"].choices == ["(A) red", "(B) blue", "(C) green", "(D) white"]
    assert samples["P0001_q1.1"].qtype == "numeric" and samples["P0001_q1.1"].answer == "12"
    assert samples["b64_q"].qtype == "tf" and samples["b64_q"].answer == "false"
    sharegpt = samples["ft3_whole_shuffle-4"]
    assert sharegpt.answer == "A" and sharegpt.images == samples["P0001_q1.0"].images  # same image, stored once
    assert r["rejected"] == 1 and r["rejections_by_reason"] == {"free-form answer (LLM judge needed)": 1}
    rej = [json.loads(x) for x in (tmp_path / "out" / "rejections.jsonl").read_text().splitlines()]
    assert rej[0]["id"] == "P0002_q1" and "LLM judge" in rej[0]["reason"]
    # every image went through prepare-images once and the store opens it
    from tools.store import ImageStore

    store = ImageStore.from_manifest(tmp_path / "out" / "images" / "images.jsonl")
    for s in samples.values():
        for i in s.images:
            assert store.info(i).width in (96, 300)
    assert r["images_missing"] == []
    # keep_free_form keeps the description as an (unscored) text record
    r2 = run(_cfg("superrs-vqa", src / "ft3_whole_shuffle.json", tmp_path / "out2",
                  image_root=str(src / "jpg_images"), keep_free_form=True, prepare_images=False))
    assert r2["rejected"] == 0 and r2["records"] == 6


def test_deepeyes_parquet_with_its_own_answer_types_and_rejections(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    src = make_deepeyes(tmp_path / "src")
    r = run(_cfg("deepeyes-47k", src, tmp_path / "out"))
    samples = list(read_jsonl(tmp_path / "out" / "vqa.jsonl", VQASample))
    kinds = {(s.category, s.qtype, s.answer) for s in samples}
    assert kinds == {("vstar", "single", "C"), ("vstar", "text", "red"), ("chart", "numeric", "1250"),
                     ("thinklite_eureka", "tf", "true")}
    assert samples[0].question.startswith("What is the color of the umbrella?")
    assert samples[0].meta["index"] == 0 and samples[0].meta["env_name"] == "visual_toolbox_v2"
    assert r["rows"] == 6 and r["records"] == 4 and r["rejected"] == 2
    assert r["rejections_by_source"] == {"chart": 1, "vstar": 1}
    assert r["rejections_by_reason"] == {"answer names no option": 1, "free-form answer (LLM judge needed)": 1}
    # the strict verifier scores every kept record's own answer as right and a wrong one as wrong
    from rl.verifier import verify_sample

    for s in samples:
        assert verify_sample(f"<answer>{s.answer}</answer>", s).correct
        assert not verify_sample("<answer>D</answer>" if s.choices else "<answer>zzz 999</answer>", s).correct


# -- malformed rows -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,maker,needle", [
    ("tbv-text", make_tbv, "text_148k_sft.json row 2"),
    ("superrs-vqa", make_geollava, "ft3_whole_shuffle.json row 1"),
    ("deepeyes-47k", make_deepeyes, "data_v0.8_visual_toolbox_v2.parquet row 1"),
])
def test_malformed_rows_name_file_and_row_or_are_reported(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                          fmt: str, maker, needle: str) -> None:
    (tmp_path / "src").mkdir()
    src = maker(tmp_path / "src", malformed=True)
    kw = {"image_root": str(src / "jpg_images")} if fmt == "superrs-vqa" else {}
    with pytest.raises(DatasetFormatError, match=needle):
        run(_cfg(fmt, src, tmp_path / "out", **kw))
    # the command: one clear line, non-zero exit, no traceback
    args = ["import-data", "--format", fmt, "--path", str(src), "--output_dir", str(tmp_path / "cli"),
            "--progress", "false"] + (["--image_root", kw["image_root"]] if kw else [])
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    r = run(_cfg(fmt, src, tmp_path / "skip", on_error="skip", prepare_images=False, **kw))
    assert r["rejections_by_reason"].get("malformed") == 1
    rej = [json.loads(x) for x in (tmp_path / "skip" / "rejections.jsonl").read_text().splitlines()]
    assert any(needle in x["row"] and x["reason"].startswith("malformed") for x in rej)


def test_bad_config_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["import-data", "--format", "nope", "--path", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "format: 'nope' unknown" in err and "does not exist" in err


# -- resumable and bit-identical ----------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,maker", [("deepeyes-47k", make_deepeyes), ("tbv-text", make_tbv)])
def test_resume_skips_done_rows_and_is_bit_identical(tmp_path: Path, fmt: str, maker) -> None:
    (tmp_path / "src").mkdir()
    src = maker(tmp_path / "src")
    name = "text_qa.jsonl" if fmt == "tbv-text" else "vqa.jsonl"
    full = run(_cfg(fmt, src, tmp_path / "full", prepare_images=False))
    # an interrupted run: first rows only, then a kill mid-line
    run(_cfg(fmt, src, tmp_path / "part", prepare_images=False, limit=3))
    with (tmp_path / "part" / name).open("a") as f:
        f.write('{"id": "half-writ')
    again = run(_cfg(fmt, src, tmp_path / "part", prepare_images=False))
    assert again["skipped_existing"] >= 1 and again["records"] == full["records"] - again["skipped_existing"]
    for f in (name, "rejections.jsonl"):
        assert (tmp_path / "part" / f).read_bytes() == (tmp_path / "full" / f).read_bytes()
    raw_full = sorted(p.name for p in (tmp_path / "full" / "raw").iterdir())
    assert raw_full == sorted(p.name for p in (tmp_path / "part" / "raw").iterdir())
    # a third run writes nothing new
    third = run(_cfg(fmt, src, tmp_path / "part", prepare_images=False))
    assert third["records"] == 0 and (tmp_path / "part" / name).read_bytes() == (tmp_path / "full" / name).read_bytes()


def test_json_formats_also_read_the_hubs_parquet_conversion(tmp_path: Path) -> None:
    """The HF hub's refs/convert/parquet copy of the sharegpt rows (messages list<struct<role, content>>)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "src" / "default" / "train").mkdir(parents=True)
    rows = [{"messages": r["messages"]} for r in TBV_ROWS]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "src" / "default" / "train" / "0000.parquet")
    r = run(_cfg("tbv-text", tmp_path / "src", tmp_path / "out"))
    assert r["records"] == 4 and r["rows"] == 4
    qas = list(read_jsonl(tmp_path / "out" / "text_qa.jsonl", TextQA))
    assert qas[0].meta["row"] == "0000.parquet row 0" and qas[0].answer == "B"
