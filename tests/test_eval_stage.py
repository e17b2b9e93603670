"""`knowzoom eval` and `knowzoom mine-hard` end to end: metrics, Pass@k, resume after a kill, --limit,
reports, and the CLI with the real tiny model."""

from __future__ import annotations

import itertools
import json
import random

import pytest
from test_eval_helpers import OracleBackend, ScriptBackend, make_vqa_set, store_for

from pipeline.core.config import load_config
from pipeline.core.records import VQASample, read_jsonl
from pipeline.eval.evaluate import EvalConfig
from pipeline.eval.evaluate import run as run_eval
from pipeline.eval.mining import MineHardConfig
from pipeline.eval.mining import run as run_mine
from pipeline.eval.report import compute_metrics, pass_at_k
from tools.zoom import ZoomConfig


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_vqa_set(tmp_path_factory.mktemp("vqa"), n=4)


def _cfg(data, out, **kw):
    base = {"output_dir": str(out), "dataset_path": str(data / "vqa_test.jsonl"),
            "images_manifest": str(data / "images.jsonl"), "viewer_max_items": 4}
    base.update(kw)
    return load_config(EvalConfig, None, base)


def _samples(data):
    return list(read_jsonl(data / "vqa_test.jsonl", VQASample))


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 5, 3), (10, 3, 1), (10, 3, 4), (8, 2, 8), (6, 1, 2)])
def test_pass_at_k_matches_brute_force(n, c, k):
    outcomes = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    brute = sum(1 for sub in subsets if any(outcomes[i] for i in sub)) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(brute)
    assert pass_at_k(n, c, 1) == pytest.approx(c / n)


def test_pass_at_k_rejects_bad_inputs():
    for args in [(3, 4, 1), (3, 1, 4), (3, 1, 0)]:
        with pytest.raises(ValueError):
            pass_at_k(*args)


def test_eval_oracle_scores_all_and_writes_reports(data, tmp_path):
    cfg = _cfg(data, tmp_path / "e")
    be = OracleBackend(_samples(data), store_for(data), ZoomConfig())
    summary = run_eval(cfg, backend=be)
    assert summary["pass@1_micro"] == 1.0 and summary["pass@1_macro"] == 1.0 and summary["reportable"]
    assert summary["tool_calls_per_question"] == 1.0
    res = json.loads((tmp_path / "e" / "results.json").read_text())
    assert set(res["metrics"]["tasks"]) == {"Object color", "Other"}
    md = (tmp_path / "e" / "results.md").read_text()
    assert "| pass@1 | 100.00 | 100.00 |" in md and "Not reportable" not in md
    assert (tmp_path / "e" / "per_task.png").read_bytes()[:4] == b"\x89PNG"
    html = (tmp_path / "e" / "viewer.html").read_text()
    assert html.count('class="zoom-box"') == 4 and html.count('class="target-box"') == 4


def test_micro_vs_macro_and_parse_failures(data, tmp_path):
    cfg = _cfg(data, tmp_path / "e")
    summary = run_eval(cfg, backend=ScriptBackend(["<answer>A</answer>"]))  # q0 A right; q3 (Other) is D
    # Object color: q0..q2 answers A,B,C -> 1/3; Other: q3 D -> 0
    assert summary["pass@1_micro"] == pytest.approx(1 / 4)
    assert summary["pass@1_macro"] == pytest.approx((1 / 3 + 0) / 2)
    s2 = run_eval(_cfg(data, tmp_path / "f"), backend=ScriptBackend(["I think A or B"]))
    assert s2["parse_failure_rate"] == 1.0 and s2["pass@1_micro"] == 0.0


