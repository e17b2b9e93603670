"""Scripted policies that validate the zoom environment (`knowzoom`'s scripted-policy check).

Both policies answer with the same simple pixel classifier, so the only difference is what they look at:
- `oracle`: zooms on the target region (Episode.oracle_bbox, through the real tool and protocol), then
  classifies the crop it got back;
- `overview`: never zooms; classifies the same region cut from the overview it was shown.
If the crop really shows the evidence the oracle scores near 100%; if the overview hides it, the no-zoom
policy falls to near chance. Both numbers are measured, not assumed. Classifiers exist for the colour and
count questions of tools/scenes.py (`meta.task` "colour" / "count"); other questions are not scripted.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import numpy as np
from PIL import Image

from pipeline.core.records import VQASample

SCRIPTED_TASKS = ("colour", "count")


def _palette(extra: dict[str, tuple[int, int, int]] | None = None) -> dict[str, tuple[int, int, int]]:
    from tools.scenes import COLOUR_RGB

    return dict(COLOUR_RGB, **(extra or {}))


def _option_texts(sample: VQASample) -> list[str]:
    return [re.sub(r"^\([A-Z]\)\s*", "", c).strip().lower() for c in sample.choices]


def classify_colour(view: Image.Image, sample: VQASample, max_dist: float = 60.0) -> str | None:
    """The option colour with the most pixels within `max_dist` (RGB) of it; None when no pixel is."""
    pal = _palette()
    opts = _option_texts(sample)
    a = np.asarray(view.convert("RGB"), dtype=np.float32).reshape(-1, 3)
    votes = []
    for name in opts:
        rgb = np.array(pal.get(name, (-999, -999, -999)), dtype=np.float32)
        votes.append(int((np.linalg.norm(a - rgb, axis=1) < max_dist).sum()))
    if max(votes) == 0:
        return None
    return "ABCDEFGH"[int(np.argmax(votes))]


def count_objects(view: Image.Image, sample: VQASample, max_dist: float = 60.0, min_area_frac: float = 0.002) -> str | None:
    """Connected blobs of object-coloured pixels, matched to the nearest count option."""
    pal = _palette()
    a = np.asarray(view.convert("RGB"), dtype=np.float32)
    mask = np.zeros(a.shape[:2], dtype=bool)
    for rgb in pal.values():
        mask |= np.linalg.norm(a - np.array(rgb, dtype=np.float32), axis=2) < max_dist
    areas = _blob_areas(mask)
    if not areas:
        return None
    k = sum(1 for a in areas if a >= max(2.0, min_area_frac * mask.size))
    opts = []
    for t in _option_texts(sample):
        try:
            opts.append(int(t))
        except ValueError:
            opts.append(10**6)
    return "ABCDEFGH"[int(np.argmin([abs(o - k) for o in opts]))]


def _blob_areas(mask: np.ndarray) -> list[int]:
    """Sizes of 4-connected components of a boolean mask (iterative flood fill; views are small)."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    areas = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        stack, n = [(y0, x0)], 0
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            n += 1
            for yy, xx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    stack.append((yy, xx))
        areas.append(n)
    return areas


def classify(view: Image.Image, sample: VQASample) -> str | None:
    task = sample.meta.get("task")
    if task == "colour":
        return classify_colour(view, sample)
    if task == "count":
        return count_objects(view, sample)
    return None


def _digest(im: Image.Image) -> str:
    return hashlib.sha1(np.asarray(im.convert("RGB")).tobytes()).hexdigest()


