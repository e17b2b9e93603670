"""SFT datasets: `TextQA` → chat messages; `VQASample` → oracle zoom trajectories in the tool protocol.

Text cold start: the question (with its options and an instruction) → `<think>` the graph rationale
`</think><answer>…</answer>`.
Image pre-warm: system + user prompt from `tools.protocol.build_prompt_messages` → for each target region, an
assistant turn with `zoom_in` on that region (the native box mapped into the declared frame of the image the
model saw, by `Episode.oracle_bbox`) → the tool's observation (a real crop made by `Episode.execute`) → a
final assistant turn with the answer; a sample without a target region answers directly. Trajectories are
materialized once (crops as PNG beside a `Trajectory` JSONL, resumable) so training reads small PNGs, not
rasters.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.manifest import atomic_write_text
from pipeline.core.records import JsonlAppender, TextQA, Trajectory, VQASample, read_jsonl, read_records
from sft.errors import SFTDataError, TrajectoryError
from tools.protocol import text_qa_messages

if TYPE_CHECKING:
    from tools.store import ImageStore
    from tools.zoom import ZoomConfig

log = logging.getLogger(__name__)

def read_text_qa(paths: Sequence[str | Path], split: str | None = None, limit: int | None = None,
                 qtypes: Sequence[str] = ()) -> list[TextQA]:
    """TextQA records from JSONL files (optionally one split, only some question types), in file order."""
    def keep(qa: TextQA) -> bool:
        return (not split or qa.split == split) and (not qtypes or qa.qtype in qtypes)

    return read_records(paths, TextQA, limit, keep=keep if split or qtypes else None)


# ----------------------------------------------------------------------------------------- trajectories
def oracle_trajectory(sample: VQASample, store: ImageStore, zoom_cfg: ZoomConfig, *, think: bool = True,
                      max_zooms: int | None = None) -> tuple[list[dict], list[Any], list[Any]]:
    """(messages, images, observations) of the oracle episode of a sample: overview → zoom_in on each
    target region (at most `max_zooms`, default zoom_cfg.max_turns) → answer. Crops come from the real
    tool (`Episode.execute`); a rejected box raises TrajectoryError."""
    from tools.protocol import (
        ANSWER_THINK,
        DIRECT_THINK,
        TOOL_NAME,
        ZOOM_THINK,
        ZOOM_THINK_AT,
        Episode,
        ToolCall,
        answer_think,
        build_prompt_messages,
        format_answer,
        format_box,
        format_tool_call,
        tool_message,
    )

    episode = Episode(store, list(sample.images), zoom_cfg)
    observations = list(episode.initial_observations())
    # same prompt as the agent loop (rl.agent) renders for eval, mining and RL: overview sizes included
    messages = build_prompt_messages(sample, zoom_cfg.frame, sizes=[o.image.size for o in observations])
    images = [o.image for o in observations]
    limit = zoom_cfg.max_turns if max_zooms is None else min(max_zooms, zoom_cfg.max_turns)
    targets = sample.targets[:limit]
    meta = sample.meta if isinstance(sample.meta, dict) else {}
    where, sees, asks = meta.get("zoom_on"), meta.get("sees"), meta.get("asks")
    for k, t in enumerate(targets):
        source = f"image_{t.image}"
        bbox = episode.oracle_bbox(t.image, t.bbox)
        call_text = format_tool_call(bbox, source=source)
        # a later zoom (a change pair's second, on image_1) names the image it zooms, not the site again: its box
        # is then a copy of the box the tool's text just echoed ("obs_1: zoom of image_0 [741, ...]"), a fixed
        # few tokens back, where restating the site meant a copy from before the view's tokens, which the tiny
        # model does not learn (docs/tiny_model.md, "The change pair's second call")
        at = where if k == 0 else source
        zoom_think = ZOOM_THINK_AT.format(where=at, box=format_box(bbox)) if where else ZOOM_THINK
        messages.append({"role": "assistant", "content": (zoom_think if think else "") + call_text})
        result = episode.execute(ToolCall(name=TOOL_NAME, arguments={"bbox": list(bbox), "source": source}))
        if result.error is not None or result.observation is None:
            raise TrajectoryError(f"sample {sample.id}: the zoom tool rejected the oracle box {bbox}: "
                                  f"{result.error}")
        messages.append(tool_message(result))
        observations.append(result.observation)
        images.append(result.observation.image)
    if not think:
        final = ""
    elif targets:
        final = answer_think(sees, asks) if sees else ANSWER_THINK
    else:
        final = DIRECT_THINK
    messages.append({"role": "assistant", "content": final + format_answer(sample.answer)})
    return messages, images, observations


# what a rendered trajectory depends on besides its sample: bump when oracle_trajectory's output changes for the
# same inputs (2: a change pair's second zoom names image_1), so a folder rendered before is refused, not reused
ORACLE_FORMAT = 2


def trajectory_settings(zoom_cfg: Any, *, think: bool, max_zooms: int | None) -> dict[str, Any]:
    """The settings a trajectory folder was rendered with (`trajectories.settings.json`): the oracle's format,
    think, the zoom cap and the zoom tool's settings."""
    zoom = {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(vars(zoom_cfg).items())
            if k != "read_timeout_s"}  # how long a read may take changes no pixel
    return {"oracle_format": ORACLE_FORMAT, "think": think, "max_zooms": max_zooms, "zoom": zoom}


