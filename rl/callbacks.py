"""The GRPO trainer's callbacks (non-finite gradient guard, reward log, checkpoint marker / Ray report) and the
checkpoint bookkeeping they write: `latest.json` and the reward log that a resume trims."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pipeline.core.manifest import atomic_write_text
from rl.config import RLConfig
from rl.rewards import ZoomRewards

log = logging.getLogger("rl.stage")

LOG_KEYS = [
    "reward", "reward_std", "rewards/accuracy/mean", "rewards/format/mean", "rewards/tool_bonus/mean",
    "rewards/region/mean", "tools/call_frequency", "tools/failure_frequency", "loss", "grad_norm", "kl",
    "entropy", "learning_rate", "completions/mean_length", "frac_reward_zero_std",
]


def _callbacks(cfg: RLConfig, ckpt_dir: Path, ray_mode: bool, rewards: ZoomRewards, counters: dict) -> list[Any]:
    from transformers import TrainerCallback

    class NonFiniteGradGuard(TrainerCallback):
        """Skip the optimizer update when any gradient is NaN/inf (grads dropped; AdamW skips params without grad)."""

        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            import torch

            if model is None:
                return
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            if grads and not all(torch.isfinite(g).all() for g in grads):
                for p in model.parameters():
                    p.grad = None
                counters["nonfinite_skipped"] = counters.get("nonfinite_skipped", 0) + 1
                log.warning("rl: non-finite gradients at step %d; update skipped", state.global_step + 1)

    class RewardLog(TrainerCallback):
        """Append the step's logged metrics to rewards.jsonl (rank 0)."""

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs or "reward" not in logs:
                return
            row = {"step": state.global_step}
            row.update({k: float(v) for k, v in logs.items() if isinstance(v, (int, float))
                        and (k in LOG_KEYS or k.startswith("episodes/"))})
            row["nonfinite_skipped"] = counters.get("nonfinite_skipped", 0)
            with open(Path(cfg.output_dir) / "rewards.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    class CheckpointMarker(TrainerCallback):
        """After a checkpoint is complete: latest.json (atomic, written last); under Ray, report it on every rank."""

        def on_save(self, args, state, control, **kw):
            path = ckpt_dir / f"checkpoint-{state.global_step}"
            # rank 0 may still be writing the folder when another rank gets here: wait for every rank
            _barrier()
            if ray_mode:
                import ray.train

                metrics = {"step": state.global_step, **{k: float(v) for k, v in rewards.last_batch.items()}}
                # every rank reports (Ray needs the same number of reports from each), the folder once: Ray
                # merges reported folders into one, so N ranks reporting it would copy it N times
                ckpt = ray.train.Checkpoint.from_directory(str(path)) if state.is_world_process_zero else None
                ray.train.report(metrics, checkpoint=ckpt)
            if state.is_world_process_zero:
                atomic_write_text(ckpt_dir / "latest.json",
                                  json.dumps({"step": state.global_step, "path": str(path.resolve())}))

    return [NonFiniteGradGuard(), RewardLog(), CheckpointMarker()]


def _barrier() -> None:
    """Wait for every rank of the default process group (no-op in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint named by latest.json when it exists and is complete, else None."""
    marker = ckpt_dir / "latest.json"
    if not marker.exists():
        return None
    try:
        path = Path(json.loads(marker.read_text(encoding="utf-8"))["path"])
    except (json.JSONDecodeError, KeyError):
        return None
    return path if (path / "trainer_state.json").exists() else None


def _trim_reward_log(path: Path, step: int) -> None:
    """Drop log lines after the resumed step (they were written after the checkpoint and will be redone)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError):
            continue
    atomic_write_text(path, "".join(k + "\n" for k in keep))
