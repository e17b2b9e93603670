"""Kill `knowzoom rl` after a checkpoint, run it again: it resumes at the checkpointed step (model, optimizer,
scheduler, RNG, data position) and ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rl.callbacks import latest_checkpoint
from rl.config import RLConfig
from rl.synthetic import make_zoom_task


def _args(task: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "rl", "--output_dir", str(out), "--model", "tiny",
            "--train_data", str(task / "vqa.jsonl"), "--image_manifest", str(task / "images.jsonl"),
            "--max_steps", "4", "--save_steps", "1", "--save_total_limit", "5", "--num_generations", "2",
            "--per_device_train_batch_size", "2", "--max_completion_length", "24", "--max_zooms", "1",
            "--mask_length_truncated", "false", "--plot", "false", "--learning_rate", "0.01"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


def test_kill_and_resume_matches_uninterrupted(tmp_path):
    task = tmp_path / "task"
    make_zoom_task(task, n=4, size=512, square=32, seed=2)
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_args(task, full), check=True, env=_env(), capture_output=True, timeout=300)

    proc = subprocess.Popen(_args(task, killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            ck = latest_checkpoint(killed / "checkpoints")
            if ck is not None and json.loads((ck / "trainer_state.json").read_text())["global_step"] >= 2:
                break
            if proc.poll() is not None:
                pytest.fail("the run ended before it could be killed")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    marker = json.loads((killed / "checkpoints" / "latest.json").read_text())
    assert 2 <= marker["step"] < 4
    assert not (killed / "model").exists()

    done = subprocess.run(_args(task, killed), check=True, env=_env(), capture_output=True, text=True, timeout=300)
    summary = json.loads((killed / "train_summary.json").read_text())
    assert summary["resumed_from_step"] == marker["step"], done.stderr[-2000:]
    assert summary["steps"] == 4
    steps = [json.loads(line)["step"] for line in (killed / "rewards.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # nothing lost, nothing duplicated
    a = load_file(str(full / "model" / "model.safetensors"))
    b = load_file(str(killed / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert diff < 1e-5, f"resumed run differs from the uninterrupted one by {diff}"


def test_latest_marker_ignores_incomplete_checkpoints(tmp_path):
    ck = tmp_path / "checkpoints"
    (ck / "checkpoint-3").mkdir(parents=True)
    (ck / "latest.json").write_text(json.dumps({"step": 3, "path": str(ck / "checkpoint-3")}))
    assert latest_checkpoint(ck) is None  # no trainer_state.json: the save did not finish
    (ck / "checkpoint-3" / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(ck) == ck / "checkpoint-3"
    (ck / "latest.json").write_text("{not json")
    assert latest_checkpoint(ck) is None


def test_resume_off_starts_fresh(tmp_path):
    cfg = RLConfig(output_dir=str(tmp_path), resume=False)
    assert cfg.resume is False and not cfg.validate()
