"""Ray: the tool-actor pool survives a killed actor (episode replayed, GRPO step completes); the trainer runs
under Ray Train's TorchTrainer and resumes from the checkpoint Ray stored (slow)."""

from __future__ import annotations

import json
import os

import pytest
from fixtures.scenes import make_scenes

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoomtask_ray")
    make_scenes(root, n=2, size=512, square=32, seed=3, image_id="scene_{i:03d}")
    return root


@pytest.fixture(scope="module")
def ray_local():
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


def _wait_restarted(actor, old_pid: int, timeout_s: float = 120.0) -> None:
    import time

    from ray.exceptions import GetTimeoutError, RayActorError

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if ray.get(actor.ping.remote(), timeout=30) != old_pid:
                return
        except (RayActorError, GetTimeoutError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"actor was not restarted within {timeout_s}s")


def test_pool_replays_episode_on_restarted_actor(task, ray_local):
    from rl.ray_pool import RayEpisodePool

    pool = RayEpisodePool(task / "images.jsonl", {"max_pixels": 50176}, n_actors=2, call_timeout_s=90)
    try:
        pids = pool.wait_ready(60)
        obs = pool.start("ep", ["scene_000"])
        assert obs[0].name == "image_0" and obs[0].image.size[0] % 28 == 0
        r1 = pool.execute("ep", "zoom_in", {"bbox": [10, 10, 80, 80], "source": "image_0"})
        assert r1.error is None and r1.observation.name == "obs_1"
        victim = pool._tracks["ep"].actor
        ray.kill(pool.actors[victim], no_restart=False)
        _wait_restarted(pool.actors[victim], pids[victim])  # kill is asynchronous: a call could beat it
        # the chained call needs obs_1, which only existed on the dead actor: replayed, then answered
        r2 = pool.execute("ep", "zoom_in", {"bbox": [0, 0, 112, 112], "source": "obs_1"})
        assert r2.error is None and r2.observation.name == "obs_2" and r2.observation.parent == "obs_1"
        assert pool.counters["replays"] >= 1  # a replay that met the actor mid-restart is retried
        assert pool.wait_ready(60)[victim] != pids[victim]  # a new process serves it
        bad = pool.execute("ep", "zoom_in", {"bbox": [9000, 9000, 9100, 9100], "source": "image_0"})
        assert bad.error is not None and bad.observation is None  # tool errors stay observations
    finally:
        pool.shutdown()


def test_grpo_step_completes_when_a_tool_actor_is_killed(task, ray_local, tmp_path):
    from fixtures.scripted_trainer import VALID_CALL as VALID
    from fixtures.scripted_trainer import script_policy

    from rl.config import RLConfig
    from rl.ray_pool import RayEpisodePool
    from rl.stage import build_run

    answer = json.loads((task / "vqa.jsonl").read_text().splitlines()[0])["answer"]
    cfg = RLConfig(output_dir=str(tmp_path), model="tiny", train_data=str(task / "vqa.jsonl"),
                   image_manifest=str(task / "images.jsonl"), max_samples=1, num_generations=2,
                   per_device_train_batch_size=2, max_steps=1, max_zooms=2, save_steps=0, plot=False)
    pool = RayEpisodePool(cfg.image_manifest, cfg.zoom_config(), n_actors=1, call_timeout_s=30)
    pids = pool.wait_ready(60)
    run = build_run(cfg, backend=pool)
    scripts = [[f"<think>r0</think>{VALID}", f"<answer>{answer}</answer>"],
               [f"<think>r1</think>{VALID}", f"<answer>{answer}</answer>"]]
    script_policy(run.trainer, scripts)
    fake = run.trainer._generate_single_turn
    killed = []

    def kill_then_generate(*args, **kw):
        if not killed:  # after reset (episodes live on the actor), before the first zoom
            ray.kill(pool.actors[0], no_restart=False)
            _wait_restarted(pool.actors[0], pids[0])
            killed.append(True)
        return fake(*args, **kw)

    run.trainer._generate_single_turn = kill_then_generate
    try:
        run.trainer.train()
    finally:
        pool.shutdown()
    scores = [env.score for env in run.trainer.environments]
    assert all(s.n_zooms_ok == 1 and not s.unscorable and s.accuracy == 1.0 for s in scores)
    assert pool.counters["replays"] >= 1 and run.rewards.totals["unscorable"] == 0
    assert run.trainer.state.global_step == 1


@pytest.mark.slow
@pytest.mark.timeout(1500)  # two fits, each starting Ray Train: minutes on a loaded 2-core machine
def test_ray_train_run_and_resume_from_ray_checkpoint(task, tmp_path):
    """TorchTrainer (1 CPU worker, gloo), tools in Ray actors; a second fit resumes from Ray's checkpoint."""
    from rl.config import RLConfig
    from rl.stage import run

    base = dict(output_dir=str(tmp_path / "out"), model="tiny", train_data=str(task / "vqa.jsonl"),
                image_manifest=str(task / "images.jsonl"), num_generations=2, per_device_train_batch_size=2,
                max_completion_length=32, max_zooms=1, save_steps=1, mask_length_truncated=False,
                learning_rate=0.01, use_ray=True, ray_num_workers=1, tool_actors=1,
                # a gradient whatever the random model's rewards are (all zero gives zero advantages, no update)
                entropy_coef=0.01)
    s1 = run(RLConfig(max_steps=2, **base))
    assert s1["steps"] == 2 and s1["param_delta_l2"] > 0 and s1["ray_checkpoint"]
    s2 = run(RLConfig(max_steps=3, **base))
    assert s2["resumed_from_step"] == 2 and s2["steps"] == 3
    steps = [json.loads(line)["step"] for line in (tmp_path / "out" / "rewards.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_ray_train_two_cpu_workers(task, tmp_path):
    """Two DDP ranks (gloo) under TorchTrainer, each with its own tool actor; checkpoints reported on every rank."""
    from rl.config import RLConfig
    from rl.stage import run

    # 4 generations of 48 tokens per rank: some group has unequal rewards (GRPO learns nothing from a batch
    # whose groups all score alike, which 2 x 32 tokens of a random model can be)
    s = run(RLConfig(output_dir=str(tmp_path / "out"), model="tiny", train_data=str(task / "vqa.jsonl"),
                     image_manifest=str(task / "images.jsonl"), num_generations=4, per_device_train_batch_size=4,
                     max_completion_length=48, max_zooms=1, save_steps=1, max_steps=2, mask_length_truncated=False,
                     learning_rate=0.01, use_ray=True, ray_num_workers=2, ray_cpus_per_worker=0.5, tool_actors=1))
    assert s["steps"] == 2 and s["param_delta_l2"] > 0 and s["ray_checkpoint"]
