"""Multi-process stages: one launch path for CPU (gloo) and GPU (nccl/DeepSpeed).

A stage config with `num_processes > 1` is not run in the calling process: `launch()` re-executes it under
`accelerate launch --multi_gpu` (or `torchrun`), both of which start the ranks with `torch.distributed.run`
and set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. Each rank runs `python -m
pipeline.launcher STAGE CONFIG.yaml RESULT.json` (the rank entry, in the roof: it reads the stage registry): it loads the resolved config the parent wrote, runs the
stage function, and rank 0 writes the stage's summary; the parent (the `knowzoom` process) writes the
manifest and DONE.json, so no two processes write bookkeeping. DeepSpeed and FSDP are switched on by the
stage's own fields (`deepspeed`, `fsdp`) inside the HF Trainer, so the command is the same on CPU and GPU:
under the launcher's environment DeepSpeed finds its ranks and never falls back to MPI discovery.

RL with `use_ray: true` is the exception: its ranks are Ray Train workers (`ray_num_workers`) that Ray
starts itself, so the launcher runs it in-process.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.config import StageConfig, hfield, save_config
from pipeline.core.errors import KnowZoomError
from pipeline.core.manifest import mark_done, read_manifest, seed_everything, write_manifest

log = logging.getLogger(__name__)
PROJECT_ROOT = Path(__file__).resolve().parents[2]
LAUNCHERS = ("accelerate", "torchrun")
RESULT_FILE = ".launch_result.json"


class LaunchError(KnowZoomError):
    """The ranks of a multi-process stage could not be started or one of them failed."""


@dataclass
class LaunchConfig(StageConfig):
    """Fields of a stage that can run as several ranks (one per GPU, or gloo processes on CPU)."""

    num_processes: int = hfield(1, help="Ranks (one per GPU). >1 re-executes the stage under the launcher "
                                        "(gloo on CPU, nccl on GPU); 1 runs in this process.")
    launcher: str = hfield("accelerate", help="How ranks start: 'accelerate' (accelerate launch --multi_gpu) or "
                                              "'torchrun'; both use torch.distributed.run.")
    main_process_port: int = hfield(0, help="Rendezvous port of rank 0 (0 = a free port picked at launch).")

    def validate(self) -> list[str]:
        p = super().validate()
        if self.num_processes < 1:
            p.append("num_processes: must be >= 1")
        if self.launcher not in LAUNCHERS:
            p.append(f"launcher: use one of {', '.join(LAUNCHERS)}")
        if not 0 <= self.main_process_port < 65536:
            p.append("main_process_port: must be in [0, 65535] (0 = pick a free port)")
        return p


def world_size() -> int:
    """Ranks of the current job (1 outside a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank() -> int:
    """Global rank of this process (0 outside a launcher)."""
    return int(os.environ.get("RANK", "0") or 0)


def is_main_rank() -> bool:
    return rank() == 0


def needs_launch(name: str, cfg: StageConfig) -> bool:
    """True when this stage must start its own ranks: num_processes > 1, not already inside a launched job,
    and not an RL run whose ranks are Ray Train workers."""
    if getattr(cfg, "num_processes", 1) <= 1 or world_size() > 1:
        return False
    return not (name == "rl" and getattr(cfg, "use_ray", False))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_command(name: str, cfg: StageConfig, config_path: Path, result_path: Path) -> list[str]:
    """The command that starts `cfg.num_processes` ranks of stage `name` on this machine."""
    n = int(getattr(cfg, "num_processes", 1))
    port = int(getattr(cfg, "main_process_port", 0)) or free_port()
    child = ["-m", "pipeline.launcher", name, str(config_path), str(result_path), cfg.fingerprint()]
    if getattr(cfg, "launcher", "accelerate") == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(n),
                "--master_addr", "127.0.0.1", "--master_port", str(port), *child]
    # --multi_gpu selects accelerate's torch.distributed.run path; on a machine without CUDA the ranks fall
    # back to gloo (accelerate's MULTI_CPU). Mixed precision comes from the stage's own bf16 field (the HF
    # Trainer passes it to accelerate), DeepSpeed/FSDP from its deepspeed/fsdp fields.
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
            "--num_machines", "1", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
            "--mixed_precision", "no", "--dynamo_backend", "no", *child]


def launch(name: str, cfg: StageConfig) -> dict[str, Any]:
    """Run stage `name` as `cfg.num_processes` ranks and return rank 0's summary.

    The resolved config is the `config.yaml` that `run_stage` wrote into output_dir; ranks inherit this
    process's working folder, so relative paths mean the same for them."""
    out = Path(cfg.output_dir).resolve()
    config_path = out / "config.yaml"
    if not config_path.exists():
        save_config(cfg, config_path)
    result_path = out / RESULT_FILE
    result_path.unlink(missing_ok=True)
    cmd = launch_command(name, cfg, config_path, result_path)
    env = dict(os.environ)
    # ranks import this checkout's code, whatever is installed
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    log.info("%s: starting %d ranks: %s", name, getattr(cfg, "num_processes", 1), shlex.join(cmd))
    try:
        proc = subprocess.run(cmd, env=env, check=False)
    except OSError as e:
        raise LaunchError(f"stage {name}: cannot start the launcher ({e})") from e
    if proc.returncode != 0:
        raise LaunchError(f"stage {name}: a rank exited with code {proc.returncode} (its log is above); "
                          f"command: {shlex.join(cmd)}")
    if not result_path.exists():
        raise LaunchError(f"stage {name}: the ranks finished but rank 0 wrote no result ({result_path})")
    summary = json.loads(result_path.read_text())
    result_path.unlink()
    return summary


def drop_stale_checkpoints(cfg: StageConfig) -> bool:
    """Delete OUTPUT_DIR/checkpoints when the manifest there was written for another config (a stage rerun after
    its config changed): the SFT and RL trainers resume from that folder, and a checkpoint of another config
    (another learning rate, data or step count) is not this run's. A killed run of the same config keeps its
    checkpoints and resumes. True when something was deleted."""
    import shutil

    out = Path(cfg.output_dir)
    ckpt = out / "checkpoints"
    if not ckpt.is_dir():
        return False
    old = read_manifest(out).get("config_fingerprint")
    if old is None or old == cfg.fingerprint():
        return False  # the same config, or no record of what wrote them: keep them (the trainers' resume rules apply)
    log.warning("%s: its checkpoints were written for another config (%s, now %s); starting fresh", out, old,
                cfg.fingerprint())
    shutil.rmtree(ckpt)
    return True


def run_recorded(name: str, cfg: StageConfig, func: Callable[[Any], dict[str, Any] | None]) -> dict[str, Any]:
    """Run `func(cfg)` as stage `name` with manifest + DONE bookkeeping, starting its ranks when it needs them.

    Only rank 0 writes the bookkeeping (inside a job someone else launched, WORLD_SIZE is set)."""
    main = is_main_rank()
    if main:
        drop_stale_checkpoints(cfg)
        write_manifest(cfg, name)
    if needs_launch(name, cfg):
        summary = launch(name, cfg)
    else:
        seed_everything(cfg.seed)
        summary = func(cfg) or {}
    if main:
        mark_done(cfg, name, summary)
    return summary