def check_trajectory_settings(out: Path, settings: dict[str, Any]) -> None:
    """Record `settings` beside a new trajectory JSONL, or refuse a folder whose trajectories were rendered with
    others (the JSONL is resumed by sample id, so they would be reused as they are)."""
    path, meta = out / "trajectories.jsonl", out / "trajectories.settings.json"
    if path.exists() and path.stat().st_size > 0:
        try:
            had = json.loads(meta.read_text(encoding="utf-8")) if meta.exists() else {}
        except ValueError:
            had = {"unreadable": str(meta)}  # refused below like any other mismatch, with the fix to apply
        if had != settings:
            differ = sorted(k for k in set(had) | set(settings) if had.get(k) != settings.get(k))
            raise SFTDataError(f"{out} holds oracle trajectories rendered with other settings ({', '.join(differ)} "
                               f"differ{'; written by an older version' if not had else ''}); set trajectory_dir "
                               f"to a new folder, or remove {path} to render them again")
        return
    atomic_write_text(meta, json.dumps(settings, indent=2, sort_keys=True))


# PNG is lossless at every level: level 1 encodes the rendered crops ~3.5x faster than PIL's default 6 for ~20 %
# more bytes (tests/benchmarks/bench_trajectories.py), and every pixel the trainer reads is the same.
PNG_COMPRESS_LEVEL = 1


def materialize_trajectories(samples: Iterable[VQASample], store: ImageStore, zoom_cfg: ZoomConfig,
                             out_dir: str | Path, *, think: bool = True, max_zooms: int | None = None,
                             progress: bool = True, png_compress_level: int = PNG_COMPRESS_LEVEL,
                             ) -> tuple[Path, dict[str, int]]:
    """Write oracle trajectories as `Trajectory` JSONL (`trajectories.jsonl`) + PNG observations under
    `out_dir/images/`, and their LLaMA-Factory sharegpt copy + `dataset_info.json` (sft/export.py). Resumable: samples already in the JSONL are skipped; a sample whose box the tool
    rejects is counted and skipped (never crashes the build). A folder rendered with other settings (think, zoom
    cap, the tool's settings, ORACLE_FORMAT) is refused with SFTDataError rather than resumed.

    A sample's PNGs are encoded in a background thread while the next sample renders (Pillow's encoder releases
    the GIL); its JSONL line is appended only once all of them are on disk, so a killed build never leaves a line
    whose image is missing, and a failed write fails the build with its error."""
    from concurrent.futures import Future, ThreadPoolExecutor

    from tqdm import tqdm

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    check_trajectory_settings(out, trajectory_settings(zoom_cfg, think=think, max_zooms=max_zooms))
    path = out / "trajectories.jsonl"
    stats = {"written": 0, "skipped_existing": 0, "failed": 0}
    samples = list(samples)
    with JsonlAppender(path, key="sample_id") as app, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="kz-png") as writer:
        pending: list[tuple[Trajectory, list[Future]]] = []  # at most one sample: written, line not yet appended

        def settle() -> None:
            for record, saves in pending:
                for f in saves:
                    f.result()  # raises the write's error
                app.append(record)
                stats["written"] += 1
            pending.clear()

        done = app.keys()
        for s in tqdm(samples, desc="oracle trajectories", disable=not progress):
            if s.id in done:
                stats["skipped_existing"] += 1
                continue
            try:
                messages, images, observations = oracle_trajectory(s, store, zoom_cfg, think=think,
                                                                   max_zooms=max_zooms)
            except TrajectoryError as e:
                log.warning("%s", e)
                stats["failed"] += 1
                continue
            obs_dicts = []
            saves = []
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in s.id)
            for k, (o, img) in enumerate(zip(observations, images, strict=False)):
                rel = f"images/{safe}_{k}_{o.name}.png"
                saves.append(writer.submit(img.save, out / rel, compress_level=png_compress_level))
                d = o.to_dict()
                d.update(file=rel, shown_size=list(img.size))
                obs_dicts.append(d)
            settle()  # the previous sample's images are written by now, or being written while this one rendered
            pending.append((Trajectory(
                sample_id=s.id, messages=messages, observations=obs_dicts,
                final_text=messages[-1]["content"], prediction=s.answer, correct=True,
                turns=sum(m["role"] == "assistant" for m in messages), tool_calls=len(observations) - len(s.images),
                meta={"kind": "oracle", "qtype": s.qtype, "category": s.category},
            ), saves))
        settle()
    from sft.export import export_llamafactory

    export_llamafactory(path)  # the same trajectories for LLaMA-Factory (sharegpt + images), beside the JSONL
    return path, stats


