"""The pipeline report (tables stay tables, every stage's before → after figures), the zoom-quality metrics of
an evaluation (valid calls, zooms covering the target) and the concise Trainer progress lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.core.records import TargetRegion, Trajectory, VQASample
from pipeline.eval.report import compute_metrics, markdown_report, zoom_hits


def _stage(out: Path, name: str, sid: str):
    from pipeline.core.config import StageConfig

    return sid, name, StageConfig(output_dir=str(out))


def _png(path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(path)


def _tables(md: str) -> list[list[str]]:
    """Markdown tables as lists of lines: a table is a run of lines starting with '|'."""
    out, cur = [], []
    for line in md.splitlines():
        if line.startswith("|"):
            cur.append(line)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def test_report_tables_are_whole_and_show_every_stage_before_and_after(tmp_path):
    from pipeline.core.config import StageConfig
    from pipeline.pipeline_report import write_pipeline_report

    root = tmp_path / "run"
    text, warm, rl, ev = root / "sft_text", root / "sft_prewarm", root / "rl", root / "eval"
    (text / "metrics.json").parent.mkdir(parents=True)
    (text / "metrics.json").write_text(json.dumps({
        "eval_before": {"n": 200, "accuracy": 0.25}, "eval_after": {"n": 200, "accuracy": 0.61, "chance": 0.085,
                                                                     "prior": 0.165},
        "eval_rephrased_before": {"n": 20, "accuracy": 0.0},
        "eval_rephrased_after": {"n": 20, "accuracy": 0.7, "chance": 0.35},
        "first_logged_loss": 7.3, "final_logged_loss": 0.9}))
    warm.mkdir()
    (warm / "metrics.json").write_text(json.dumps({
        "probe_before": {"valid_zoom_rate": 0.0, "target_hit_rate": None, "pass@1_micro": 0.24},
        "probe_after": {"valid_zoom_rate": 0.97, "target_hit_rate": 0.81, "pass@1_micro": 0.55}}))
    _png(text / "loss_curve.png")
    _png(warm / "loss_curve.png")
    rl.mkdir()
    # 8 rollouts a step: the first 10 steps 6 on target (3 right), 2 off (1 right); the last 10 all on target,
    # 4 right; a uniform guess is right on a quarter
    (rl / "rewards.jsonl").write_text("".join(json.dumps({
        "step": i, "reward": 0.1 * i, "episodes/on_target_rate": 6 / 8 if i < 10 else 1.0,
        "episodes/correct_on_target_rate": 3 / 8 if i < 10 else 4 / 8, "episodes/accuracy": 4 / 8,
        "episodes/guess_rate": 0.25}) + "\n" for i in range(20)))
    _png(rl / "reward_curve.png")
    ev.mkdir()
    (ev / "results.json").write_text(json.dumps({"metrics": {"overall": {
        "pass@1_macro": 0.64, "pass@1_micro": 0.66, "pass@4_macro": 0.8, "tool_error_rate": 0.05,
        "valid_zoom_rate": 0.95, "target_hit_rate": 0.9, "parse_failure_rate": 0.0}}}))
    (ev / "viewer.html").write_text("<html></html>")
    _png(ev / "per_task.png")
    resolved = [_stage(text, "sft", "sft_text"), _stage(warm, "sft", "sft_prewarm"), _stage(rl, "rl", "rl"),
                _stage(ev, "eval", "eval")]
    md_path = write_pipeline_report(StageConfig(output_dir=str(root)), resolved, {"rl": {"skipped": True}},
                                    {"sft_text": 1.0, "rl": 2.0})
    md = md_path.read_text()
    tables = _tables(md)
    # the stage table: header, rule and one row per stage, with nothing between its rows
    stage_table = next(t for t in tables if t[0].startswith("| stage | command"))
    assert len(stage_table) == 2 + len(resolved)
    assert all(line.count("|") == stage_table[0].count("|") for line in stage_table)
    measures = "\n".join(next(t for t in tables if t[0].startswith("| stage | measure")))
    assert "| sft_text | held-out KG accuracy (n=200, chance 8.5 %, answer prior 16.5 %) | 25.0 % | 61.0 % |" in measures
    assert "| sft_text | held-out rephrasings of trained facts (n=20, chance 35.0 %) | 0.0 % | 70.0 % |" in measures
    assert "| sft_prewarm | held-out scenes: valid zoom calls | 0.0 % | 97.0 % |" in measures
    assert "zooms covering target | – | 81.0 % |" in measures
    assert "| rl | mean reward (first → last 10 steps) | 0.450 | 1.450 |" in measures
    assert "| rl | rollouts right, zoom on the target (first → last 10 steps) | 50.0 % | 50.0 % |" in measures
    assert "| rl | rollouts right, zoom off it or none (first → last 10 steps) | 50.0 % | – |" in measures
    assert "| rl | a uniform guess would be right (first → last 10 steps) | 25.0 % | 25.0 % |" in measures
    assert "| eval | Pass@1 macro | – | 64.0 % |" in measures and "Pass@4 macro" in measures
    # figures sit in sections below the tables, never inside one
    assert "![sft_text: loss_curve.png](sft_text/loss_curve.png)" in md
    assert "![rl: reward_curve.png](rl/reward_curve.png)" in md
    assert not any("![" in line for t in tables for line in t)
    page = (root / "report.html").read_text()
    assert "before → after" in page and "<td>97.0 %</td>" in page and "reward_curve.png" in page


def _sample(sid: str, box: list[float]) -> VQASample:
    return VQASample(id=sid, images=["x"], question="q", answer="A", choices=["(A) x", "(B) y"], category="T/u",
                     targets=[TargetRegion(image=0, bbox=box)])


def _traj(sid: str, windows: list[list[float]], errors: int = 0, correct: bool = True) -> Trajectory:
    obs = [{"name": "image_0", "image_index": 0, "window": [0, 0, 1000, 1000], "parent": None}]
    obs += [{"name": f"obs_{k + 1}", "image_index": 0, "window": w, "parent": "image_0"} for k, w in enumerate(windows)]
    return Trajectory(sample_id=sid, messages=[], observations=obs, tool_calls=len(windows) + errors,
                      tool_errors=errors, correct=correct, meta={"parse_failure": False})


def test_zoom_hits_and_valid_zoom_rate():
    s = _sample("a", [100, 100, 200, 200])
    assert zoom_hits(_traj("a", [[90, 90, 210, 210], [500, 500, 600, 600]]), s) == (2, 1)
    assert zoom_hits(_traj("a", [[150, 150, 400, 400]]), s) == (1, 0)  # covers a quarter only
    samples = [s, _sample("b", [0, 0, 50, 50])]
    greedy = {"a": _traj("a", [[90, 90, 210, 210]], errors=1), "b": _traj("b", [[0, 0, 60, 60]])}
    o = compute_metrics(samples, greedy)["overall"]
    assert o["valid_zoom_rate"] == pytest.approx(2 / 3) and o["target_hit_rate"] == 1.0
    assert o["tool_error_rate"] == pytest.approx(1 / 3)
    # a malformed call: the agent counts an error but no call; the rate stays a share of attempts (<= 100 %)
    bad = Trajectory(sample_id="b", messages=[], observations=[], tool_calls=0, tool_errors=1, correct=False,
                     meta={"parse_failure": False})
    o = compute_metrics(samples, {"a": greedy["a"], "b": bad})["overall"]
    assert o["tool_error_rate"] == pytest.approx(2 / 3) and o["valid_zoom_rate"] == pytest.approx(1 / 3)
    assert "target hit %" in markdown_report({"metrics": compute_metrics(samples, greedy), "reportable": True})


def test_concise_progress_lines_replace_raw_log_dicts():
    pytest.importorskip("transformers")
    import transformers.trainer as hf_trainer
    from transformers.trainer_callback import ProgressCallback

    from pipeline.progress import ConciseProgressCallback, concise_line, install

    line = concise_line({"loss": 3.4591, "grad_norm": 0.65, "learning_rate": 0.002967, "entropy": 5.8,
                         "mean_token_accuracy": 0.7214, "num_tokens": 95600.0, "epoch": 0.83}, 25, 150)
    assert line == "step 25/150 · loss 3.4591 · tok-acc 72.1% · lr 2.97e-03 · |g| 0.65"
    assert "{" not in line and "entropy" not in line and "num_tokens" not in line
    assert concise_line({"train_runtime": 68.2, "train_steps_per_second": 2.2, "train_loss": 0.646}, 150, 150) \
        == "done: 150 steps in 68 s · 2.20 steps/s · mean loss 0.6460"
    assert concise_line({"epoch": 1.0}, 3, 10) is None
    old = hf_trainer.DEFAULT_PROGRESS_CALLBACK
    try:
        hf_trainer.DEFAULT_PROGRESS_CALLBACK = ProgressCallback
        install()
        assert hf_trainer.DEFAULT_PROGRESS_CALLBACK is ConciseProgressCallback
    finally:
        hf_trainer.DEFAULT_PROGRESS_CALLBACK = old


def test_ablate_seeds_get_own_roots_seeded_training_stages_and_a_spread_table(tmp_path):
    from pipeline.ablate import (
        DEFAULT_VARIANTS,
        AblateConfig,
        _pipeline_for,
        format_spread,
        format_table,
        metrics_row,
        spread_rows,
    )
    from pipeline.core.config import load_config

    root = Path(__file__).resolve().parent.parent
    cfg = load_config(AblateConfig, root / "configs/tiny/ablate.yaml",
                      {"output_dir": str(tmp_path / "abl"), "seeds": [0, 1, 2]})
    c = DEFAULT_VARIANTS["c_coldstart_prewarm_rl"]
    main = _pipeline_for(cfg, "c_coldstart_prewarm_rl", c, 0)
    assert main.output_dir == "runs/tiny" and "seed" not in (main.overrides.get("rl") or {})
    other = _pipeline_for(cfg, "c_coldstart_prewarm_rl", c, 2)
    assert other.output_dir == str(tmp_path / "abl/seed2/c_coldstart_prewarm_rl")
    assert all(other.overrides[s]["seed"] == 2 for s in ("sft_text", "sft_prewarm", "rl", "eval"))
    assert "make-scenes" not in other.overrides and other.data_root == cfg.data_root  # same data, same test set
    a = _pipeline_for(cfg, "a_rl_only", DEFAULT_VARIANTS["a_rl_only"], 1)
    assert a.overrides["rl"] == {"seed": 1, "model": "{data_root}/base/model"}  # the variant's own override kept

    def result(p1: float, know: float) -> dict:
        return {"metrics": {"metrics": ["pass@1"], "overall": {"pass@1_macro": p1, "pass@1_micro": p1, "n": 10},
                            "tasks": {"Object operator (text only)": {"pass@1": know, "answer_prior": 2 / 3}}}}

    rows = [dict(metrics_row("c", "full", result(v, k)), seed=s) for s, (v, k) in enumerate([(0.5, 0.2), (0.7, 0.4)])]
    agg = spread_rows(rows)
    assert agg[0]["pass@1_macro"]["mean"] == pytest.approx(0.6) and agg[0]["pass@1_macro"]["sd"] == pytest.approx(0.1414, abs=1e-3)
    assert agg[0]["knowledge_text_only_pass@1"]["max"] == 0.4
    assert "| c (full) | 2 | 60.0 ± 14.1 (50.0–70.0) |" in format_spread(agg)
    # a seed whose run has no results yet is listed as not run and left out of the spread
    missing = dict(metrics_row("c", "full", {}), seed=2, not_run=True)
    assert spread_rows([*rows, missing]) == agg
    assert "| c (full) seed 2 | not run |" in format_table([*rows, missing])
    # under the table: what one answer always scores on the knowledge family (its answers are two letters)
    from pipeline.ablate import one_answer_line

    assert "Object operator (text only) 66.7 %" in one_answer_line([missing, *rows])
    assert one_answer_line(rows).count(" %") == 1 and one_answer_line([missing]) == ""  # seen: no prior given


def test_ablate_rl_columns_give_the_probe_gain_and_reward_windows_and_none_for_stages_not_run(tmp_path):
    from pipeline.ablate import format_table, metrics_row, rl_columns

    def probe(name: str, macro: float) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "results.json").write_text(json.dumps({"metrics": {"overall": {"pass@1_macro": macro}}}))
        return d

    rl = tmp_path / "rl"
    rl.mkdir()
    rewards = [0.1] * 10 + [0.3] * 40 + [0.6] * 10  # 60 steps: first 10 → 0.1, last 10 → 0.6
    (rl / "rewards.jsonl").write_text("".join(json.dumps({"step": i + 1, "reward": r}) + "\n"
                                              for i, r in enumerate(rewards)) + "not json\n")
    cols = rl_columns(probe("before", 0.20), probe("after", 0.25), rl)
    assert cols["probe_rl_gain"] == pytest.approx(0.05)
    assert (cols["rl_reward_first"], cols["rl_reward_last"]) == (pytest.approx(0.1), pytest.approx(0.6))
    none = rl_columns(tmp_path / "never_ran", probe("after_only", 0.3), tmp_path / "no_rl")
    assert none["probe_before_rl"] is None and none["probe_rl_gain"] is None and none["rl_reward_first"] is None
    row = {**metrics_row("b", "pre-warm", {"metrics": {"overall": {"pass@1_macro": 0.5}, "tasks": {
        "Object operator": {"pass@1": 0.25}}}}), **cols}
    line = format_table([row]).splitlines()[-1]
    # fractions print in percent (the knowledge and probe columns too), rewards as numbers
    assert "| 50.0 |" in line and "| 25.0 |" in line and "| 5.0 | 0.10 | 0.60 |" in line


def test_stage_seconds_from_done_and_from_older_outputs_without_it(tmp_path):
    from pipeline.core.config import StageConfig
    from pipeline.core.manifest import mark_done, stage_seconds, write_manifest

    cfg = StageConfig(output_dir=str(tmp_path / "stage"))
    write_manifest(cfg, "demo")
    mark_done(cfg, "demo")
    done = json.loads((tmp_path / "stage/DONE.json").read_text())
    assert 0 <= done["seconds"] < 60 and stage_seconds(tmp_path / "stage") == done["seconds"]
    # outputs written before DONE carried seconds: finished − started
    old = tmp_path / "old"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({"started": "2026-11-30T14:25:29"}))
    (old / "DONE.json").write_text(json.dumps({"finished": "2026-11-30T14:27:12"}))
    assert stage_seconds(old) == 103.0
    assert stage_seconds(tmp_path / "never_ran") is None
