"""`knowzoom run` end to end on CPU: the tiny pipeline and the 7B recipe's wiring, with tiny-data
overrides; skip-when-done, rerun after a config change, the report; the ablation table."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.core.config import load_config
from pipeline.core.errors import ConfigError
from pipeline.runner import PipelineConfig, run, stage_configs

ROOT = Path(__file__).resolve().parent.parent

# Tiny-data overrides: every stage runs for real, on a few items / steps.
FAST = {
    "make-scenes": {"size": 4096, "n_train_scenes": 1, "n_test_scenes": 1, "n_train_pairs": 0,
                    "n_test_pairs": 1, "pair_size": 4096, "grid": 4, "n_vehicles": 300, "n_houses": 100},
    "build-qa": {"n_train": 200, "n_val": 20, "n_test": 40, "min_test": 20, "max_spectra": 200},
    "sft_text": {"max_steps": 2, "per_device_train_batch_size": 4, "warmup_steps": 0, "eval_max_samples": 4,
                 "eval_train_samples": 4, "save_steps": 1, "torch_threads": 1},
    "mine_hard": {"limit": 6, "k": 2, "max_zooms": 1, "max_new_tokens": 24, "batch_size": 6},
    "sft_aim": {"max_steps": 2, "per_device_train_batch_size": 2, "warmup_steps": 0, "save_steps": 1,
                "torch_threads": 1},
    "sft_prewarm": {"max_steps": 2, "per_device_train_batch_size": 2, "warmup_steps": 0, "eval_max_samples": 4,
                    "save_steps": 1, "torch_threads": 1},
    "rl": {"max_steps": 1, "num_generations": 2, "per_device_train_batch_size": 2, "max_completion_length": 48,
           "max_zooms": 2, "save_steps": 1, "torch_threads": 1},
    "eval": {"limit": 6, "n_samples": 2, "pass_k": [1, 2], "max_new_tokens": 24, "max_zooms": 1, "batch_size": 6},
}


def _tiny(tmp: Path, **extra) -> PipelineConfig:
    return load_config(PipelineConfig, ROOT / "configs/tiny/pipeline.yaml",
                       {"output_dir": str(tmp / "run"), "data_root": str(tmp / "data"), "overrides": FAST, **extra})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipe")
    cfg = _tiny(tmp)
    return tmp, cfg, run(cfg)


def test_tiny_pipeline_runs_every_stage_and_reports(tiny_run):
    tmp, cfg, summary = tiny_run
    ids = cfg.stage_ids()
    assert list(summary["stages"]) == ids
    assert not any(r.get("skipped") for r in summary["stages"].values())
    res = json.loads((tmp / "run/eval/results.json").read_text())
    assert res["metrics"]["overall"]["n"] == 6
    assert (tmp / "run/rl/model").is_dir() and (tmp / "run/sft_prewarm/model").is_dir()
    # the aiming step rendered the oracle trajectories once; the pre-warm reused them
    assert json.loads((tmp / "run/sft_prewarm/metrics.json").read_text())["data"]["trajectories_written"] == 0
    assert json.loads((tmp / "run/sft_aim/metrics.json").read_text())["data"]["trajectories_written"] > 0
    report = (tmp / "run/report.md").read_text()
    html = (tmp / "run/report.html").read_text()
    for sid in ids:
        assert sid in report and f"id='{sid}'" in html
    assert "viewer.html" in report and ".png" in html


def test_rerun_skips_and_a_changed_stage_reruns_downstream(tiny_run):
    tmp, cfg, first = tiny_run
    again = run(cfg)
    assert all(r.get("skipped") for r in again["stages"].values())
    # the report of a rerun keeps what each reused stage took when it ran (not the ~0 s of the skip)
    for sid in ("make-scenes", "sft_text", "rl"):
        assert 0 < again["seconds"][sid] <= first["seconds"][sid] + 1.0  # from its manifest to its DONE
    assert f"| sft_text | `knowzoom sft` | {again['seconds']['sft_text']} (cached) |" in (
        Path(cfg.output_dir) / "report.md").read_text()
    changed = _tiny(tmp, overrides={**FAST, "eval": {**FAST["eval"], "max_new_tokens": 16}})
    out = run(changed)
    # every eval stage (the probes too) reruns, and nothing else: no stage reads an eval's outputs
    assert [s for s, r in out["stages"].items() if not r.get("skipped")] == ["probe_text", "probe_prewarm",
                                                                          "probe_rl", "eval"]
    changed = _tiny(tmp, overrides={**FAST, "rl": {**FAST["rl"], "learning_rate": 5e-5}})
    out = run(changed)
    assert [s for s, r in out["stages"].items() if not r.get("skipped")] == ["probe_text", "probe_prewarm", "rl",
                                                                          "probe_rl", "eval"]  # evals: back to FAST
    # the rerun RL does not resume from the checkpoints the other learning rate wrote: it starts at step 0
    rl_dir = Path(dict((sid, c) for sid, _, c in stage_configs(changed))["rl"].output_dir)
    assert out["stages"]["rl"]["resumed_from_step"] == 0 and out["stages"]["rl"]["steps"] == 1
    assert [json.loads(x)["step"] for x in (rl_dir / "rewards.jsonl").read_text().splitlines()] == [1]


def test_7b_recipe_wiring_with_tiny_overrides(tiny_run, tmp_path):
    """The paper's pipeline file, stage for stage, with the tiny model and data and an XLRS-format copy."""
    from test_eval_datasets import write_parquet, xlrs_rows

    tmp, _, _ = tiny_run
    xlrs = tmp_path / "xlrs"
    write_parquet(xlrs, xlrs_rows())
    base = str(tmp / "data/base/model")
    paper = load_config(PipelineConfig, ROOT / "configs/qwen2_5_vl_7b/pipeline.yaml")
    assert [s["name"] for s in paper.stages] == ["make-scenes", "build-qa", "mine-hard", "sft", "rl", "eval"]
    sft = dict(stage_configs(paper)[3][2].__dict__)
    assert (sft["learning_rate"], sft["freeze_vision"], sft["freeze_projector"], sft["zoom_max_pixels"]) == (
        2e-5, True, True, 1003520)
    # the 7B SFT starts 8 DeepSpeed ZeRO-2 ranks through pipeline.launcher (here: 2 gloo ranks, no DeepSpeed)
    assert (sft["num_processes"], sft["launcher"], sft["deepspeed"]) == (8, "accelerate",
                                                                        "configs/qwen2_5_vl_7b/zero2.json")
    cpu = {
        "make-scenes": FAST["make-scenes"], "build-qa": {**FAST["build-qa"], "teacher_url": ""},
        "mine_hard": {**FAST["mine_hard"], "model": base, "backend": "transformers", "dtype": "auto",
                      "zoom_max_pixels": 50176, "batch_size": 6},
        "sft": {"model": base, "deepspeed": "", "bf16": False, "gradient_checkpointing": False, "max_steps": 2,
                "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "zoom_max_pixels": 50176,
                "max_length": 2048, "dataloader_num_workers": 0, "torch_threads": 1, "save_steps": 1,
                "num_processes": 2},
        "rl": {**FAST["rl"], "use_vllm": False, "use_ray": False, "bf16": False, "gradient_checkpointing": False,
               "gradient_accumulation_steps": 1, "zoom_max_pixels": 50176, "beta": 0.0,
               "num_processes": 1, "fsdp": False},  # 8 FSDP ranks on GPUs; one CPU process here
        "eval": {"backend": "transformers", "dtype": "auto", "dataset_path": str(xlrs), "limit": 4,
                 "n_samples": 0, "pass_k": [1], "max_new_tokens": 16, "max_zooms": 1, "batch_size": 4,
                 "zoom_max_pixels": 50176, "xlrs_images_dir": str(tmp_path / "xlrs_prepared")},
    }
    cpu["build-qa"]["output_dir"] = str(tmp_path / "qa")  # the 7B QA config differs: keep the tiny run's QA intact
    cfg = load_config(PipelineConfig, ROOT / "configs/qwen2_5_vl_7b/pipeline.yaml",
                      {"output_dir": str(tmp_path / "7b"), "data_root": str(tmp / "data"), "overrides": cpu})
    summary = run(cfg)
    assert list(summary["stages"]) == ["make-scenes", "build-qa", "mine_hard", "sft", "rl", "eval"]
    assert summary["stages"]["make-scenes"].get("skipped")  # same data config: the tiny run's scenes are reused
    res = json.loads((tmp_path / "7b/eval/results.json").read_text())
    assert res["dataset"] == "xlrs"
    assert res["metrics"]["overall"]["n"] + res["metrics"]["overall"]["errors"] == min(4, len(xlrs_rows()))
    assert res["reportable"] is False  # --limit runs are never reportable