# ------------------------------------------------------------------------------------------ the dataset
@dataclass
class ChatItem:
    """One SFT example: messages and image files (or in-memory images) in placeholder order."""

    messages: list[dict]
    image_files: list[str]
    kind: str  # "text" | "vqa"
    n_image_tokens: int = 0  # visual tokens after merging (for length filtering)
    images: list[Any] | None = None
    n_tokens: int = 0  # full tokenized length, set by filter_by_length (for length-grouped batches)
    image_sizes: list[tuple[int, int]] | None = None  # (w, h) each file is shown at; resized on load if it differs


FIRST_ZOOM_MODES = ("off", "add", "only", "every")


def trajectory_items(path: str | Path, merge_pixels: int = 28 * 28, *,
                     first_zoom_examples: str = "off", sample_ids: set[str] | None = None) -> list[ChatItem]:
    """ChatItems from a materialized trajectory JSONL (image paths resolved against its folder); with
    `sample_ids`, only those samples' trajectories (a folder shared by stages may hold more).

    first_zoom_examples: "add" puts after each trajectory that zooms its prefix cut right after the first zoom
    call (system, user turn with the input images, the aiming turn); "only" keeps just those prefixes (an
    aiming curriculum: every target in them is learnable, none is an answer guessed at chance); "every" keeps a
    prefix cut after each zoom call instead (a change pair's second call, on image_1, as well as its first);
    "off": whole trajectories only."""
    if first_zoom_examples not in FIRST_ZOOM_MODES:
        raise ValueError(f"first_zoom_examples {first_zoom_examples!r} not in {FIRST_ZOOM_MODES}")
    base = Path(path).parent
    items = []
    for t in read_jsonl(path, Trajectory):
        if sample_ids is not None and t.sample_id not in sample_ids:
            continue
        if first_zoom_examples in ("off", "add"):
            items.append(_chat_item(t.messages, t.observations, base, merge_pixels))
        if first_zoom_examples == "off":
            continue
        calls = [i for i, m in enumerate(t.messages[:-1]) if m["role"] == "assistant"]  # the last turn answers
        for i in calls if first_zoom_examples == "every" else calls[:1]:
            n_seen = sum(1 for m in t.messages[:i] if isinstance(m["content"], list)
                         for c in m["content"] if c.get("type") == "image")
            items.append(_chat_item(t.messages[:i + 1], t.observations[:n_seen], base, merge_pixels))
    return items


def view_swap_items(path: str | Path, trajectories: str | Path, merge_pixels: int = 28 * 28, *,
                    sample_ids: set[str] | None = None) -> tuple[list[ChatItem], int]:
    """ChatItems of make-scenes' swapped views (`swap/views.jsonl`: sample_id, file, sees, answer): each the
    oracle episode of its sample (from the materialized `trajectories`) with the view in place of the crop of its
    one zoom (shown at the crop's size: a site's crop is 224x224 or, with the box rounded to the frame, 224x196),
    and the answer turn saying what the view shows and the view's answer. The prompt and the aiming
    turn are the sample's own; only the view tells the answer. Returns (items, rows skipped: sample not among the
    trajectories or `sample_ids`, or an episode without exactly one zoom)."""
    from PIL import Image

    from tools.protocol import answer_think, format_answer

    base_t, base_v = Path(trajectories).parent, Path(path).parent
    episodes = {t.sample_id: t for t in read_jsonl(trajectories, Trajectory)
                if (sample_ids is None or t.sample_id in sample_ids) and t.tool_calls == 1}
    items, skipped = [], 0
    for row in read_jsonl(path):
        t = episodes.get(str(row.get("sample_id")))
        if t is None:
            skipped += 1
            continue
        view = base_v / str(row["file"])
        crop = dict(t.observations[-1])
        w, h = (int(v) for v in crop["shown_size"])
        with Image.open(view) as im:
            if abs(im.size[0] / im.size[1] - w / h) > 0.25:
                raise TrajectoryError(f"{view}: a swapped view is {im.size[0]}x{im.size[1]}, the crop it replaces "
                                      f"in {t.sample_id} is {w}x{h}; a view of a site should have the crop's shape")
        crop["file"] = str(view.resolve())
        think = str(t.messages[-1]["content"]).startswith("<think>")
        final = (answer_think(str(row["sees"]), row.get("asks")) if think else "") + format_answer(str(row["answer"]))
        messages = [*t.messages[:-1], {"role": "assistant", "content": final}]
        items.append(_chat_item(messages, [*t.observations[:-1], crop], base_t, merge_pixels))
    return items, skipped


