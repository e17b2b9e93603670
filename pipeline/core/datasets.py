"""Evaluation datasets: XLRS-Bench-lite from a local copy, and our own VQA JSONL.

XLRS-Bench-lite as published (HF `initiacms/XLRS-Bench-lite`, read by lmms-eval task `xlrs-lite`): one row per
question with fields `index`, `question`, `multi-choice options` (option strings already labelled "(A) …"),
`answer` (letters; several for Overall Land-use Classification), `category` ("Task/Subtask"), `l2-category`,
`path`, `image` (a list: change-detection questions carry two images). Two on-disk layouts are read:

- parquet shards (`*.parquet` anywhere under the folder; `image` entries are HF Image structs
  `{"bytes", "path"}`), read row-group by row-group so 8k-pixel images never all sit in memory;
- JSON per question (`*.json` files holding one question object each, or a JSON list / JSONL file), with
  `image` a list of file paths relative to the JSON file (or to the dataset folder).

The images are never decoded here: their bytes are written once to `<work_dir>/raw/<id>.<ext>` and then go
through `knowzoom prepare-images` (tools/prepare.py) into tiled COGs with an `images.jsonl` manifest that
`tools.store.ImageStore.from_manifest` opens. The XLRS licence forbids redistribution: nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import DatasetNotFoundError, RecordError
from pipeline.core.records import VQASample, read_jsonl, write_jsonl

log = logging.getLogger(__name__)

XLRS_FIELDS = ("index", "question", "multi-choice options", "answer", "category", "l2-category", "path", "image")

# The 13 VQA sub-tasks of XLRS-Bench-lite ("Task/Subtask" exactly as in the data) → short name.
XLRS_SUBTASKS: dict[str, str] = {
    "Counting/Overall counting": "OC",
    "Counting/Regional counting": "RC",
    "Land use classification/Overall Land use classification": "OLUC",
    "Land use classification/Regional Land use classification": "RLUC",
    "Object properties/Object classification": "OCC",
    "Object properties/Object color": "OCL",
    "Object properties/Object motion state": "OMS",
    "Object spatial relationship/Object spatial relationship": "OSR",
    "Complex reasoning/Anomaly Detection and Interpretation": "AD",
    "Complex reasoning/Environmental condition reasoning": "ECR",
    "Complex reasoning/Route planning": "RP",
    "Counting/Counting with changing detection": "RCCD",
    "Counting/Counting with complex reasoning": "CCR",
}
MULTI_ANSWER_CATEGORY = "Land use classification/Overall Land use classification"

# The official lmms-eval `xlrs-lite` prompt (mcq_utils.xlrs_doc_to_text), kept verbatim, typo included.
_OPTION_PROMPT = "The choices are listed below:\n"
_POST_SINGLE = (
    "\nSelect the best answer for the multiple-choice question based on the image. Only respond with the "
    "letter corresponding to the correct answer (A, B, C, D).\nThe answer is:"
)
_POST_MULTI = (
    "\nSelect the best answer(s) for the multiple-choice question based on the image. There may be more than "
    "one correct option. Only respond with the letter(s) corresponding to the correct answer(s) (A, B, C, D), "
    "with multiple choices separated by spaces.The answer(s) is(are):"
)

_ID_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


class DatasetFormatError(RecordError):
    """A dataset file exists but does not have the documented fields or types."""


def official_prompt(sample: VQASample) -> str:
    """The lmms-eval `xlrs-lite` question text (the images come before it in the user turn). As in lmms-eval,
    the multi-answer instruction is chosen by the category alone: the answer key never shapes the prompt.
    A benchmark loader that stores its own official text in `meta["official_prompt"]` (pipeline/eval/benchmarks.py)
    gets that."""
    if isinstance(sample.meta.get("official_prompt"), str):
        return sample.meta["official_prompt"]
    post = _POST_MULTI if sample.category == MULTI_ANSWER_CATEGORY else _POST_SINGLE
    return sample.question + _OPTION_PROMPT + "\n".join(sample.choices) + "\n" + post


def subtask_name(category: str) -> str:
    """Short sub-task name for a category ("Object properties/Object color" → "OCL"); unknown → as is."""
    return XLRS_SUBTASKS.get(category, category.split("/")[-1] if category else "all")


def _sniff_ext(data: bytes) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    if data[:3] == b"\xff\xd8\xff":
        return ".jpg"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return ".tif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    if data[:2] == b"BM":
        return ".bmp"
    raise DatasetFormatError("image bytes are not PNG, JPEG, TIFF, WebP or BMP")


def _to_png(data: bytes) -> bytes:
    """Lossless PNG of a WebP/BMP image (decoded by Pillow), so the guarded raster open accepts it."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            buf = io.BytesIO()
            im.convert("RGBA" if "A" in im.getbands() else "RGB").save(buf, format="PNG")
    except Exception as e:  # noqa: BLE001 - a corrupt image is a format error of the dataset
        raise DatasetFormatError(f"image bytes could not be decoded ({e})") from e
    return buf.getvalue()


