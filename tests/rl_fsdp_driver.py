"""One rank of a 2-rank FSDP GRPO run (`python -m torch.distributed.run --nproc_per_node 2 THIS WORKDIR`).

The policy is fp32 under bf16 autocast, beta > 0 (a bf16 reference model, sharded by TRL), two GRPO steps
with a scripted policy through TRL's tool loop, a checkpoint and the final model. Each rank writes
WORKDIR/rank<N>.json with what it saw.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fsdp_cpu_shim  # noqa: E402,F401


def main(work: Path) -> None:
    import torch
    from torch.distributed.fsdp import FSDPModule

    from rl.config import RLConfig
    from rl.scripted import VALID_CALL, script_policy
    from rl.stage import build_run, train_worker
    from rl.synthetic import make_zoom_task

    rank = int(os.environ["RANK"])
    task = work / "task"
    if rank == 0:
        make_zoom_task(task / "tmp", n=2, size=512, square=32, seed=1)
        os.replace(task / "tmp", task / "ready")
    while not (task / "ready" / "vqa.jsonl").exists():
        time.sleep(0.1)
    task = task / "ready"
    cfg = RLConfig(output_dir=str(work / "out"), model="tiny", train_data=str(task / "vqa.jsonl"),
                   image_manifest=str(task / "images.jsonl"), num_generations=2, per_device_train_batch_size=2,
                   max_steps=2, max_zooms=2, save_steps=2, plot=False, max_completion_length=256,
                   learning_rate=1e-4, bf16=True, beta=0.001, log_episodes=0, fsdp=True, num_processes=2,
                   gradient_checkpointing=True)
    run = build_run(cfg)
    tr = run.trainer
    script_policy(tr, [[f"<think>r{k}</think>{VALID_CALL}", "<answer>A</answer>" if k % 2 else "<answer>B</answer>"]
                       for k in range(8)])
    summary = train_worker(cfg, run=run)
    params = list(tr.model.parameters())
    ref_params = list(tr.ref_model.parameters())
    info = {
        "distributed_type": str(tr.accelerator.distributed_type), "world": tr.accelerator.num_processes,
        "policy_fsdp": isinstance(tr.model, FSDPModule), "ref_fsdp": isinstance(tr.ref_model, FSDPModule),
        "policy_dtype": str(params[0].dtype), "ref_dtype": str(ref_params[0].dtype),
        "local_numel": int(sum(p.to_local().numel() for p in params)),
        "global_numel": int(sum(p.numel() for p in params)),
        "steps": summary["steps"], "param_delta_l2": summary["param_delta_l2"],
        "mixed_precision": tr.accelerator.mixed_precision, "torch": torch.__version__,
        "activation_checkpointing": bool(tr.accelerator.state.fsdp_plugin.activation_checkpointing),
        "checkpoint_wrapped": sum("checkpoint_wrapped" in n for n, _ in tr.model.named_modules()),
    }
    (work / f"rank{rank}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