def _chat_item(messages: list[dict], observations: list[dict], base: Path, merge_pixels: int) -> ChatItem:
    n_tok = sum(int(o["shown_size"][0]) * int(o["shown_size"][1]) // merge_pixels for o in observations)
    return ChatItem(messages=messages, image_files=[str(base / o["file"]) for o in observations], kind="vqa",
                    n_image_tokens=n_tok,
                    image_sizes=[(int(o["shown_size"][0]), int(o["shown_size"][1])) for o in observations])


def text_items(records: Iterable[TextQA], *, think: bool = True, system: str | None = None) -> list[ChatItem]:
    return [ChatItem(messages=text_qa_messages(q, think=think, system=system), image_files=[], kind="text")
            for q in records]


def mix(text: list[ChatItem], vqa: list[ChatItem], text_ratio: float | None, seed: int) -> list[ChatItem]:
    """Mix the two sources. None: all items of both. A ratio r in (0, 1): text items are resampled (seeded)
    so that they are a fraction r of the result; all VQA items are kept."""
    if text_ratio is None or not text or not vqa:
        return text + vqa
    rng = random.Random(seed)
    n_text = round(len(vqa) * text_ratio / (1.0 - text_ratio))
    full, rem = divmod(n_text, len(text))
    picked = text * full + rng.sample(text, rem)
    return picked + vqa


class ChatDataset:
    """Map-style dataset of {"messages", "images"} dicts for the SFT collator (PNG images load lazily)."""

    def __init__(self, items: list[ChatItem]) -> None:
        if not items:
            raise SFTDataError("the SFT dataset is empty; give text_data and/or vqa_data with records")
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from PIL import Image

        if not 0 <= i < len(self.items):
            raise IndexError(i)
        it = self.items[i]
        if it.images is not None:
            images = list(it.images)
        else:
            images = []
            for j, f in enumerate(it.image_files):
                with Image.open(f) as im:
                    rgb = im.convert("RGB")
                size = it.image_sizes[j] if it.image_sizes else rgb.size
                images.append(rgb if rgb.size == size else rgb.resize(size, Image.Resampling.BILINEAR))
        return {"messages": it.messages, "images": images}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]

    def to_hf(self) -> Any:
        """A `datasets.Dataset` of row indices whose transform yields {"messages", "images"} lazily (what
        TRL's trainer requires; messages and PIL images never go through Arrow)."""
        from datasets import Dataset

        def transform(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
            if "index" not in batch:  # a plain column read, e.g. the trainer's `dataset["length"]`
                return batch
            rows = [self[i] for i in batch["index"]]
            out = {k: v for k, v in batch.items() if k != "index"}
            out.update(messages=[r["messages"] for r in rows], images=[r["images"] for r in rows])
            return out

        return Dataset.from_dict({"index": list(range(len(self))),
                                  "length": [max(1, it.n_tokens) for it in self.items]}).with_transform(transform)


def filter_by_length(items: list[ChatItem], processor: Any, max_length: int) -> tuple[list[ChatItem], int]:
    """Drop examples whose tokenized length (text + visual tokens) exceeds max_length; returns (kept, dropped)."""
    tok = processor.tokenizer
    kept, dropped = [], 0
    for it in items:
        text = processor.apply_chat_template(it.messages, tokenize=False)
        n = len(tok(text, add_special_tokens=False)["input_ids"]) + it.n_image_tokens - len(it.image_files)
        if n > max_length:
            dropped += 1
        else:
            it.n_tokens = n
            kept.append(it)
    return kept, dropped


__all__ = [
    "read_text_qa", "oracle_trajectory", "materialize_trajectories", "ChatItem", "ChatDataset",
    "trajectory_items", "view_swap_items", "text_items", "mix", "filter_by_length",
]