def test_pass_at_k_run_and_cache_keys(data, tmp_path):
    rng = random.Random(0)

    class Coin:
        def generate(self, conversations, images, *, temperature, **kw):
            return [f"<answer>{rng.choice('AB') if temperature > 0 else 'A'}</answer>" for _ in conversations]

    cfg = _cfg(data, tmp_path / "e", n_samples=6, pass_k=[1, 2, 6], sample_temperature=1.0)
    summary = run_eval(cfg, backend=Coin())
    res = json.loads((tmp_path / "e" / "results.json").read_text())
    items = {r["id"]: r for r in res["metrics"]["items"]}
    assert all(r["n_samples"] == 6 for r in items.values())
    q1 = items["q1"]  # truth B
    assert res["metrics"]["tasks"]["Other"]["pass@6"] == 0.0  # q3 truth D never sampled
    assert summary["pass@6_micro"] >= summary["pass@2_micro"] >= summary["sampled_acc_micro"]
    other = [r for r in items.values() if r["task"] == "Object color"]
    expect = sum(pass_at_k(6, r["n_correct"], 2) for r in other) / len(other)
    assert res["metrics"]["tasks"]["Object color"]["pass@2"] == pytest.approx(expect)
    assert 0 < q1["n_correct"] < 6  # a fair coin over 6 draws (seeded)
    files = sorted(p.name for p in (tmp_path / "e" / "predictions").iterdir())
    assert len(files) == 2  # greedy and sampled settings have separate caches


def test_resume_after_kill_recomputes_nothing(data, tmp_path):
    samples = _samples(data)
    store = store_for(data)

    class Dies(OracleBackend):
        def generate(self, conversations, images, **kw):
            if self.calls >= 3:
                raise KeyboardInterrupt  # a kill mid-run (not an episode error)
            return super().generate(conversations, images, **kw)

    cfg = _cfg(data, tmp_path / "e", batch_size=1, chunk_size=1)
    with pytest.raises(KeyboardInterrupt):
        run_eval(cfg, backend=Dies(samples, store, ZoomConfig()))
    [cache] = list((tmp_path / "e" / "predictions").iterdir())
    before = [json.loads(x)["key"] for x in cache.read_text().splitlines()]
    assert before == ["q0#0"]  # q0 finished (2 calls), q1 died mid-episode
    be = OracleBackend(samples, store, ZoomConfig())
    summary = run_eval(cfg, backend=be)
    assert be.calls == 6  # 3 remaining items x 2 turns, q0 not recomputed
    keys = [json.loads(x)["key"] for x in cache.read_text().splitlines()]
    assert sorted(keys) == ["q0#0", "q1#0", "q2#0", "q3#0"] and len(keys) == len(set(keys))
    assert summary["pass@1_micro"] == 1.0
    be2 = OracleBackend(samples, store, ZoomConfig())
    run_eval(cfg, backend=be2)
    assert be2.calls == 0  # everything cached


def test_errors_are_not_cached_and_not_reportable(data, tmp_path):
    class Broken:
        def generate(self, conversations, images, **kw):
            raise RuntimeError("server down")

    from pipeline.core.errors import EvalError

    with pytest.raises(EvalError, match="no episode could be scored .4 of 4 items failed.*server down"):
        run_eval(_cfg(data, tmp_path / "e"), backend=Broken())
    [cache] = list((tmp_path / "e" / "predictions").iterdir())
    assert cache.read_text() == ""
    res = json.loads((tmp_path / "e" / "results.json").read_text())
    assert "episode errors" in res["not_reportable_reason"]


def test_limit_marks_not_reportable(data, tmp_path):
    summary = run_eval(_cfg(data, tmp_path / "e", limit=2), backend=ScriptBackend(["<answer>A</answer>"]))
    assert not summary["reportable"] and summary["n"] == 2
    assert "Not reportable" in (tmp_path / "e" / "results.md").read_text()


def test_config_validation_messages():
    from pipeline.core.errors import ConfigError

    with pytest.raises(ConfigError, match="pass_k"):
        load_config(EvalConfig, None, {"pass_k": [1, 8], "n_samples": 4})
    with pytest.raises(ConfigError, match="base_url"):
        load_config(EvalConfig, None, {"backend": "openai"})
    with pytest.raises(ConfigError, match="sample_temperature"):
        load_config(EvalConfig, None, {"n_samples": 2, "pass_k": [2], "sample_temperature": 0})
    with pytest.raises(ConfigError, match="temperature"):
        load_config(MineHardConfig, None, {"temperature": 0})
    with pytest.raises(ConfigError, match="max_pass_rate"):
        load_config(MineHardConfig, None, {"min_pass_rate": 0.8, "max_pass_rate": 0.2})


