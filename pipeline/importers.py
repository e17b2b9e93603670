"""`knowzoom import-data`: convert local copies of the public training sets the paper and its peers used into
our records. Nothing is downloaded; the user points `--path` at a copy they fetched themselves.

Formats (`--format`) and where their exact fields were read:

- `tbv-text`: the "Text Before Vision" paper's Earth-science text CoT QA (148,777 items, `text_148k_sft.json`;
  HF dataset `initiacms/Text-Before-Vision`, folder `sft/`). Its `training/sft/dataset_info.json` in the paper's
  code registers it for LLaMA-Factory as `formatting: sharegpt` with `columns: {messages: messages, images:
  images}` and `tags: {role_tag: role, content_tag: content, user_tag: user, assistant_tag: assistant,
  system_tag: system}`: a JSON list of `{"messages": [{"role", "content"}, ...]}`. LLaMA-Factory's default
  sharegpt tags (`conversations` of `{"from": "human"|"gpt"|"system", "value"}`) are read too. → `TextQA`
  (the reply's `<think>`/`<answer>` or "The answer is …" split into rationale and answer; the reply kept in
  `meta.reply`).
- `superrs-vqa` / `highrs-vqa`: GeoLLaVA-8K's SuperRS-VQA and HighRS-VQA (HF `initiacms/GeoLLaVA-Data`, folder
  `geollava_raw_format/`, e.g. `ft3_whole_shuffle.json`). GeoLLaVA-8K trains with LongVA/LLaVA's loader
  (`longva/scripts/ft3.sh`: `--data_path <json> --image_folder <folder>`), whose rows are `{"id", "image":
  "<path under image_folder>" (or a list), "conversations": [{"from": "human", "value": "<image>\\n…"},
  {"from": "gpt", "value": …}, …]}`. TBV's own pre-resized copy (`sft/geollava_superrs.json`) is LLaMA-Factory
  sharegpt with `messages` and `images`; both are read. Each human/gpt pair → one `VQASample`.
- `deepeyes-47k`: DeepEyes' visual-toolbox RL parquet shards (HF `ChenShawn/DeepEyes-Datasets-47k`:
  `data_0.1.2_visual_toolbox_v2.parquet`, `data_v0.8_visual_toolbox_v2.parquet`,
  `data_thinklite_reasoning_acc.parquet`, as named in DeepEyes-based training scripts). Fields from DeepEyes'
  verl code (`verl/utils/dataset/rl_dataset.py`: `prompt` = chat list of `{"role", "content"}` with `<image>`
  placeholders, `images` = list of HF Image structs `{"bytes", "path"}` opened with `image["bytes"]`;
  `verl/utils/reward_score/__init__.py` dispatches on `data_source` and passes `reward_model.ground_truth` and
  `extra_info`; `vl_agent.compute_score` reads `extra_info["question"]`) and verl's DeepEyes recipe
  (`env_name`, `extra_info.index`, `extra_info.answer`). → `VQASample`.

Answers become our strict types: options in the question and a letter answer → `single`/`multi`; yes/no/true/
false → `tf`; a plain number → `numeric`; a short phrase (≤ `max_text_answer_words`) → `text`. DeepEyes scored
free-form answers with an LLM judge; our strict verifier (rl/verifier.py) cannot, so such items — and any item
whose own answer the verifier does not accept — go to `rejections.jsonl` with the reason, and the summary
counts them per reason and source (`keep_free_form` keeps them as `text` for SFT instead).

The JSON formats are also read from the HF hub's parquet conversion of the same rows (a folder holding only
`*.parquet`). Images (parquet bytes, paths, base64 strings or data URIs) are written once to `<output_dir>/raw/` and
converted once by `knowzoom prepare-images` into `<output_dir>/images/` (COGs + `images.jsonl`). Resumable:
records and rejections are appended durably in source order; a rerun skips the rows already written, so the
files of an interrupted and resumed import equal those of one uninterrupted run. A malformed row stops the
import with the file and row named (`on_error: skip` records it in `rejections.jsonl` and goes on).

Over 500 lines on purpose: one stage, four formats that share the record building, image writing and
error policy; each format's reader is a short function next to the field notes above.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.config import StageConfig, hfield
from pipeline.core.datasets import DatasetFormatError, _ImageRef, _RawWriter
from pipeline.core.errors import DatasetNotFoundError
from pipeline.core.records import JsonlAppender, TextQA, VQASample

log = logging.getLogger(__name__)

FORMATS = ("tbv-text", "superrs-vqa", "highrs-vqa", "deepeyes-47k")
_ROLE = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system",
         "observation": "observation", "function_call": "function_call", "tool": "observation"}
_OPTION = re.compile(r"^\s*\(?([A-H])(?:\)|\.|:|\)\.|\s*\))\s*(\S.*)$")
_OPTIONS_HEADER = re.compile(r"^\s*(?:options|choices|answer choices)\s*:?\s*$", re.I)
_LETTER_ANSWER = re.compile(r"^\(?([A-H])\)?(?:[.:)]\s*.*)?$", re.S)
_MULTI_LETTERS = re.compile(r"^\(?[A-H]\)?(?:\s*(?:,|;|&|\band\b|\s)\s*\(?[A-H]\)?)+$")
_NUMBER = re.compile(r"^[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?$")
_TRUE = {"yes", "true"}
_FALSE = {"no", "false"}
_B64_MAGIC = ("/9j/", "iVBOR", "SUkq", "TU0A", "UklGR", "Qk")


@dataclass
class ImportDataConfig(StageConfig):
    """Convert a local copy of a public training set into TextQA / VQASample records (+ prepared images)."""

    output_dir: str = hfield("runs/import", help="Folder for the records, rejections.jsonl, raw/ and images/.")
    format: str = hfield("", help=f"Source format: {' | '.join(FORMATS)}.")
    path: str = hfield("", help="Local copy: a JSON/JSONL/parquet file or a folder holding them.")
    image_root: str = hfield("", help="Folder the JSON's relative image paths are under (LLaVA's --image_folder); "
                                      "also tried: the --path folder (a file's folder) and its images/ subfolder.")
    on_error: str = hfield("fail", help="Malformed rows: fail (stop, naming file and row) | skip (report them in "
                                        "rejections.jsonl and go on).")
    max_text_answer_words: int = hfield(5, help="Longest text answer (words) kept as a strictly scored 'text' item.")
    keep_free_form: bool = hfield(False, help="Keep answers the strict verifier cannot score as 'text' records "
                                              "(SFT use) instead of only reporting them.")
    split: str = hfield("train", help="Split written into the records.")
    limit: int | None = hfield(None, help="Stop after this many source rows (null: all).")
    prepare_images: bool = hfield(True, help="Convert the written images with prepare-images into images/.")
    progress: bool = hfield(True, help="Show a progress bar.")

    def validate(self) -> list[str]:
        p = super().validate()
        if self.format not in FORMATS:
            p.append(f"format: {self.format!r} unknown; use one of {list(FORMATS)}")
        if not self.path:
            p.append("path: give the local copy (file or folder) to convert")
        elif not Path(self.path).exists():
            p.append(f"path: {self.path} does not exist; nothing is downloaded, point it at your local copy")
        if self.image_root and not Path(self.image_root).is_dir():
            p.append(f"image_root: {self.image_root} is not a folder")
        if self.on_error not in ("fail", "skip"):
            p.append("on_error: use fail or skip")
        if self.max_text_answer_words < 1:
            p.append("max_text_answer_words: must be >= 1")
        if self.limit is not None and self.limit < 1:
            p.append("limit: must be >= 1 (or null)")
        return p


# -- answers ------------------------------------------------------------------------------------------
@dataclass
class Parsed:
    """A question split into stem and labelled options, with its answer in our strict form."""

    qtype: str
    question: str
    choices: list[str]
    answer: str


def split_options(question: str) -> tuple[str, list[str]]:
    """(stem, ["(A) …", …]) of a question whose options are lines "(A) …" / "A. …" / "A) …" (A, B, … in order)."""
    stem: list[str] = []
    opts: list[str] = []
    for line in question.replace("<image>", "").splitlines():
        m = _OPTION.match(line)
        if m and m.group(1) == "ABCDEFGH"[len(opts)]:
            opts.append(f"({m.group(1)}) {m.group(2).strip()}")
        elif not _OPTIONS_HEADER.match(line):
            stem.append(line)
    if len(opts) < 2:
        return question.replace("<image>", "").strip(), []
    return "\n".join(stem).strip(), opts


def classify(question: str, answer: str, *, max_text_words: int) -> Parsed | str:
    """Our strict form of a question/answer pair, or the reason it has none (a string)."""
    stem, choices = split_options(question)
    ans = str(answer).strip()
    bare = ans.rstrip(".").strip()
    if not bare:
        return "empty answer"
    if choices:
        letters = {c[1] for c in choices}
        if (_MULTI_LETTERS.match(bare) or re.fullmatch(r"[A-H]{2,8}", bare)) and len(re.findall(r"[A-H]", bare)) > 1:
            got = sorted(set(re.findall(r"[A-H]", bare)))
            if set(got) <= letters:
                return Parsed("multi", stem, choices, "".join(got))
        m = _LETTER_ANSWER.match(bare)
        if m and m.group(1) in letters:
            return Parsed("single", stem, choices, m.group(1))
        by_text = [c[1] for c in choices if c[4:].strip().lower().rstrip(".") == bare.lower()]
        if len(by_text) == 1:
            return Parsed("single", stem, choices, by_text[0])
        return f"answer {ans[:60]!r} names none of the options"
    low = bare.lower()
    if low in _TRUE or low in _FALSE:
        return Parsed("tf", stem, [], "true" if low in _TRUE else "false")
    if _NUMBER.match(bare):
        return Parsed("numeric", stem, [], bare.replace(",", ""))
    if len(bare.split()) <= max_text_words:
        return Parsed("text", stem, [], bare)
    return f"free-form answer of {len(bare.split())} words (> max_text_answer_words): needs an LLM judge"


def verifier_accepts(p: Parsed) -> str | None:
    """None when rl/verifier.py scores the item's own answer as correct, else why not."""
    from rl.verifier import verify

    r = verify(f"<answer>{p.answer}</answer>", p.answer, p.qtype, p.choices, 0.0)
    return None if r.correct else f"the strict verifier cannot score it ({r.reason})"


