"""Teacher-forced answer probe of a pre-warm model: for oracle trajectories with one zoom (a pre-warm's
`sft_data/trajectories.jsonl`), the letter the model predicts right after `<answer>`, per sub-task, with the
zoomed crop as rendered and, with `--blank_crop`, with the crop replaced by a flat image.

It tells "does not see the crop" from "has not learned the answer" (docs/tiny_model.md): a model that reads the
crop answers training items above the letter prior and loses that with a blank crop; one that answers every
item with the same letter has learned the prior only.

    python tests/benchmarks/probe_answer_letters.py --model runs/tiny/sft_prewarm/model \\
        --trajectories runs/tiny/sft_data/trajectories.jsonl --n 96 [--blank_crop]
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter, defaultdict
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--trajectories", required=True, help="a Trajectory JSONL (the pipeline's sft_data/)")
    ap.add_argument("--n", type=int, default=96, help="trajectories scored (seeded sample)")
    ap.add_argument("--blank_crop", action="store_true", help="replace the zoomed crop by a flat image")
    ap.add_argument("--max_pixels", type=int, default=50176)
    args = ap.parse_args()

    import torch
    from PIL import Image

    from pipeline.core.records import Trajectory, read_jsonl
    from pipeline.models import load_model, set_pixel_bounds

    model, proc = load_model(args.model)
    set_pixel_bounds(proc, min_pixels=3136, max_pixels=args.max_pixels)
    tok = proc.tokenizer
    answer_id = tok.convert_tokens_to_ids("<answer>")
    base = Path(args.trajectories).parent
    rows = [t for t in read_jsonl(args.trajectories, Trajectory) if t.tool_calls == 1]
    random.Random(0).shuffle(rows)
    right: dict[str, int] = defaultdict(int)
    seen: dict[str, int] = defaultdict(int)
    letters: dict[str, Counter] = defaultdict(Counter)
    for t in rows[: args.n]:
        task = t.sample_id.split("-")[1] if "-" in t.sample_id else t.meta.get("category", "all")
        images = []
        for k, o in enumerate(t.observations):
            with Image.open(base / o["file"]) as im:
                im = im.convert("RGB")
            if args.blank_crop and k == len(t.observations) - 1:
                im = Image.new("RGB", im.size, (60, 90, 120))
            images.append(im)
        enc = proc(text=[proc.apply_chat_template(t.messages, tokenize=False)], images=images, return_tensors="pt")
        ids = enc["input_ids"][0].tolist()
        if answer_id not in ids:
            continue
        at = len(ids) - 1 - ids[::-1].index(answer_id)
        with torch.no_grad():
            pred = int(model(**enc).logits[0, at].argmax())
        seen[task] += 1
        right[task] += int(pred == ids[at + 1])
        letters[task][tok.decode([pred])] += 1
    print(json.dumps({"model": args.model, "blank_crop": args.blank_crop,
                      "accuracy": {k: f"{right[k]}/{seen[k]}" for k in sorted(seen)},
                      "predicted_letters": {k: dict(letters[k]) for k in sorted(letters)}}, indent=1))


if __name__ == "__main__":
    main()
