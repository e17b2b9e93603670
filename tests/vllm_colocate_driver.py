"""One GRPO step of `knowzoom rl` with `use_vllm: true, vllm_mode: colocate` through TRL's real code, with
`tests/vllm_standin_colocate.py` as the `vllm` package. Run as a script (TRL must be imported after the stand-in):

    python tests/vllm_colocate_driver.py WORKDIR REPORT.json

The data holds a 1-image and a 2-image sample; the scripted policy zooms twice (image_0, then image_1 or a
second box) and answers. The report lists, for every vLLM request, whether what vLLM saw (after its own
placeholder expansion) and generated is exactly a prefix of the sequence the trainer scores for some
rollout, whether each image's placeholder sits on that rollout's image token run for the same image, and
whether each rollout's scored sequence is covered end to end by one request.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vllm_standin_colocate as vllm_standin  # noqa: E402

vllm_standin.install()


def policy(text: str, n_images: int) -> str:
    """Turn t of a rollout: zoom image_0, zoom again (image_1 when there is one), answer."""
    turn = text.count("<|im_start|>assistant") - 1
    two = text.count("<|vision_start|>") - turn >= 2  # prompt images (one tool image per earlier turn)
    if turn == 0:  # the think holds an image placeholder, which the run's bad_words keep out of the rollout
        return ('<think>look<|image_pad|></think><tool_call>{"name": "zoom_in", "arguments": {"bbox": [10, 10, 80, 80], '
                '"source": "image_0"}}</tool_call><|im_end|>')
    if turn == 1:
        src = "image_1" if two else "image_0"
        return ('<think>again</think><tool_call>{"name": "zoom_in", "arguments": {"bbox": [40, 30, 120, 100], '
                f'"source": "{src}"}}}}</tool_call><|im_end|>')
    return "<think>seen</think><answer>A</answer><|im_end|>"


def main(work: Path, report_path: Path) -> int:
    import dataclasses

    import torch
    from fixtures.scenes import make_scenes

    from pipeline.core.records import VQASample, read_jsonl, write_jsonl
    from rl.config import RLConfig
    from rl.stage import build_run

    task = work / "task"
    make_scenes(task, n=2, size=512, square=32, seed=3)
    one, other = list(read_jsonl(task / "vqa.jsonl", VQASample))
    two = VQASample.from_dict({**dataclasses.asdict(one), "id": "two-images", "images": [one.images[0], other.images[0]],
                               "question": "Which image shows the red square?", "targets": []})
    write_jsonl(work / "train.jsonl", [one, two])
    cfg = RLConfig(output_dir=str(work / "out"), model="tiny", train_data=str(work / "train.jsonl"),
                   image_manifest=str(task / "images.jsonl"), num_generations=2, per_device_train_batch_size=4,
                   max_steps=1, max_zooms=3, save_steps=0, plot=False, max_completion_length=2048,
                   learning_rate=1e-5, use_vllm=True, vllm_mode="colocate", log_episodes=0,
                   vllm_enable_sleep_mode=True)
    vllm_standin.POLICY["fn"] = policy
    run = build_run(cfg)
    trainer = run.trainer
    scored = []
    orig_generate = trainer._generate

    def spy(prompts):  # type: ignore[no-untyped-def]
        out = orig_generate(prompts)
        prompt_ids, completion_ids, _tool_mask, _c, _lp, _extra, images, _tool_images = out
        for p, c, imgs in zip(prompt_ids, completion_ids, images or [None] * len(prompt_ids), strict=True):
            scored.append({"ids": list(p) + list(c), "images": [vllm_standin.image_key(i) for i in imgs or []]})
        return out

    trainer._generate = spy
    trainer.train()

    pad = trainer._image_pad_token_id
    grid = trainer.processing_class.image_processor

    def runs(ids: list[int]) -> list[tuple[int, int]]:
        out, i = [], 0
        while i < len(ids):
            if ids[i] == pad:
                j = i
                while j < len(ids) and ids[j] == pad:
                    j += 1
                out.append((i, j - i))
                i = j
            else:
                i += 1
        return out

    checks = []
    for r in vllm_standin.REQUESTS:
        seen = r["expanded"] + r["generated"]
        match = None
        for k, s in enumerate(scored):
            if s["ids"][: len(seen)] == seen and s["images"][: len(r["images"])] == r["images"]:
                match = k
                break
        placed = False
        if match is not None:
            trainer_runs = runs(scored[match]["ids"])[: len(r["placeholders"])]
            placed = [(p["offset"], p["length"]) for p in r["placeholders"]] == trainer_runs
        checks.append({"n_images": len(r["images"]), "n_sent_pads": r["sent"].count(pad),
                       "n_tokens": r["n_tokens"], "prefix_of_scored": match is not None, "placed": placed})
    covered = [any(r["expanded"] + r["generated"] == s["ids"] for r in vllm_standin.REQUESTS) for s in scored]
    report = {"requests": checks, "bad_words": [r["bad_words"] for r in vllm_standin.REQUESTS], "scored_covered": covered, "n_scored": len(scored),
              "max_images": max((len(s["images"]) for s in scored), default=0),
              "weight_loads": len(vllm_standin.WEIGHT_LOADS), "pad_id": pad, "events": vllm_standin.EVENTS,
              "weight_dtypes": sorted({d for _, d in vllm_standin.WEIGHT_LOADS}),
              "merge_size": int(getattr(grid, "merge_size", 2)), "torch": torch.__version__}
    report_path.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1]), Path(sys.argv[2])))
