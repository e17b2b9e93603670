"""A short real run of `knowzoom rl` with the tiny model: reward log, plot, summary, parameters move."""

from __future__ import annotations

import json

from fixtures.scenes import make_scenes
from fixtures.scripted_trainer import anchor_first_rollout


def test_tiny_run_logs_rewards_and_updates_parameters(tmp_path, monkeypatch):
    import rl.stage
    from pipeline.stages import STAGES, run_stage

    build_run = rl.stage.build_run

    def anchored(*args, **kwargs):
        # The random model's samples can all score alike (on CUDA's random stream they did: three steps of
        # tied rewards, zero advantage, no update); one well-formed rollout per group keeps a learning signal.
        run = build_run(*args, **kwargs)
        anchor_first_rollout(run.trainer, "<think>The crop shows it.</think><answer>A</answer>")
        return run

    monkeypatch.setattr(rl.stage, "build_run", anchored)

    cfg_cls, run_fn = STAGES["rl"].load()
    task = tmp_path / "task"
    make_scenes(task, n=3, size=512, square=32, seed=5)
    cfg = cfg_cls(output_dir=str(tmp_path / "rl"), model=str(tmp_path / "no_prewarm_model"), model_fallback="tiny",
                  train_data=str(tmp_path / "hard.jsonl"), train_data_fallback=str(task / "vqa.jsonl"),
                  image_manifest=str(task / "images.jsonl"), max_steps=3, num_generations=2,
                  per_device_train_batch_size=4, max_completion_length=48, max_zooms=2, save_steps=2,
                  mask_length_truncated=False, learning_rate=1e-2)
    summary = run_stage("rl", cfg)
    out = tmp_path / "rl"
    rows = [json.loads(line) for line in (out / "rewards.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("reward", "rewards/accuracy/mean", "rewards/format/mean", "rewards/tool_bonus/mean",
                "episodes/tool_call_rate", "episodes/accuracy", "episodes/format_ok_rate"):
        assert all(key in r for r in rows), key
    assert summary["param_delta_l2"] > 0 and summary["steps"] == 3
    assert len(summary["fallbacks"]) == 2 and summary["model"] == "tiny"
    assert (out / "reward_curve.png").stat().st_size > 1000
    assert (out / "model" / "model.safetensors").exists() and (out / "model" / "chat_template.jinja").exists()
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 3
    assert (out / "DONE").exists() or any(p.name.startswith("DONE") for p in out.iterdir())
