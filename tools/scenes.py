"""`knowzoom make-scenes`: seeded procedural UHR scenes (COGs) and XLRS-Bench-style VQA from their truth.

A scene is a land-cover map (water, forest, farmland, urban, bare, grassland) rendered with texture, roads,
small background objects (vehicles 6-12 px, houses 10-20 px) and a G x G grid of *sites*: at the centre of
each grid cell a small pad holding the question objects (ships in a harbour basin, planes on an apron next to a
runway strip, storage tanks, buildings; 32-44 px). Questions name a site by its grid cell ("the site in row 2,
column 5 of a 6x6 grid"), so where to zoom is learnable, and its objects shrink to ~1 px in the overview, so the
answer needs the zoom. Each question's `targets` is the site box: the oracle zoom on it (in the overview's
frame, rounded outward) shows the objects at >= 32 px in a 224x224 view.

Answer options have a FIXED order per question type (colours always (A) white (B) red (C) blue (D) yellow,
counts always (A) 2 ... (D) 5, ...): a tiny model measured here stays at chance when options are shuffled per
question (it learns the letter format before it learns the mapping), and a fixed order makes the letter a
function of what is seen. Answer balance comes from sampling the truth uniformly, not from shuffling.

Knowledge family ("text before vision" in miniature): "Which company operates the objects at <site>?" The
class is seen only after zooming; which company operates which class is a tiny-world fact stated only in
`kg_facts.jsonl`, text QA that make-scenes writes for the text cold start. Operator questions about some
classes (`knowledge_train_classes`) are in the training split; the held-out split asks about the others too,
as a separate sub-task ("Object operator (text only)"), whose answer needs the text fact.

Bi-temporal pairs: the same scene twice with objects added at some sites; the question counts new objects.
Train and test splits use disjoint scenes. Layout of `output_dir`: images/*.tif (COG), images.jsonl,
scenes.jsonl (ground truth), vqa_train.jsonl, vqa_test.jsonl, preview.png.

Over 500 lines on purpose: the scene truth, the question writers and the oracle boxes must agree on one
grid and one site phrasing; one module keeps them from drifting (tests/test_tools_scenes.py checks them).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.core.config import StageConfig, hfield
from pipeline.core.records import TargetRegion, TextQA, Trajectory, VQASample, write_jsonl

log = logging.getLogger(__name__)

COVERS = ("water", "forest", "farmland", "urban", "bare land", "grassland")
COVER_RGB = {
    "water": (38, 72, 104),
    "forest": (44, 78, 40),
    "farmland": (118, 128, 64),
    "urban": (120, 116, 112),
    "bare land": (150, 128, 100),
    "grassland": (92, 120, 62),
}
COLOURS = ("white", "red", "blue", "yellow")  # fixed option order of colour questions
COLOUR_RGB = {"white": (240, 240, 236), "red": (200, 30, 30), "blue": (30, 60, 210), "yellow": (235, 205, 30)}
CLASSES = ("ship", "plane", "storage tank", "building")  # fixed option order of class questions
PLURAL = {"ship": "ships", "plane": "planes", "storage tank": "storage tanks", "building": "buildings"}
COUNTS = (2, 3, 4, 5)
RELATIONS = ("left of", "right of", "above", "below")
CHANGE_COUNTS = (0, 1, 2, 3)
OPERATORS = ("Alder Co", "Birch Co", "Cedar Co", "Dune Co")  # fixed option order of operator questions
# the tiny world's facts, taught only by kg_facts.jsonl; never the class question's letter (A-D = CLASSES)
OPERATOR_OF = {"ship": "Cedar Co", "plane": "Dune Co", "storage tank": "Alder Co", "building": "Birch Co"}
PAD_RGB = {"ship": COVER_RGB["water"], "plane": (96, 96, 98), "storage tank": (168, 164, 156), "building": (134, 130, 124)}

CAT = {
    "count": ("Counting/Regional counting", "Perception"),
    "colour": ("Object properties/Object color", "Perception"),
    "class": ("Object properties/Object classification", "Perception"),
    "relation": ("Object spatial relationship/Object spatial relationship", "Perception"),
    "landuse": ("Land use classification/Regional Land use classification", "Perception"),
    "overall": ("Land use classification/Overall Land use classification", "Perception"),
    "change": ("Counting/Counting with changing detection", "Reasoning"),
    "operator": ("Object properties/Object operator", "Reasoning"),
    "operator_text_only": ("Object properties/Object operator (text only)", "Reasoning"),
}
LETTERS = "ABCDEFGH"
# a site's pad (harbour basin, apron, concrete) covers its box less this frame: a zoom on the box shows the land
# cover around the pad, which the land-use question about the site asks (a pad over the whole box hid it)
PAD_INSET = 24


@dataclass
class MakeScenesConfig(StageConfig):
    """Procedural UHR scenes + VQA. Defaults build the tiny pipeline's data in about a minute."""

    output_dir: str = hfield("runs/tiny/scenes", help="Folder for images/, images.jsonl, vqa_*.jsonl, scenes.jsonl.")
    size: int = hfield(8192, help="Scene side in pixels (square; 2048..40960).")
    n_train_scenes: int = hfield(6, help="Single-image scenes whose questions go to vqa_train.jsonl.")
    n_test_scenes: int = hfield(3, help="Held-out single-image scenes for vqa_test.jsonl.")
    n_train_pairs: int = hfield(2, help="Bi-temporal pairs (2 images each) for training.")
    n_test_pairs: int = hfield(1, help="Held-out bi-temporal pairs for testing.")
    pair_size: int = hfield(4096, help="Side of bi-temporal images (smaller: they cost two images each).")
    grid: int = hfield(8, help="Sites per side: a grid x grid array of question sites per scene.")
    site_index_base: int = hfield(1, help="Rows and columns in questions count from this (0 or 1). With grid 10, "
                                          "base 0 and the norm1000 frame, a site's zoom box is [c41, r41, c59, r59]: "
                                          "its digits copy the column c and row r (docs/tiny_model.md).")
    site_order: str = hfield("row_column", help="How questions name a site: row_column ('row 3, column 7') or "
                                                "column_row ('column 7, row 3': the order of the box digits "
                                                "[c41, r41, ...], which the tiny model learns to copy; "
                                                "docs/tiny_model.md).")
    min_site_index: int = hfield(0, help="Ask only about sites whose 0-based row and column are >= this (objects "
                                         "are drawn everywhere). 1 with grid 10 + norm1000: every box then has "
                                         "3-digit coordinates (row/column 0 give '41', breaking the copy pattern).")
    landuse_box: str = hfield("cell", help="Target of a land-use question: cell (the whole grid cell; answer: "
                                           "the cell's main cover) or site (the site box, the same zoom as the "
                                           "other questions; answer: the main cover inside that box).")
    site_hint: bool = hfield(False, help="Repeat the question's site as the user turn's last line ('Site: column 7, "
                                         "row 3.', the VQASample hint), so it stands the same number of tokens "
                                         "before the answer in every template: the tiny model then learns to aim "
                                         "at every template, not only at those whose site sits at the offset it "
                                         "learned first (docs/tiny_model.md).")
    site_box: int = hfield(144, help="Native side of a site's target box (objects 32-44 px fill it at >= 32 px in a 224 view).")
    overview_side: int = hfield(224, help="Overview side the questions are designed for: question objects stay < 2 px in it.")
    landuse_fraction: float = hfield(0.25, help="Share of sites that also get a regional land-use question.")
    knowledge_fraction: float = hfield(0.5, help="Share of single/group sites that also get an operator question "
                                                 "(the knowledge family; 0 = none).")
    knowledge_fact_repeats: int = hfield(20, help="Copies of each fact item in kg_facts.jsonl, so the few facts "
                                                  "weigh enough among thousands of KG QA in the text cold start.")
    knowledge_train_classes: list[str] = hfield(["ship", "plane"], help="Classes whose operator questions are in "
                                                "the training split; the others are asked only in the held-out "
                                                "split, answerable only with kg_facts.jsonl.")
    n_vehicles: int = hfield(3000, help="Background vehicles (6-12 px) per 8192^2 scene, scaled by area.")
    n_houses: int = hfield(1500, help="Background houses (10-20 px) in urban areas per 8192^2 scene, scaled by area.")
    compress: str = hfield("JPEG", help="COG compression: JPEG (fast, small) | DEFLATE | LZW | WEBP.")
    quality: int = hfield(90, help="JPEG/WEBP quality.")
    blocksize: int = hfield(512, help="COG tile side.")
    probe_per_task: int = hfield(24, help="vqa_probe.jsonl: a fixed, seeded held-out probe set with at most this "
                                          "many test items per sub-task (stage-by-stage before/after checks).")
    look_crops: int = hfield(0, help="Also write look/: this many synthetic site views (what a zoom on a site shows: "
                                     "land cover, pad, 1-5 objects) as one-turn trajectories, the tool turn with "
                                     "the view then 'I see 3 red ships on water.' (0 = none). `knowzoom sft "
                                     "--trajectory_data` trains the tiny model's random vision tower on them "
                                     "(docs/tiny_model.md).")
    think_asks: bool = hfield(False, help="Questions about a site also state the asked part in the options' words "
                                          "(meta 'asks', e.g. 'Colour: red'); the oracle's answer think then ends "
                                          "with it: 'I see 3 red ships on water. Colour: red.' (docs/tiny_model.md).")
    swap_views: int = hfield(0, help="Also write swap/: this many synthetic views per training question that a view "
                                     "of its site answers (count, colour, class, site land cover), each with the "
                                     "answer it gives (0 = none). `knowzoom sft --view_swap_data` trains the "
                                     "question's episode with the view in place of its crop (docs/tiny_model.md).")
    preview: bool = hfield(True, help="Write preview.png: one scene's overview and a site with its targets drawn.")
    overwrite: bool = hfield(False, help="Rewrite COGs that already exist (otherwise kept: resumable).")

    def validate(self) -> list[str]:
        p = super().validate()
        for name in ("size", "pair_size"):
            v = getattr(self, name)
            if not 2048 <= v <= 40960:
                p.append(f"{name}: {v} outside 2048..40960; pick a side in that range")
        if self.n_train_scenes < 0 or self.n_test_scenes < 0 or self.n_train_pairs < 0 or self.n_test_pairs < 0:
            p.append("n_*: scene counts must be >= 0")
        if self.n_train_scenes + self.n_test_scenes + self.n_train_pairs + self.n_test_pairs == 0:
            p.append("n_*: all scene counts are 0; ask for at least one scene")
        if self.site_index_base not in (0, 1):
            p.append("site_index_base: use 0 or 1")
        if self.site_order not in ("row_column", "column_row"):
            p.append("site_order: use row_column or column_row")
        if not 0 <= self.min_site_index < self.grid:
            p.append("min_site_index: must be within 0..grid-1")
        if self.landuse_box not in ("cell", "site"):
            p.append("landuse_box: use cell or site")
        if not 1 <= self.grid <= 16:
            p.append("grid: use 1..16 sites per side")
        if self.look_crops < 0:
            p.append("look_crops: must be >= 0")
        if self.swap_views < 0:
            p.append("swap_views: must be >= 0")
        if self.site_box < 96:
            p.append("site_box: must be >= 96 px to hold up to five 32-44 px objects")
        if self.grid and min(self.size, self.pair_size) // max(self.grid, 1) < 2 * self.site_box:
            p.append("grid/site_box: grid cells must be at least 2*site_box wide; lower grid or site_box")
        if min(self.size, self.pair_size) * 1.99 / max(self.overview_side, 1) - 2 < 32:
            p.append("size/pair_size/overview_side: scenes this small cannot hide >= 32 px objects below 2 px in "
                     "the overview; use sides >= 3700 for a 224 overview")
        if not 0 <= self.landuse_fraction <= 1:
            p.append("landuse_fraction: must be within 0..1")
        if not 0 <= self.knowledge_fraction <= 1:
            p.append("knowledge_fraction: must be within 0..1")
        bad = [c for c in self.knowledge_train_classes if c not in CLASSES]
        if bad:
            p.append(f"knowledge_train_classes: {bad} are not classes; use some of {', '.join(CLASSES)}")
        if self.compress.upper() not in ("JPEG", "DEFLATE", "LZW", "WEBP", "ZSTD", "NONE"):
            p.append("compress: use JPEG, DEFLATE, LZW, WEBP, ZSTD or NONE")
        if self.blocksize % 16 or not 128 <= self.blocksize <= 2048:
            p.append("blocksize: a multiple of 16 within 128..2048")
        return p


