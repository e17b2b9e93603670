"""Reading probe of an image model: does its answer turn read the view it zoomed on? For held-out questions with
one target (`--vqa`, e.g. make-scenes' vqa_probe.jsonl), it renders the oracle episode (overview, the oracle's
aiming turn, the real crop), lets the model write the answer turn greedily, and scores per sub-task:

- letter: the answer letter is right;
- count / colour / class / cover: the think's "I see 3 red ships on water" names that part of the view right
  (against the sample's `meta["sees"]`, make-scenes' words); sub-tasks whose sees are not of that form
  (relations, change pairs) are scored by letter only.

With the aim taken from the oracle, it isolates the answer turn from the aiming turn (the probe in
`knowzoom eval` needs both). `--blank_crop` shows a flat view instead of the crop: a model that reads the view
loses what it had. `--single_view` asks the question about the crop alone (system prompt, then a user turn with
the crop and the question's text, no overview and no aiming turn): the format of a perception step that trains on
single views, so it shows what such a step learned before any episode.

    python tests/benchmarks/probe_reading.py --model runs/tiny/sft_prewarm/model \\
        --vqa runs/tiny/scenes/vqa_probe.jsonl --images runs/tiny/scenes/images.jsonl [--blank_crop]
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from collections import defaultdict
from pathlib import Path

SEES = re.compile(r"(\d+) (\w+) (.+?) on (.+)")


def parts(sees: str | None) -> dict[str, str] | None:
    m = SEES.fullmatch(sees or "")
    if not m:
        return None
    noun = m.group(3)
    return {"count": m.group(1), "colour": m.group(2), "class": noun[:-1] if noun.endswith("s") else noun,
            "cover": m.group(4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--vqa", required=True, help="VQASample JSONL (held-out: make-scenes' vqa_probe.jsonl)")
    ap.add_argument("--images", required=True, help="the images.jsonl of their image store")
    ap.add_argument("--blank_crop", action="store_true", help="show a flat view instead of the crop")
    ap.add_argument("--single_view", action="store_true",
                    help="the crop alone with the question's text, not inside the episode")
    ap.add_argument("--max_pixels", type=int, default=50176)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", default="", help="also write the per-item answers here (JSONL)")
    args = ap.parse_args()

    import torch
    from PIL import Image

    from pipeline.core.records import Trajectory, VQASample, read_jsonl
    from pipeline.models import load_model, set_pixel_bounds
    from rl.verifier import verify_sample
    from sft.data import ChatDataset, materialize_trajectories, trajectory_items
    from tools.protocol import parse_turn
    from tools.store import ImageStore
    from tools.zoom import ZoomConfig

    samples = [s for s in read_jsonl(args.vqa, VQASample) if len(s.targets) == 1]
    by_id = {s.id: s for s in samples}
    zoom = ZoomConfig(frame="norm1000", max_pixels=args.max_pixels, min_pixels=3136)
    with tempfile.TemporaryDirectory() as tmp:
        path, _ = materialize_trajectories(samples, ImageStore.from_manifest(args.images), zoom, tmp,
                                           max_zooms=1, progress=False)
        # one item per trajectory, in file order (whole trajectories); images load as SFT feeds them
        trajectories, items = list(read_jsonl(path, Trajectory)), trajectory_items(path)
        episodes = []
        for t, it in zip(trajectories, items, strict=True):
            images = ChatDataset([it])[0]["images"]
            if args.blank_crop:
                images[-1] = Image.new("RGB", images[-1].size, (60, 90, 120))
            messages = it.messages[:-1]
            if args.single_view:
                system, user = messages[0], messages[1]
                text = [c for c in user["content"] if c.get("type") == "text"][-1]["text"]
                messages = [system, {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
                images = images[-1:]
            episodes.append((by_id[t.sample_id], messages, images))

    model, proc = load_model(args.model)
    set_pixel_bounds(proc, min_pixels=3136, max_pixels=args.max_pixels)
    proc.tokenizer.padding_side = "left"
    model.eval()
    right: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    seen: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    rows = []
    for b in range(0, len(episodes), args.batch):
        chunk = episodes[b:b + args.batch]
        texts = [proc.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for _, m, _ in chunk]
        enc = proc(text=texts, images=[im for _, _, ims in chunk for im in ims], padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=40, do_sample=False)
        for (s, _, _), seq in zip(chunk, out[:, enc["input_ids"].shape[1]:], strict=True):
            text = proc.tokenizer.decode(seq, skip_special_tokens=True)
            turn = parse_turn(text)
            task = str(s.meta.get("task", s.category)) if isinstance(s.meta, dict) else s.category
            ok = bool(turn.answer is not None and verify_sample(turn.answer, s).correct)
            seen[task]["letter"] += 1
            right[task]["letter"] += ok
            truth, said = parts(s.meta.get("sees") if isinstance(s.meta, dict) else None), parts(
                (turn.think or "").removeprefix("I see ").split(". ")[0].rstrip("."))
            if truth:
                for key, value in truth.items():
                    seen[task][key] += 1
                    right[task][key] += bool(said and said[key] == value)
            rows.append({"id": s.id, "task": task, "answer": s.answer, "output": text, "correct": ok})
    table = {t: {k: f"{right[t][k]}/{n} ({100 * right[t][k] / n:.0f} %)" for k, n in seen[t].items()}
             for t in sorted(seen)}
    print(json.dumps({"model": args.model, "blank_crop": args.blank_crop, "single_view": args.single_view,
                      "items": len(rows), "per_task": table}, indent=1))
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
