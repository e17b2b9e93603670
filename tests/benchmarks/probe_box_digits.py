"""Teacher-forced digit probe of a pre-warm model: for oracle trajectories (a pre-warm's
`sft_data/trajectories.jsonl`), the share of correctly predicted digits at each digit position of the aiming
turn under teacher forcing: the site restated in the think (column, row), the box the think works out from it
(when the think names one), the call's 12 box digits, the source.

It separates the copies the aiming turn needs (docs/tiny_model.md): the restatement must find the site's
digits in the prompt (the hint line, a fixed number of tokens back; without a hint, in the question ~80 tokens
back); each box digit then copies a digit a fixed number of tokens back in the same turn. A model whose box
digits are right but whose restated site is wrong has learned the later copies and not the first.

    python tests/benchmarks/probe_box_digits.py --model runs/tiny/sft_prewarm/model \\
        --trajectories runs/tiny/sft_prewarm/sft_data/trajectories.jsonl --n 64 [--attention]

With --attention it also shows where each language-model head looks from the position that predicts the think's
column digit (eager attention): the mean entropy of its attention and the relative offset it puts the most
weight on, with that weight and the share of trajectories whose top offset is the site's column digit in the
hint line. A head that copies the site puts ~1.0 on that digit; a model whose aiming loss stays on the plateau
has sharp heads on a neighbouring token (the comma after the digit: docs/tiny_model.md).
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
    ap.add_argument("--attention", action="store_true", help="also report the heads' attention at the think's "
                                                             "column digit")
    args = ap.parse_args()

    import torch
    from PIL import Image

    from pipeline.core.records import Trajectory, read_jsonl
    from pipeline.models import load_model, set_pixel_bounds

    torch.set_num_threads(1)
    model, proc = load_model(args.model)
    if args.attention:
        model.set_attn_implementation("eager")  # sdpa returns no attention weights
    set_pixel_bounds(proc, min_pixels=3136, max_pixels=args.max_pixels)
    tok = proc.tokenizer
    base = Path(args.trajectories).parent
    rows = [t for t in read_jsonl(args.trajectories, Trajectory) if t.tool_calls > 0]
    random.Random(0).shuffle(rows)
    right: dict[int, int] = {}
    seen: dict[int, int] = {}
    heads: dict[str, list[tuple[float, int, float, bool]]] = {}  # head -> (entropy, top offset, its weight, on site)
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
            out = model(**enc, output_attentions=args.attention)
        pred = out.logits[0].argmax(-1)
        ids = enc["input_ids"][0].tolist()
        start = max(i for i, x in enumerate(ids) if tok.decode([x]) == "<|im_start|>")
        digits = [i for i in range(start + 1, len(ids)) if tok.decode([ids[i]]).strip().isdigit()]
        for k, i in enumerate(digits):
            seen[k] = seen.get(k, 0) + 1
            right[k] = right.get(k, 0) + int(pred[i - 1].item() == ids[i])
        if args.attention and digits:
            _attention_at(out.attentions, ids, digits[0], tok, heads)
    # think: column, row (+ the box worked out: 4 numbers x 3 digits); the call's box; the source's image index
    names = ["think column", "think row"]
    if len(seen) >= 27:  # the think names the box too (ZOOM_THINK_AT with {box})
        names += [f"think box digit {j + 1}" for j in range(12)]
    names += [f"box digit {j + 1}" for j in range(12)] + ["source index"]
    names += [f"digit {j + 1}" for j in range(len(names), len(seen))]
    report: dict = {"model": args.model, "n": min(args.n, len(rows)),
                    "digit_accuracy": {names[k]: round(right[k] / seen[k], 3) for k in sorted(seen)}}
    if heads:
        report["attention_at_think_column"] = {h: _summary(v) for h, v in heads.items()}
    print(json.dumps(report, indent=1))


def _attention_at(attentions, ids: list[int], target: int, tok, heads: dict) -> None:
    """Record, for every head, its attention from the position predicting `target` (the think's column digit):
    entropy, top relative offset, its weight, and whether that offset is the site's column digit (the first
    digit after the last "Site:" of the prompt)."""
    site = max(i for i in range(target) if tok.decode([ids[i]]).strip().startswith("Site"))
    source = next(i for i in range(site, target) if tok.decode([ids[i]]).strip().isdigit())
    q = target - 1
    for layer, a in enumerate(attentions):
        for h in range(a.shape[1]):
            p = a[0, h, q].float()
            entropy = float(-(p.clamp_min(1e-12).log() * p).sum())
            top = int(p.argmax())
            heads.setdefault(f"L{layer}h{h}", []).append((entropy, top - q, float(p[top]), top == source))


def _summary(rows: list[tuple[float, int, float, bool]]) -> dict:
    from collections import Counter

    offset, _ = Counter(r[1] for r in rows).most_common(1)[0]
    return {"entropy": round(sum(r[0] for r in rows) / len(rows), 2), "top_offset": offset,
            "top_weight": round(sum(r[2] for r in rows) / len(rows), 2),
            "on_site_digit": round(sum(r[3] for r in rows) / len(rows), 2)}


if __name__ == "__main__":
    main()
