"""Box-copy test of the tiny model: how many steps does the tiny Qwen2.5-VL (random weights) need to copy the
grid cell named in a question into the zoom box `[c41, r41, c59, r59]`, per phrasing and prompt length?

A text-only stand-in for the pre-warm's first turn (loss on the box only, and on the restated site for
variant D), scored by greedy generation on 15 grid cells never seen in training (2 templates each; exact box).
It isolates the copy the pre-warm must learn from everything else in a trajectory (docs/tiny_model.md,
"Why the zoom boxes miss"). Variants: A "row r, column c" (cells 0-9), B "column c, row r" (cells 1-9),
C "(column, row) = (c,r)", D = B + the think restating "column c, row r" before the box. `--long` uses the
real system prompt, `--image` puts one 224² image (64 tokens) in the prompt.

    python tests/benchmarks/bench_box_copy.py --variant D --steps 300 --batch 16 --long --image
"""

from __future__ import annotations

import argparse
import random
import time

SHORT_SYS = ("You answer questions about very large remote-sensing images. Small objects are invisible in the "
             "overview; zoom in first. To zoom, reply with a bbox.")
LONG_SYS = ('You answer questions about very large remote-sensing images. Small objects are invisible in the '
            'overview; zoom in first. To zoom, reply with <tool_call>{"name": "zoom_in", "arguments": {"bbox": '
            '[x0, y0, x1, y1], "source": "image_0"}}</tool_call> where bbox is in coordinates normalised to '
            '0-1000 on both axes of that image named by source (image_0, image_1, or an earlier obs_N). You may '
            'think inside <think></think>. When sure, reply with <answer>letter(s)</answer>.')
TEMPLATES = ["How many ships are at {w}?", "What colour are the planes at {w}?", "What kind of objects are at {w}?",
             "At {w}, where is the red ship relative to the blue ship?",
             "Which company operates the objects at {w}?", "What is the main land cover of {w}?"]
CHOICES = ["(A) 1\n(B) 2\n(C) 3\n(D) 4", "(A) white\n(B) red\n(C) blue\n(D) yellow",
           "(A) ships\n(B) planes\n(C) tanks\n(D) buildings", "(A) left of\n(B) right of\n(C) above\n(D) below",
           "(A) Alder Co\n(B) Birch Co\n(C) Cedar Co\n(D) Dune Co", "(A) water\n(B) forest\n(C) urban\n(D) crop"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", choices=["A", "B", "C", "D"], default="D")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--long", action="store_true", help="the real ~110-token system prompt")
    ap.add_argument("--image", action="store_true", help="one 224x224 image (64 tokens) in the prompt")
    args = ap.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    from pipeline.models import load_model, set_pixel_bounds

    torch.manual_seed(0)
    random.seed(0)
    torch.set_num_threads(1)
    v = args.variant
    model, proc = load_model("tiny")
    tok = proc.tokenizer
    set_pixel_bounds(proc, min_pixels=3136, max_pixels=50176)
    rs = np.random.default_rng(0)
    images = [Image.fromarray(rs.integers(0, 255, (224, 224, 3), dtype=np.uint8)) for _ in range(8)]
    system = LONG_SYS if args.long else SHORT_SYS

    def where(c: int, r: int) -> str:
        if v == "A":
            return f"the site in row {r}, column {c} of a 10x10 grid over the image"
        if v == "C":
            return f"the site at (column, row) = ({c},{r}) of a 10x10 grid over the image"
        return f"the site in column {c}, row {r} of a 10x10 grid over the image"

    def item(c: int, r: int) -> tuple[str, str]:
        t = random.randrange(6)
        q = (system + ("\n<|vision_start|><|image_pad|><|vision_end|>\n" if args.image else "\n[image]\n")
             + TEMPLATES[t].format(w=where(c, r)) + "\nThe choices are listed below:\n" + CHOICES[t]
             + "\nAnswer with the option letter.\nassistant: <think>The evidence is small, so I zoom in")
        think = f" on column {c}, row {r}" if v == "D" else ""
        return q + think + '.</think><tool_call>{"bbox": ', f"[{c}41, {r}41, {c}59, {r}59]"

    def prompt_only(p: str) -> str:
        return p.split(" on column")[0] if v == "D" else p

    lo = 0 if v == "A" else 1
    cells = [(c, r) for c in range(lo, 10) for r in range(lo, 10)]
    random.shuffle(cells)
    test, train = cells[:15], cells[15:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / 50))
    n_img = 63  # one <|image_pad|> in the text becomes 64

    def encode(batch: list[tuple[str, str]]) -> tuple[dict, torch.Tensor]:
        if args.image:
            enc = proc(text=[p + b for p, b in batch], images=[images[random.randrange(8)] for _ in batch],
                       padding=True, return_tensors="pt")
            ids = enc["input_ids"]
            labels = torch.full_like(ids, -100)
            for i, (p, b) in enumerate(batch):
                start = len(tok(prompt_only(p))["input_ids"]) + n_img
                end = len(tok(p + b)["input_ids"]) + n_img
                labels[i, start:end] = ids[i, start:end]
            return dict(enc), labels
        rows, labs = [], []
        for p, b in batch:
            pi, bi = tok(p)["input_ids"], tok(b)["input_ids"]
            start = len(tok(prompt_only(p))["input_ids"])
            rows.append(pi + bi)
            labs.append([-100] * start + pi[start:] + bi)
        n = max(map(len, rows))
        ids = torch.full((len(rows), n), tok.pad_token_id)
        labels = torch.full((len(rows), n), -100)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, (a, lab) in enumerate(zip(rows, labs, strict=True)):
            ids[i, :len(a)], labels[i, :len(a)], mask[i, :len(a)] = torch.tensor(a), torch.tensor(lab), 1
        return {"input_ids": ids, "attention_mask": mask}, labels

    def score(cs: list[tuple[int, int]]) -> float:
        model.eval()
        ok = n = 0
        with torch.no_grad():
            for c, r in cs:
                for _ in range(2):
                    p, b = item(c, r)
                    p = prompt_only(p)
                    if args.image:
                        enc = dict(proc(text=[p], images=[images[0]], return_tensors="pt"))
                    else:
                        ids = torch.tensor([tok(p)["input_ids"]])
                        enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
                    out = model.generate(**enc, max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id)
                    ok += b in tok.decode(out[0, enc["input_ids"].shape[1]:])
                    n += 1
        model.train()
        return ok / n

    t0 = time.time()
    for step in range(1, args.steps + 1):
        enc, labels = encode([item(*random.choice(train)) for _ in range(args.batch)])
        loss = model(**enc, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 100 == 0:
            print(f"variant {v} long={args.long} image={args.image} step {step}: loss {loss.item():.3f} · exact "
                  f"box on training cells {score(train[:15]):.0%} · on unseen cells {score(test):.0%} · "
                  f"{time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
