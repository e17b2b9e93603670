"""Run manifests: every stage writes its resolved config and a manifest (git SHA, versions, seed)
next to its outputs, and a DONE marker (with the config fingerprint) written last and atomically, so a
rerun with the same config skips the stage and a changed config reruns it."""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.core.config import StageConfig, save_config

_PACKAGES = (
    "knowzoom", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "ray", "rasterio",
    "numpy", "pillow", "networkx", "vllm",
)
DONE = "DONE.json"


def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parents[2],
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str]:
    out = {}
    for p in _PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            continue
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass
    if "torch" in sys.modules:
        import torch

        torch.manual_seed(seed)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(cfg: StageConfig, stage: str, extra: dict[str, Any] | None = None) -> Path:
    """Write `config.yaml` and `manifest.json` into cfg.output_dir (called when a stage starts)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    manifest = {
        "stage": stage,
        "config_fingerprint": cfg.fingerprint(),
        "git_sha": git_sha(),
        "versions": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "seed": cfg.seed,
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "started_epoch": time.time(),
        **(extra or {}),
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2, default=str))
    return out / "manifest.json"


def mark_done(cfg: StageConfig, stage: str, summary: dict[str, Any] | None = None) -> None:
    """Written last: the stage's outputs for this exact config are complete (with the seconds since the
    stage's manifest was written, so a later run that reuses the outputs can still say what they cost)."""
    out = Path(cfg.output_dir)
    done: dict[str, Any] = {"stage": stage, "config_fingerprint": cfg.fingerprint(), "summary": summary or {},
                            "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    started = read_manifest(out).get("started_epoch")
    if isinstance(started, (int, float)):
        done["seconds"] = round(time.time() - float(started), 1)
    atomic_write_text(out / DONE, json.dumps(done, indent=2, default=str))


def stage_seconds(output_dir: str | Path) -> float | None:
    """How long the run that wrote OUTPUT_DIR's outputs took: DONE's seconds, or, for outputs written before
    DONE carried them, its finished time minus the manifest's started time (1 s resolution); None if unknown."""
    import datetime as dt

    done = read_done(output_dir) or {}
    if isinstance(done.get("seconds"), (int, float)):
        return float(done["seconds"])
    try:
        started = read_manifest(output_dir)["started"]
        return (dt.datetime.fromisoformat(done["finished"]) - dt.datetime.fromisoformat(started)).total_seconds()
    except (ValueError, KeyError, TypeError):
        return None


def is_done(cfg: StageConfig) -> bool:
    p = Path(cfg.output_dir) / DONE
    if not p.exists():
        return False
    try:
        return json.loads(p.read_text())["config_fingerprint"] == cfg.fingerprint()
    except (ValueError, KeyError):
        return False


def read_manifest(output_dir: str | Path) -> dict[str, Any]:
    """OUTPUT_DIR's manifest.json ({} when absent or unreadable: outputs with no record of what wrote them)."""
    try:
        m = json.loads((Path(output_dir) / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    return m if isinstance(m, dict) else {}


def read_done(output_dir: str | Path) -> dict[str, Any] | None:
    p = Path(output_dir) / DONE
    return json.loads(p.read_text()) if p.exists() else None
