"""LRS-VQA and MME-RealWorld-RS: loaders on files generated in the published layouts, the official prompts and
scoring rules (quirks included), the official tables, and `knowzoom eval` with its resumable cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core.config import load_config
from pipeline.core.datasets import DatasetFormatError
from pipeline.core.records import Trajectory, VQASample
from pipeline.eval import benchmarks as B
from pipeline.eval.evaluate import EvalConfig
from pipeline.eval.evaluate import run as run_eval


def _img(path: Path, seed: int, size: tuple[int, int] = (300, 200)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


LRS_ROWS = [
    {"question_id": "FAIR1M_0001", "image": "LRS_VQA/image/FAIR1M_a.png", "category": "color",
     "text": "What is the color of the largest ship?\nAnswer the question using a single word or phrase.",
     "ground_truth": "red"},
    {"question_id": "FAIR1M_0002", "image": "LRS_VQA/image/FAIR1M_a.png", "category": "count",
     "text": "How many planes are there?\nAnswer the question using a single word or phrase.", "ground_truth": "3"},
    {"question_id": "FAIR1M_0003", "image": "LRS_VQA/image/FAIR1M_b.png", "category": "category",
     "text": "What kind of vehicle is parked by the gate?\nAnswer the question using a single word or phrase.",
     "ground_truth": "car"},
    {"question_id": "STAR_0004", "image": "LRS_VQA/image/STAR_c.png", "category": "count",
     "text": "How many tanks are there?\nAnswer the question using a single word or phrase.", "ground_truth": "5"},
]
MME_ROWS = [
    {"Question_id": "perception/remote_sensing/color/1", "Image": "remote_sensing/03553_Toronto.png",
     "Text": "What color is the roof of the building in the top-left corner?",
     "Answer choices": ["(A) Red", "(B) White", "(C) Green", "(D) Black", "(E) This image doesn't feature the color."],
     "Ground truth": "B", "Category": "color", "Subtask": "Remote Sensing", "Task": "Perception"},
    {"Question_id": "perception/remote_sensing/count/2", "Image": "remote_sensing/03553_Toronto.png",
     "Text": "How many cars are parked on the left?",
     "Answer choices": ["(A) 4", "(B) 6", "(C) 8", "(D) 10", "(E) The image does not feature the cars."],
     "Ground truth": "A", "Category": "count", "Subtask": "Remote Sensing", "Task": "Perception"},
    {"Question_id": "reasoning/remote_sensing/position/3", "Image": "remote_sensing/11_Vegas.png",
     "Text": "Where is the stadium relative to the river?",
     "Answer choices": ["(A) north", "(B) south", "(C) east", "(D) west", "(E) none"],
     "Ground truth": "C", "Category": "position/attribute_motion", "Subtask": "Remote Sensing", "Task": "Reasoning"},
    {"Question_id": "perception/ocr/1", "Image": "ocr/sign.png", "Text": "What does the sign say?",
     "Answer choices": ["(A) stop", "(B) go"], "Ground truth": "A", "Category": "text", "Subtask": "OCR with Complex Context",
     "Task": "Perception"},
]


@pytest.fixture()
def lrs(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "LRS_VQA").mkdir(parents=True)
    for k, name in enumerate(["FAIR1M_a", "FAIR1M_b", "STAR_c"]):
        _img(root / "LRS_VQA" / "image" / f"{name}.png", k)
    (root / "LRS_VQA" / "LRS_VQA_merged.jsonl").write_text("".join(json.dumps(r) + "\n" for r in LRS_ROWS))
    return root / "LRS_VQA" / "LRS_VQA_merged.jsonl"


@pytest.fixture()
def mme(tmp_path: Path) -> Path:
    root = tmp_path / "MME_RealWorld"
    for k, rel in enumerate(["remote_sensing/03553_Toronto.png", "remote_sensing/11_Vegas.png"]):
        _img(root / rel, 10 + k)
    (root / "MME_RealWorld.json").write_text(json.dumps(MME_ROWS))
    return root


# -- official rules ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reply,letter", [
    ("B", "B"), ("The best answer is C", "C"), ("(D) Black", "D"),
    ("A large white building sits in the corner", "A"),  # the published rule reads the first capital A-E
    ("", "A"),  # an empty reply is "in" the first choice
    ("white", "B"), ("there is no clear evidence for any of the listed options in this picture at all", ""),
    ("The best option isThe correct option is E", "E"),
])
def test_mme_extract_reproduces_the_published_rule(reply: str, letter: str) -> None:
    choices = MME_ROWS[0]["Answer choices"]
    assert B.mme_extract(reply, choices) == letter


def test_mme_prompt_and_category_keys() -> None:
    p = B.mme_prompt("Q?", ["(A) x", "(B) y"])
    assert p == ("Q? The choices are listed below: \n(A) x\n(B) y\nSelect the best answer to the above multiple-choice "
                 "question based on the image. Respond with only the letter (A, B, C, D, or E) of the correct option."
                 "\nThe best answer is:")
    assert B.mme_category("Position/Attribute_motion") == "position/attribute"
    assert B.mme_category("Color") == "color"


def test_lrs_rule_exact_lowercase_and_synonyms() -> None:
    assert B.lrs_correct("  Red\n", "red", None) and not B.lrs_correct("red ship", "red", None)
    syn = {("car", "automobile")}
    assert B.lrs_correct("Automobile", "car", lambda a, b: (a, b) in syn)
    assert not B.lrs_correct("Automobile", "car", None)


def test_wordnet_rule_follows_nltk_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in with NLTK's contract (wn.synsets(word) → synsets with path_similarity) drives the rule."""
    import sys
    import types

    class Syn:
        def __init__(self, name: str):
            self.name = name

        def path_similarity(self, other: Syn) -> float | None:
            return 1.0 if {self.name, other.name} <= {"car.n.01"} else 0.1

    wn = types.SimpleNamespace(synsets=lambda w: [Syn("car.n.01")] if w in ("car", "automobile") else [Syn(w)])
    corpus = types.ModuleType("nltk.corpus")
    corpus.wordnet = wn
    nltk = types.ModuleType("nltk")
    nltk.corpus = corpus
    monkeypatch.setitem(sys.modules, "nltk", nltk)
    monkeypatch.setitem(sys.modules, "nltk.corpus", corpus)
    are = B.wordnet_synonyms()
    assert are is not None and are("car", "automobile") and not are("car", "truck")


