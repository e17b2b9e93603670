"""A self-contained HTML trajectory viewer: per question, each overview with every zoom box drawn on it (SVG
rectangles over the image, labelled obs_k), the crops the model saw, and the model's turns beside them.
Images are embedded as data URLs so the file opens anywhere, offline."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.core.records import Trajectory, VQASample

_COLORS = ["#ff3b30", "#ffcc00", "#34c759", "#0a84ff", "#bf5af2", "#ff9f0a"]

_CSS = """
body{font-family:system-ui,sans-serif;margin:16px;background:#f4f4f6;color:#111}
h1{font-size:20px}.item{background:#fff;border-radius:8px;margin:14px 0;padding:12px;display:flex;gap:16px}
.item.ok{border-left:6px solid #34c759}.item.bad{border-left:6px solid #ff3b30}
.views{flex:0 0 auto}.overview{position:relative;display:inline-block;margin:0 8px 8px 0}
.overview img{display:block;width:100%;height:100%}.overview svg{position:absolute;left:0;top:0}
.crops img{height:96px;margin:2px;border:1px solid #999}.text{flex:1 1 auto;min-width:280px;font-size:13px}
.turn{white-space:pre-wrap;background:#f0f0f3;border-radius:6px;padding:6px;margin:4px 0;font-family:monospace}
.turn.tool{background:#e8f1ff}.meta{color:#555;font-size:12px}.label{font:bold 11px sans-serif}
"""


def _data_url(im: Image.Image, max_side: int = 512) -> str:
    im = im.convert("RGB")
    if max(im.size) > max_side:
        s = max_side / max(im.size)
        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _box_on(overview: dict[str, Any], window: list[float], disp: tuple[int, int]) -> tuple[float, ...]:
    """A native-pixel window → display pixels of an overview (its own window and shown size)."""
    ox0, oy0, ox1, oy1 = overview["window"]
    sx, sy = disp[0] / (ox1 - ox0), disp[1] / (oy1 - oy0)
    x0, y0, x1, y1 = window
    return ((x0 - ox0) * sx, (y0 - oy0) * sy, (x1 - x0) * sx, (y1 - y0) * sy)


def _message_text(m: dict[str, Any]) -> str:
    c = m.get("content")
    if isinstance(c, list):
        return " ".join(f"[{x.get('observation') or 'image'}]" if x.get("type") == "image" else str(x.get("text", ""))
                        for x in c)
    return "" if c is None else str(c)


def render_item(traj: Trajectory, sample: VQASample | None, images: dict[str, Image.Image],
                targets: bool = True, display_side: int = 448) -> str:
    """One question's block. `images` maps observation names ("image_0", "obs_1") to what the model saw."""
    overviews = [o for o in traj.observations if o.get("parent") is None]
    crops = [o for o in traj.observations if o.get("parent") is not None]
    views = []
    for ov in overviews:
        im = images.get(ov["name"])
        w, h = ov.get("shown_size") or (im.size if im else (display_side, display_side))
        s = display_side / max(w, h)
        disp = (round(w * s), round(h * s))
        rects = []
        if targets and sample is not None:
            for t in sample.targets:
                if t.image == ov.get("image_index"):
                    x, y, bw, bh = _box_on(ov, t.bbox, disp)
                    rects.append(f'<rect class="target-box" x="{x:.1f}" y="{y:.1f}" width="{bw:.1f}" '
                                 f'height="{bh:.1f}" fill="none" stroke="#fff" stroke-width="1.5" '
                                 f'stroke-dasharray="4 3"/>')
        for j, c in enumerate(crops):
            if c.get("image_index") != ov.get("image_index"):
                continue
            color = _COLORS[j % len(_COLORS)]
            x, y, bw, bh = _box_on(ov, c["window"], disp)
            name = html.escape(c["name"])
            rects.append(f'<rect class="zoom-box" data-obs="{name}" x="{x:.1f}" y="{y:.1f}" width="{max(bw, 1):.1f}" '
                         f'height="{max(bh, 1):.1f}" fill="none" stroke="{color}" stroke-width="2.5"/>'
                         f'<text class="label" x="{x + 2:.1f}" y="{max(y - 3, 10):.1f}" fill="{color}">{name}</text>')
        src = _data_url(im, display_side) if im is not None else ""
        views.append(f'<div class="overview" style="width:{disp[0]}px;height:{disp[1]}px">'
                     f'<img alt="{html.escape(ov["name"])}" src="{src}">'
                     f'<svg width="{disp[0]}" height="{disp[1]}">{"".join(rects)}</svg></div>')
    crop_imgs = "".join(f'<img class="crop" title="{html.escape(c["name"])}" alt="{html.escape(c["name"])}" '
                        f'src="{_data_url(images[c["name"]], 256)}">' for c in crops if c["name"] in images)
    turns = []
    for m in traj.messages:
        role = m.get("role", "")
        if role == "system":
            continue
        cls = "turn tool" if role == "tool" else "turn"
        turns.append(f'<div class="{cls}"><b>{html.escape(role)}</b>: {html.escape(_message_text(m))}</div>')
    q = html.escape(sample.question) if sample else ""
    truth = html.escape(sample.answer) if sample else "?"
    ok = "ok" if traj.correct else "bad"
    meta = (f"id {html.escape(traj.sample_id)} · truth <b>{truth}</b> · prediction "
            f"<b>{html.escape(str(traj.prediction))}</b> · {'correct' if traj.correct else 'wrong'} · "
            f"zooms {traj.tool_calls} (errors {traj.tool_errors}) · turns {traj.turns}"
            + (f" · error {html.escape(traj.error)}" if traj.error else ""))
    return (f'<div class="item {ok}" data-sample="{html.escape(traj.sample_id)}" data-zooms="{len(crops)}">'
            f'<div class="views">{"".join(views)}<div class="crops">{crop_imgs}</div></div>'
            f'<div class="text"><div><b>{q}</b></div><div class="meta">{meta}</div>{"".join(turns)}</div></div>')


def load_observation_images(traj: Trajectory, store: Any, zoom_cfg: Any) -> dict[str, Image.Image]:
    """Re-read what the model saw (overviews and crops) from the store, exactly as the tool produced it."""
    from tools.zoom import read_overview, read_region

    out: dict[str, Image.Image] = {}
    for o in traj.observations:
        if o.get("parent") is None:
            ob = read_overview(store, o["image_id"], zoom_cfg, name=o["name"], image_index=o["image_index"])
        else:
            ob = read_region(store, o["image_id"], tuple(o["window"]), zoom_cfg, name=o["name"],
                             image_index=o["image_index"], parent=o["parent"])
        out[o["name"]] = ob.image
    return out


def write_viewer(path: str | Path, items: list[tuple[Trajectory, VQASample | None, dict[str, Image.Image]]],
                 title: str = "KnowZoom trajectories", note: str = "") -> Path:
    """Write the viewer HTML for (trajectory, sample, observation images) triples."""
    body = "".join(render_item(t, s, ims) for t, s, ims in items)
    n_ok = sum(1 for t, _, _ in items if t.correct)
    doc = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
           f"<p class='meta'>{len(items)} trajectories, {n_ok} correct. {html.escape(note)} Coloured boxes: "
           f"zooms (obs_k); dashed white: the target region.</p>{body}</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc, encoding="utf-8")
    return path


__all__ = ["render_item", "write_viewer", "load_observation_images"]