def test_compute_metrics_counts_tool_errors():
    from pipeline.core.records import Trajectory

    s = [VQASample(id="a", images=["x"], question="q", answer="A", choices=["(A) x", "(B) y"], category="T/u")]
    g = {"a": Trajectory(sample_id="a", messages=[], tool_calls=4, tool_errors=1, correct=True,
                         meta={"parse_failure": False})}
    m = compute_metrics(s, g)
    assert m["overall"]["tool_error_rate"] == 0.25 and m["overall"]["tool_calls_per_question"] == 4
    assert m["overall"]["read_rate"] is None  # no sample says what its zoom shows: no read % column


def test_read_rate_counts_answer_thinks_that_name_what_the_zoom_shows():
    from pipeline.core.records import Trajectory
    from pipeline.eval.report import markdown_report

    s = [VQASample(id=i, images=["x"], question="q", answer="B", choices=["(A) x", "(B) y"], category="T/u",
                   meta={"sees": "3 red ships on water"}) for i in ("a", "b")]
    s.append(VQASample(id="c", images=["x"], question="q", answer="A", choices=["(A) x", "(B) y"], category="T/v"))
    g = {"a": Trajectory(sample_id="a", messages=[], final_text="<think>I see 3 red ships on water.</think><answer>B"
                                                                "</answer>", correct=True),
         "b": Trajectory(sample_id="b", messages=[], final_text="<think>I see 3 red ships on forest.</think><answer>B"
                                                                "</answer>", correct=True),
         "c": Trajectory(sample_id="c", messages=[], final_text="<answer>A</answer>", correct=True)}
    m = compute_metrics(s, g)
    assert m["overall"]["read_rate"] == 0.5 and m["tasks"]["u"]["read_rate"] == 0.5
    assert m["tasks"]["v"]["read_rate"] is None
    md = markdown_report({"metrics": m, "model": "m", "dataset": "d", "protocol": "zoom"})
    assert "target hit % | read % | one answer always % |" in md and "| u | 2 |" in md and "views read right" in md


def test_answer_prior_is_what_one_answer_always_would_score(tmp_path):
    """A model that writes one letter whatever the view scores a task's most common answer share; the
    per-task table and plot show it beside Pass@1 (the knowledge family's answers are two letters)."""
    from pipeline.core.records import Trajectory
    from pipeline.eval.report import bar_plot, markdown_report

    answers = {"a": "A", "b": "A", "c": "b", "d": "C"}  # task u: A, A, B (case and spaces do not matter), C
    s = [VQASample(id=i, images=["x"], question="q", answer=a, choices=["(A) x", "(B) y", "(C) z"], category="T/u")
         for i, a in answers.items()]
    s.append(VQASample(id="e", images=["x"], question="q", answer="B", choices=["(A) x", "(B) y"], category="T/v"))
    g = {i: Trajectory(sample_id=i, messages=[], final_text="<answer>A</answer>", prediction="A",
                       correct=answers.get(i) == "A") for i in "abcde"}
    g["d"] = Trajectory(sample_id="d", messages=[], error="boom")  # not scored, not in the prior either
    m = compute_metrics(s, g)
    assert m["tasks"]["u"]["answer_prior"] == pytest.approx(2 / 3) and m["tasks"]["u"]["pass@1"] == pytest.approx(2 / 3)
    assert m["tasks"]["v"]["answer_prior"] == 1.0
    md = markdown_report({"metrics": m, "model": "m", "dataset": "d", "protocol": "zoom"})
    row = next(line for line in md.splitlines() if line.startswith("| u |"))
    header = next(line for line in md.splitlines() if line.startswith("| task |"))
    assert header.endswith("| one answer always % |") and row.endswith("| 66.67 |")
    assert row.count("|") == header.count("|")
    assert bar_plot({"metrics": m}, tmp_path / "p.png").stat().st_size > 0


def test_mine_hard_keeps_low_pass_rate_and_resumes(data, tmp_path):
    class Knows:  # always answers A: q0 (truth A) pass rate 1, the others 0
        calls = 0

        def generate(self, conversations, images, **kw):
            self.calls += len(conversations)
            return ["<answer>A</answer>"] * len(conversations)

    cfg = load_config(MineHardConfig, None, {
        "output_dir": str(tmp_path / "h"), "dataset_path": str(data / "vqa_test.jsonl"),
        "images_manifest": str(data / "images.jsonl"), "k": 3, "max_pass_rate": 0.5})
    be = Knows()
    stats = run_mine(cfg, backend=be)
    assert be.calls == 12 and stats["n_hard"] == 3 and stats["pass_count_histogram"] == {
        "0/3": 3, "1/3": 0, "2/3": 0, "3/3": 1}
    hard = list(read_jsonl(tmp_path / "h" / "hard.jsonl", VQASample))
    assert [h.id for h in hard] == ["q1", "q2", "q3"] and hard[0].meta["pass_rate"] == 0.0
    assert hard[0].targets == _samples(data)[1].targets
    be2 = Knows()
    run_mine(cfg, backend=be2)
    assert be2.calls == 0  # resumed from the rollout cache