class ScriptedPolicy:
    """A Backend that plays `oracle` or `overview` (no zoom) for known samples; an unreadable view gets
    the fixed guess "A" (so an empty view scores at chance, never above it)."""

    def __init__(self, samples: list[VQASample], store: Any, zoom_cfg: Any, mode: str = "oracle",
                 slip_rate: float = 0.0):
        """`slip_rate`: when sampling (temperature > 0), the share of answers replaced by an option drawn from
        the rollout's own seed (`rl.agent.rollout_seed`) — a cheap stochastic policy whose rollouts differ yet
        repeat exactly on a rerun or a resumed run, like the model backends'."""
        if mode not in ("oracle", "overview"):
            raise ValueError("mode: oracle | overview")
        if not 0.0 <= slip_rate <= 1.0:
            raise ValueError("slip_rate: must be in [0, 1]")
        self.samples, self.store, self.zoom_cfg, self.mode = samples, store, zoom_cfg, mode
        self.slip_rate = slip_rate
        self._index: dict[tuple[str, str], VQASample] | None = None
        self.unreadable = 0

    def _lookup(self, conv: list[dict], first: Image.Image) -> VQASample:
        from tools.zoom import read_overview

        if self._index is None:
            digests: dict[str, str] = {}
            self._index = {}
            for s in self.samples:
                if s.images[0] not in digests:
                    digests[s.images[0]] = _digest(read_overview(self.store, s.images[0], self.zoom_cfg).image)
                self._index[(s.question.strip(), digests[s.images[0]])] = s
        text = " ".join(c.get("text", "") for m in conv if m["role"] == "user" and isinstance(m["content"], list)
                        for c in m["content"] if c.get("type") == "text")
        d = _digest(first)
        for (q, dg), s in self._index.items():
            if dg == d and q in text:
                return s
        raise LookupError("conversation matches no known sample")

    def _box(self, sample: VQASample) -> tuple[int, list[float]]:
        from tools.protocol import Episode

        t = sample.targets[0]
        return t.image, Episode(self.store, sample.images, self.zoom_cfg).oracle_bbox(t.image, t.bbox)

    def generate(self, conversations: list[list[dict]], images: list[list[Image.Image]], *,
                 temperature: float = 0.0, seeds: list[int] | None = None, **kw: Any) -> list[str]:
        from tools.protocol import format_tool_call

        out = []
        if seeds is not None and len(seeds) != len(conversations):
            raise ValueError(f"{len(seeds)} seeds for {len(conversations)} conversations")
        for j, (conv, ims) in enumerate(zip(conversations, images, strict=True)):
            sample = self._lookup(conv, ims[0])
            zoomed = any(m["role"] == "tool" for m in conv)
            k, box = self._box(sample)
            if self.mode == "oracle" and not zoomed:
                out.append(format_tool_call(box, f"image_{k}"))
                continue
            if self.mode == "oracle":
                view = ims[-1]
            else:  # the same region, cut from the overview the model was shown
                view = ims[k].crop(tuple(int(round(v)) for v in box))
            letter = classify(view, sample)
            if letter is None:
                self.unreadable += 1
                letter = "A"
            if temperature > 0 and self.slip_rate > 0:
                if seeds is None:
                    raise ValueError("a sampling scripted policy needs per-rollout seeds")
                rng = np.random.default_rng(seeds[j])
                if rng.random() < self.slip_rate:
                    letter = "ABCDEFGH"[int(rng.integers(len(sample.choices) or 1))]
            out.append(f"<answer>{letter}</answer>")
        return out


def scripted_check(samples: list[VQASample], store: Any, zoom_cfg: Any | None = None) -> dict[str, Any]:
    """Run both policies through the real agent loop on the scripted tasks; returns per-policy accuracy,
    per task, and the chance level (1 / number of options)."""
    from rl.agent import AgentConfig, run_episodes
    from tools.zoom import ZoomConfig

    zoom_cfg = zoom_cfg or ZoomConfig()
    todo = [s for s in samples if s.meta.get("task") in SCRIPTED_TASKS and s.targets]
    if not todo:
        raise ValueError("no colour/count samples with targets to check")
    cfg = AgentConfig(max_turns=2, zoom=zoom_cfg, batch_size=32)
    out: dict[str, Any] = {"n": len(todo), "chance": float(np.mean([1 / len(s.choices) for s in todo]))}
    for mode in ("oracle", "overview"):
        pol = ScriptedPolicy(todo, store, zoom_cfg, mode)
        trajs = run_episodes(pol, todo, store, cfg)
        errors = [t.error for t in trajs if t.error]
        if errors:
            raise RuntimeError(f"{mode} policy episodes failed: {errors[:3]}")
        by_task: dict[str, list[bool]] = {}
        for s, t in zip(todo, trajs, strict=True):
            by_task.setdefault(s.meta["task"], []).append(t.correct)
        out[mode] = {
            "accuracy": float(np.mean([t.correct for t in trajs])),
            "per_task": {k: float(np.mean(v)) for k, v in sorted(by_task.items())},
            "zooms_per_question": float(np.mean([t.tool_calls for t in trajs])),
            "unreadable_views": pol.unreadable,
        }
    return out


__all__ = ["ScriptedPolicy", "scripted_check", "classify", "classify_colour", "count_objects", "SCRIPTED_TASKS"]
