"""Teacher-forced digit probe of a pre-warm model: for oracle trajectories (a pre-warm's
`sft_data/trajectories.jsonl`), the share of correctly predicted digits at each digit position of the aiming
turn under teacher forcing: the site restated in the think (column, row), the box the think works out from it
(when the think names one), the call's 12 box digits, the source.

It separates the copies the aiming turn needs (docs/tiny_model.md): the restatement must find the site's
digits in the prompt (the hint line, a fixed number of tokens back; without a hint, in the question ~80 tokens
back); each box digit then copies a digit a fixed number of tokens back in the same turn. A model whose box
digits are right but whose restated site is wrong has learned the later copies and not the first.

    python tests/benchmarks/probe_box_digits.py --model runs/tiny/sft_prewarm/model \\
        --trajectories runs/tiny/sft_prewarm/sft_data/trajectories.jsonl --n 64
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--trajectories", required=True, help="a Trajectory JSONL (a pre-warm's sft_data/)")
    ap.add_argument("--n", type=int, default=64, help="trajectories scored (seeded sample)")
    ap.add_argument("--max_pixels", type=int, default=50176)
    args = ap.parse_args()

    import torch
    from PIL import Image

    from pipeline.core.records import Trajectory, read_jsonl
    from pipeline.models import load_model, set_pixel_bounds

    torch.set_num_threads(1)
    model, proc = load_model(args.model)
    set_pixel_bounds(proc, min_pixels=3136, max_pixels=args.max_pixels)
    tok = proc.tokenizer
    base = Path(args.trajectories).parent
    rows = [t for t in read_jsonl(args.trajectories, Trajectory) if t.tool_calls > 0]
    random.Random(0).shuffle(rows)
    right: dict[int, int] = {}
    seen: dict[int, int] = {}
    for t in rows[: args.n]:
        first = next(i for i, m in enumerate(t.messages) if m["role"] == "assistant")
        messages = t.messages[: first + 1]
        n_inputs = sum(1 for m in messages if isinstance(m["content"], list)
                       for c in m["content"] if c.get("type") == "image")
        images = []
        for o in t.observations[:n_inputs]:
            with Image.open(base / o["file"]) as im:
                images.append(im.convert("RGB"))
        enc = proc(text=[proc.apply_chat_template(messages, tokenize=False)], images=images, return_tensors="pt")
        with torch.no_grad():
            pred = model(**enc).logits[0].argmax(-1)
        ids = enc["input_ids"][0].tolist()
        start = max(i for i, x in enumerate(ids) if tok.decode([x]) == "<|im_start|>")
        k = 0
        for i in range(start + 1, len(ids)):
            if tok.decode([ids[i]]).strip().isdigit():
                seen[k] = seen.get(k, 0) + 1
                right[k] = right.get(k, 0) + int(pred[i - 1].item() == ids[i])
                k += 1
    # think: column, row (+ the box worked out: 4 numbers x 3 digits); the call's box; the source's image index
    names = ["think column", "think row"]
    if len(seen) >= 27:  # the think names the box too (ZOOM_THINK_AT with {box})
        names += [f"think box digit {j + 1}" for j in range(12)]
    names += [f"box digit {j + 1}" for j in range(12)] + ["source index"]
    names += [f"digit {j + 1}" for j in range(len(names), len(seen))]
    print(json.dumps({"model": args.model, "n": min(args.n, len(rows)),
                      "digit_accuracy": {names[k]: round(right[k] / seen[k], 3) for k in sorted(seen)}},
                     indent=1))


if __name__ == "__main__":
    main()