def test_mine_hard_sample_draws_a_seeded_subset_of_the_whole_set(data, tmp_path):
    """`sample: N` mines N items drawn with the seed from the whole set, in the set's order (the tiny run mines
    120 of its ~1,500 train items; the first 120 were one scene's questions, and no change pair reached RL)."""
    from pipeline.core.errors import ConfigError

    class Blank:
        def generate(self, conversations, images, **kw):
            return ["<answer>A</answer>"] * len(conversations)

    order = [s.id for s in _samples(data)]
    drawn = {}
    for seed in range(6):
        cfg = load_config(MineHardConfig, None, {
            "output_dir": str(tmp_path / f"h{seed}"), "dataset_path": str(data / "vqa_test.jsonl"),
            "images_manifest": str(data / "images.jsonl"), "k": 1, "sample": 2, "seed": seed,
            "max_pass_rate": 1.0})
        stats = run_mine(cfg, backend=Blank())
        ids = [h.id for h in read_jsonl(tmp_path / f"h{seed}" / "hard.jsonl", VQASample)]
        assert stats["n_scored"] == 2 and ids == sorted(ids, key=order.index)  # every item kept, in set order
        drawn[seed] = tuple(ids)
    assert len(set(drawn.values())) > 1  # the seed draws, over the whole set (not the first N)
    again = load_config(MineHardConfig, None, {
        "output_dir": str(tmp_path / "again"), "dataset_path": str(data / "vqa_test.jsonl"),
        "images_manifest": str(data / "images.jsonl"), "k": 1, "sample": 2, "seed": 3,
        "max_pass_rate": 1.0})
    run_mine(again, backend=Blank())
    assert [h.id for h in read_jsonl(tmp_path / "again" / "hard.jsonl", VQASample)] == [
        h.id for h in read_jsonl(tmp_path / "h3" / "hard.jsonl", VQASample)]
    with pytest.raises(ConfigError, match="sample"):
        load_config(MineHardConfig, None, {"sample": 0})