@dataclass
class _ImageRef:
    """One image of a question: its bytes (parquet) or a file (JSON layout), and a name hint."""

    name: str | None
    data: bytes | None = None
    file: Path | None = None


class _RawWriter:
    """Writes each distinct image once under raw/ and gives it a stable id: the file-name stem, with a
    content-hash suffix when two different images share a name. Same content (or same file) → same id."""

    def __init__(self, raw_dir: Path):
        self.raw_dir = raw_dir
        raw_dir.mkdir(parents=True, exist_ok=True)
        self._by_key: dict[str, str] = {}  # file path or content digest → id
        self._taken: dict[str, str] = {}  # id → digest

    def add(self, ref: _ImageRef) -> str:
        if ref.data is None and ref.file is None:
            raise DatasetFormatError("an image entry has neither bytes nor a path")
        file_key = f"file:{ref.file.resolve()}" if ref.file is not None else None
        if file_key and file_key in self._by_key:
            return self._by_key[file_key]
        data = ref.data if ref.data is not None else ref.file.read_bytes()  # type: ignore[union-attr]
        digest = hashlib.sha1(data).hexdigest()
        if digest in self._by_key:
            return self._by_key[digest]
        stem = _ID_SAFE.sub("_", Path(ref.name).stem if ref.name else "").strip("._")
        image_id = stem or f"xlrs_{digest[:10]}"
        if image_id in self._taken:
            image_id = f"{image_id}_{digest[:10]}"
        ext = _sniff_ext(data[:16])
        if ext in (".webp", ".bmp"):  # prepare-images opens TIFF, PNG and JPEG only (tools/security.py)
            data, ext = _to_png(data), ".png"
        out = self.raw_dir / (image_id + ext)
        if not out.exists() or out.stat().st_size != len(data):
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(out)
        self._by_key[digest] = image_id
        if file_key:
            self._by_key[file_key] = image_id
        self._taken[image_id] = digest
        return image_id


def _answer_letters(answer: Any, where: str) -> str:
    letters = re.findall(r"[A-Z]", str(answer).upper()) if answer is not None else []
    if not letters:
        raise DatasetFormatError(f"{where}: answer {answer!r} has no option letters")
    return "".join(sorted(set(letters)))


def _to_sample(row: dict[str, Any], image_ids: list[str], where: str) -> VQASample:
    missing = [f for f in ("index", "question", "multi-choice options", "answer", "category") if f not in row]
    if missing:
        raise DatasetFormatError(f"{where}: missing XLRS-Bench fields {missing}; expected {list(XLRS_FIELDS)}")
    options = row["multi-choice options"]
    if isinstance(options, str):
        options = [o for o in options.split("\n") if o.strip()]
    if not isinstance(options, (list, tuple)) or len(options) < 2:
        raise DatasetFormatError(f"{where}: 'multi-choice options' must be a list of >= 2 option strings")
    category = str(row["category"])
    answer = _answer_letters(row["answer"], where)
    qtype = "multi" if category == MULTI_ANSWER_CATEGORY or len(answer) > 1 else "single"
    sample = VQASample(
        id=str(row["index"]),
        images=image_ids,
        question=str(row["question"]),
        answer=answer,
        qtype=qtype,
        choices=[str(o) for o in options],
        category=category,
        l2_category=str(row.get("l2-category") or ""),
        split="test",
        meta={"source": "xlrs-bench-lite", "subtask": subtask_name(category), "path": row.get("path")},
    )
    try:
        sample.validate()
    except RecordError as e:
        raise DatasetFormatError(f"{where}: {e}") from e
    return sample


def _image_refs_from_parquet_cell(cell: Any, path_field: Any, where: str) -> list[_ImageRef]:
    items = cell if isinstance(cell, (list, tuple)) else [cell]
    refs = []
    for i, item in enumerate(items):
        hint = None
        if isinstance(path_field, (list, tuple)) and i < len(path_field) and isinstance(path_field[i], str):
            hint = path_field[i]
        elif isinstance(path_field, str) and len(items) == 1:
            hint = path_field
        if isinstance(item, dict):
            if item.get("bytes") is None:
                raise DatasetFormatError(f"{where}: image {i} has no bytes in the parquet file")
            refs.append(_ImageRef(name=item.get("path") or hint, data=item["bytes"]))
        elif isinstance(item, (bytes, bytearray)):
            refs.append(_ImageRef(name=hint, data=bytes(item)))
        else:
            raise DatasetFormatError(f"{where}: image {i} is {type(item).__name__}, expected an HF Image struct")
    if not refs:
        raise DatasetFormatError(f"{where}: 'image' is an empty list")
    return refs


def _iter_parquet(files: list[Path]) -> Iterator[tuple[dict[str, Any], list[_ImageRef], str]]:
    import pyarrow.parquet as pq

    for f in files:
        pf = pq.ParquetFile(f)
        names = set(pf.schema_arrow.names)
        if "image" not in names or "question" not in names:
            raise DatasetFormatError(f"{f}: parquet columns {sorted(names)} are not XLRS-Bench's {list(XLRS_FIELDS)}")
        row_no = 0
        for batch in pf.iter_batches(batch_size=4):
            for row in batch.to_pylist():
                where = f"{f.name} row {row_no}"
                row_no += 1
                refs = _image_refs_from_parquet_cell(row.get("image"), row.get("path"), where)
                yield row, refs, where


