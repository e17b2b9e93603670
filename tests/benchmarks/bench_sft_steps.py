"""SFT step cost on the tiny model, side by side in one process: random vs length-grouped text batches, and
1 vs 2 torch threads. Prints ratios (never asserts absolute times).

    python tests/benchmarks/bench_sft_steps.py --qa runs/tiny/qa/qa_train.jsonl --model runs/tiny/base/model
(without --qa it uses the seeded spectral-index toy QA; without --model the embedded tiny model)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the fixtures package


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--qa", default="")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()

    from fixtures.toy import spectral_index_qa
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from pipeline.models import load_model
    from sft.data import filter_by_length, read_text_qa, text_items
    from sft.masks import ZoomSFTCollator

    model, proc = load_model(args.model)
    records = read_text_qa([args.qa]) if args.qa else spectral_index_qa()
    items, _ = filter_by_length(text_items(records), proc, 4096)
    lengths = [it.n_tokens for it in items]
    collate = ZoomSFTCollator(proc)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    orders = {"random": torch.randperm(len(items), generator=g).tolist(),
              "grouped": get_length_grouped_indices(lengths, args.batch, generator=g)}

    def run(order: list[int], threads: int) -> tuple[float, float]:
        torch.set_num_threads(threads)
        batches = [order[i:i + args.batch] for i in range(0, args.steps * args.batch, args.batch)]
        padded = real = 0
        t0 = time.perf_counter()
        for b in batches:
            enc = collate([{"messages": items[j].messages, "images": []} for j in b])
            padded += enc["input_ids"].numel()
            real += int(enc["attention_mask"].sum())
            model(**enc).loss.backward()
            opt.step()
            opt.zero_grad()
        return (time.perf_counter() - t0) / len(batches), padded / real

    results = {}
    for threads in (1, 2):
        for name, order in orders.items():
            results[(name, threads)] = run(order, threads)
            s, pad = results[(name, threads)]
            print(f"{name:8s} threads={threads}: {s:.3f} s/step, padded/real tokens {pad:.2f}")
    for threads in (1, 2):
        r = results[("random", threads)][0] / results[("grouped", threads)][0]
        print(f"threads={threads}: grouped batches are {r:.2f}x faster per step than random")
    r = results[("grouped", 1)][0] / results[("grouped", 2)][0]
    print(f"grouped: 2 threads are {r:.2f}x the speed of 1 thread (below 1 = slower; shared cores)")


if __name__ == "__main__":
    main()
