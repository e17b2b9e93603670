"""The GPU smoke check (tests/gpu/smoke.py) runs here with the tiny model on CPU: the same SFT step, GRPO
step and eval code the GPU run uses with the 7B dimensions, and the JSON report it writes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("trl")
ROOT = Path(__file__).resolve().parent.parent


def test_smoke_tiny_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("KNOWZOOM_CACHE", str(tmp_path.parent / "kz_model_cache"))
    spec = importlib.util.spec_from_file_location("kz_gpu_smoke", ROOT / "tests/gpu/smoke.py")
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    assert smoke.main(["--out", str(tmp_path / "out"), "--tiny", "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "out" / "smoke.json").read_text())
    st = report["stages"]
    assert report["device"] == "cpu" and report["model"]["params"] > 0
    assert st["sft"]["steps"] == 1 and st["sft"]["tokens"] > 0 and st["sft"]["loss"] > 0
    assert 0 < st["sft"]["plan_estimate_gb"] < 1  # the plan's figure for this step (tiny: a few MB)
    assert st["grpo"]["rollouts"] == 2 and st["grpo"]["zooms_per_rollout"] == 1
    assert st["grpo"]["generated_tokens"] > 0 and st["grpo"]["train_tokens"] > 0
    assert st["eval"]["items"] == 4 and st["eval"]["generated_tokens"] > 0
    for name in ("sft", "grpo", "eval"):
        assert st[name]["peak_rss_gb"] > 0
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_a_failed_stage_is_recorded_and_the_next_still_runs(tmp_path, monkeypatch):
    """On a scarce device run an out-of-memory GRPO step must not cost the eval figures or the JSON."""
    monkeypatch.setenv("KNOWZOOM_CACHE", str(tmp_path.parent / "kz_model_cache"))
    spec = importlib.util.spec_from_file_location("kz_gpu_smoke_fail", ROOT / "tests/gpu/smoke.py")
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)

    def oom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 4.00 GiB")

    monkeypatch.setattr(smoke, "grpo_step", oom)
    assert smoke.main(["--out", str(tmp_path / "out"), "--tiny", "--device", "cpu"]) == 1
    st = json.loads((tmp_path / "out" / "smoke.json").read_text())["stages"]
    assert st["grpo"]["error"].startswith("RuntimeError: CUDA out of memory") and st["grpo"]["peak_rss_gb"] > 0
    assert st["sft"]["steps"] == 1 and st["eval"]["items"] == 4


def test_smoke_refuses_7b_on_cpu(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tests/gpu/smoke.py"), "--out", str(tmp_path), "--device", "cpu"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "need a GPU" in r.stderr


def test_build_wheels_script_lists_what_a_bare_cuda_machine_lacks():
    text = (ROOT / "tests/gpu/build_wheels.sh").read_text()
    for pkg in ("trl==1.16.0", "datasets==", "rasterio==1.4.4", "multiprocess==", "spyndex==", "deepspeed==",
                "pydantic-core=="):
        assert pkg in text
    assert "vllm" not in text.lower().replace("no vllm", "")
    assert 'LIMIT_MB="${LIMIT_MB:-60}"' in text


def test_deepspeed_sft_driver_runs_the_7b_config_through_the_launcher_on_cpu(tmp_path, monkeypatch):
    """tests/gpu/deepspeed_sft.py without DeepSpeed (not installed on CPU): the 7B SFT config, tiny model, two
    steps through pipeline.core.launch (torch.distributed.run, one gloo rank); on a GPU the same run takes the
    config's ZeRO-2 JSON."""
    monkeypatch.setenv("KNOWZOOM_CACHE", str(tmp_path.parent / "kz_model_cache"))
    r = subprocess.run([sys.executable, str(ROOT / "tests/gpu/deepspeed_sft.py"), "--out", str(tmp_path),
                        "--deepspeed", "none"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "deepspeed_sft.json").read_text())
    assert report["summary"]["global_step"] == 2 and report["summary"]["train_loss"] > 0
    assert sorted(report["checkpoints"]) == ["checkpoint-1", "checkpoint-2"] and report["deepspeed_partitions"] == []
    w = report["weights"]
    assert w["language_changed"] > 0.1 and w["vision_changed"] == 0.0 and w["saved_dtype"] == "bfloat16"


def test_text_seeds_repeats_a_runs_text_stage_over_seeds_and_budgets(tmp_path, monkeypatch):
    """tests/gpu/text_seeds.py on CPU: a run's sft_text/config.yaml, moved to another folder (--data_root), two
    seeds of one step each; every run's scores land in text_seeds.json."""
    import shutil

    from fixtures.toy import write_text_qa

    from pipeline.core.config import load_config, save_config
    from sft.config import SFTConfig

    monkeypatch.setenv("KNOWZOOM_CACHE", str(tmp_path.parent / "kz_model_cache"))
    run = tmp_path / "run"
    train, test = write_text_qa(run / "qa")
    cfg = load_config(SFTConfig, ROOT / "configs/tiny/sft_text.yaml", {
        "output_dir": str(run / "sft_text"), "model": "tiny", "text_data": [str(train)],
        "eval_text_data": [str(test)], "eval_max_samples": 2, "eval_train_samples": 2, "eval_max_new_tokens": 4,
        "warmup_steps": 0, "torch_threads": 1, "save_steps": 100})
    save_config(cfg, run / "sft_text" / "config.yaml")
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    shutil.rmtree(run / "qa")  # the runs must read the moved copy
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "tests/gpu/text_seeds.py"), "--run_dir", str(moved),
                        "--data_root", str(moved), "--out", str(out), "--seeds", "0,1", "--steps", "1",
                        "--parallel", "2", "--timeout", "240"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    rows = json.loads((out / "text_seeds.json").read_text())["runs"]
    assert sorted((x["seed"], x["steps"], x["exit"]) for x in rows) == [(0, 1, 0), (1, 1, 0)]
    for x in rows:
        assert x["global_step"] == 1 and x["eval_after"]["n"] == 2 and x["eval_train_after"]["n"] == 2
