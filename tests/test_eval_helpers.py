"""Shared fixtures of the eval tests: a small on-disk VQA set (tiled GeoTIFFs + images.jsonl + JSONL) and
scripted backends that play an oracle zoom policy through the real protocol."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin

from pipeline.core.records import TargetRegion, VQASample, write_jsonl

COLOURS = {"Red": (230, 30, 30), "Green": (30, 200, 30), "Blue": (30, 60, 230), "White": (245, 245, 245)}
CHOICES = [f"({k}) {c}" for k, c in zip("ABCD", COLOURS, strict=True)]


def make_vqa_set(root: Path, n: int = 4, size: int = 1536, square: int = 24, seed: int = 0) -> Path:
    """n scenes, each one coloured square on a grey, noisy background; question: its colour."""
    rng = np.random.default_rng(seed)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    samples, manifest = [], []
    names = list(COLOURS)
    for i in range(n):
        arr = rng.integers(90, 130, (3, size, size), dtype=np.uint8)
        x0, y0 = int(rng.integers(64, size - 64 - square)), int(rng.integers(64, size - 64 - square))
        colour = names[i % 4]
        for b in range(3):
            arr[b, y0:y0 + square, x0:x0 + square] = COLOURS[colour][b]
        path = img_dir / f"scene_{i}.tif"
        with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8",
                           tiled=True, blockxsize=256, blockysize=256, crs="EPSG:32633",
                           transform=from_origin(500000, 4000000, 0.5, 0.5)) as ds:
            ds.write(arr)
            ds.build_overviews([2, 4, 8], rasterio.enums.Resampling.average)
        manifest.append({"id": f"scene_{i}", "path": f"images/scene_{i}.tif"})
        samples.append(VQASample(
            id=f"q{i}", images=[f"scene_{i}"], question="What colour is the small square?",
            answer="ABCD"[i % 4], choices=list(CHOICES), category="Synthetic/Object color",
            l2_category="Perception/Color" if i % 2 == 0 else "Perception/Other",
            targets=[TargetRegion(0, [x0, y0, x0 + square, y0 + square])], split="test",
        ))
    if n > 1:  # a second sub-task so macro != micro can be seen
        samples[-1].category = "Synthetic/Other"
    (root / "images.jsonl").write_text("".join(json.dumps(m) + "\n" for m in manifest))
    write_jsonl(root / "vqa_test.jsonl", samples)
    return root


def _user_text(conv: list[dict]) -> str:
    for m in conv:
        if m.get("role") == "user" and isinstance(m.get("content"), list):
            return " ".join(c.get("text", "") for c in m["content"] if c.get("type") == "text")
    return ""


def classify_colour(image) -> str:
    """The colour option whose RGB is nearest to the most saturated pixel cluster of an image."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    flat = a.reshape(-1, 3)
    spread = flat.max(axis=1) - flat.min(axis=1)
    bright = flat.mean(axis=1)
    score = np.maximum(spread, (bright - 200) * 2)  # saturated, or very bright (white)
    top = flat[np.argsort(score)[-max(4, len(flat) // 200):]].mean(axis=0)
    names = list(COLOURS)
    d = [np.linalg.norm(top - np.array(COLOURS[c])) for c in names]
    return "ABCD"[int(np.argmin(d))]


class OracleBackend:
    """Turn 1: zoom onto the target (Episode.oracle_bbox); turn 2: answer from the crop's pixels."""

    def __init__(self, samples: list[VQASample], store, zoom_cfg, answer_from_pixels: bool = True):
        self.samples = {s.images[0]: s for s in samples}
        self.store, self.zoom_cfg = store, zoom_cfg
        self.answer_from_pixels = answer_from_pixels
        self.calls = 0
        self.batches: list[int] = []

    def generate(self, conversations, images, *, max_new_tokens, temperature, top_p, stop, seeds=None):
        from tools.protocol import Episode, format_tool_call

        self.batches.append(len(conversations))
        out = []
        for conv, ims in zip(conversations, images, strict=True):
            self.calls += 1
            n_assist = sum(1 for m in conv if m["role"] == "assistant")
            sample = self._match(ims[0])
            if n_assist == 0:
                ep = Episode(self.store, sample.images, self.zoom_cfg)
                box = ep.oracle_bbox(0, sample.targets[0].bbox)
                out.append("<think>zoom on the target</think>" + format_tool_call(box, "image_0"))
            else:
                letter = classify_colour(ims[-1]) if self.answer_from_pixels else sample.answer
                out.append(f"<answer>{letter}</answer>")
        return out

    def _match(self, overview):
        from tools.zoom import read_overview

        if not hasattr(self, "_cache"):
            self._cache = {sid: np.asarray(read_overview(self.store, sid, self.zoom_cfg).image)
                           for sid in self.samples}
        a = np.asarray(overview)
        for sid, ref in self._cache.items():
            if ref.shape == a.shape and np.array_equal(ref, a):
                return self.samples[sid]
        raise AssertionError("overview not recognised")


class ScriptBackend:
    """Replies from a fixed script per turn index (same for every conversation)."""

    def __init__(self, script: list[str]):
        self.script = script
        self.seen: list[list[dict]] = []

    def generate(self, conversations, images, *, max_new_tokens, temperature, top_p, stop, seeds=None):
        out = []
        for conv in conversations:
            self.seen.append(conv)
            n = sum(1 for m in conv if m["role"] == "assistant")
            out.append(self.script[min(n, len(self.script) - 1)])
        return out


def store_for(root: Path):
    from tools.store import ImageStore

    return ImageStore.from_manifest(root / "images.jsonl")


def test_fixture_builds_and_classifier_reads_crops(tmp_path):
    from pipeline.core.records import read_jsonl
    from tools.zoom import ZoomConfig, read_region

    root = make_vqa_set(tmp_path, n=4)
    samples = list(read_jsonl(root / "vqa_test.jsonl", VQASample))
    store = store_for(root)
    cfg = ZoomConfig()
    for s in samples:
        crop = read_region(store, s.images[0], s.targets[0].bbox, cfg, name="obs_1")
        assert classify_colour(crop.image) == s.answer
    assert re.search("colour", _user_text([{"role": "user", "content": [{"type": "text", "text": "colour"}]}]))
