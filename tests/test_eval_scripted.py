"""The scripted-policy check on make-scenes data: an oracle that zooms on the target scores near 100% with a
pixel classifier on its crop; the same classifier on the overview region (no zoom) falls toward chance."""

from __future__ import annotations

from pipeline.config import load_config
from pipeline.records import VQASample, read_jsonl
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
