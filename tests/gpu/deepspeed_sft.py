"""The 7B recipe's SFT config through the project's launcher with the tiny model: DeepSpeed ZeRO-2 on a GPU.

    python tests/gpu/deepspeed_sft.py --out DIR                     # CUDA machine with deepspeed installed
    python tests/gpu/deepspeed_sft.py --out DIR --deepspeed none    # the same launch on CPU (gloo), no DeepSpeed

`configs/qwen2_5_vl_7b/sft.yaml` as it is (its ZeRO-2 JSON, bf16, frozen vision tower and projector, gradient
checkpointing, cosine schedule) with the tiny model, toy GeoTIFF scenes, 2 optimizer steps of 2 accumulated
micro-batches and a checkpoint at step 1. The stage is started the way `knowzoom sft` starts its ranks
(`pipeline.core.launch.launch`: `torch.distributed.run` → `pipeline.launcher` → `sft.stage.run`); one rank,
because NCCL refuses two ranks on one GPU. DIR/deepspeed_sft.json gets the summary, what the checkpoint
folder holds (DeepSpeed's `global_step*/` partitions when its engine ran) and which weights moved.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def moved(out: Path) -> dict[str, Any]:
    """Fraction of changed elements in the trained language model and in the frozen vision tower, in bf16 (the
    run trains and saves in bf16)."""
    import torch

    from pipeline.models import load_model

    model, _ = load_model(str(out / "model"))
    base, _ = load_model("tiny")
    ref = {k: v.to(torch.bfloat16) for k, v in base.state_dict().items()}
    lang = [0, 0]
    vis = [0, 0]
    for k, v in model.state_dict().items():
        d = int((v.to(torch.bfloat16) != ref[k]).sum())
        acc = vis if ".visual." in f".{k}" else lang
        acc[0] += d
        acc[1] += v.numel()
    return {"language_changed": round(lang[0] / lang[1], 4), "vision_changed": round(vis[0] / max(vis[1], 1), 4),
            "saved_dtype": json.loads((out / "model" / "config.json").read_text()).get("dtype")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for deepspeed_sft.json")
    p.add_argument("--deepspeed", default="configs/qwen2_5_vl_7b/zero2.json",
                   help="the DeepSpeed JSON (default: the 7B config's own), or none")
    args = p.parse_args(argv)
    from fixtures.scenes import make_scenes

    from pipeline.core.config import load_config
    from pipeline.core.launch import launch
    from pipeline.core.manifest import atomic_write_text
    from sft.config import SFTConfig

    report: dict[str, Any] = {"deepspeed": args.deepspeed}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kz_ds_sft_") as tmp:
        work = Path(tmp)
        os.environ.setdefault("KNOWZOOM_CACHE", str(work / "cache"))
        scenes = make_scenes(work / "scenes", n=4, size=1024, square=48, direct_every=4)
        out = work / "sft"
        cfg = load_config(SFTConfig, ROOT / "configs/qwen2_5_vl_7b/sft.yaml", {
            "output_dir": str(out), "model": "tiny", "text_data": [], "vqa_data": [str(scenes.vqa)],
            "images_manifest": str(scenes.manifest), "eval_text_data": [], "zoom_max_pixels": 50176,
            "max_length": 4096, "max_steps": 2, "warmup_ratio": 0.0, "warmup_steps": 0,
            "per_device_train_batch_size": 1, "gradient_accumulation_steps": 2, "save_steps": 1,
            "logging_steps": 1, "dataloader_num_workers": 0, "num_processes": 1, "launcher": "torchrun",
            "deepspeed": "" if args.deepspeed == "none" else str(ROOT / args.deepspeed)})
        out.mkdir(parents=True)
        summary = launch("sft", cfg)
        ckpts = sorted((out / "checkpoints").glob("checkpoint-*"))
        report["summary"] = {k: summary.get(k) for k in ("global_step", "train_loss", "loss_history")
                             if k in summary}
        report["checkpoints"] = {c.name: sorted(x.name for x in c.iterdir()) for c in ckpts}
        report["deepspeed_partitions"] = sorted(str(x.relative_to(out)) for x in out.glob("checkpoints/*/global_step*/*"))
        report["weights"] = moved(out)
    atomic_write_text(out_dir / "deepspeed_sft.json", json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