def test_the_reading_preset_chains_its_answer_step_over_swapped_views(tmp_path):
    """configs/tiny/pipeline_reading.yaml end to end on tiny data: make-scenes writes swapped views and the asked
    part, three answer stages each continue the last over those views, a probe follows each, and the report's
    before → after rows chain the probes (each probe's "before" is the probe of the stage before it)."""
    import yaml

    answer = {**FAST["sft_prewarm"], "max_steps": 1}
    over = {**FAST, "make-scenes": {**FAST["make-scenes"], "swap_views": 2},
            "sft_answer300": answer, "sft_answer900": answer, "sft_prewarm": answer}
    cfg = load_config(PipelineConfig, ROOT / "configs/tiny/pipeline_reading.yaml",
                      {"output_dir": str(tmp_path / "run"), "data_root": str(tmp_path / "data"), "overrides": over})
    summary = run(cfg)
    ids = cfg.stage_ids()
    assert list(summary["stages"]) == ids and not any(r.get("skipped") for r in summary["stages"].values())
    chain = ["sft_aim", "sft_answer300", "sft_answer900", "sft_prewarm"]
    assert [i for i in ids if i.startswith("sft_") and i != "sft_text"] == chain
    root, data = tmp_path / "run", tmp_path / "data"
    views = data / "scenes/swap/views.jsonl"
    rows = [json.loads(x) for x in views.read_text().splitlines()]
    assert rows and all(r.get("asks") for r in rows)  # think_asks reached the swapped views too
    for before, stage in pairwise(chain):
        c = yaml.safe_load((root / stage / "config.yaml").read_text())
        assert c["model"] == str(root / before / "model") and c["view_swap_data"] == [str(views)]
        assert c["text_data"] == []
        m = json.loads((root / stage / "metrics.json").read_text())["data"]
        assert m["view_swap_items"] > 0 and m["trajectories_written"] == 0  # the aiming step's trajectories
    # the oracle answer think ends with the asked part ("Colour: red.") in the trajectories every stage reads
    from tools.scenes import ASK_LABEL

    traj = [json.loads(x) for x in (root / "sft_data/trajectories.jsonl").read_text().splitlines()]
    thinks = [t["messages"][-1]["content"].split("</think>")[0] for t in traj]
    asked = [th for th in thinks if any(f". {label}: " in th for label in ASK_LABEL.values())]
    assert len(asked) > len(thinks) / 2  # all but the whole-image land-use questions, which name no site
    report = (root / "report.md").read_text()
    probes = ["probe_text", "probe_answer300", "probe_answer900", "probe_prewarm", "probe_rl"]
    for before, probe in pairwise(probes):
        a = json.loads((root / before / "results.json").read_text())["metrics"]["overall"]["pass@1_macro"]
        assert f"| {probe} | Pass@1 macro (n=" in report
        row = next(x for x in report.splitlines() if x.startswith(f"| {probe} | Pass@1 macro"))
        assert row.split("|")[3].strip() == f"{100 * a:.1f} %"


