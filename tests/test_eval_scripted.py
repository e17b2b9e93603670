"""The scripted-policy check on make-scenes data: an oracle that zooms on the target scores near 100% with a
pixel classifier on its crop; the same classifier on the overview region (no zoom) falls toward chance."""

from __future__ import annotations

from pipeline.core.config import load_config
from pipeline.core.records import VQASample, read_jsonl
from rl.backends_scripted import scripted_check


def test_oracle_near_100_no_zoom_far_below(tmp_path, capsys):
    from tools.scenes import MakeScenesConfig
    from tools.scenes import run as make_scenes
    from tools.store import ImageStore

    cfg = load_config(MakeScenesConfig, None, {
        "output_dir": str(tmp_path), "size": 4096, "grid": 4, "n_train_scenes": 0, "n_test_scenes": 2,
        "n_train_pairs": 0, "n_test_pairs": 0, "preview": False})
    make_scenes(cfg)
    samples = list(read_jsonl(tmp_path / "vqa_test.jsonl", VQASample))
    r = scripted_check(samples, ImageStore.from_manifest(tmp_path / "images.jsonl"))
    with capsys.disabled():
        print(f"\nscripted check (4096 px scenes, n={r['n']}): oracle {r['oracle']['accuracy']:.2f}, "
              f"no-zoom {r['overview']['accuracy']:.2f}, chance {r['chance']:.2f}")
    assert r["oracle"]["accuracy"] >= 0.95 and r["oracle"]["zooms_per_question"] == 1.0
    assert r["overview"]["zooms_per_question"] == 0.0
    assert r["overview"]["accuracy"] <= r["oracle"]["accuracy"] - 0.2


def test_sampling_scripted_policy_is_seeded_per_rollout(tmp_path):
    """The scripted backend samples from each rollout's own seed: rollouts differ, and a rerun with other
    batches repeats them exactly (as the model backends do)."""
    from rl.agent import AgentConfig, run_episodes
    from rl.backends_scripted import SCRIPTED_TASKS, ScriptedPolicy
    from tools.scenes import MakeScenesConfig
    from tools.scenes import run as make_scenes
    from tools.store import ImageStore

    cfg = load_config(MakeScenesConfig, None, {
        "output_dir": str(tmp_path), "size": 4096, "grid": 4, "n_train_scenes": 0, "n_test_scenes": 1,
        "n_train_pairs": 0, "n_test_pairs": 0, "preview": False})
    make_scenes(cfg)
    store = ImageStore.from_manifest(tmp_path / "images.jsonl")
    samples = [s for s in read_jsonl(tmp_path / "vqa_test.jsonl", VQASample)
               if s.meta.get("task") in SCRIPTED_TASKS and s.targets][:2]

    def answers(batch_size):
        pol = ScriptedPolicy(samples, store, AgentConfig().zoom, slip_rate=0.7)
        agent = AgentConfig(max_turns=2, temperature=1.0, seed=3, batch_size=batch_size)
        return [t.final_text for t in run_episodes(pol, samples, store, agent, n=8)]

    a = answers(16)
    assert a == answers(3)
    assert len(set(a[:8])) > 1  # the 8 rollouts of an item are not copies
