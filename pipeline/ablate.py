"""`knowzoom ablate`: the paper's ablation as one command.

(a) RL only, (b) pre-warm SFT + RL, (c) text cold start + pre-warm + RL — each a variant of the same
pipeline config, from the same seeds, sharing the data stages (scenes, QA) and evaluated on the same
held-out synthetic set; printed as one table with Pass@1 and Pass@k (micro and macro), and the knowledge
family (operator questions whose answer needs a fact only the text QA states) in its own columns.

With several `seeds`, the training stages (SFT, mining, RL, eval sampling) of every variant run once per seed
on the same data and test set; a second table gives mean ± sample standard deviation (and min–max) over
seeds, so a difference can be read against the seed spread. The main run is reused for the pipeline's seed.
Three seeds × three variants are about 3 × (main run) of CPU time: `tests/benchmarks/bench_ablate.py` runs it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.config import StageConfig, config_from_dict, hfield, load_yaml
from pipeline.core.manifest import atomic_write_text

DEFAULT_VARIANTS: dict[str, dict[str, Any]] = {
    "a_rl_only": {
        "label": "RL only",
        "skip": ["sft_text", "sft_aim", "sft_prewarm", "probe_text", "probe_prewarm"],
        "overrides": {"mine_hard": {"model": "{data_root}/base/model"}, "rl": {"model": "{data_root}/base/model"}},
    },
    "b_prewarm_rl": {
        "label": "+ pre-warm",
        "skip": ["sft_text", "probe_text"],
        "overrides": {"mine_hard": {"model": "{data_root}/base/model"},
                      "sft_aim": {"model": "{data_root}/base/model"}},  # the pre-warm's aiming step, from scratch
    },
    # the full recipe is the main pipeline itself: reuse its run ({main}: the pipeline's own output_dir; its
    # stages are skipped when already done)
    "c_coldstart_prewarm_rl": {"label": "+ text cold start", "skip": [], "overrides": {}, "root": "{main}"},
}


@dataclass
class AblateConfig(StageConfig):
    """Which pipeline to ablate, where, and which variants."""

    output_dir: str = hfield("runs/tiny/ablate", help="Each variant runs under OUTPUT_DIR/<variant>.")
    pipeline: str = hfield("configs/tiny/pipeline.yaml", help="The pipeline YAML whose stages are ablated.")
    data_root: str = hfield("runs/tiny", help="Shared data stages (scenes, QA) read/write here, once for all variants.")
    variants: dict = hfield(DEFAULT_VARIANTS, help="variant → {label, skip: [stage ids], overrides: {stage id: {field: "
                            "value}}, root?: output root (default OUTPUT_DIR/<variant>; {main} = the pipeline's own "
                            "output_dir, to reuse the main run)}.")
    overrides: dict = hfield({}, help="stage id → {field: value} for every variant (under each variant's own "
                             "overrides), e.g. fewer steps for a quick look; the reused main run must match.")
    only: list[str] = hfield([], help="Run only these variants (the table still lists every variant already run).")
    seeds: list[int] = hfield([], help="Training seeds (empty = [seed]); data stages keep the pipeline's own seed "
                                       "so every seed sees the same data and test set.")
    training_stages: list[str] = hfield(["sft_text", "mine_hard", "sft_aim", "sft_prewarm", "rl", "eval"],
                                        help="Stage ids whose seed follows the ablation seed.")
    eval_stage: str = hfield("eval", help="Stage id whose results.json is tabulated.")
    probe_stage: str = hfield("probe_rl", help="Eval stage id that scores the RL model on the fixed probe set; with "
                              "the eval before it on the same items (the pre-warm probe) it gives RL's gain per run. "
                              "Empty: no RL columns.")
    rl_stage: str = hfield("rl", help="RL stage id whose rewards.jsonl gives the mean reward of the first and the "
                           "last 10 steps.")
    force: bool = hfield(False, help="Rerun stages even when their outputs exist.")

    def validate(self) -> list[str]:
        problems = super().validate()
        if not self.variants:
            problems.append("variants: empty; give at least one variant")
        for k, v in self.variants.items():
            if not isinstance(v, dict) or set(v) - {"label", "skip", "overrides", "root"}:
                problems.append(f"variants.{k}: must be a mapping with label, skip, overrides (and optional root)")
        if len(set(self.seeds)) != len(self.seeds):
            problems.append(f"seeds: {self.seeds} has duplicates")
        for name in self.only:
            if name not in self.variants:
                problems.append(f"only: {name!r} is not a variant; use one of {', '.join(self.variants)}")
        return problems


def _pipeline_for(cfg: AblateConfig, name: str, variant: dict[str, Any], seed: int | None = None):
    from pipeline.runner import PipelineConfig, _resolve_path

    seed = cfg.seed if seed is None else seed
    data = load_yaml(_resolve_path(cfg.pipeline))
    main_seed = int(data.get("seed", cfg.seed))
    root = variant.get("root") or str(Path(cfg.output_dir) / name)
    if seed != cfg.seed or (root == "{main}" and seed != main_seed):  # other seeds: never the main run's folder
        root = str(Path(cfg.output_dir) / f"seed{seed}" / name)
    data["output_dir"] = root.replace("{main}", str(data.get("output_dir", "runs/tiny")))
    data["data_root"] = cfg.data_root
    data["seed"] = cfg.seed
    data["force"] = cfg.force
    data["skip"] = list(data.get("skip", [])) + list(variant.get("skip", []))
    overrides = dict(data.get("overrides", {}) or {})
    seeded = {sid: {"seed": seed} for sid in cfg.training_stages} if seed != cfg.seed else {}
    for sid, o in [*(cfg.overrides or {}).items(), *seeded.items(), *(variant.get("overrides") or {}).items()]:
        overrides[sid] = {**overrides.get(sid, {}), **o}
    data["overrides"] = overrides
    data["report"] = True
    return config_from_dict(PipelineConfig, data, f"ablation variant {name}")


TABLE_KEYS = ["pass@1_macro", "pass@1_micro", "pass@k_macro", "pass@k_micro", "k", "n", "parse_failure_rate",
              "tool_calls_per_question", "zoom_rate", "knowledge_seen_pass@1", "knowledge_text_only_pass@1",
              "probe_before_rl", "probe_after_rl", "probe_rl_gain", "rl_reward_first", "rl_reward_last"]
# sub-tasks of the knowledge family (tools/scenes.py): operator questions about classes whose operator is also
# in the image training split, and about classes whose operator only the text QA states
KNOWLEDGE_TASKS = {"knowledge_seen_pass@1": "Object operator",
                   "knowledge_text_only_pass@1": "Object operator (text only)"}
SPREAD_KEYS = ["pass@1_macro", "pass@1_micro", "pass@k_macro", "knowledge_seen_pass@1", "knowledge_text_only_pass@1",
               "parse_failure_rate", "tool_error_rate", "probe_after_rl", "probe_rl_gain"]


def _percent(key: str) -> bool:
    """Accuracies and rates (fractions, printed in percent): Pass@k, *_rate, the knowledge and probe columns."""
    return key.startswith(("pass@", "knowledge_", "probe_")) or key.endswith("rate")


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table; accuracies in percent."""
    keys = TABLE_KEYS
    head = "| variant | " + " | ".join(keys) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 1)]
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k)
            if isinstance(v, float) and _percent(k):
                v = f"{100 * v:.1f}"
            cells.append(f"{v:.2f}" if isinstance(v, float) else ("–" if v is None else str(v)))
        label = r["variant"] + (f" seed {r['seed']}" if "seed" in r else "")
        if r.get("not_run"):
            lines.append(f"| {label} | not run |" + " |" * (len(keys) - 1))
            continue
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def metrics_row(name: str, label: str, result: dict[str, Any]) -> dict[str, Any]:
    """Flatten an eval results.json into one table row (Pass@k = the largest k evaluated)."""
    row: dict[str, Any] = {"variant": f"{name} ({label})"}
    metrics = result.get("metrics", {})
    overall = metrics.get("overall", {})
    ks = [int(m.split("@")[1]) for m in metrics.get("metrics", []) if m.startswith("pass@")]
    k = max(ks, default=1)
    row.update({
        "pass@1_macro": overall.get("pass@1_macro"), "pass@1_micro": overall.get("pass@1_micro"),
        "pass@k_macro": overall.get(f"pass@{k}_macro"), "pass@k_micro": overall.get(f"pass@{k}_micro"),
        "k": k, "n": overall.get("n"), "parse_failure_rate": overall.get("parse_failure_rate"),
        "tool_calls_per_question": overall.get("tool_calls_per_question"), "zoom_rate": overall.get("zoom_rate"),
        "tool_error_rate": overall.get("tool_error_rate"),
    })
    tasks = metrics.get("tasks", {})
    for key, task in KNOWLEDGE_TASKS.items():
        row[key] = (tasks.get(task) or {}).get("pass@1")
        # what one answer always scores on the family (its answers are two letters, not four)
        row[key.replace("pass@1", "one_answer")] = (tasks.get(task) or {}).get("answer_prior")
    return row