# -- loaders -----------------------------------------------------------------------------------------------
def test_lrs_loader_reads_the_published_layout(lrs: Path, tmp_path: Path) -> None:
    samples, raw = B.load_lrs_vqa(lrs.parent.parent, tmp_path / "w")
    assert [s.id for s in samples] == [r["question_id"] for r in LRS_ROWS]
    s = samples[0]
    assert s.qtype == "text" and s.answer == "red" and s.meta["subset"] == "FAIR1M" and s.category == "FAIR1M:color"
    assert s.meta["official_prompt"] == LRS_ROWS[0]["text"]
    assert samples[0].images == samples[1].images and len({i for x in samples for i in x.images}) == 3
    # images are hard-linked (same filesystem), not copied and not symlinked (prepare-images refuses links out)
    assert all(p.stat().st_nlink == 2 and not p.is_symlink() for p in raw.iterdir())


def test_mme_loader_keeps_only_remote_sensing(mme: Path, tmp_path: Path) -> None:
    samples, _ = B.load_mme_rs(mme, tmp_path / "w")
    assert [s.id for s in samples] == [r["Question_id"] for r in MME_ROWS[:3]]
    assert samples[2].category == "Reasoning:position:attribute" and samples[0].choices[4].startswith("(E)")
    from pipeline.core.datasets import official_prompt

    assert official_prompt(samples[0]) == B.mme_prompt(MME_ROWS[0]["Text"], MME_ROWS[0]["Answer choices"])


@pytest.mark.parametrize("bad,needle", [({"Ground truth": "Z"}, "not one of the choice letters"),
                                        ({"Answer choices": "A"}, "list of >= 2"), ({"Task": None}, None)])
def test_mme_malformed_items_are_named(mme: Path, tmp_path: Path, bad: dict, needle: str | None) -> None:
    rows = [dict(MME_ROWS[0])]
    if needle is None:
        rows[0].pop("Task")
        needle = "missing MME-RealWorld fields"
    else:
        rows[0].update(bad)
    (mme / "MME_RealWorld.json").write_text(json.dumps(rows))
    with pytest.raises(DatasetFormatError, match=f"MME_RealWorld.json item 0: .*{needle}"):
        B.load_mme_rs(mme, tmp_path / "w")


def test_lrs_malformed_line_is_named(lrs: Path, tmp_path: Path) -> None:
    lines = lrs.read_text().splitlines()
    lines[1] = json.dumps({k: v for k, v in LRS_ROWS[1].items() if k != "ground_truth"})
    lrs.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetFormatError, match="LRS_VQA_merged.jsonl line 2: missing LRS-VQA fields"):
        B.load_lrs_vqa(lrs, tmp_path / "w")


