"""The SFT loss on CPU, side by side in one process: TRL's fused LM head scoring every position of the batch
(what TRL 1.16 does off CUDA) against scoring only the labelled positions (what it does on CUDA, and what the
project's trainers do everywhere: `pipeline.models.scored_positions_only`). Forward + backward of oracle zoom
episodes, in alternating rounds; prints seconds per step, the ratio and the largest loss difference (never
asserts absolute times).

    python tests/benchmarks/bench_loss_positions.py --vqa runs/tiny/scenes/vqa_train.jsonl \
        --images runs/tiny/scenes/images.jsonl --model runs/tiny/sft_aim/model
    python tests/benchmarks/bench_loss_positions.py --qa runs/tiny/qa/qa_train.jsonl --batch 32 --model runs/tiny/base/model
(without --vqa it writes the seeded fixture scenes to a temporary folder; without --model the embedded tiny model)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the fixtures package


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vqa", default="")
    ap.add_argument("--images", default="")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--qa", default="", help="text QA JSONL: time text items (the text cold start) instead")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import trl
    from fixtures.sft_trainer import oracle_items, trainer_and_batch

    from pipeline.models import load_model
    from tools.zoom import ZoomConfig

    tmp = Path(tempfile.mkdtemp(prefix="kz_bench_loss_"))
    model, processor = load_model(args.model, device="cpu")
    if args.qa:  # the text stage's items (no thinks, as configs/tiny/sft_text.yaml trains them)
        from sft.data import read_text_qa, text_items

        items = text_items(read_text_qa([args.qa])[:args.batch], think=False)
    else:
        if not args.vqa:
            from fixtures.scenes import make_scenes

            sc = make_scenes(tmp / "scenes", n=args.batch, size=2048, square=48)
            args.vqa, args.images = str(sc.vqa), str(sc.manifest)
        zoom = ZoomConfig(frame="norm1000", max_pixels=50176, min_pixels=3136)
        items = oracle_items(args.vqa, args.images, args.batch, zoom, max_zooms=3)
    trainer, batch = trainer_and_batch(model, processor, items, tmp)
    modes = {"TRL, every position": lambda m, b: trl.SFTTrainer.compute_loss(trainer, m, b),
             "labelled positions only": trainer.compute_loss}
    times: dict[str, list[float]] = {k: [] for k in modes}
    losses: dict[str, float] = {}
    for _ in range(args.rounds + 1):  # the first round warms up and is not timed
        for name, compute in modes.items():
            model.zero_grad()
            t0 = time.perf_counter()
            loss = compute(model, dict(batch))
            loss.backward()
            times[name].append(time.perf_counter() - t0)
            losses[name] = float(loss.detach())
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    print(f"batch {len(items)} {'text items' if args.qa else 'episodes'}, {batch['input_ids'].numel()} positions, {labelled} labelled "
          f"({100 * labelled / batch['input_ids'].numel():.1f} %)")
    per = {k: sum(v[1:]) / len(v[1:]) for k, v in times.items()}
    for name, s in per.items():
        print(f"{name:26s}: {s:.3f} s per forward + backward (loss {losses[name]:.6f})")
    a, b = per.values()
    print(f"labelled positions only is {a / b:.2f}x the speed of every position; loss difference "
          f"{abs(losses['TRL, every position'] - losses['labelled positions only']):.2e}")


if __name__ == "__main__":
    main()