# -- rendering ------------------------------------------------------------------------------------------
def _smooth_noise(rng: np.random.Generator, n: int, octaves: tuple[int, ...] = (4, 8, 16, 32)) -> np.ndarray:
    """n x n smooth noise in [0, 1] from a few upsampled random grids (cheap, seeded)."""
    acc = np.zeros((n, n), np.float32)
    for k, g in enumerate(octaves):
        small = Image.fromarray(rng.random((g, g), dtype=np.float32), "F")
        acc += np.asarray(small.resize((n, n), Image.Resampling.BICUBIC), np.float32) / (1.6**k)
    acc -= acc.min()
    return acc / max(float(acc.max()), 1e-6)


def _texture_tile(rng: np.random.Generator, n: int = 512) -> np.ndarray:
    """A seeded n x n uint8 texture (0..40): fine grain + blobs, tiled over the scene."""
    fine = rng.integers(0, 14, (n, n), dtype=np.uint8)
    blobs = (_smooth_noise(rng, n, (16, 64)) * 26).astype(np.uint8)
    return fine + blobs


def _land_cover(rng: np.random.Generator, lo: int) -> np.ndarray:
    """lo x lo land-cover class map (indices into COVERS)."""
    elev = _smooth_noise(rng, lo)
    moist = _smooth_noise(rng, lo)
    dev = _smooth_noise(rng, lo, (2, 4, 8))
    lab = np.full((lo, lo), COVERS.index("grassland"), np.uint8)
    lab[moist > 0.55] = COVERS.index("forest")
    lab[(moist <= 0.55) & (elev > 0.45)] = COVERS.index("farmland")
    lab[(dev > 0.68)] = COVERS.index("urban")
    lab[(elev > 0.82) & (dev <= 0.68)] = COVERS.index("bare land")
    lab[elev < np.quantile(elev, 0.18)] = COVERS.index("water")
    return lab