def one_answer_line(rows: list[dict[str, Any]]) -> str:
    """A sentence under the table: what writing one answer always scores on each knowledge family (the same
    held-out items in every variant), or "" when no row has it."""
    parts = []
    for key, task in KNOWLEDGE_TASKS.items():
        v = next((r[k] for r in rows if isinstance(r.get(k := key.replace("pass@1", "one_answer")), float)), None)
        if v is not None:
            parts.append(f"{task} {100 * v:.1f} %")
    return ("Writing the most common answer every time, whatever the image, scores: " + ", ".join(parts)
            + ". A knowledge column shows transfer only above that.") if parts else ""


def rl_columns(probe_before: Path | None, probe_after: Path | None, rl_out: Path | None) -> dict[str, Any]:
    """RL's effect in one run: probe Pass@1 macro before (the pre-warm model) and after RL on the same fixed
    probe items, their difference, and the mean reward of the first and the last 10 GRPO steps. A column is None
    when its stage did not run (RL only has no pre-warm probe)."""
    from pipeline.pipeline_report import eval_overall, reward_windows

    def macro(folder: Path | None) -> float | None:
        v = eval_overall(folder).get("pass@1_macro")
        return float(v) if isinstance(v, (int, float)) else None

    before, after = macro(probe_before), macro(probe_after)
    reward = reward_windows(rl_out).get("reward") if rl_out else None
    return {"probe_before_rl": before, "probe_after_rl": after,
            "probe_rl_gain": after - before if before is not None and after is not None else None,
            "rl_reward_first": reward[0] if reward else None, "rl_reward_last": reward[1] if reward else None}


