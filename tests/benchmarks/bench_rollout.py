"""Share of GRPO rollout wall time spent in the zoom tool (target < 5%), in-process tools vs Ray tool actors.

Runs real GRPO steps (TRL tool loop, tiny Qwen2.5-VL generating on CPU) on UHR scenes. With `--policy forced`
(default) the model generates as many tokens as a scripted zoom→answer episode (the same compute) and the
scripted text replaces its output, so every rollout really zooms; `--policy free` keeps the model's own text
(use it with a pre-warm SFT model). Tool time = env reset (overview reads) + zoom_in calls, measured around the
backend; rollout time = TRL's `_generate` (tokenize, generate, tool loop).

    python tests/benchmarks/bench_rollout.py [--scenes runs/tiny/scenes] [--model tiny] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


class TimedBackend:
    """Wraps an EpisodeBackend and adds up the wall time of its calls."""

    def __init__(self, inner):
        self.inner = inner
        self.seconds = {"start": 0.0, "execute": 0.0}
        self.calls = {"start": 0, "execute": 0}

    def _timed(self, kind, fn, *a):
        t = time.perf_counter()
        try:
            return fn(*a)
        finally:
            self.seconds[kind] += time.perf_counter() - t
            self.calls[kind] += 1

    def start(self, key, image_ids):
        return self._timed("start", self.inner.start, key, image_ids)

    def execute(self, key, name, arguments):
        return self._timed("execute", self.inner.execute, key, name, arguments)

    def close(self, key):
        self.inner.close(key)


def forced_policy(trainer, answer_of):
    """Generate with the real model for as many tokens as the scripted turn, then emit the scripted turn."""
    import torch

    from tools.protocol import format_tool_call

    real = trainer._generate_single_turn
    tok = trainer.processing_class.tokenizer

    def generate(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        turns = []
        for ids in prompt_ids:
            text = tok.decode(ids, skip_special_tokens=False)
            t = text.count("<|im_start|>assistant\n") - 1
            if t == 0:
                turn = "<think>zoom on the region</think>" + format_tool_call([60, 60, 140, 140])
            else:
                turn = f"<think>seen</think><answer>{answer_of(text)}</answer>"
            turns.append(tok(turn + "<|im_end|>", add_special_tokens=False)["input_ids"])
        n = max(len(x) for x in turns)
        gc = trainer.generation_config
        old = (gc.max_new_tokens, gc.min_new_tokens)
        gc.max_new_tokens, gc.min_new_tokens = n, n
        try:
            with torch.no_grad():
                real(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
        finally:
            gc.max_new_tokens, gc.min_new_tokens = old
        return turns, None

    trainer._generate_single_turn = generate


def warm(backend, manifest: Path) -> None:
    """Open every image once (lazy store/actor start-up is a one-off cost, not per-rollout)."""
    ids = [json.loads(line)["id"] for line in manifest.read_text().splitlines() if line.strip()]
    for i, iid in enumerate(ids):
        backend.start(f"warm-{i}", [iid])
        backend.close(f"warm-{i}")


def measure(cfg, backend, policy: str, steps: int) -> dict:
    from rl.stage import build_run

    warm(backend, Path(cfg.image_manifest))
    timed = TimedBackend(backend)
    run = build_run(cfg, backend=timed)
    tr = run.trainer
    if policy == "forced":
        forced_policy(tr, lambda text: "A")
    gen_seconds = [0.0]
    real_generate = tr._generate

    def timed_generate(prompts):
        t = time.perf_counter()
        try:
            return real_generate(prompts)
        finally:
            gen_seconds[0] += time.perf_counter() - t

    tr._generate = timed_generate
    t0 = time.perf_counter()
    tr.train()
    total = time.perf_counter() - t0
    # a rollout = the env resets (overview reads, before TRL's _generate) + _generate (tool calls inside it)
    rollout = gen_seconds[0] + timed.seconds["start"]
    tool = timed.seconds["start"] + timed.seconds["execute"]
    return {"rollout_s": round(rollout, 2), "tool_s": round(tool, 3), "tool_share": tool / max(rollout, 1e-9),
            "resets": timed.calls["start"], "zooms": timed.calls["execute"],
            "ms_per_reset": round(1000 * timed.seconds["start"] / max(timed.calls["start"], 1), 1),
            "ms_per_zoom": round(1000 * timed.seconds["execute"] / max(timed.calls["execute"], 1), 1),
            "step_s": round(total / steps, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", default="", help="a make-scenes folder (images.jsonl, vqa_train.jsonl); default: synthetic")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--policy", choices=["forced", "free"], default="forced")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray tool-actor column")
    args = ap.parse_args()

    from rl.config import RLConfig
    from rl.env import LocalEpisodes
    from tools.store import ImageStore
    from tools.zoom import ZoomConfig

    tmp = Path(tempfile.mkdtemp(prefix="bench_rollout_"))
    if args.scenes:
        manifest, data = Path(args.scenes) / "images.jsonl", Path(args.scenes) / "vqa_train.jsonl"
    else:
        from rl.synthetic import make_zoom_task

        data = make_zoom_task(tmp / "task", n=4, size=4096, square=48)
        manifest = tmp / "task" / "images.jsonl"
    cfg = RLConfig(output_dir=str(tmp / "out"), model=args.model, train_data=str(data), image_manifest=str(manifest),
                   max_steps=args.steps, num_generations=args.generations, per_device_train_batch_size=args.batch,
                   max_zooms=2, save_steps=0, plot=False, max_completion_length=512, resume=False)
    zcfg = ZoomConfig(**cfg.zoom_config())
    rows = {"in-process tools": measure(cfg, LocalEpisodes(ImageStore.from_manifest(manifest), zcfg), args.policy,
                                        args.steps)}
    if not args.no_ray:
        import ray

        from rl.ray_pool import RayEpisodePool

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        pool = RayEpisodePool(manifest, cfg.zoom_config(), n_actors=2)
        pool.wait_ready(60)
        try:
            rows["Ray tool actors"] = measure(cfg, pool, args.policy, args.steps)
        finally:
            pool.shutdown()
            ray.shutdown()
    print(f"rollout tool share ({args.policy} policy, model {args.model}, {args.steps} steps x "
          f"{args.batch} rollouts, data {'synthetic 4096^2' if not args.scenes else args.scenes})")
    print(f"{'backend':<18} {'rollout s':>9} {'tool s':>7} {'resets':>6} {'ms/reset':>8} {'zooms':>6} {'ms/zoom':>7} "
          f"{'tool share':>10} {'s/step':>7}")
    for name, r in rows.items():
        print(f"{name:<18} {r['rollout_s']:>9} {r['tool_s']:>7} {r['resets']:>6} {r['ms_per_reset']:>8} "
              f"{r['zooms']:>6} {r['ms_per_zoom']:>7} {100 * r['tool_share']:>9.2f}% {r['step_s']:>7}")
    if len(rows) == 2:
        a, b = rows["in-process tools"], rows["Ray tool actors"]
        print(f"Ray / in-process tool share: {b['tool_share'] / max(a['tool_share'], 1e-9):.2f}x")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
