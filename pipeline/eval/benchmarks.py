"""Evaluation sets beyond XLRS-Bench: LRS-VQA and MME-RealWorld's remote-sensing subset, each read from a local
copy in its published layout, with its official prompt and scoring rule (reproduced as published, quirks
included, so numbers compare with the papers) next to our strict verifier.

LRS-VQA (HF `ll-13/LRS-VQA`; code VisionXLab/LRS-VQA): `LRS_VQA/LRS_VQA_merged.jsonl`, one question per line with
`question_id`, `image` (a path under the folder that holds `LRS_VQA/`, e.g. "LRS_VQA/image/…"), `text`,
`ground_truth`, `category` (`LRS-VQA-Code/eval_lrs_vqa.sh`, `Script/llava_eval_LRSVQA.py`).
- Prompt (`Script/llava_eval_LRSVQA.py`): the image, then `text` as given; greedy decoding.
- Scoring (`Script/evaluation_LRSVQA.py`): the stripped, lower-cased reply equals the lower-cased ground truth,
  or the two are WordNet synonyms (any synset pair with path similarity > 0.8, NLTK). Items are grouped by
  sub-set (the id's prefix before the first "_": FAIR1M, GLH-Bridge, STAR) and each reports OA (correct / all)
  and AA (mean of per-category accuracies). The synonym rule needs NLTK's WordNet data; without it only the
  exact rule runs and the result says so (`synonyms: "unavailable"`, a lower bound of the official score).
MME-RealWorld (HF `yifanzhang114/MME-RealWorld`; code yfzhang114/MME-RealWorld): `MME_RealWorld.json` (or the
remote-sensing file `MME_RealWorld_RS.json` LRS-VQA's scripts read), a JSON list of `Question_id`, `Image` (path
under the dataset folder, e.g. "remote_sensing/…"), `Text`, `Answer choices` (["(A) …", …]), `Ground truth`
(a letter), `Category`, `Subtask` ("Remote Sensing" here), `Task` ("Perception" / "Reasoning").
- Prompt (`evaluation/model_vqa_mme_real_world.py`): image, `Text`, " The choices are listed below: \\n", each
  choice + "\\n", "Select the best answer to the above multiple-choice question based on the image. Respond with
  only the letter (A, B, C, D, or E) of the correct option.", "\\nThe best answer is:".
- Scoring (`evaluation/eval_your_results.py`, `extract_characters_regex`): some answer prefixes are deleted
  (two pairs of them are fused by missing commas in the original list, reproduced), a reply of more than 10
  words without any of A-E scores nothing, else the first A-E character anywhere in the reply is the answer
  (so "A large ship…" reads as A), else the first choice containing the reply (an empty reply matches the first
  choice). Accuracy per category (lower-cased; every "…/attribute…" category merged to "<group>/attribute"),
  per sub-task and task (micro), and overall.
With the zoom protocol the rules apply to the final answer our protocol extracts (`<answer>…</answer>`), or to the
whole last reply when it has none.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.core.datasets import DatasetFormatError
from pipeline.core.errors import DatasetNotFoundError
from pipeline.core.records import Trajectory, VQASample

BENCHMARKS = ("lrs_vqa", "mme_rs")
LRS_FIELDS = ("question_id", "image", "text", "ground_truth", "category")
MME_FIELDS = ("Question_id", "Image", "Text", "Answer choices", "Ground truth", "Category", "Subtask", "Task")
MME_SUBTASK = "Remote Sensing"
MME_CHOICE_PROMPT = " The choices are listed below: \n"
MME_TEST_PROMPT = ("Select the best answer to the above multiple-choice question based on the image. Respond with "
                   "only the letter (A, B, C, D, or E) of the correct option.")
MME_POST = "\nThe best answer is:"
# the official prefix list; two commas are missing in the original, which fuses those pairs (kept as published)
_MME_PREFIXES = ["The best answer is", "The correct answer is", "The answer is", "The answer",
                 "The best option is" "The correct option is", "Best answer:" "Best option:"]
PROMPT_TEXT = MME_CHOICE_PROMPT + MME_TEST_PROMPT + MME_POST + "|lrs:text-as-given"
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


# -- prompts ----------------------------------------------------------------------------------------------
def mme_prompt(question: str, choices: list[str]) -> str:
    """MME-RealWorld's official question text (the image comes before it)."""
    return question + MME_CHOICE_PROMPT + "".join(c + "\n" for c in choices) + MME_TEST_PROMPT + MME_POST