def _text_qtype(question: str, answer: str) -> Parsed:
    """TextQA form of a text item: mcq / tf / fill / free (never rejected: SFT data)."""
    p = classify(question, answer, max_text_words=10**6)
    if isinstance(p, Parsed) and p.qtype in ("single", "multi"):
        return Parsed("mcq", p.question, p.choices, p.answer)
    if isinstance(p, Parsed) and p.qtype == "tf":
        return p
    stem, _ = split_options(question)
    fill = "___" in question or re.search(r"\bfill in\b|\bblank\b", question, re.I) is not None
    return Parsed("fill" if fill else "free", stem, [], str(answer).strip())


_THINK = re.compile(r"<think>(.*?)</think>", re.S | re.I)


def split_reply(reply: str) -> tuple[list[str], str, str]:
    """(rationale steps, answer, how the answer was found) of a CoT reply."""
    from rl.verifier import extract_answer

    think = _THINK.findall(reply)
    answer = extract_answer(reply, allow_bare=False)
    if answer is not None:
        how = "tag" if "<answer>" in reply.lower() else "marker"
        if how == "marker":  # "The answer is true." → "true"
            answer = answer.strip().rstrip(".")
        body = "\n".join(think) if think else re.split(r"<answer>|(?i:(?:the\s+)?(?:final\s+)?answer\s*(?:is|:))",
                                                       reply)[0]
    else:
        paras = [p for p in re.split(r"\n\s*\n", _THINK.sub("", reply)) if p.strip()]
        if not paras:
            return [], reply.strip(), "whole"
        answer, how = paras[-1].strip(), "last_paragraph" if len(paras) > 1 else "whole"
        body = "\n".join(think) if think else "\n".join(paras[:-1])
    steps = [s.strip() for s in re.split(r"\n+", _THINK.sub(lambda m: m.group(1), body)) if s.strip()]
    return steps, answer.strip(), how


