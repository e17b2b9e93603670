"""The README's picture: one zoom trajectory drawn as the model lives it — the overview with the zoom box,
the crop the tool returned, and the turns of the conversation. Seeded and reproducible:

    python -m pipeline.eval.figures --scenes runs/tiny/scenes --out docs/trajectory.png
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from pipeline.core.records import VQASample, read_jsonl


def _text(content) -> str:
    if isinstance(content, str):
        return content
    return " ".join(p.get("text", "[image]") if p.get("type") == "text" else "[image]" for p in content)


def trajectory_figure(scenes_dir: str | Path, out: str | Path, *, category: str = "color", index: int = 0,
                      max_pixels: int = 50176) -> Path:
    """Render the oracle trajectory of one test question of `make-scenes` output to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    from sft.data import oracle_trajectory
    from tools.store import ImageStore
    from tools.zoom import ZoomConfig

    scenes_dir = Path(scenes_dir)
    samples = [s for s in read_jsonl(scenes_dir / "vqa_test.jsonl", VQASample)
               if category.lower() in s.category.lower() and s.targets and len(s.images) == 1]
    if not samples:
        raise ValueError(f"no single-image {category!r} question with a target in {scenes_dir}")
    sample = samples[index % len(samples)]
    store = ImageStore.from_manifest(scenes_dir / "images.jsonl")
    messages, images, observations = oracle_trajectory(sample, store, ZoomConfig(max_pixels=max_pixels))
    overview, crop = observations[0], observations[1]
    box = overview.native_to_frame(crop.window)

    fig = plt.figure(figsize=(13, 5.2))
    ax0 = fig.add_axes([0.01, 0.05, 0.3, 0.85])
    ax1 = fig.add_axes([0.33, 0.05, 0.3, 0.85])
    ax2 = fig.add_axes([0.65, 0.05, 0.34, 0.85])
    ax0.imshow(overview.image)
    ax0.add_patch(patches.Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False,
                                    ec="red", lw=2))
    w0, h0 = overview.image.size
    ax0.set_title(f"image_0: overview {w0}×{h0} of a {store.info(overview.image_id).width}² scene", fontsize=9)
    ax1.imshow(crop.image)
    x0, y0, x1, y1 = (int(v) for v in crop.window)
    ax1.set_title(f"obs_1: zoom_in → native window [{x0}, {y0}, {x1}, {y1}]", fontsize=9)
    for a in (ax0, ax1):
        a.set_xticks([])
        a.set_yticks([])
    ax2.axis("off")
    lines = []
    for m in messages[1:]:
        body = _text(m["content"]).replace("\n", " ")
        lines.append(f"[{m['role']}] " + textwrap.shorten(body, 360))
    ax2.text(0, 1, "\n\n".join(textwrap.fill(t, 62) for t in lines), va="top", fontsize=7.5, family="monospace")
    fig.suptitle(f"{sample.category} — correct answer {sample.answer}", fontsize=11)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenes", default="runs/tiny/scenes")
    p.add_argument("--out", default="docs/trajectory.png")
    p.add_argument("--category", default="color")
    p.add_argument("--index", type=int, default=0)
    a = p.parse_args(argv)
    print(trajectory_figure(a.scenes, a.out, category=a.category, index=a.index))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