# -- official scoring ---------------------------------------------------------------------------------------
def mme_extract(reply: str, choices: list[str]) -> str:
    """MME-RealWorld's `extract_characters_regex`, as published."""
    s = reply.strip()
    for p in _MME_PREFIXES:
        s = s.replace(p, "")
    if len(s.split()) > 10 and not re.search("[ABCDE]", s):
        return ""
    m = re.search(r"[ABCDE]", s)
    if m is None:
        for choice in choices:
            if s.lower() in choice.lower():
                return choice[1]
        return ""
    return m[0]


def mme_category(category: str) -> str:
    """The official category key: lower-cased, "…attribute…" merged to "<group>/attribute"."""
    c = category.lower()
    return c.split("/")[0] + "/attribute" if "attribute" in c else c


def wordnet_synonyms() -> Callable[[str, str], bool] | None:
    """LRS-VQA's `are_synonyms` on NLTK's WordNet, or None when NLTK or its WordNet data is not installed."""
    try:
        from nltk.corpus import wordnet as wn

        wn.synsets("dog")
    except Exception:  # noqa: BLE001 - ImportError or LookupError (no corpus): the rule is unavailable
        return None

    def are_synonyms(a: str, b: str) -> bool:
        for s1 in wn.synsets(a):
            for s2 in wn.synsets(b):
                sim = s1.path_similarity(s2)
                if sim is not None and sim > 0.8:
                    return True
        return False

    return are_synonyms


def lrs_correct(reply: str, ground_truth: str, synonyms: Callable[[str, str], bool] | None) -> bool:
    """LRS-VQA's rule: exact lower-cased match of the stripped reply, else WordNet synonyms."""
    gt, ans = str(ground_truth).lower(), reply.strip().lower()
    if gt == ans:
        return True
    return bool(synonyms and synonyms(gt, ans))


def _final_answer(t: Trajectory, protocol: str) -> str:
    """What the official rule reads: the whole reply (direct protocol), else our protocol's final answer."""
    text = t.final_text if not t.truncated else ""
    if protocol == "direct":
        return text.strip()
    from rl.verifier import extract_answer

    got = extract_answer(text, allow_bare=False)
    return (got if got is not None else text).strip()


def rescore(dataset: str, samples: list[VQASample], runs: list[dict[str, Any]], protocol: str) -> dict[str, Any]:
    """Score every trajectory with the benchmark's official rule (in place: `correct`, `prediction`; the strict
    verifier's verdict is kept in `meta.strict_correct`). `runs` are {sample id: trajectory or [trajectories]}."""
    by_id = {s.id: s for s in samples}
    syn = wordnet_synonyms() if dataset == "lrs_vqa" else None
    for run in runs:
        for sid, ts in run.items():
            s = by_id.get(sid)
            if s is None:
                continue
            for t in ts if isinstance(ts, list) else [ts]:
                if t.error is not None:
                    continue
                t.meta.setdefault("strict_correct", bool(t.correct))
                ans = _final_answer(t, protocol)
                if dataset == "lrs_vqa":
                    t.correct = lrs_correct(ans, s.answer, syn)
                    t.prediction = ans.lower()
                else:
                    letter = mme_extract(ans, s.choices)
                    t.correct = letter == s.answer
                    t.prediction = letter or None
                t.meta["official"] = True
    return {"rule": "official", "synonyms": ("wordnet" if syn else "unavailable") if dataset == "lrs_vqa" else None}


def official_tables(dataset: str, samples: list[VQASample], greedy: dict[str, Trajectory]) -> dict[str, Any]:
    """The benchmark's own summary of the Pass@1 run: LRS-VQA OA/AA per sub-set; MME-RealWorld per category,
    sub-task, task and overall (micro), with the count of E answers."""
    scored = [(s, greedy[s.id]) for s in samples if s.id in greedy and greedy[s.id].error is None]
    if dataset == "lrs_vqa":
        groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for s, t in scored:
            groups[s.meta["subset"]][s.meta["category"]].append(1.0 if t.correct else 0.0)
        out = {}
        for name, cats in sorted(groups.items()):
            allv = [v for vs in cats.values() for v in vs]
            out[name] = {"OA": 100 * sum(allv) / len(allv),
                         "AA": 100 * sum(sum(v) / len(v) for v in cats.values()) / len(cats),
                         "n": len(allv),
                         "categories": {c: {"acc": 100 * sum(v) / len(v), "n": len(v)} for c, v in sorted(cats.items())}}
        return {"benchmark": "LRS-VQA", "subsets": out}
    tree: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    e_answers: dict[str, int] = defaultdict(int)
    for s, t in scored:
        tree[s.meta["task"]][s.meta["subtask"]][mme_category(s.meta["category"])].append(1.0 if t.correct else 0.0)
        e_answers[s.meta["task"]] += int(t.prediction == "E")
    tasks, total = {}, []
    for task, subs in sorted(tree.items()):
        tv: list[float] = []
        sub_out = {}
        for sub, cats in sorted(subs.items()):
            sv = [v for vs in cats.values() for v in vs]
            tv += sv
            sub_out[sub] = {"acc": 100 * sum(sv) / len(sv), "n": len(sv),
                            "categories": {c: {"acc": 100 * sum(v) / len(v), "n": len(v)} for c, v in sorted(cats.items())}}
        total += tv
        tasks[task] = {"acc": 100 * sum(tv) / len(tv), "n": len(tv), "E_answers": e_answers[task], "subtasks": sub_out}
    return {"benchmark": "MME-RealWorld-RS", "overall": 100 * sum(total) / len(total) if total else 0.0,
            "n": len(total), "tasks": tasks}


