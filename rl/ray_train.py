"""`knowzoom rl` with `use_ray`: the GRPO trainer under Ray Train's TorchTrainer (one worker per rank)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.core.manifest import atomic_write_text
from rl.config import RLConfig


def _ray_train_loop(config: dict[str, Any]) -> None:
    cfg = RLConfig(**config["cfg"])
    config["worker"](cfg, ray_mode=True)


def run_ray(cfg: RLConfig, worker: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """The trainer under Ray Train's TorchTrainer (workers = DDP ranks); Ray restores the run from its storage.

    `worker(cfg, ray_mode=True)` is what each Ray worker runs (rl.stage.train_worker): passed in, so this
    launcher does not import the stage that calls it."""
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    env_vars = {k: os.environ[k] for k in ("RAY_TRAIN_ENABLE_PRINT_PATCH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                           "HF_DATASETS_OFFLINE", "KNOWZOOM_CACHE", "TRL_EXPERIMENTAL_SILENCE")
                if k in os.environ}
    env_vars.setdefault("OMP_NUM_THREADS", str(max(cfg.torch_threads, 1)))
    started = False
    if not ray.is_initialized():
        ray.init(address=cfg.ray_address or None, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": env_vars})
        started = True
    storage = Path(cfg.ray_storage_path or Path(cfg.output_dir) / "ray").resolve()
    cfg_dict = cfg.to_dict()
    cfg_dict["output_dir"] = str(Path(cfg.output_dir).resolve())
    for k in ("model", "train_data", "train_data_fallback", "image_manifest"):
        if cfg_dict[k] and Path(cfg_dict[k]).exists():
            cfg_dict[k] = str(Path(cfg_dict[k]).resolve())
    t0 = time.time()
    try:
        trainer = TorchTrainer(
            _ray_train_loop,
            train_loop_config={"cfg": cfg_dict, "worker": worker},
            scaling_config=ScalingConfig(num_workers=cfg.world_size(), use_gpu=cfg.ray_use_gpu,
                                         resources_per_worker={"CPU": cfg.ray_cpus_per_worker,
                                                               **({"GPU": 1} if cfg.ray_use_gpu else {})}),
            torch_config=TorchConfig(backend="nccl" if cfg.ray_use_gpu else "gloo"),
            run_config=RunConfig(name="rl", storage_path=str(storage),
                                 checkpoint_config=CheckpointConfig(num_to_keep=max(cfg.save_total_limit, 1))),
        )
        result = trainer.fit()
    finally:
        if started:
            ray.shutdown()
    summary_path = Path(cfg_dict["output_dir"]) / "train_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary["ray_fit_seconds"] = round(time.time() - t0, 1)
    summary["ray_checkpoint"] = str(result.checkpoint.path) if result.checkpoint else None
    atomic_write_text(summary_path, json.dumps(summary, indent=2))
    return summary