def test_cli_eval_with_tiny_model(data, tmp_path, capsys):
    """The real path: `knowzoom eval` with the tiny transformers model, 2 items, 1 turn."""
    from pipeline.cli import main

    rc = main(["eval", "--config", "configs/tiny/eval.yaml", "--model", "tiny", "--output_dir", str(tmp_path / "e"),
               "--dataset_path", str(data / "vqa_test.jsonl"), "--images_manifest", str(data / "images.jsonl"),
               "--limit", "2", "--n_samples", "2", "--pass_k", "[1, 2]", "--max_new_tokens", "8",
               "--max_zooms", "1"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 2 and out["reportable"] is False
    assert (tmp_path / "e" / "DONE.json").exists()
    assert json.loads((tmp_path / "e" / "results.json").read_text())["metrics"]["overall"]["n"] == 2


def test_eval_on_xlrs_parquet_direct_protocol(tmp_path):
    """XLRS-Bench layout → prepare-images → official no-tool prompt → exact-set scoring."""
    from test_eval_datasets import write_parquet, xlrs_rows

    root = write_parquet(tmp_path / "xlrs", xlrs_rows())
    cfg = load_config(EvalConfig, None, {
        "output_dir": str(tmp_path / "e"), "dataset": "xlrs", "dataset_path": str(root), "protocol": "direct",
        "max_new_tokens": 64, "zoom_max_pixels": 3136 * 4})
    be = ScriptBackend(["C"])  # right for the colour question, wrong (single letter) for OLUC "AC"
    summary = run_eval(cfg, backend=be)
    assert summary["n"] == 3 and summary["pass@1_micro"] == pytest.approx(1 / 3)
    assert be.seen[0][0]["content"][-1]["text"].endswith("The answer is:")
    assert sum(1 for c in be.seen[2][0]["content"] if c["type"] == "image") == 2  # bi-temporal question
    res = json.loads((tmp_path / "e" / "results.json").read_text())
    assert set(res["metrics"]["tasks"]) == {"OCL", "OLUC", "RCCD"}
    assert (tmp_path / "e" / "xlrs_images" / "prepared" / "images.jsonl").exists()


def _sampled_cache(out):
    """{key: final text} of the sampled-rollouts cache of an eval output folder."""
    res = json.loads((out / "results.json").read_text())
    path = out / "predictions" / f"{res['cache']['sampled']}.jsonl"
    return {json.loads(x)["key"]: json.loads(x)["trajectory"]["final_text"] for x in path.read_text().splitlines()}


def test_killed_and_resumed_sampled_eval_is_bit_identical_tiny_model(data, tmp_path):
    """Per-rollout seeds (base seed, item, rollout, turn): a run killed mid-way and resumed, whose batches are
    therefore composed differently, samples exactly what an uninterrupted run samples (real tiny model)."""
    kw = {"model": "tiny", "limit": 3, "n_samples": 3, "pass_k": [1, 3], "sample_temperature": 1.0,
          "max_new_tokens": 6, "max_zooms": 1, "batch_size": 3, "chunk_size": 4}
    full_cfg = _cfg(data, tmp_path / "full", **kw)
    backend = full_cfg.make_backend()
    full = run_eval(full_cfg, backend=backend)

    class KilledAfter:
        """The same model; the second sampled generate call is a kill."""

        def __init__(self):
            self.sampled_calls = 0

        def generate(self, conversations, images, **kw):
            if kw["temperature"] > 0:
                self.sampled_calls += 1
                if self.sampled_calls == 2:  # mid-chunk: the resumed batches are composed differently
                    raise KeyboardInterrupt
            return backend.generate(conversations, images, **kw)

    cut_cfg = _cfg(data, tmp_path / "cut", **kw)
    with pytest.raises(KeyboardInterrupt):
        run_eval(cut_cfg, backend=KilledAfter())
    resumed = run_eval(cut_cfg, backend=backend)
    a, b = _sampled_cache(tmp_path / "full"), _sampled_cache(tmp_path / "cut")
    assert len(a) == 9 and a == b
    assert len(set(a.values())) > 1  # the rollouts really differ from each other
    assert {k: v for k, v in full.items() if "pass" in k or "acc" in k} == \
        {k: v for k, v in resumed.items() if "pass" in k or "acc" in k}



def test_pass_at_k_reports_items_per_k_and_errored_rollouts(data, tmp_path):
    """Rollouts that errored are counted, Pass@k says how many items it was computed on, and a run with
    missing rollouts is not reportable (a rerun retries them)."""
    from rl.agent import rollout_seed

    q1_seeds = {rollout_seed(0, "q1", k, 0) for k in range(3)}  # the sampled rollouts of q1 (base seed 0)

    class FailsQ1:
        def generate(self, conversations, images, *, temperature, seeds, **kw):
            if temperature > 0 and q1_seeds & set(seeds):
                raise RuntimeError("server error on this request")
            return ["<answer>A</answer>"] * len(conversations)

    cfg = _cfg(data, tmp_path / "e", n_samples=3, pass_k=[1, 2, 3], sample_temperature=1.0, batch_size=1)
    summary = run_eval(cfg, backend=FailsQ1())
    assert summary["sampled_errors"] == 3 and summary["items_missing_rollouts"] == 1
    assert summary["pass@2_items"] == 3 and summary["pass@3_items"] == 3  # q1 has no scored rollout
    assert not summary["reportable"]
    res = json.loads((tmp_path / "e" / "results.json").read_text())
    assert "fewer than 3 scored rollouts" in res["not_reportable_reason"]
    md = (tmp_path / "e" / "results.md").read_text()
    assert "| pass@2 |" in md and "sampled rollouts that errored: 3" in md
    ok = run_eval(cfg, backend=ScriptBackend(["<answer>A</answer>"]))  # the rerun fills the gap
    assert ok["items_missing_rollouts"] == 0 and ok["pass@3_items"] == 4 and ok["reportable"]