def official_markdown(official: dict[str, Any]) -> str:
    """The official table as markdown (appended to results.md)."""
    sc = official.get("scoring", {})
    lines = ["", f"## {official['benchmark']}: official scoring ({sc.get('rule')}"
             + (f", synonyms: {sc['synonyms']}" if sc.get("synonyms") else "") + ")", ""]
    if official["benchmark"] == "LRS-VQA":
        lines += ["| subset | n | OA | AA |", "|---|---:|---:|---:|"]
        lines += [f"| {k} | {v['n']} | {v['OA']:.2f} | {v['AA']:.2f} |" for k, v in official["subsets"].items()]
        for k, v in official["subsets"].items():
            lines += ["", f"{k} per category: " + ", ".join(f"{c} {d['acc']:.1f} ({d['n']})"
                                                          for c, d in v["categories"].items())]
    else:
        lines += ["| task / sub-task / category | n | acc |", "|---|---:|---:|"]
        for t, tv in official["tasks"].items():
            lines.append(f"| **{t}** (E answers: {tv['E_answers']}) | {tv['n']} | {tv['acc']:.2f} |")
            for sub, sv in tv["subtasks"].items():
                lines.append(f"| {t} / {sub} | {sv['n']} | {sv['acc']:.2f} |")
                lines += [f"| {t} / {sub} / {c} | {d['n']} | {d['acc']:.2f} |" for c, d in sv["categories"].items()]
        lines.append(f"| **overall** | {official['n']} | {official['overall']:.2f} |")
    return "\n".join(lines) + "\n"


# -- loaders ----------------------------------------------------------------------------------------------
def _find(root: Path, names: tuple[str, ...], what: str) -> Path:
    if root.is_file():
        return root
    for n in names:
        hits = sorted(root.rglob(n))
        if hits:
            return hits[0]
    raise DatasetNotFoundError(f"{root}: no {' or '.join(names)} of {what} found; nothing is downloaded, point "
                               "dataset_path at your local copy")


def _link_image(path: Path, raw: Path, rel: str) -> str:
    """Give the image an id from its relative path and place it under raw/ for prepare-images: a hard link
    (no copy) when raw/ is on the same filesystem, else a copy. Not a symlink: prepare-images refuses links
    that leave its input folder (tools/security.py)."""
    import os
    import shutil

    image_id = _SAFE.sub("_", str(Path(rel).with_suffix(""))).strip("._") or "image"
    dst = raw / (image_id + path.suffix.lower())
    if not dst.exists():
        raw.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(path.resolve(), tmp)
        except OSError:
            shutil.copyfile(path.resolve(), tmp)
        tmp.replace(dst)
    return image_id


def _image_file(base: Path, rel: Any, where: str) -> Path:
    if not isinstance(rel, str) or not rel:
        raise DatasetFormatError(f"{where}: the image must be a path string")
    for cand in (base / rel, base.parent / rel):
        if cand.is_file():
            return cand
    raise DatasetNotFoundError(f"{where}: image {rel!r} not found under {base}")