def test_bad_pipeline_configs_say_what_to_fix(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("stages:\n  - {name: sft, config: configs/tiny/sft_text.yaml, set: {lerning_rate: 1}}\n"
                   "  - {name: nope}\n")
    with pytest.raises(ConfigError) as e:
        stage_configs(load_config(PipelineConfig, None, {"stages": [{"name": "sft", "set": {"lerning_rate": 1}}]}))
    assert "lerning_rate" in str(e.value)
    assert main(["run", str(bad)]) == 2


def test_cli_run_defaults_to_the_tiny_pipeline(monkeypatch):
    seen = {}
    monkeypatch.setattr("pipeline.cli.run_stage", lambda name, cfg: seen.update(name=name, cfg=cfg) or {})
    monkeypatch.chdir(ROOT)
    assert main(["run"]) == 0
    assert seen["name"] == "run" and seen["cfg"].stage_ids()[-1] == "eval"


def test_ablate_runs_the_three_variants_from_one_seed_and_tabulates(tiny_run, tmp_path):
    """(a) RL only, (b) + pre-warm, (c) + text cold start (the main run, reused): one table, same test set."""
    from pipeline.ablate import DEFAULT_VARIANTS, AblateConfig
    from pipeline.stages import run_stage

    tmp, _, _ = tiny_run
    variants = {k: dict(v) for k, v in DEFAULT_VARIANTS.items()}
    assert variants["c_coldstart_prewarm_rl"]["root"] == "{main}"
    variants["c_coldstart_prewarm_rl"]["root"] = str(tmp / "run")  # the fixture's main run, not runs/tiny
    over = {"output_dir": str(tmp_path / "abl"), "data_root": str(tmp / "data"), "variants": variants,
            "overrides": FAST}
    cfg = load_config(AblateConfig, ROOT / "configs/tiny/ablate.yaml", over)
    out = run_stage("ablate", cfg)
    rows = out["rows"]
    assert [r["variant"].split()[0] for r in rows] == list(DEFAULT_VARIANTS)
    for r in rows:
        assert r["n"] == 6 and r["k"] == 2 and 0 <= r["pass@1_micro"] <= r["pass@k_micro"] <= 1
        assert isinstance(r["probe_after_rl"], float)
        assert r["rl_reward_last"] is None  # one RL step here: no first → last window (two steps at least)
    # RL's gain on the probe: RL only has no pre-warm probe; the others are after − before on the same items
    assert rows[0]["probe_before_rl"] is None and rows[0]["probe_rl_gain"] is None
    for r in rows[1:]:
        assert r["probe_rl_gain"] == pytest.approx(r["probe_after_rl"] - r["probe_before_rl"])
    a, b = tmp_path / "abl/a_rl_only", tmp_path / "abl/b_prewarm_rl"
    assert not any((a / s).exists() for s in ("sft_text", "sft_aim", "sft_prewarm"))  # RL only: no SFT at all
    assert not (b / "sft_text").exists() and (b / "sft_prewarm/model").is_dir()
    import yaml

    def resolved(d: Path) -> dict:
        return yaml.safe_load((d / "config.yaml").read_text())

    base = str(tmp / "data/base/model")
    assert resolved(a / "rl")["model"] == base and resolved(a / "hard")["model"] == base
    assert resolved(b / "sft_aim")["model"] == base and resolved(b / "sft_prewarm")["model"] == str(b / "sft_aim/model")
    assert resolved(b / "rl")["model"] == str(b / "sft_prewarm/model")
    evals = [resolved(d / "eval") for d in (a, b, tmp / "run")]
    assert len({(e["dataset_path"], e["seed"], e["limit"]) for e in evals}) == 1  # same held-out set and seed
    table = (tmp_path / "abl/ablation.md").read_text()
    assert table.count("\n| ") == 4 and "pass@1_macro" in table  # header + 3 variants
    # --only reruns nothing that is done, and the table still lists every variant already run
    again = run_stage("ablate", load_config(AblateConfig, ROOT / "configs/tiny/ablate.yaml",
                                            {**over, "only": ["a_rl_only"]}))
    assert [r["pass@1_micro"] for r in again["rows"]] == [r["pass@1_micro"] for r in rows]
    with pytest.raises(ConfigError, match="only: 'd_nope' is not a variant"):
        load_config(AblateConfig, None, {**over, "only": ["d_nope"]})


def test_the_pipeline_seed_reaches_every_stage(tmp_path):
    """`knowzoom run --seed 1` ran seed 0 throughout: every stage YAML says `seed: 0`, and the pipeline's seed
    only filled a missing one (a whole run with --seed 1 reproduced seed 0's figures to the digit)."""
    stages = stage_configs(_tiny(tmp_path, seed=3))
    assert stages and all(c.seed == 3 for _, _, c in stages)
    pinned = stage_configs(_tiny(tmp_path, seed=3, overrides={"rl": {"seed": 5}}))
    assert {sid: c.seed for sid, _, c in pinned}["rl"] == 5
    assert all(c.seed == 0 for _, _, c in stage_configs(_tiny(tmp_path)))  # the default is unchanged