# -- end to end: knowzoom eval ------------------------------------------------------------------------------
class ReplyBackend:
    """Replies per question: looks up which question the user turn carries; counts the calls."""

    def __init__(self, replies: dict[str, str]):
        self.replies = replies
        self.calls = 0
        self.prompts: list[str] = []

    def generate(self, conversations, images, *, max_new_tokens, temperature, top_p, stop, seeds=None):
        out = []
        for conv in conversations:
            self.calls += 1
            text = "\n".join(c["text"] for m in conv if m["role"] == "user" for c in
                             (m["content"] if isinstance(m["content"], list) else [{"text": m["content"]}])
                             if c.get("text"))
            self.prompts.append(text)
            out.append(next(r for q, r in self.replies.items() if q in text))
        return out


def _eval(tmp_path: Path, dataset: str, path: Path, out: str, **kw) -> EvalConfig:
    base = {"output_dir": str(tmp_path / out), "dataset": dataset, "dataset_path": str(path), "protocol": "direct",
            "viewer_max_items": 2, "xlrs_images_dir": str(tmp_path / "imgs")}
    base.update(kw)
    return load_config(EvalConfig, None, base)


def test_eval_lrs_vqa_official_and_strict(lrs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(B, "wordnet_synonyms", lambda: (lambda a, b: {a, b} == {"car", "automobile"}))
    replies = {"largest ship": "Red", "planes": "3", "vehicle": "Automobile", "tanks": "four"}
    be = ReplyBackend(replies)
    summary = run_eval(_eval(tmp_path, "lrs_vqa", lrs, "e"), backend=be)
    assert be.prompts[0] == LRS_ROWS[0]["text"]  # the official prompt: the text as given
    res = json.loads((tmp_path / "e" / "results.json").read_text())
    off = res["official"]
    assert off["scoring"] == {"rule": "official", "synonyms": "wordnet"}
    assert off["subsets"]["FAIR1M"]["OA"] == pytest.approx(100.0) and off["subsets"]["STAR"]["OA"] == 0.0
    assert summary["pass@1_micro"] == pytest.approx(0.75)
    assert "LRS-VQA: official scoring" in (tmp_path / "e" / "results.md").read_text()
    # the same items with our strict verifier: "Automobile" is not "car"
    be2 = ReplyBackend(replies)
    s2 = run_eval(_eval(tmp_path, "lrs_vqa", lrs, "e2", benchmark_scoring="strict"), backend=be2)
    assert s2["pass@1_micro"] == pytest.approx(0.5)


def test_eval_mme_rs_official_with_pass_at_k_and_resume(mme: Path, tmp_path: Path) -> None:
    replies = {"roof": "The best answer is B", "cars are parked": "A large car park; I count 6",
               "stadium": "(C) east"}
    be = ReplyBackend(replies)
    cfg = _eval(tmp_path, "mme_rs", mme, "m", n_samples=2, pass_k=[1, 2], sample_temperature=1.0)
    summary = run_eval(cfg, backend=be)
    assert be.prompts[0].endswith("The best answer is:") and "The choices are listed below: \n(A) Red\n" in be.prompts[0]
    res = json.loads((tmp_path / "m" / "results.json").read_text())
    off = res["official"]
    # "A large car park; I count 6" reads as A under the published rule, which is the ground truth here
    assert off["tasks"]["Perception"]["acc"] == pytest.approx(100.0)
    assert off["tasks"]["Reasoning"]["subtasks"]["Remote Sensing"]["categories"] == {"position/attribute":
                                                                                      {"acc": 100.0, "n": 1}}
    assert off["overall"] == pytest.approx(100.0) and summary["pass@1_micro"] == pytest.approx(1.0)
    assert res["metrics"]["overall"]["pass@2_micro"] == pytest.approx(1.0)
    # strict verifier on the same replies: the count reply is a parse failure, not an A
    calls = be.calls
    again = run_eval(cfg, backend=be)  # resumable cache: nothing regenerated
    assert be.calls == calls and again["pass@1_micro"] == summary["pass@1_micro"]


def test_rescore_keeps_the_strict_verdict() -> None:
    s = VQASample(id="q", images=["i"], question="Q", answer="B", qtype="single", choices=["(A) x", "(B) y"],
                  meta={"task": "Perception", "subtask": "Remote Sensing", "category": "color"})
    t = Trajectory(sample_id="q", messages=[], final_text="Because B", correct=False)
    B.rescore("mme_rs", [s], [{"q": t}], "direct")
    assert t.correct and t.meta["strict_correct"] is False and t.prediction == "B"