# -- source rows ------------------------------------------------------------------------------------
@dataclass
class Row:
    """One source row: where it is (file and row, for messages), its stable id and its content."""

    where: str
    rid: str
    data: Any


def _files(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if root.is_file():
        return [root]
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in suffixes)
    if not files:
        raise DatasetNotFoundError(f"{root}: no {' / '.join(suffixes)} files found")
    return files


def _iter_json_rows(root: Path) -> Iterator[Row]:
    for f in _files(root, (".json", ".jsonl")):
        if f.name in ("dataset_info.json",):
            continue
        try:
            if f.suffix == ".jsonl":
                lines = f.read_text(encoding="utf-8").splitlines()
                items: list[Any] = []
                for k, line in enumerate(lines):
                    if line.strip():
                        try:
                            items.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            items.append(DatasetFormatError(f"{f.name} line {k + 1}: invalid JSON ({e})"))
            else:
                data = json.loads(f.read_text(encoding="utf-8"))
                items = data if isinstance(data, list) else [data]
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetFormatError(f"{f}: not valid JSON ({e})") from e
        for k, item in enumerate(items):
            yield Row(f"{f.name} row {k}", f"{f.stem}-{k}", item)


def _iter_parquet_rows(root: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    for f in _files(root, (".parquet",)):
        pf = pq.ParquetFile(f)
        k = 0
        for batch in pf.iter_batches(batch_size=16):
            for row in batch.to_pylist():
                yield Row(f"{f.name} row {k}", f"{f.stem}-{k}", row)
                k += 1


def _is_parquet(fmt: str, root: Path) -> bool:
    """DeepEyes shards are parquet; the JSON formats are read from parquet too when that is what the copy holds
    (the HF hub's auto-converted `refs/convert/parquet` of the same rows)."""
    if fmt == "deepeyes-47k" or root.suffix == ".parquet":
        return True
    if root.is_dir():
        has_json = any(p.suffix in (".json", ".jsonl") and p.name != "dataset_info.json" for p in root.rglob("*"))
        return not has_json and any(root.rglob("*.parquet"))
    return False


def _count_rows(fmt: str, root: Path) -> int | None:
    try:
        if _is_parquet(fmt, root):
            import pyarrow.parquet as pq

            return sum(pq.ParquetFile(f).metadata.num_rows for f in _files(root, (".parquet",)))
    except Exception:  # noqa: BLE001 - only the progress bar's total
        return None
    return None


def _chat(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    """The conversation of a sharegpt row (messages/role/content or conversations/from/value)."""
    if "messages" in row:
        turns, rk, ck = row["messages"], "role", "content"
    elif "conversations" in row:
        turns, rk, ck = row["conversations"], "from", "value"
    else:
        raise DatasetFormatError(f"{where}: no 'messages' (role/content) or 'conversations' (from/value) field; "
                                 f"found {sorted(row)[:8]}")
    if not isinstance(turns, list) or not turns:
        raise DatasetFormatError(f"{where}: the conversation must be a non-empty list")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or rk not in t or ck not in t:
            raise DatasetFormatError(f"{where}: turn {i} needs '{rk}' and '{ck}'")
        role = _ROLE.get(str(t[rk]).lower())
        if role is None:
            raise DatasetFormatError(f"{where}: turn {i} has unknown {rk} {t[rk]!r}")
        if not isinstance(t[ck], str):
            raise DatasetFormatError(f"{where}: turn {i} {ck} must be a string")
        out.append({"role": role, "content": t[ck]})
    return out


def _pairs(chat: list[dict[str, str]], where: str) -> list[tuple[str, str]]:
    """(question, answer) of each user turn followed by an assistant turn."""
    pairs = []
    msgs = [m for m in chat if m["role"] != "system"]
    for i in range(0, len(msgs) - 1):
        if msgs[i]["role"] == "user" and msgs[i + 1]["role"] == "assistant":
            pairs.append((msgs[i]["content"], msgs[i + 1]["content"]))
    if not pairs:
        raise DatasetFormatError(f"{where}: no user turn followed by an assistant turn")
    return pairs


def _image_ref(item: Any, where: str, bases: list[Path]) -> _ImageRef:
    """An image given as an HF struct {bytes, path}, raw bytes, a base64 string / data URI, or a path."""
    if isinstance(item, dict):
        if item.get("bytes") is not None:
            return _ImageRef(name=item.get("path"), data=bytes(item["bytes"]))
        item = item.get("path") or item.get("image") or item.get("url")
    if isinstance(item, (bytes, bytearray)):
        return _ImageRef(name=None, data=bytes(item))
    if not isinstance(item, str) or not item:
        raise DatasetFormatError(f"{where}: an image entry is {type(item).__name__}, expected bytes, a path or base64")
    if item.startswith("data:image"):
        payload = item.split("base64,", 1)[-1]
        return _ImageRef(name=None, data=_b64(payload, where))
    if item.startswith(_B64_MAGIC) and len(item) > 256:  # a bare base64 image (no data: prefix)
        return _ImageRef(name=None, data=_b64(item, where))
    if item.startswith(("http://", "https://")):
        raise DatasetFormatError(f"{where}: image {item[:60]!r} is a URL; nothing is downloaded, use a local copy")
    p = Path(item.removeprefix("file://"))
    cands = [p] if p.is_absolute() else [b / p for b in bases]
    hit = next((c for c in cands if c.is_file()), None)
    if hit is None:
        raise DatasetNotFoundError(f"{where}: image {item!r} not found under {[str(b) for b in bases]}")
    return _ImageRef(name=hit.name, file=hit)


def _b64(s: str, where: str) -> bytes:
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as e:
        raise DatasetFormatError(f"{where}: image is not valid base64 ({e})") from e


# -- converters: one source row → records or rejections ------------------------------------------------
class _Converter:
    def __init__(self, cfg: ImportDataConfig):
        self.cfg = cfg
        self.root = Path(cfg.path)
        self.out = Path(cfg.output_dir)
        self.writer = _RawWriter(self.out / "raw")

    def bases(self) -> list[Path]:
        folder = self.root if self.root.is_dir() else self.root.parent
        b = [Path(self.cfg.image_root)] if self.cfg.image_root else []
        return b + [folder, folder / "images"]

    def images(self, items: Any, where: str) -> list[str]:
        if items is None:
            return []
        if not isinstance(items, (list, tuple)):
            items = [items]
        try:
            return [self.writer.add(_image_ref(it, where, self.bases())) for it in items]
        except DatasetFormatError as e:
            raise DatasetFormatError(f"{where}: {e}") from e

    def vqa(self, rid: str, question: str, answer: str, image_ids: list[str], source: str, where: str,
            meta: dict[str, Any]) -> tuple[VQASample | None, str | None]:
        parsed = classify(question, answer, max_text_words=self.cfg.max_text_answer_words)
        reason = parsed if isinstance(parsed, str) else verifier_accepts(parsed)
        if reason is not None:
            if not self.cfg.keep_free_form or not str(answer).strip():
                return None, reason
            stem, _ = split_options(question)
            parsed = Parsed("text", stem, [], str(answer).strip())
            meta = {**meta, "unscorable": reason}
        if not image_ids:
            return None, "no image"
        assert isinstance(parsed, Parsed)  # a str (reject reason) returned above or was replaced by a Parsed
        s = VQASample(id=rid, images=image_ids, question=parsed.question, answer=parsed.answer, qtype=parsed.qtype,
                      choices=parsed.choices, category=source, split=self.cfg.split,
                      meta={"source": source, "row": where, **meta})
        s.validate()
        return s, None

    def convert(self, row: Row) -> list[tuple[str, Any]]:
        """[("record", rec) | ("reject", {...})] for one row; malformed rows raise DatasetFormatError."""
        fmt = self.cfg.format
        d = row.data
        if isinstance(d, Exception):
            raise d
        if not isinstance(d, dict):
            raise DatasetFormatError(f"{row.where}: a row must be a JSON object, got {type(d).__name__}")
        if fmt == "tbv-text":
            return self._tbv_text(row, d)
        if fmt == "deepeyes-47k":
            return self._deepeyes(row, d)
        return self._geollava(row, d)

    def _tbv_text(self, row: Row, d: dict[str, Any]) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        if d.get("images"):
            raise DatasetFormatError(f"{row.where}: has images; tbv-text is the text-only set (use superrs-vqa for "
                                     "image rows)")
        pairs = _pairs(_chat(d, row.where), row.where)
        for k, (q, reply) in enumerate(pairs):
            rid = row.rid if len(pairs) == 1 else f"{row.rid}.{k}"
            if not q.strip() or not reply.strip():
                raise DatasetFormatError(f"{row.where}: empty question or reply")
            steps, answer, how = split_reply(reply)
            p = _text_qtype(q, answer)
            qa = TextQA(id=rid, question=p.question, qtype=p.qtype, answer=p.answer, choices=p.choices,
                        rationale=steps, source="tbv-text", split=self.cfg.split,
                        meta={"row": row.where, "answer_from": how, "reply": reply})
            qa.validate()
            out.append(("record", qa))
        return out

    def _geollava(self, row: Row, d: dict[str, Any]) -> list[tuple[str, Any]]:
        source = self.cfg.format
        images = d.get("images", d.get("image"))
        if images is None or images == []:
            raise DatasetFormatError(f"{row.where}: no 'image' (LLaVA) or 'images' (sharegpt) field")
        ids = self.images(images, row.where)
        pairs = _pairs(_chat(d, row.where), row.where)
        base = str(d.get("id", row.rid))
        out: list[tuple[str, Any]] = []
        for k, (q, a) in enumerate(pairs):
            rid = f"{base}" if len(pairs) == 1 else f"{base}.{k}"
            s, reason = self.vqa(rid, q, a, ids, source, row.where, {"turn": k})
            out.append(("record", s) if s else ("reject", {"id": rid, "row": row.where, "source": source,
                                                            "reason": reason, "answer": str(a)[:200]}))
        return out

    def _deepeyes(self, row: Row, d: dict[str, Any]) -> list[tuple[str, Any]]:
        missing = [k for k in ("data_source", "prompt", "images", "reward_model") if k not in d]
        if missing:
            raise DatasetFormatError(f"{row.where}: missing DeepEyes fields {missing}; expected data_source, "
                                     "prompt, images, reward_model, extra_info")
        rm, extra = d["reward_model"], d.get("extra_info") or {}
        if not isinstance(rm, dict) or not isinstance(rm.get("ground_truth"), (str, int, float)):
            raise DatasetFormatError(f"{row.where}: reward_model.ground_truth must be a string")
        if not isinstance(extra, dict):
            raise DatasetFormatError(f"{row.where}: extra_info must be a struct")
        question = extra.get("question")
        if not isinstance(question, str) or not question.strip():
            chat = _chat({"messages": d["prompt"]}, row.where)
            users = [m["content"] for m in chat if m["role"] == "user"]
            if not users:
                raise DatasetFormatError(f"{row.where}: no question in extra_info.question or the prompt")
            question = users[-1]
        if not isinstance(d["images"], list) or not d["images"]:
            raise DatasetFormatError(f"{row.where}: images must be a non-empty list of {{bytes, path}} structs")
        ids = self.images(d["images"], row.where)
        source = str(d["data_source"])
        index = extra.get("index")
        rid = f"deepeyes-{row.rid}"
        s, reason = self.vqa(rid, question, str(rm["ground_truth"]), ids, source, row.where,
                             {"index": index, "ability": d.get("ability"), "env_name": d.get("env_name")})
        if s is None:
            return [("reject", {"id": rid, "row": row.where, "source": source, "reason": reason,
                                "answer": str(rm["ground_truth"])[:200]})]
        return [("record", s)]


def _prepare(raw: Path, out: Path) -> Path:
    """prepare-images on the written images (every format `_RawWriter` writes: PNG, JPEG, TIFF, WebP, BMP)."""
    from pipeline.core.config import load_config
    from pipeline.stages import run_stage
    from tools.prepare import PrepareImagesConfig

    patterns = ["*.tif", "*.png", "*.jpg", "*.webp", "*.bmp"]
    summary = run_stage("prepare-images", load_config(PrepareImagesConfig, None, {
        "input_dir": str(raw), "output_dir": str(out), "patterns": patterns})) or {}
    if summary.get("failed"):
        log.warning("import-data: prepare-images failed on %d images: %s", summary["failed"], summary.get("errors"))
    return out / "images.jsonl"


def _reason_kind(reason: str) -> str:
    if reason.startswith("malformed"):
        return "malformed"
    if reason.startswith("free-form"):
        return "free-form answer (LLM judge needed)"
    if "names none of the options" in reason:
        return "answer names no option"
    if reason.startswith("the strict verifier"):
        return "verifier cannot score"
    return reason


def run(cfg: ImportDataConfig) -> dict[str, Any]:
    """Convert every row (resuming after the rows already written); write records, rejections, images."""
    from tqdm import tqdm

    cfg.check()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(cfg.path)
    kind = "text_qa" if cfg.format == "tbv-text" else "vqa"
    rec_path, rej_path = out / f"{kind}.jsonl", out / "rejections.jsonl"
    conv = _Converter(cfg)
    rows = _iter_parquet_rows(root) if _is_parquet(cfg.format, root) else _iter_json_rows(root)
    counts: Counter[str] = Counter({"rows": 0, "records": 0, "skipped_existing": 0})
    reasons: Counter[str] = Counter()
    by_source: Counter[str] = Counter()
    with JsonlAppender(rec_path) as recs, JsonlAppender(rej_path, key="row") as rejs:
        done_ids, done_rows = recs.keys(), rejs.keys()
        run_ids: set[str] = set()
        bar = tqdm(rows, total=_count_rows(cfg.format, root), desc=f"import-data {cfg.format}", unit="row",
                   disable=not cfg.progress)
        for n, row in enumerate(bar):
            if cfg.limit is not None and n >= cfg.limit:
                break
            counts["rows"] += 1
            try:
                results = conv.convert(row)
            except (DatasetFormatError, DatasetNotFoundError) as e:
                if cfg.on_error == "fail":
                    raise DatasetFormatError(f"{e} (rerun with on_error=skip to report such rows and go on)") from e
                results = [("reject", {"id": row.rid, "row": row.where, "source": cfg.format,
                                       "reason": f"malformed: {e}"})]
            for what, rec in results:
                if what == "record":
                    if rec.id in run_ids:  # a source id used twice: the later row gets its row id appended
                        rec.id = f"{rec.id}~{row.rid}"
                    run_ids.add(rec.id)
                    if rec.id in done_ids:
                        counts["skipped_existing"] += 1
                        continue
                    recs.append(rec)
                    done_ids.add(rec.id)
                    counts["records"] += 1
                else:
                    reasons[_reason_kind(rec["reason"])] += 1
                    by_source[rec["source"]] += 1
                    key = f"{rec['row']}#{rec['id']}"
                    if key in done_rows:
                        continue
                    rejs.append({**rec, "row": key})
                    done_rows.add(key)
    counts["rejected"] = sum(reasons.values())
    summary: dict[str, Any] = {"format": cfg.format, "records_file": str(rec_path), **dict(counts),
                               "rejections_by_reason": dict(sorted(reasons.items())),
                               "rejections_by_source": dict(sorted(by_source.items())),
                               "rejections_file": str(rej_path)}
    raw = out / "raw"
    if kind == "vqa" and cfg.prepare_images and any(raw.iterdir()):
        manifest = _prepare(raw, out / "images")
        summary["images_manifest"] = str(manifest)
        prepared = {json.loads(x)["id"] for x in manifest.read_text(encoding="utf-8").splitlines() if x.strip()}
        from pipeline.core.records import read_jsonl

        wanted = {i for r in read_jsonl(rec_path) for i in r["images"]}
        summary["images_missing"] = sorted(wanted - prepared)[:20]
        if wanted - prepared:
            log.warning("import-data: %d image ids were not prepared (e.g. %s)", len(wanted - prepared),
                        sorted(wanted - prepared)[:3])
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    log.info("import-data %s: %s", cfg.format, summary)
    return summary


__all__ = ["FORMATS", "ImportDataConfig", "run", "classify", "split_options", "split_reply", "Parsed"]
