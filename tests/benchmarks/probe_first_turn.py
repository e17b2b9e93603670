"""First-turn zoom probe of a model (e.g. a pre-warm checkpoint): one greedy assistant turn per held-out item
with a target region, run through the real tool; prints the share of valid zoom calls (the tool opened a
view), of calls the tool rejected, of turns without a parsable call, and of valid zooms covering >= 50 % of
the target box — per sub-task too. Much cheaper than a full `knowzoom eval` (one turn, no answers), so a
checkpoint series can be compared while training runs (the figures in docs/tiny_model.md).

    python tests/benchmarks/probe_first_turn.py --model runs/tiny/sft_prewarm/checkpoints/checkpoint-200 \\
        --probe runs/tiny/scenes/vqa_probe.jsonl --manifest runs/tiny/scenes/images.jsonl --frame norm1000
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--probe", default="runs/tiny/scenes/vqa_probe.jsonl")
    ap.add_argument("--manifest", default="runs/tiny/scenes/images.jsonl")
    ap.add_argument("--frame", default="norm1000")
    ap.add_argument("--max_pixels", type=int, default=50176)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max_new_tokens", type=int, default=96, help="the zoom agent's default turn length")
    args = ap.parse_args()

    import torch

    from pipeline.core.records import VQASample, read_jsonl
    from pipeline.models import load_model, set_pixel_bounds
    from tools.protocol import Episode, build_prompt_messages, parse_turn
    from tools.store import ImageStore
    from tools.zoom import ZoomConfig

    torch.set_num_threads(1)
    model, proc = load_model(args.model)
    set_pixel_bounds(proc, min_pixels=3136, max_pixels=args.max_pixels)
    store = ImageStore.from_manifest(args.manifest)
    zcfg = ZoomConfig(max_pixels=args.max_pixels, min_pixels=3136, frame=args.frame, max_turns=5)
    samples = [s for s in read_jsonl(args.probe, VQASample) if s.targets][: args.limit]
    tok = proc.tokenizer
    tok.padding_side = "left"
    total: Counter = Counter()
    per: dict[str, Counter] = defaultdict(Counter)
    examples: list[str] = []
    for i in range(0, len(samples), args.batch):
        chunk = samples[i:i + args.batch]
        episodes = [Episode(store, list(s.images), zcfg) for s in chunk]
        views = [e.initial_observations() for e in episodes]
        texts = [proc.apply_chat_template(build_prompt_messages(s, zcfg.frame, sizes=[o.image.size for o in v]),
                                          tokenize=False, add_generation_prompt=True)
                 for s, v in zip(chunk, views, strict=True)]
        enc = proc(text=texts, images=[o.image for v in views for o in v], padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        for s, ep, seq in zip(chunk, episodes, out[:, enc["input_ids"].shape[1]:], strict=True):
            text = tok.decode(seq, skip_special_tokens=False).split("<|im_end|>")[0]
            task = str(s.meta.get("task", s.category))
            for c in (total, per[task]):
                c["n"] += 1
            parsed = parse_turn(text)
            if parsed.tool_call is None:
                total["no_call"] += 1
                per[task]["no_call"] += 1
                continue
            res = ep.execute(parsed.tool_call)
            if res.observation is None:
                total["rejected"] += 1
                per[task]["rejected"] += 1
                if len(examples) < 5:
                    examples.append(text[-100:])
                continue
            x0, y0, x1, y1 = res.observation.window
            hit = False
            for t in s.targets:
                tx0, ty0, tx1, ty1 = t.bbox
                w, h = min(x1, tx1) - max(x0, tx0), min(y1, ty1) - max(y0, ty0)
                if t.image == res.observation.image_index and w > 0 and h > 0 and \
                        w * h / ((tx1 - tx0) * (ty1 - ty0)) >= 0.5:
                    hit = True
            for c in (total, per[task]):
                c["valid"] += 1
                c["on_target"] += hit
    n = max(1, total["n"])
    print(json.dumps({
        "model": args.model, "n": total["n"], "valid_call": total["valid"] / n, "rejected": total["rejected"] / n,
        "no_call": total["no_call"] / n, "on_target_of_valid": total["on_target"] / max(1, total["valid"]),
        "per_task": {k: dict(v) for k, v in per.items()}, "rejected_examples": examples}, indent=1))


if __name__ == "__main__":
    main()
