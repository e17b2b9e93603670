"""Multi-process stages through pipeline.launcher: `knowzoom sft --num_processes 2` starts two gloo ranks with
the same `accelerate launch` command a GPU node uses; rank 0 alone writes data and bookkeeping, both ranks end
with the same weights. Plus the launch command itself, the runner's use of it, and `report_to`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from fixtures.scenes import make_scenes
    from fixtures.toy import write_text_qa

    d = tmp_path_factory.mktemp("launchdata")
    train, _ = write_text_qa(d / "qa")
    scenes = make_scenes(d / "scenes", n=4, size=1024, square=48, direct_every=4)
    manifest, vqa = scenes.manifest, scenes.vqa
    return {"train": str(train), "manifest": str(manifest), "vqa": str(vqa),
            "cache": str(tmp_path_factory.getbasetemp() / "kz_model_cache")}


def test_two_rank_sft_through_the_launcher(data, tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    out, hashes = tmp_path / "sft", tmp_path / "hashes"
    monkeypatch.setenv("KNOWZOOM_CACHE", data["cache"])
    monkeypatch.setenv("KNOWZOOM_RANK_HASH_DIR", str(hashes))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rc = main(["sft", "--output_dir", str(out), "--text_data", data["train"], "--vqa_data", data["vqa"],
               "--images_manifest", data["manifest"], "--max_steps", "2", "--logging_steps", "1",
               "--per_device_train_batch_size", "2", "--max_text_samples", "8", "--torch_threads", "1",
               "--save_steps", "10", "--num_processes", "2", "--report_to", "tensorboard",
               "--freeze_modules", "[q_proj, k_proj]"])
    assert rc == 0, capsys.readouterr().err[-3000:]
    # freeze_modules under DDP: the query/key projections are the base model's, the rest of the layers trained
    import torch

    from pipeline.models import load_model

    trained = load_model(str(out / "model"))[0].state_dict()
    base = load_model("tiny")[0].state_dict()
    lm = [k for k in trained if "language_model" in k and k.endswith(".weight") and "_proj." in k]
    assert all(torch.equal(trained[k], base[k]) == (".q_proj." in k or ".k_proj." in k) for k in lm)
    # the trajectory JSONL was written once: one line per sample, no duplicates from a second rank
    lines = (out / "sft_data" / "trajectories.jsonl").read_text().splitlines()
    ids = [json.loads(ln)["sample_id"] for ln in lines]
    assert len(ids) == 4 and len(set(ids)) == len(ids)
    referenced = {o["file"] for ln in lines for o in json.loads(ln)["observations"]}
    assert referenced == {f"images/{p.name}" for p in (out / "sft_data" / "images").glob("*.png")}
    done = json.loads((out / "DONE.json").read_text())
    assert done["summary"]["model"] == str(out / "model") and done["summary"]["global_step"] == 2
    assert (out / "model" / "config.json").exists() and (out / "manifest.json").exists()
    assert not list(out.glob(".*.tmp")) and not (out / ".launch_result.json").exists()
    # both ranks trained (DDP over gloo) and ended with the same weights
    ranks = {int(p.stem[4:]): json.loads(p.read_text()) for p in hashes.glob("rank*.json")}
    assert sorted(ranks) == [0, 1]
    assert ranks[0]["sha256"] == ranks[1]["sha256"] and ranks[0]["step"] == ranks[1]["step"] == 2
    # report_to=tensorboard wrote event files (rank 0 only)
    events = list((out / "checkpoints" / "runs").rglob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0


def test_two_rank_rl_through_the_launcher(tmp_path, monkeypatch, capsys):
    """`knowzoom rl --num_processes 2` without Ray: the same launcher starts two gloo ranks of GRPO; one
    DONE.json, one reward line per step (rank 0 writes), a saved model."""
    from fixtures.scenes import make_scenes

    from pipeline.cli import main

    task = tmp_path / "task"
    make_scenes(task, n=4, size=512, square=32, seed=1)
    out = tmp_path / "rl"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rc = main(["rl", "--config", str(ROOT / "configs/tiny/rl.yaml"), "--output_dir", str(out), "--model", "tiny",
               "--model_fallback", "", "--train_data", str(task / "vqa.jsonl"), "--train_data_fallback", "",
               "--image_manifest", str(task / "images.jsonl"), "--num_processes", "2", "--max_steps", "2",
               "--num_generations", "2", "--per_device_train_batch_size", "2", "--save_steps", "0"])
    assert rc == 0, capsys.readouterr().err[-3000:]
    assert json.loads((out / "DONE.json").read_text())["summary"]
    assert len((out / "rewards.jsonl").read_text().splitlines()) == 2  # two steps, written once
    assert (out / "model" / "config.json").exists() and not (out / ".launch_result.json").exists()


def test_launch_command_accelerate_and_torchrun(tmp_path):
    from pipeline.core.launch import launch_command, needs_launch
    from sft.config import SFTConfig

    cfg = SFTConfig(output_dir=str(tmp_path), text_data=["x.jsonl"], num_processes=8, main_process_port=29511)
    cmd = launch_command("sft", cfg, tmp_path / "config.yaml", tmp_path / "r.json")
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"] and "--multi_gpu" in cmd
    assert cmd[cmd.index("--num_processes") + 1] == "8" and cmd[cmd.index("--main_process_port") + 1] == "29511"
    i = cmd.index("pipeline.launcher")
    assert cmd[i - 1:] == ["-m", "pipeline.launcher", "sft", str(tmp_path / "config.yaml"),
                           str(tmp_path / "r.json"), cfg.fingerprint()]
    cfg.launcher = "torchrun"
    cmd = launch_command("sft", cfg, tmp_path / "config.yaml", tmp_path / "r.json")
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and cmd[cmd.index("--nproc_per_node") + 1] == "8"
    assert needs_launch("sft", cfg)
    cfg.num_processes = 1
    assert not needs_launch("sft", cfg)


def test_needs_launch_inside_a_launched_job_and_for_ray(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from pipeline.core.launch import needs_launch

    cfg = SimpleNamespace(num_processes=2)
    assert needs_launch("sft", cfg)
    monkeypatch.setenv("WORLD_SIZE", "2")  # a user ran `accelerate launch -m pipeline.cli sft` directly
    assert not needs_launch("sft", cfg)
    monkeypatch.delenv("WORLD_SIZE")
    assert not needs_launch("rl", SimpleNamespace(num_processes=2, use_ray=True))  # Ray Train starts them
    assert needs_launch("rl", SimpleNamespace(num_processes=2, use_ray=False))


def test_rank_1_of_an_external_launch_writes_no_bookkeeping(monkeypatch, tmp_path):
    from pipeline import stages
    from pipeline.core.config import StageConfig

    calls = []
    monkeypatch.setitem(stages.STAGES, "fake", stages.Stage("fake", "builtins", "object"))
    monkeypatch.setattr(stages.Stage, "load", lambda self: (StageConfig, lambda c: calls.append(c) or {"x": 1}))
    cfg = StageConfig(output_dir=str(tmp_path / "o"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert stages.run_stage("fake", cfg) == {"x": 1} and calls
    assert not (tmp_path / "o" / "DONE.json").exists() and not (tmp_path / "o" / "manifest.json").exists()
    monkeypatch.setenv("RANK", "0")
    stages.run_stage("fake", cfg)
    assert (tmp_path / "o" / "DONE.json").exists() and (tmp_path / "o" / "manifest.json").exists()


def test_pipeline_runner_launches_multi_process_stages(monkeypatch, tmp_path):
    """`knowzoom run`: a stage with num_processes 2 goes through pipeline.core.launch.launch (spy), others not."""
    from pipeline.core import launch as launcher
    from pipeline.core.config import config_from_dict
    from pipeline.runner import PipelineConfig, run

    seen = []
    monkeypatch.setattr(launcher, "launch", lambda name, cfg: seen.append((name, cfg.num_processes)) or
                        {"model": str(Path(cfg.output_dir) / "model")})
    qa = tmp_path / "qa.jsonl"
    qa.write_text("")
    cfg = config_from_dict(PipelineConfig, {
        "output_dir": str(tmp_path / "root"), "report": False,
        "stages": [{"name": "sft", "config": "configs/tiny/sft_text.yaml",
                    "set": {"output_dir": "{root}/sft", "text_data": [str(qa)], "eval_text_data": [],
                            "num_processes": 2}}]})
    summary = run(cfg)
    assert seen == [("sft", 2)]
    assert json.loads((tmp_path / "root" / "sft" / "DONE.json").read_text())["summary"]["model"].endswith("model")
    assert summary["stages"]["sft"]["model"].endswith("model")


def test_rl_report_to_reaches_grpo_config(tmp_path):
    from rl.config import RLConfig
    from rl.stage import _grpo_config

    cfg = RLConfig(output_dir=str(tmp_path), report_to=["tensorboard"])
    assert _grpo_config(cfg, tmp_path / "ck", False).report_to == ["tensorboard"]
    assert _grpo_config(RLConfig(output_dir=str(tmp_path)), tmp_path / "ck", False).report_to in ("none", [], ["none"])


def test_bad_launcher_settings_are_config_errors(tmp_path):
    from pipeline.core.config import config_from_dict
    from pipeline.core.errors import ConfigError
    from sft.config import SFTConfig

    with pytest.raises(ConfigError) as e:
        config_from_dict(SFTConfig, {"output_dir": str(tmp_path), "text_data": ["a"], "num_processes": 0,
                                     "launcher": "mpirun"})
    assert "num_processes" in str(e.value) and "launcher" in str(e.value)
    with pytest.raises(ConfigError, match="unknown logger 'tensorbord'"):
        config_from_dict(SFTConfig, {"output_dir": str(tmp_path), "text_data": ["a"], "report_to": "tensorbord"})
    assert os.environ.get("WORLD_SIZE") is None