def spread_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant over its seeds: mean, sample standard deviation, min and max of SPREAD_KEYS."""
    import statistics

    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if not r.get("not_run"):
            by.setdefault(r["variant"], []).append(r)
    out = []
    for variant, rs in by.items():
        agg: dict[str, Any] = {"variant": variant, "seeds": [r.get("seed") for r in rs]}
        for k in SPREAD_KEYS:
            vals = [float(r[k]) for r in rs if isinstance(r.get(k), (int, float))]
            if vals:
                agg[k] = {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                          "min": min(vals), "max": max(vals), "n": len(vals)}
        out.append(agg)
    return out


def format_spread(aggs: list[dict[str, Any]]) -> str:
    """Markdown: mean ± sd (min–max) in percent per variant over seeds."""
    head = "| variant | seeds | " + " | ".join(SPREAD_KEYS) + " |"
    lines = [head, "|" + "---|" * (len(SPREAD_KEYS) + 2)]
    for a in aggs:
        cells = []
        for k in SPREAD_KEYS:
            v = a.get(k)
            cells.append("–" if not v else f"{100 * v['mean']:.1f} ± {100 * v['sd']:.1f} "
                         f"({100 * v['min']:.1f}–{100 * v['max']:.1f})")
        lines.append(f"| {a['variant']} | {len(a['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(cfg: AblateConfig) -> dict[str, Any]:
    from pipeline.pipeline_report import eval_baselines
    from pipeline.runner import run as run_pipeline
    from pipeline.runner import stage_configs

    rows = []
    seeds = list(cfg.seeds) or [cfg.seed]
    for seed in seeds:
        for name, variant in cfg.variants.items():
            pcfg = _pipeline_for(cfg, name, variant, seed)
            if not cfg.only or name in cfg.only:
                run_pipeline(pcfg)
            resolved = stage_configs(pcfg)
            folders = {sid: Path(c.output_dir) for sid, _, c in resolved}
            mpath = folders[cfg.eval_stage] / "results.json"
            metrics = json.loads(mpath.read_text()) if mpath.exists() else {}
            row = metrics_row(name, variant.get("label", name), metrics)
            if not metrics:
                row["not_run"] = True  # listed as "not run", left out of the spread
            if cfg.probe_stage:
                row.update(rl_columns(eval_baselines(resolved).get(cfg.probe_stage), folders.get(cfg.probe_stage),
                                      folders.get(cfg.rl_stage)))
            if len(seeds) > 1:
                row["seed"] = seed
            rows.append(row)
    table = format_table(rows)
    text = "# Ablation\n\n" + table + "\n"
    if note := one_answer_line(rows):
        text += "\n" + note + "\n"
    result: dict[str, Any] = {"table": table, "rows": rows}
    if len(seeds) > 1:
        aggs = spread_rows(rows)
        spread = format_spread(aggs)
        text += f"\n## Mean ± sd (min–max) over seeds {seeds}, in %\n\n" + spread + "\n"
        result.update(spread=spread, aggregates=aggs)
        table = table + "\n\n" + spread
    print(table)
    out = Path(cfg.output_dir)
    atomic_write_text(out / "ablation.md", text)
    atomic_write_text(out / "ablation.json", json.dumps(result if len(seeds) > 1 else rows, indent=2))
    return result