def _draw_object(img: np.ndarray, cls: str, cx: int, cy: int, size: int, colour: tuple[int, int, int],
                 vertical: bool = False) -> list[int]:
    """Draw one object centred at (cx, cy); returns its native bbox [x0, y0, x1, y1]."""
    h, w = img.shape[:2]
    col = np.array(colour, np.uint8)
    dark = (col * 0.45).astype(np.uint8)

    def rect(x0: int, y0: int, x1: int, y1: int, c: np.ndarray) -> None:
        img[max(0, y0):min(h, y1), max(0, x0):min(w, x1)] = c

    if cls == "ship":
        L, W = size, max(10, int(size * 0.4))
        if vertical:
            rect(cx - W // 2, cy - L // 2 + W // 2, cx + W - W // 2, cy + L - L // 2, col)
            for i in range(W // 2):  # bow
                rect(cx - i, cy - L // 2 + W // 2 - (W // 2 - i), cx + i + 1, cy - L // 2 + W // 2 - (W // 2 - i) + 1, col)
            box = [cx - W // 2, cy - L // 2, cx + W - W // 2, cy + L - L // 2]
        else:
            rect(cx - L // 2, cy - W // 2, cx + L - L // 2 - W // 2, cy + W - W // 2, col)
            for i in range(W // 2):
                x = cx + L - L // 2 - W // 2 + (W // 2 - i)
                rect(x - 1, cy - i, x, cy + i + 1, col)
            box = [cx - L // 2, cy - W // 2, cx + L - L // 2, cy + W - W // 2]
    elif cls == "plane":
        f = max(6, size // 6)  # fuselage width
        rect(cx - f // 2, cy - size // 2, cx + f - f // 2, cy + size - size // 2, col)  # fuselage (N-S)
        rect(cx - size // 2, cy - size // 6, cx + size - size // 2, cy - size // 6 + f, col)  # wings
        rect(cx - size // 4, cy + size // 2 - f, cx + size // 4, cy + size // 2, col)  # tail
        box = [cx - size // 2, cy - size // 2, cx + size - size // 2, cy + size - size // 2]
    elif cls == "storage tank":
        r = size / 2
        yy, xx = np.ogrid[-int(r): int(r) + 1, -int(r): int(r) + 1]
        d2 = xx * xx + yy * yy
        y0, x0 = cy - int(r), cx - int(r)
        sub = img[max(0, y0): y0 + d2.shape[0], max(0, x0): x0 + d2.shape[1]]
        m = d2[: sub.shape[0], : sub.shape[1]]
        sub[m <= r * r] = dark
        sub[m <= (r - 3) ** 2] = col
        box = [x0, y0, x0 + d2.shape[1], y0 + d2.shape[0]]
    else:  # building: roof with a shadow edge
        bw, bh = size, max(20, int(size * 0.75))
        if vertical:
            bw, bh = bh, bw
        rect(cx - bw // 2 + 2, cy - bh // 2 + 2, cx + bw - bw // 2 + 2, cy + bh - bh // 2 + 2, np.array((30, 30, 30), np.uint8))
        rect(cx - bw // 2, cy - bh // 2, cx + bw - bw // 2, cy + bh - bh // 2, col)
        box = [cx - bw // 2, cy - bh // 2, cx + bw - bw // 2 + 2, cy + bh - bh // 2 + 2]
    return [int(v) for v in box]


def _site_layout(rng: np.random.Generator, k: int, box: int, size: int) -> list[tuple[int, int]]:
    """k object centres (relative to the box centre) on a jittered grid inside the site box."""
    cols = 2 if k <= 4 else 3
    rows = math.ceil(k / cols)
    cell_w, cell_h = box / cols, box / rows
    slots = [(c, r) for r in range(rows) for c in range(cols)]
    rng.shuffle(slots)
    out = []
    for c, r in slots[:k]:
        jx = (cell_w - size) / 2 * 0.5
        jy = (cell_h - size) / 2 * 0.5
        x = -box / 2 + (c + 0.5) * cell_w + rng.uniform(-jx, jx) if jx > 0 else -box / 2 + (c + 0.5) * cell_w
        y = -box / 2 + (r + 0.5) * cell_h + rng.uniform(-jy, jy) if jy > 0 else -box / 2 + (r + 0.5) * cell_h
        out.append((int(round(x)), int(round(y))))
    return out


def max_object_px(size: int, overview_side: int = 224) -> int:
    """Largest question-object side that stays < 2 px in an overview_side view of a size^2 scene (<= 44)."""
    return min(44, int(1.99 * size / overview_side) - 2)  # -2: a building's shadow edge


def _size_for(rng: np.random.Generator, k: int, box: int, max_px: int) -> int:
    """Object size (px): 32..max_px, limited so k objects fit the site box with gaps."""
    cols = 2 if k <= 4 else 3
    rows = math.ceil(k / cols)
    cap = int(min(box / cols, box / rows) - 8)
    lo = 32
    return int(rng.integers(lo, max(lo + 1, min(max_px, cap) + 1)))


@dataclass
class Scene:
    """Ground truth of one rendered scene (JSON-able)."""

    id: str
    size: int
    grid: int
    cover_lo: np.ndarray
    sites: list[dict[str, Any]]
    covers_present: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "size": self.size, "grid": self.grid, "sites": self.sites,
                "covers_present": self.covers_present}


def site_box(size: int, grid: int, box: int, row: int, col: int) -> list[int]:
    """The fixed native target box of site (row, col): centred in its grid cell."""
    cell = size / grid
    cx, cy = int((col + 0.5) * cell), int((row + 0.5) * cell)
    return [cx - box // 2, cy - box // 2, cx + box - box // 2, cy + box - box // 2]


def plan_scene(rng: np.random.Generator, scene_id: str, size: int, grid: int, box: int) -> Scene:
    """Decide land cover and the objects of every site (no pixels yet)."""
    lo = max(64, size // 16)
    cover = _land_cover(rng, lo)
    sites = []
    for r in range(grid):
        for c in range(grid):
            kind = str(rng.choice(["group", "group", "single", "pair"]))
            cls = CLASSES[int(rng.integers(len(CLASSES)))]
            if kind == "group":
                k = int(rng.choice(COUNTS))
                colours = [COLOURS[int(rng.integers(4))]] * k
            elif kind == "single":
                k, colours = 1, [COLOURS[int(rng.integers(4))]]
            else:
                k = 2
                a, b = rng.choice(4, 2, replace=False)
                colours = [COLOURS[int(a)], COLOURS[int(b)]]
            sbox = site_box(size, grid, box, r, c)
            sites.append({"row": r, "col": c, "kind": kind, "cls": cls, "colours": colours, "box": sbox,
                          "objects": []})
    present = sorted({COVERS[int(v)] for v in np.unique(cover)}, key=COVERS.index)
    return Scene(scene_id, size, grid, cover, sites, present)


def _cell_cover(scene: Scene, row: int, col: int) -> str:
    lo = scene.cover_lo.shape[0]
    a, b = int(row * lo / scene.grid), int((row + 1) * lo / scene.grid)
    c, d = int(col * lo / scene.grid), int((col + 1) * lo / scene.grid)
    vals = np.bincount(scene.cover_lo[a:b, c:d].ravel(), minlength=len(COVERS))
    return COVERS[int(vals.argmax())]


def render_scene(rng: np.random.Generator, scene: Scene, tex: np.ndarray, box: int, n_vehicles: int,
                 n_houses: int, place_objects: bool = True, overview_side: int = 224) -> np.ndarray:
    """Render the scene to an (H, W, 3) uint8 array and fill each site's object boxes."""
    size = scene.size
    lo = scene.cover_lo.shape[0]
    pal = np.array([COVER_RGB[c] for c in COVERS], np.uint8)
    rgb_lo = pal[scene.cover_lo].astype(np.int16)
    # farmland parcels: per-parcel tint on a coarse grid
    parcels = rng.integers(-22, 23, (max(2, lo // 8), max(2, lo // 8), 1)).astype(np.int16)
    parcels = np.kron(parcels, np.ones((8, 8, 1), np.int16))[:lo, :lo]
    if parcels.shape[0] < lo:
        parcels = np.pad(parcels, ((0, lo - parcels.shape[0]), (0, lo - parcels.shape[1]), (0, 0)), mode="edge")
    farm = (scene.cover_lo == COVERS.index("farmland"))[..., None]
    rgb_lo = np.where(farm, rgb_lo + parcels * np.array([1, 1, 0.3]).astype(np.int16), rgb_lo)
    rgb_lo = np.clip(rgb_lo, 0, 215).astype(np.uint8)
    img = np.asarray(Image.fromarray(rgb_lo, "RGB").resize((size, size), Image.Resampling.NEAREST)).copy()
    # texture: add a tiled uint8 texture (values <= 40 keep 215 + 40 in range)
    reps = math.ceil(size / tex.shape[0])
    t = np.tile(tex, (reps, reps))[:size, :size]
    img += t[..., None]
    del t
    # roads: a few straight roads across the scene
    road = np.array((70, 70, 72), np.uint8)
    for _ in range(max(2, size // 2048)):
        p = int(rng.integers(size // 10, size - size // 10))
        wdt = int(rng.integers(8, 14))
        if rng.random() < 0.5:
            img[p:p + wdt, :] = road
        else:
            img[:, p:p + wdt] = road
    # background houses in urban areas and vehicles anywhere on land (6-20 px; never asked about)
    area = (size / 8192) ** 2
    cover_lo = scene.cover_lo
    for _ in range(int(n_houses * area)):
        x, y = int(rng.integers(0, size - 24)), int(rng.integers(0, size - 24))
        if cover_lo[y * lo // size, x * lo // size] != COVERS.index("urban"):
            continue
        s = int(rng.integers(10, 21))
        img[y:y + s, x:x + s] = rng.integers(150, 230, 3).astype(np.uint8)
    for _ in range(int(n_vehicles * area)):
        x, y = int(rng.integers(0, size - 14)), int(rng.integers(0, size - 14))
        if cover_lo[y * lo // size, x * lo // size] == COVERS.index("water"):
            continue
        s = int(rng.integers(6, 13))
        img[y:y + max(3, s // 2), x:x + s] = rng.integers(20, 240, 3).astype(np.uint8)
    # sites: a pad (harbour basin / apron / concrete) plus the question objects
    for site in scene.sites:
        x0, y0, x1, y1 = site["box"]
        cls = site["cls"]
        m = 20
        pad = np.array(PAD_RGB[cls], np.uint8)
        a, b, c, d = y0 + PAD_INSET, y1 - PAD_INSET, x0 + PAD_INSET, x1 - PAD_INSET
        img[a:b, c:d] = pad
        img[a:b, c:d] += tex[: b - a, : d - c, None] // 4
        if cls == "plane":  # runway strip beside the apron
            img[y1 + m:y1 + m + 30, x0 - 6 * m:x1 + 6 * m] = (88, 88, 90)
            img[y1 + m + 13:y1 + m + 17, x0 - 6 * m:x1 + 6 * m:24] = (230, 230, 230)
        if place_objects:
            place_site_objects(rng, img, site, box, max_object_px(size, overview_side))
    return img


def layout_site(rng: np.random.Generator, site: dict[str, Any], box: int, extra: int = 0, max_px: int = 44,
                ) -> tuple[int, list[tuple[int, int, bool]]]:
    """Object size and (cx, cy, vertical) for the site's objects plus `extra` later ones (change pairs)."""
    x0, y0, x1, y1 = site["box"]
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    k = len(site["colours"])
    if site["kind"] == "pair":
        horizontal = bool(rng.random() < 0.5)
        size = int(rng.integers(32, max_px + 1))
        off = box // 4
        centres = [(-off, 0), (off, 0)] if horizontal else [(0, -off), (0, off)]
        if rng.random() < 0.5:
            centres = centres[::-1]
        site["first_is"] = _relation(centres[0], centres[1])
    else:
        size = _size_for(rng, k + extra, box, max_px)
        centres = _site_layout(rng, k + extra, box, size)
    return size, [(cx + dx, cy + dy, bool(rng.random() < 0.5)) for dx, dy in centres]


def draw_site(img: np.ndarray, site: dict[str, Any], size: int, layout: list[tuple[int, int, bool]],
              ) -> list[list[int]]:
    """Draw the objects of `layout` (colours: the site's, then its first colour for extra ones)."""
    colours = site["colours"] + [site["colours"][0]] * max(0, len(layout) - len(site["colours"]))
    return [_draw_object(img, site["cls"], x, y, size, COLOUR_RGB[c], vertical=v)
            for (x, y, v), c in zip(layout, colours, strict=False)]


def place_site_objects(rng: np.random.Generator, img: np.ndarray, site: dict[str, Any], box: int,
                       max_px: int = 44) -> None:
    """Lay out and draw a site's objects; records their native boxes and size in the site."""
    size, layout = layout_site(rng, site, box, max_px=max_px)
    site["objects"] = draw_site(img, site, size, layout)
    site["size"] = size


def _relation(a: tuple[int, int], b: tuple[int, int]) -> str:
    """Where a lies relative to b (image axes: y grows downwards)."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


# -- COG writing ----------------------------------------------------------------------------------------
def write_cog(arr: np.ndarray, path: Path, compress: str = "JPEG", quality: int = 90, blocksize: int = 512,
              crs: str | None = None, transform: Any = None, stage_tiled: bool = True) -> None:
    """Write an (H, W, 3) uint8 array as a COG with internal overviews (atomic rename).

    The array is staged in memory as a GTiff that GDAL's COG driver then copies. `stage_tiled` (the default) tiles
    the staging copy like the COG, so the driver reads whole blocks: 1.6–1.9x faster per 8192² scene than a striped
    staging copy, with the same bytes out (`tests/benchmarks/bench_scenes.py` measures both)."""
    import warnings

    import rasterio
    import rasterio.shutil
    from rasterio.errors import NotGeoreferencedWarning
    from rasterio.io import MemoryFile

    h, w = arr.shape[:2]
    prof: dict[str, Any] = {"driver": "GTiff", "width": w, "height": h, "count": 3, "dtype": "uint8"}
    if stage_tiled:
        prof.update(tiled=True, blockxsize=blocksize, blockysize=blocksize)
    if crs is not None:
        prof.update(crs=crs, transform=transform)
    opts: dict[str, Any] = {"compress": compress.upper(), "blocksize": blocksize,
                            "overview_resampling": "average", "num_threads": "ALL_CPUS", "BIGTIFF": "IF_SAFER"}
    if compress.upper() in ("JPEG", "WEBP"):
        opts["quality"] = quality
    tmp = path.with_name(path.name + ".tmp.tif")
    with warnings.catch_warnings(), rasterio.Env(GDAL_NUM_THREADS="ALL_CPUS"), MemoryFile() as mf:
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with mf.open(**prof) as ds:
            ds.write(arr.transpose(2, 0, 1))
        with mf.open() as src:
            rasterio.shutil.copy(src, str(tmp), driver="COG", **opts)
    os.replace(tmp, path)


# -- questions ------------------------------------------------------------------------------------------
def _rc(site: dict[str, Any], base: int = 1, order: str = "row_column") -> str:
    r, c = site["row"] + base, site["col"] + base
    return f"column {c}, row {r}" if order == "column_row" else f"row {r}, column {c}"


def _where(site: dict[str, Any], grid: int, base: int = 1, order: str = "row_column") -> str:
    return f"the site in {_rc(site, base, order)} of a {grid}x{grid} grid over the image"


def _box_cover(scene: Scene, box: list[int] | list[float], inset: int = PAD_INSET) -> str:
    """Main land cover inside a native box, outside its central pad (the box less `inset` px a side): the cover a
    zoom on a site box shows around the pad (the land-use answer when the question's target is the site box)."""
    lo = scene.cover_lo.shape[0]
    f = lo / scene.size
    x0, y0 = int(box[0] * f), int(box[1] * f)
    x1, y1 = max(x0 + 1, int(math.ceil(box[2] * f))), max(y0 + 1, int(math.ceil(box[3] * f)))
    seen = np.ones((y1 - y0, x1 - x0), bool)
    a, b = int(math.ceil((box[1] + inset) * f)) - y0, int((box[3] - inset) * f) - y0
    c, d = int(math.ceil((box[0] + inset) * f)) - x0, int((box[2] - inset) * f) - x0
    if inset > 0 and a < b and c < d:
        seen[a:b, c:d] = False
    vals = np.bincount(scene.cover_lo[y0:y1, x0:x1][seen].ravel(), minlength=len(COVERS))
    return COVERS[int(vals.argmax())]


def site_description(scene: Scene, site: dict[str, Any]) -> str:
    """What a zoom on a site shows, in the words of the answer options: "3 red ships on water", "1 white plane on
    urban", "a blue ship below a red ship on forest". The oracle trajectories state it before the answer
    (protocol.ANSWER_THINK_SEES): one reading of the crop that every question about the site shares, then the
    option it picks, instead of a letter guessed straight from the image (docs/tiny_model.md)."""
    cls, cols = site["cls"], site["colours"]
    cover = _box_cover(scene, site["box"])
    if site["kind"] == "pair":
        return f"a {cols[0]} {cls} {site['first_is']} a {cols[1]} {cls} on {cover}"
    return f"{len(cols)} {cols[0]} {PLURAL[cls] if len(cols) > 1 else cls} on {cover}"


def change_description(site: dict[str, Any]) -> str:
    """What the two zooms of a change question show: "1 ship before, 3 after: 2 new"."""
    k, new = len(site["colours"]), int(site.get("new", 0))
    return f"{k} {PLURAL[site['cls']] if k > 1 else site['cls']} before, {k + new} after: {new} new"


# the asked part of each sub-task, as the answer think names it (think_asks)
ASK_LABEL = {"count": "Count", "colour": "Colour", "class": "Class", "landuse": "Cover", "relation": "Relation",
             "operator": "Operator", "operator_text_only": "Operator", "change": "New"}


def asks_text(kind: str, choices: list[str], answer: str) -> str:
    """'Colour: red': the asked part and the right option's words."""
    return f"{ASK_LABEL[kind]}: {choices[LETTERS.index(answer)].split(') ', 1)[1]}"


def _opts(values: tuple, fmt: Any = str) -> list[str]:
    return [f"({LETTERS[i]}) {fmt(v)}" for i, v in enumerate(values)]


def scene_questions(scene: Scene, image_id: str, split: str, rng: np.random.Generator,
                    landuse_fraction: float, knowledge_fraction: float = 0.0,
                    knowledge_train_classes: tuple[str, ...] | list[str] = (), base: int = 1,
                    order: str = "row_column", min_index: int = 0, landuse_box: str = "cell",
                    site_hint: bool = False, think_asks: bool = False) -> list[VQASample]:
    """XLRS-style MCQs from a scene's truth; each with the site box as target region (and, with `site_hint`,
    the site repeated as the hint line)."""
    out: list[VQASample] = []
    g = scene.grid

    def add(kind: str, question: str, choices: list[str], answer: str, tsite: dict[str, Any] | None,
            qtype: str = "single", **meta: Any) -> None:
        cat, l2 = CAT[kind]
        targets = [TargetRegion(image=0, bbox=[float(v) for v in tsite["box"]])] if tsite else []
        sid = f"{image_id}-{kind}-{tsite['row']}-{tsite['col']}" if tsite else f"{image_id}-{kind}"
        hint = f"Site: {meta['zoom_on']}." if site_hint and "zoom_on" in meta else ""
        if think_asks and qtype == "single" and "sees" in meta:
            meta["asks"] = asks_text(kind, choices, answer)
        out.append(VQASample(id=sid, images=[image_id], question=question, answer=answer, qtype=qtype,
                             choices=choices, category=cat, l2_category=l2, targets=targets, split=split,
                             meta={"scene": scene.id, "task": kind, **meta}, hint=hint))

    for site in scene.sites:
        if min(site["row"], site["col"]) < min_index:
            continue
        where = _where(site, g, base, order)
        cls, cols, k = site["cls"], site["colours"], len(site["colours"])
        meta = {"site": [site["row"], site["col"]], "object_size": site.get("size"), "objects": site["objects"],
                "zoom_on": _rc(site, base, order), "sees": site_description(scene, site)}
        if site["kind"] == "group":
            add("count", f"How many {PLURAL[cls]} are at {where}?", _opts(COUNTS),
                LETTERS[COUNTS.index(k)], site, **meta)
            add("colour", f"What colour are the {PLURAL[cls]} at {where}?", _opts(COLOURS),
                LETTERS[COLOURS.index(cols[0])], site, **meta)
            add("class", f"What kind of objects are at {where}?", _opts(CLASSES, lambda c: PLURAL[c]),
                LETTERS[CLASSES.index(cls)], site, **meta)
        elif site["kind"] == "single":
            add("colour", f"What colour is the {cls} at {where}?", _opts(COLOURS),
                LETTERS[COLOURS.index(cols[0])], site, **meta)
            add("class", f"What kind of object is at {where}?", _opts(CLASSES),
                LETTERS[CLASSES.index(cls)], site, **meta)
        else:
            add("relation", f"At {where}, where is the {cols[0]} {cls} relative to the {cols[1]} {cls}?",
                _opts(RELATIONS), LETTERS[RELATIONS.index(site["first_is"])], site, **meta)
        if site["kind"] != "pair" and rng.random() < knowledge_fraction:
            seen = cls in knowledge_train_classes
            if seen or split != "train":  # text-only classes are never asked in the training split
                add("operator" if seen else "operator_text_only",
                    f"Which company operates the object{'s' if k > 1 else ''} at {where}?", _opts(OPERATORS),
                    LETTERS[OPERATORS.index(OPERATOR_OF[cls])], site, knowledge=True, **meta)
        if rng.random() < landuse_fraction:
            if landuse_box == "site":
                cover, s = _box_cover(scene, site["box"]), site
                question = f"What is the main land cover at {where}?"
            else:
                cover = _cell_cover(scene, site["row"], site["col"])
                cell = scene.size / g
                cbox = [site["col"] * cell, site["row"] * cell, (site["col"] + 1) * cell, (site["row"] + 1) * cell]
                s = dict(site, box=[float(v) for v in cbox])
                question = (f"What is the main land cover of the grid cell in {_rc(site, base, order)} of a {g}x{g} "
                            "grid over the image (around its site)?")
            add("landuse", question, _opts(COVERS), LETTERS[COVERS.index(cover)], s,
                site=[site["row"], site["col"]], zoom_on=_rc(site, base, order),
                **({"sees": meta["sees"]} if landuse_box == "site" else {}))
    letters = "".join(LETTERS[COVERS.index(c)] for c in scene.covers_present)
    add("overall", "Which land-cover types appear in this image? Select all that apply.", _opts(COVERS),
        letters, None, qtype="multi")
    return out


def pair_questions(scene: Scene, ids: tuple[str, str], split: str, base: int = 1, order: str = "row_column",
                   min_index: int = 0, site_hint: bool = False, think_asks: bool = False) -> list[VQASample]:
    """Change-detection counting: how many new objects appeared at a site between image_0 and image_1."""
    out = []
    for site in scene.sites:
        if min(site["row"], site["col"]) < min_index:
            continue
        n_new = int(site.get("new", 0))
        where = _where(site, scene.grid, base, order)
        cat, l2 = CAT["change"]
        box = [float(v) for v in site["box"]]
        out.append(VQASample(
            id=f"{ids[0]}-change-{site['row']}-{site['col']}", images=list(ids),
            question=f"Comparing image_0 (earlier) with image_1 (later), how many new {PLURAL[site['cls']]} "
                     f"appeared at {where}?",
            answer=LETTERS[CHANGE_COUNTS.index(n_new)], qtype="single", choices=_opts(CHANGE_COUNTS),
            category=cat, l2_category=l2,
            targets=[TargetRegion(image=0, bbox=box), TargetRegion(image=1, bbox=box)], split=split,
            meta={"scene": scene.id, "task": "change", "site": [site["row"], site["col"]],
                  "zoom_on": _rc(site, base, order), "sees": change_description(site),
                  "object_size": site.get("size"), "objects": site.get("objects_after", []),
                  **({"asks": f"{ASK_LABEL['change']}: {n_new}"} if think_asks else {})},
            hint=f"Site: {_rc(site, base, order)}." if site_hint else "",
        ))
    return out


def probe_subset(samples: list[VQASample], per_task: int, seed: int = 0) -> list[VQASample]:
    """A seeded subset of at most `per_task` items per sub-task (category), in the samples' own order."""
    rng = np.random.default_rng([seed, 11])
    by: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by.setdefault(s.category, []).append(i)
    keep: set[int] = set()
    for idx in by.values():
        keep.update(int(i) for i in (rng.choice(idx, per_task, replace=False) if len(idx) > per_task else idx))
    return [s for i, s in enumerate(samples) if i in keep]


def knowledge_facts(seed: int = 0) -> list[TextQA]:
    """Text QA stating the tiny world's operator facts. The `train` split has 6 phrasings per fact; the `test`
    split (kg_facts_test.jsonl) asks the same facts in 17 phrasings never trained (new verbs, word orders and
    answer forms; true/false balanced), the text cold start's check that the tiny model learned the fact, not
    the sentence. Chance on the test split: 25 % for its 11 four-option items per fact, 50 % for its 6 true/false."""
    out: list[TextQA] = []
    rng = np.random.default_rng([seed, 7])
    for cls, op in OPERATOR_OF.items():
        pl = PLURAL[cls]
        fact = f"In the KnowZoom scenes, {pl} are operated by {op}."
        letter = LETTERS[OPERATORS.index(op)]
        ops, classes = _opts(OPERATORS), _opts(CLASSES, lambda c: PLURAL[c])
        cls_letter = LETTERS[CLASSES.index(cls)]
        wrong = [o for o in OPERATORS if o != op]
        items = [
            ("train", "mcq", f"Which company operates the {pl} in the KnowZoom scenes?", ops, letter),
            ("train", "mcq", f"Which company operates objects that are {pl}?", ops, letter),
            ("train", "mcq", f"Which objects does {op} operate?", classes, cls_letter),
            ("train", "tf", f"True or false: {op} operates the {pl}.", [], "true"),
            ("train", "tf", f"True or false: {OPERATORS[(OPERATORS.index(op) + 1) % 4]} operates the {pl}.", [],
             "false"),
            ("train", "fill", f"In the KnowZoom scenes, {pl} are operated by ____.", [], op),
        ]
        items += [("test", "mcq", q, ops, letter) for q in (
            f"The {pl} seen after zooming in: which company operates them?",
            f"Who is the operator of the {pl} in the KnowZoom scenes?",
            f"Which firm runs the {pl}?",
            f"Name the operator of the {pl} in the KnowZoom scenes.",
            f"Which operator is responsible for the {pl}?",
            f"{pl.capitalize()} in the KnowZoom scenes belong to which operator?",
            f"Who runs all {pl} in the KnowZoom scenes?",
            f"Which company manages the {pl} seen in the images?")]
        items += [("test", "mcq", q, classes, cls_letter) for q in (
            f"{op} is the operator of which objects?",
            f"Which objects are run by {op}?",
            f"What kind of object does {op} operate?")]
        # true/false: one true and one false statement per phrasing; each wrong operator is the false one once
        for j, tf in enumerate(("True or false: the {pl} in the KnowZoom scenes are operated by {o}.",
                                "True or false: {o} runs the {pl}.",
                                "True or false: the operator of the {pl} is {o}.")):
            items += [("test", "tf", tf.format(pl=pl, o=op), [], "true"),
                      ("test", "tf", tf.format(pl=pl, o=wrong[(j + 1) % 3]), [], "false")]
        for j, (split, qtype, q, choices, ans) in enumerate(items):
            out.append(TextQA(id=f"fact-{cls.replace(' ', '_')}-{j}", question=q, qtype=qtype, answer=ans,
                              choices=choices, rationale=[fact], evidence=[[pl, "operated_by", op]], hops=1,
                              source="kg-template", split=split, domain="knowzoom-scenes"))
    order = rng.permutation(len(out))
    return [out[int(i)] for i in order]


# -- look set: synthetic site views for the tiny model's vision tower -------------------------------------
def look_view(rng: np.random.Generator, tex: np.ndarray, site_box: int = 144, max_px: int = 44, view: int = 224,
              *, cls: str | None = None, k: int | None = None) -> tuple[Image.Image, str, dict[str, Any]]:
    """One synthetic view of a site as the oracle zoom shows it (the box plus ~1 % rounding, magnified to
    `view` px): a land-cover patch with the scene texture, the pad, and 1-5 objects drawn by the scenes' own
    code, of class `cls` and count `k` where given (drawn otherwise); returns (image, what it shows in
    site_description's words, its attributes: count, colour, class, cover)."""
    side = site_box + 3
    cover = COVERS[int(rng.integers(len(COVERS)))]
    drawn_cls = CLASSES[int(rng.integers(len(CLASSES)))]
    drawn_k = 1 if rng.random() < 0.25 else int(rng.choice(COUNTS))
    cls, k = cls or drawn_cls, k or drawn_k
    colour = COLOURS[int(rng.integers(len(COLOURS)))]
    ox, oy = (int(v) for v in rng.integers(0, tex.shape[0] - side, 2))
    arr = np.array(COVER_RGB[cover], np.int16) + tex[oy:oy + side, ox:ox + side, None].astype(np.int16)
    img = np.clip(arr, 0, 255).astype(np.uint8)
    o = 1 + int(rng.integers(0, 2))
    site = {"kind": "single" if k == 1 else "group", "cls": cls, "colours": [colour] * k,
            "box": [o, o, o + site_box, o + site_box]}
    a, b = o + PAD_INSET, o + site_box - PAD_INSET
    img[a:b, a:b] = PAD_RGB[cls]
    img[a:b, a:b] += tex[: b - a, : b - a, None] // 4
    size, layout = layout_site(rng, site, site_box, max_px=max_px)
    draw_site(img, site, size, layout)
    noun = PLURAL[cls] if k > 1 else cls
    attrs = {"count": k, "colour": colour, "class": cls, "cover": cover}
    return (Image.fromarray(img).resize((view, view), Image.Resampling.BILINEAR), f"{k} {colour} {noun} on {cover}",
            attrs)


def write_look_set(cfg: MakeScenesConfig, out: Path, tex: np.ndarray) -> int:
    """look/trajectories.jsonl + look/images/: `cfg.look_crops` one-turn trajectories, each the tool turn of a
    zoom on a site (its view and the tool's text for a site box) then the answer think naming what it shows
    (protocol.ANSWER_THINK_SEES): the in-episode step from a view to its words, without the rest of the
    episode. Views are drawn like the scenes' sites but are not from any scene (no test site is among them)."""
    from tools.protocol import ANSWER_THINK_SEES

    rng = np.random.default_rng([cfg.seed, 5])
    (out / "images").mkdir(parents=True, exist_ok=True)
    max_px = max_object_px(cfg.size, cfg.overview_side)
    rows = []
    for i in range(cfg.look_crops):
        image, sees, _ = look_view(rng, tex, cfg.site_box, max_px)
        name = f"images/look_{i:05d}.png"
        image.save(out / name)
        c, r = (int(v) for v in rng.integers(1, 10, 2))
        tool_text = f"obs_1: zoom of image_0 [{c}41, {r}41, {c}59, {r}59], shown at {image.width}x{image.height}."
        think = ANSWER_THINK_SEES.format(sees=sees)
        rows.append(Trajectory(
            sample_id=f"look_{i:05d}",
            messages=[{"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": tool_text}]},
                      {"role": "assistant", "content": think}],
            observations=[{"name": "obs_1", "file": name, "shown_size": list(image.size)}],
            final_text=think, meta={"kind": "look", "sees": sees}))
    return write_jsonl(out / "trajectories.jsonl", rows)


# the questions whose answer a site view alone gives, with the option values their letters index
SWAP_OPTIONS: dict[str, tuple[Any, ...]] = {"count": COUNTS, "colour": COLOURS, "class": CLASSES, "landuse": COVERS}
SWAP_ATTR = {"count": "count", "colour": "colour", "class": "class", "landuse": "cover"}


def write_swap_views(cfg: MakeScenesConfig, out: Path, tex: np.ndarray, samples: list[VQASample],
                     scenes: list[Scene]) -> int:
    """swap/views.jsonl + swap/images/: for each training question about one site that a view of the site
    answers (count, colour, class, and land cover when `landuse_box` is 'site'), `cfg.swap_views` synthetic
    views of that site, with the site's class and object count except where the question asks for them, and the
    answer each view gives. `knowzoom sft --view_swap_data` trains the question's oracle episode again with the
    view in place of the zoom's crop and the view's answer, so that only the view tells the answer: thousands of
    distinct views where six scenes hold ~500 sites (docs/tiny_model.md, "Reading a view")."""
    rng = np.random.default_rng([cfg.seed, 6])
    (out / "images").mkdir(parents=True, exist_ok=True)
    max_px = max_object_px(cfg.size, cfg.overview_side)
    sites = {(sc.id, site["row"], site["col"]): site for sc in scenes for site in sc.sites}
    rows: list[dict[str, Any]] = []
    for q in samples:
        meta = q.meta if isinstance(q.meta, dict) else {}
        task = meta.get("task")
        if task not in SWAP_OPTIONS or "sees" not in meta or len(q.images) != 1:
            continue
        site = sites.get((meta["scene"], *meta["site"]))
        if site is None or site["kind"] == "pair":
            continue
        for _ in range(cfg.swap_views):
            cls = CLASSES[int(rng.integers(len(CLASSES)))] if task == "class" else site["cls"]
            k = int(rng.choice(COUNTS)) if task == "count" else len(site["colours"])
            image, sees, attrs = look_view(rng, tex, cfg.site_box, max_px, cls=cls, k=k)
            name = f"images/swap_{len(rows):05d}.png"
            image.save(out / name)
            letter = LETTERS[SWAP_OPTIONS[task].index(attrs[SWAP_ATTR[task]])]
            rows.append({"sample_id": q.id, "task": task, "file": name, "sees": sees, "answer": letter,
                         **({"asks": asks_text(task, q.choices, letter)} if "asks" in meta else {})})
    return write_jsonl(out / "views.jsonl", rows)


# -- stage ----------------------------------------------------------------------------------------------
def _make_single(cfg: MakeScenesConfig, idx: int, split: str, img_dir: Path, tex: np.ndarray, seed_index: int,
                 write: Callable[[np.ndarray, Path], None]) -> tuple[Scene, list[VQASample], np.ndarray | None]:
    rng = np.random.default_rng([cfg.seed, seed_index, 1])
    sid = f"scene_{split}_{idx:03d}"
    scene = plan_scene(rng, sid, cfg.size, cfg.grid, cfg.site_box)
    path = img_dir / f"{sid}.tif"
    arr = render_scene(rng, scene, tex, cfg.site_box, cfg.n_vehicles, cfg.n_houses,
                       overview_side=cfg.overview_side)
    if cfg.overwrite or not path.exists():
        write(arr, path)
    qs = scene_questions(scene, sid, split, np.random.default_rng([cfg.seed, seed_index, 2]), cfg.landuse_fraction,
                         cfg.knowledge_fraction, cfg.knowledge_train_classes, cfg.site_index_base,
                         cfg.site_order, cfg.min_site_index, cfg.landuse_box, cfg.site_hint, cfg.think_asks)
    return scene, qs, arr


def _make_pair(cfg: MakeScenesConfig, idx: int, split: str, img_dir: Path, tex: np.ndarray, seed_index: int,
               write: Callable[[np.ndarray, Path], None]) -> tuple[Scene, list[VQASample], list[str]]:
    rng = np.random.default_rng([cfg.seed, seed_index, 3])
    sid = f"pair_{split}_{idx:03d}"
    scene = plan_scene(rng, sid, cfg.pair_size, cfg.grid, cfg.site_box)
    for site in scene.sites:  # change pairs: groups of 1-3 objects, 0-3 new (max 5 after)
        site["kind"] = "group"
        k = int(rng.integers(1, 3))
        site["colours"] = [COLOURS[int(rng.integers(4))]] * k
        site["new"] = int(rng.choice(CHANGE_COUNTS))
    before = render_scene(rng, scene, tex, cfg.site_box, cfg.n_vehicles, cfg.n_houses, place_objects=False)
    after = before.copy()
    ids = (f"{sid}_t0", f"{sid}_t1")
    for site in scene.sites:
        size, layout = layout_site(rng, site, cfg.site_box, extra=site["new"],
                                   max_px=max_object_px(cfg.pair_size, cfg.overview_side))
        k = len(site["colours"])
        site["objects"] = draw_site(before, site, size, layout[:k])
        site["objects_after"] = draw_site(after, site, size, layout)
        site["size"] = size
    for arr, iid in zip((before, after), ids, strict=True):
        path = img_dir / f"{iid}.tif"
        if cfg.overwrite or not path.exists():
            write(arr, path)
    return scene, pair_questions(scene, ids, split, cfg.site_index_base, cfg.site_order, cfg.min_site_index,
                                 cfg.site_hint, cfg.think_asks), list(ids)


def write_preview(arr: np.ndarray, scene: Scene, path: Path, overview_side: int = 448) -> None:
    """A PNG: the scene overview with site boxes drawn, next to one site at native resolution."""
    from PIL import ImageDraw

    size = scene.size
    step = max(1, size // overview_side)
    ov = Image.fromarray(np.ascontiguousarray(arr[::step, ::step]), "RGB")
    d = ImageDraw.Draw(ov)
    for s in scene.sites:
        x0, y0, x1, y1 = (v / step for v in s["box"])
        d.rectangle([x0 - 3, y0 - 3, x1 + 3, y1 + 3], outline=(255, 0, 255), width=2)
    site = next((s for s in scene.sites if s["kind"] == "group"), scene.sites[0])
    x0, y0, x1, y1 = site["box"]
    m = 40
    crop = Image.fromarray(np.ascontiguousarray(arr[y0 - m:y1 + m, x0 - m:x1 + m]), "RGB")
    crop = crop.resize((crop.width * 2, crop.height * 2), Image.Resampling.NEAREST)
    dc = ImageDraw.Draw(crop)
    for b in site["objects"]:
        dc.rectangle([(b[0] - x0 + m) * 2, (b[1] - y0 + m) * 2, (b[2] - x0 + m) * 2, (b[3] - y0 + m) * 2],
                     outline=(255, 0, 255), width=2)
    canvas = Image.new("RGB", (ov.width + crop.width + 10, max(ov.height, crop.height)), (255, 255, 255))
    canvas.paste(ov, (0, 0))
    canvas.paste(crop, (ov.width + 10, 0))
    canvas.save(path)


class _CogWriter:
    """Writes each rendered scene's COG in one background thread while the next scene renders (GDAL's COG driver
    and its JPEG encoder release the GIL). At most one write is in flight, so at most two scenes are in memory
    beside the one rendering; a failed write raises at the next `write` or at `close`."""

    def __init__(self, cfg: MakeScenesConfig) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.cfg = cfg
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="write-cog")
        self.pending: Any = None

    def write(self, arr: np.ndarray, path: Path) -> None:
        self._wait()
        c = self.cfg
        self.pending = self.pool.submit(write_cog, arr, path, c.compress, c.quality, c.blocksize)

    def _wait(self) -> None:
        if self.pending is not None:
            fut, self.pending = self.pending, None
            fut.result()

    def close(self) -> None:
        try:
            self._wait()
        finally:
            self.pool.shutdown(wait=True)


def run(cfg: MakeScenesConfig) -> dict[str, Any]:
    """Render scenes and pairs as COGs, write the manifest, ground truth and VQA splits."""
    from tqdm import tqdm

    t0 = time.time()
    out = Path(cfg.output_dir)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    tex = _texture_tile(np.random.default_rng([cfg.seed, 0]))
    images: list[dict[str, str]] = []
    truth: list[dict[str, Any]] = []
    vqa: dict[str, list[VQASample]] = {"train": [], "test": []}
    scenes: list[Scene] = []
    # (kind, split, index in its split, seed index): the seed index runs on across the splits, so a test scene is
    # never a copy of the train scene with the same index (before, both drew from [seed, index] and every test
    # scene repeated a train scene, questions included)
    jobs = ([("single", "train", i, i) for i in range(cfg.n_train_scenes)]
            + [("single", "test", i, cfg.n_train_scenes + i) for i in range(cfg.n_test_scenes)]
            + [("pair", "train", i, i) for i in range(cfg.n_train_pairs)]
            + [("pair", "test", i, cfg.n_train_pairs + i) for i in range(cfg.n_test_pairs)])
    preview_done = not cfg.preview
    writer = _CogWriter(cfg)
    try:
        for kind, split, i, seed_index in tqdm(jobs, desc="make-scenes", unit="scene"):
            if kind == "single":
                scene, qs, arr = _make_single(cfg, i, split, img_dir, tex, seed_index, writer.write)
                ids = [scene.id]
                if not preview_done and arr is not None:
                    write_preview(arr, scene, out / "preview.png")
                    preview_done = True
                del arr
            else:
                scene, qs, ids = _make_pair(cfg, i, split, img_dir, tex, seed_index, writer.write)
            images += [{"id": iid, "path": f"images/{iid}.tif"} for iid in ids]
            truth.append({**scene.to_dict(), "split": split, "images": ids})
            scenes.append(scene)
            vqa[split] += qs
    finally:
        writer.close()
    write_jsonl(out / "images.jsonl", images)
    write_jsonl(out / "scenes.jsonl", truth)
    n_train = write_jsonl(out / "vqa_train.jsonl", vqa["train"])
    n_test = write_jsonl(out / "vqa_test.jsonl", vqa["test"])
    n_probe = write_jsonl(out / "vqa_probe.jsonl", probe_subset(vqa["test"], cfg.probe_per_task, cfg.seed))
    facts = knowledge_facts(cfg.seed) if cfg.knowledge_fraction > 0 else []
    write_jsonl(out / "kg_facts.jsonl", [dataclasses.replace(f, id=f"{f.id}-r{r}") for r in
                                          range(max(1, cfg.knowledge_fact_repeats)) for f in facts if f.split == "train"])
    write_jsonl(out / "kg_facts_test.jsonl", [f for f in facts if f.split == "test"])
    n_look = write_look_set(cfg, out / "look", tex) if cfg.look_crops else 0
    n_swap = write_swap_views(cfg, out / "swap", tex, vqa["train"], scenes) if cfg.swap_views else 0
    by_cat: dict[str, int] = {}
    for s in vqa["test"]:
        by_cat[s.category] = by_cat.get(s.category, 0) + 1
    summary = {"images": len(images), "vqa_train": n_train, "vqa_test": n_test, "vqa_probe": n_probe,
               "test_by_category": by_cat,
               "kg_facts": sum(f.split == "train" for f in facts), "look_views": n_look, "swap_views": n_swap,
               "seconds": round(time.time() - t0, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


__all__ = ["MakeScenesConfig", "run", "plan_scene", "render_scene", "scene_questions", "site_box", "write_cog",
           "COLOURS", "CLASSES", "COUNTS", "RELATIONS", "COVERS", "CHANGE_COUNTS", "OPERATORS", "OPERATOR_OF",
           "knowledge_facts"]