def _iter_json(files: list[Path], root: Path) -> Iterator[tuple[dict[str, Any], list[_ImageRef], str]]:
    for f in files:
        try:
            if f.suffix == ".jsonl":
                rows = [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
            else:
                data = json.loads(f.read_text(encoding="utf-8"))
                rows = data if isinstance(data, list) else [data]
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetFormatError(f"{f}: not valid JSON ({e})") from e
        for k, row in enumerate(rows):
            where = f"{f.name}[{k}]"
            if not isinstance(row, dict):
                raise DatasetFormatError(f"{where}: a question must be a JSON object")
            images = row.get("image")
            if images is None:
                images = row.get("path")
            if isinstance(images, str):
                images = [images]
            if not isinstance(images, list) or not images or not all(isinstance(p, str) for p in images):
                raise DatasetFormatError(f"{where}: 'image' must be a list of image file paths")
            refs = []
            for p in images:
                cands = [f.parent / p, root / p, root / "images" / p]
                hit = next((c for c in cands if c.is_file()), None)
                if hit is None:
                    raise DatasetNotFoundError(f"{where}: image {p!r} not found next to {f} or under {root}")
                refs.append(_ImageRef(name=hit.name, file=hit))
            yield row, refs, where


def xlrs_files(root: str | Path) -> tuple[str, list[Path]]:
    """Which layout a local XLRS-Bench copy has, and its files ("parquet" | "json")."""
    root = Path(root)
    if not root.exists():
        raise DatasetNotFoundError(
            f"XLRS-Bench copy {root} does not exist; it cannot be downloaded here. Put a local copy of "
            "initiacms/XLRS-Bench-lite (parquet) or the JSON-per-question layout there and set dataset_path"
        )
    if root.is_file():
        files = [root]
    else:
        files = sorted(root.rglob("*.parquet")) or sorted(
            p for p in root.rglob("*") if p.suffix in (".json", ".jsonl") and p.is_file()
        )
    if not files:
        raise DatasetNotFoundError(f"{root}: no *.parquet, *.json or *.jsonl files of XLRS-Bench found")
    kind = "parquet" if files[0].suffix == ".parquet" else "json"
    return kind, files


def load_xlrs(
    root: str | Path,
    work_dir: str | Path,
    *,
    limit: int | None = None,
    categories: list[str] | None = None,
) -> tuple[list[VQASample], Path]:
    """Read a local XLRS-Bench(-lite) copy into `VQASample`s and write each distinct image once to
    `<work_dir>/raw/`. Returns (samples, raw image folder). `categories` filters by "Task/Subtask" or short
    name ("OCL"); `limit` keeps the first N questions (after filtering)."""
    root = Path(root)
    work_dir = Path(work_dir)
    kind, files = xlrs_files(root)
    rows = _iter_parquet(files) if kind == "parquet" else _iter_json(files, root if root.is_dir() else root.parent)
    writer = _RawWriter(work_dir / "raw")
    wanted = set(categories or [])
    samples: list[VQASample] = []
    seen: set[str] = set()
    for row, refs, where in rows:
        cat = str(row.get("category", ""))
        if wanted and cat not in wanted and subtask_name(cat) not in wanted:
            continue
        ids = [writer.add(r) for r in refs]
        s = _to_sample(row, ids, where)
        if s.id in seen:
            raise DatasetFormatError(f"{where}: duplicate index {s.id}")
        seen.add(s.id)
        samples.append(s)
        if limit is not None and len(samples) >= limit:
            break
    if not samples:
        raise DatasetFormatError(f"{root}: no questions read (categories filter {sorted(wanted) or 'none'})")
    log.info("XLRS-Bench (%s): %d questions, %d images written to %s", kind, len(samples),
             len(writer._taken), writer.raw_dir)
    return samples, writer.raw_dir


def load_vqa_jsonl(path: str | Path, *, limit: int | None = None) -> list[VQASample]:
    """Our VQA JSONL (`VQASample` per line, e.g. make-scenes' vqa_test.jsonl or mine-hard's hard.jsonl)."""
    out: list[VQASample] = []
    for s in read_jsonl(path, VQASample):
        out.append(s)  # type: ignore[arg-type]
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DatasetFormatError(f"{path}: no VQA samples")
    return out


def save_vqa_jsonl(path: str | Path, samples: list[VQASample]) -> int:
    """Write samples atomically (the converted XLRS questions are cached this way)."""
    return write_jsonl(path, samples)


__all__ = [
    "XLRS_FIELDS",
    "XLRS_SUBTASKS",
    "MULTI_ANSWER_CATEGORY",
    "DatasetFormatError",
    "official_prompt",
    "subtask_name",
    "xlrs_files",
    "load_xlrs",
    "load_vqa_jsonl",
    "save_vqa_jsonl",
]
