"""Seeded toy data for tests and smoke runs: TextQA about real spectral indices (spyndex) and small VQA
scenes (coloured squares on a plain background) written as GeoTIFFs with an images.jsonl manifest."""

from __future__ import annotations

import random
from pathlib import Path

from pipeline.core.records import TargetRegion, TextQA, VQASample, write_jsonl

LETTERS = "ABCDEFGH"


def spectral_index_qa(n: int | None = None, seed: int = 0, test_fraction: float = 0.2) -> list[TextQA]:
    """MCQ "which application domain does index X belong to?" from spyndex (real facts), seeded split."""
    import spyndex

    rng = random.Random(seed)
    names = sorted(spyndex.indices)
    domains = sorted({spyndex.indices[k].application_domain for k in names})
    out: list[TextQA] = []
    for name in names:
        idx = spyndex.indices[name]
        truth = idx.application_domain
        wrong = rng.sample([d for d in domains if d != truth], 3)
        options = wrong + [truth]
        rng.shuffle(options)
        letter = LETTERS[options.index(truth)]
        out.append(TextQA(
            id=f"si-{name}", qtype="mcq", answer=letter,
            question=f"Which application domain does the spectral index {name} ({idx.long_name}) belong to?",
            choices=[f"({LETTERS[i]}) {o}" for i, o in enumerate(options)],
            rationale=[f"{name} is the {idx.long_name}.", f"{name} is used for {truth}."],
            evidence=[[name, "has_domain", truth]], hops=1, source="kg-template",
            split="test" if rng.random() < test_fraction else "train", domain="spectral-indices",
        ))
    return out[:n] if n is not None else out


def write_text_qa(out_dir: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """qa_train.jsonl / qa_test.jsonl of spectral_index_qa in out_dir."""
    out = Path(out_dir)
    qa = spectral_index_qa(seed=seed)
    tr, te = out / "qa_train.jsonl", out / "qa_test.jsonl"
    write_jsonl(tr, [q for q in qa if q.split == "train"])
    write_jsonl(te, [q for q in qa if q.split == "test"])
    return tr, te


COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 220, 30)}


def write_toy_scenes(out_dir: str | Path, n: int = 4, size: int = 1024, square: int = 48,
                     seed: int = 0) -> tuple[Path, Path]:
    """n GeoTIFF scenes, each with one coloured square; VQA "what colour is the object?" with its target.
    Returns (images.jsonl, vqa.jsonl)."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    rng = random.Random(seed)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    manifest, samples = [], []
    names = sorted(COLORS)
    for i in range(n):
        color = names[i % len(names)]
        arr = np.full((3, size, size), 90, dtype=np.uint8)
        x, y = rng.randrange(0, size - square), rng.randrange(0, size - square)
        for b in range(3):
            arr[b, y:y + square, x:x + square] = COLORS[color][b]
        rel = f"images/scene_{i}.tif"
        with rasterio.open(out / rel, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8",
                           crs="EPSG:3857", transform=from_origin(0, size, 1, 1), tiled=True,
                           blockxsize=256, blockysize=256) as dst:
            dst.write(arr)
        manifest.append({"id": f"scene_{i}", "path": rel})
        letter = LETTERS[names.index(color)]
        samples.append(VQASample(
            id=f"toy-{i}", images=[f"scene_{i}"], question="What is the colour of the square object?",
            answer=letter, qtype="single", choices=[f"({LETTERS[k]}) {c}" for k, c in enumerate(names)],
            category="Perception/Object color",
            targets=[TargetRegion(image=0, bbox=[float(x), float(y), float(x + square), float(y + square)])]
            if i % 4 != 3 else [],  # every 4th sample has no region: a direct answer
            split="train",
        ))
    write_jsonl(out / "images.jsonl", manifest)
    write_jsonl(out / "vqa.jsonl", samples)
    return out / "images.jsonl", out / "vqa.jsonl"


__all__ = ["spectral_index_qa", "write_text_qa", "write_toy_scenes", "COLORS"]