def load_lrs_vqa(path: str | Path, work: Path, image_root: str | Path | None = None) -> tuple[list[VQASample], Path]:
    """LRS-VQA questions as VQASamples (qtype text) and the raw image folder (links) for prepare-images."""
    qfile = _find(Path(path), ("LRS_VQA_merged.jsonl", "*.jsonl"), "LRS-VQA")
    # eval_lrs_vqa.sh: image paths are relative to the folder that contains LRS_VQA/
    base = Path(image_root) if image_root else (qfile.parent.parent if qfile.parent.name == "LRS_VQA" else qfile.parent)
    samples, seen = [], set()
    for k, line in enumerate(qfile.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        where = f"{qfile.name} line {k + 1}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetFormatError(f"{where}: invalid JSON ({e})") from e
        missing = [f for f in LRS_FIELDS if f not in row] if isinstance(row, dict) else list(LRS_FIELDS)
        if missing:
            raise DatasetFormatError(f"{where}: missing LRS-VQA fields {missing}; expected {list(LRS_FIELDS)}")
        qid = str(row["question_id"])
        if qid in seen:
            raise DatasetFormatError(f"{where}: duplicate question_id {qid}")
        seen.add(qid)
        image_id = _link_image(_image_file(base, row["image"], where), work / "raw", row["image"])
        subset, category = qid.split("_")[0], str(row["category"])
        s = VQASample(id=qid, images=[image_id], question=str(row["text"]), answer=str(row["ground_truth"]),
                      qtype="text", category=f"{subset}:{category}", l2_category=category, split="test",
                      meta={"source": "lrs-vqa", "subset": subset, "category": category,
                            "official_prompt": str(row["text"])})
        s.validate()
        samples.append(s)
    if not samples:
        raise DatasetFormatError(f"{qfile}: no questions")
    return samples, work / "raw"


def load_mme_rs(path: str | Path, work: Path, image_root: str | Path | None = None) -> tuple[list[VQASample], Path]:
    """MME-RealWorld remote-sensing questions (Subtask "Remote Sensing") as single-choice VQASamples."""
    qfile = _find(Path(path), ("MME_RealWorld_RS.json", "MME_RealWorld.json", "*.json"), "MME-RealWorld")
    base = Path(image_root) if image_root else qfile.parent
    try:
        data = json.loads(qfile.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetFormatError(f"{qfile}: not valid JSON ({e})") from e
    if not isinstance(data, list):
        raise DatasetFormatError(f"{qfile}: expected a JSON list of questions")
    samples = []
    for k, row in enumerate(data):
        where = f"{qfile.name} item {k}"
        missing = [f for f in MME_FIELDS if f not in row] if isinstance(row, dict) else list(MME_FIELDS)
        if missing:
            raise DatasetFormatError(f"{where}: missing MME-RealWorld fields {missing}; expected {list(MME_FIELDS)}")
        if row["Subtask"] != MME_SUBTASK:
            continue
        choices = row["Answer choices"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise DatasetFormatError(f"{where}: 'Answer choices' must be a list of >= 2 strings")
        gt = str(row["Ground truth"]).strip()
        if gt not in [c[1:2] for c in choices]:
            raise DatasetFormatError(f"{where}: 'Ground truth' {gt!r} is not one of the choice letters")
        image_id = _link_image(_image_file(base, row["Image"], where), work / "raw", row["Image"])
        s = VQASample(id=str(row["Question_id"]), images=[image_id], question=str(row["Text"]), answer=gt,
                      qtype="single", choices=list(choices),
                      category=f"{row['Task']}:{mme_category(str(row['Category'])).replace('/', ':')}",
                      l2_category=str(row["Task"]), split="test",
                      meta={"source": "mme-realworld-rs", "task": str(row["Task"]), "subtask": str(row["Subtask"]),
                            "category": str(row["Category"]),
                            "official_prompt": mme_prompt(str(row["Text"]), list(choices))})
        s.validate()
        samples.append(s)
    if not samples:
        raise DatasetFormatError(f"{qfile}: no questions with Subtask {MME_SUBTASK!r}")
    return samples, work / "raw"


def load_benchmark(dataset: str, path: str | Path, work: Path, image_root: str | Path | None = None
                   ) -> tuple[list[VQASample], Path]:
    """(samples, raw image folder) of a benchmark; the caller sends the folder through prepare-images once
    (pipeline/eval/evaluate.py), so this module does not import the evaluation above it."""
    from pipeline.core.datasets import save_vqa_jsonl

    loader = {"lrs_vqa": load_lrs_vqa, "mme_rs": load_mme_rs}[dataset]
    samples, raw = loader(path, work, image_root)
    save_vqa_jsonl(work / f"{dataset}_questions.jsonl", samples)
    return samples, raw


__all__ = ["BENCHMARKS", "load_benchmark", "load_lrs_vqa", "load_mme_rs", "mme_extract", "mme_prompt", "lrs_correct",
           "rescore", "official_tables", "official_markdown", "wordnet_synonyms", "mme_category", "PROMPT_TEXT"]
