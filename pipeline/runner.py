"""`knowzoom run`: run a pipeline's stages in order, each skipped when its outputs for the same config
exist (so a killed run resumes at the stage it was in), then write a report linking every output.

A pipeline YAML lists stages; each stage entry names the stage command, its own YAML config and `set:`
overrides. Strings may use `{root}` (this pipeline's output root) and `{data_root}` (where shared data
stages write; the ablation points several roots at one data root)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.config import StageConfig, config_from_dict, hfield, load_yaml
from pipeline.core.errors import ConfigError
from pipeline.core.manifest import stage_seconds
from pipeline.stages import STAGES, run_stage

log = logging.getLogger(__name__)
PROJECT_ROOT = Path(__file__).resolve().parent.parent
# stages whose outputs no later stage reads (an eval probe between training stages): rerunning one does not
# make the stages after it rerun
READ_ONLY_STAGES = ("eval",)


@dataclass
class PipelineConfig(StageConfig):
    """A staged pipeline: which stages, with which configs, under which output root."""

    output_dir: str = hfield("runs/tiny", help="Output root of this pipeline ({root} in stage overrides).")
    data_root: str = hfield("", help="Where shared data stages write ({data_root}); empty = output_dir.")
    stages: list[dict] = hfield([], help="Stage entries: {name, id?, config?, set?: {field: value}}.")
    only: list[str] = hfield([], help="Run only these stage ids (default: all).")
    skip: list[str] = hfield([], help="Leave out these stage ids.")
    force: bool = hfield(False, help="Rerun stages even when their outputs for the same config exist.")
    overrides: dict = hfield({}, help="Overrides for every stage of a kind: {stage name or id: {field: value}}.")
    report: bool = hfield(True, help="Write report.md and report.html linking every stage's outputs.")

    def validate(self) -> list[str]:
        problems = super().validate()
        if not self.stages:
            problems.append("stages: empty; list the stages to run (see configs/tiny/pipeline.yaml)")
        ids = []
        for i, s in enumerate(self.stages):
            if not isinstance(s, dict) or "name" not in s:
                problems.append(f"stages[{i}]: needs a 'name' (one of {', '.join(STAGES)})")
                continue
            if s["name"] not in STAGES or s["name"] in ("run", "ablate"):
                problems.append(f"stages[{i}]: unknown stage {s['name']!r}; use one of {', '.join(STAGES)}")
            unknown = set(s) - {"name", "id", "config", "set"}
            if unknown:
                problems.append(f"stages[{i}]: unknown keys {sorted(unknown)}; allowed: name, id, config, set")
            ids.append(s.get("id", s["name"]))
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            problems.append(f"stages: duplicate ids {sorted(dup)}; give repeated stages distinct 'id's")
        for name in list(self.only) + list(self.skip):
            if name not in ids:
                problems.append(f"only/skip: {name!r} is not a stage id of this pipeline ({', '.join(ids)})")
        return problems

    def stage_ids(self) -> list[str]:
        return [s.get("id", s["name"]) for s in self.stages]


def _resolve_path(p: str) -> Path:
    path = Path(p)
    if path.is_absolute() or path.exists():
        return path
    alt = PROJECT_ROOT / p
    return alt if alt.exists() else path


def _subst(value: Any, env: dict[str, str]) -> Any:
    if isinstance(value, str):
        for k, v in env.items():
            value = value.replace("{" + k + "}", v)
        return value
    if isinstance(value, list):
        return [_subst(v, env) for v in value]
    if isinstance(value, dict):
        return {k: _subst(v, env) for k, v in value.items()}
    return value


_MISSING_INPUT = ("does not exist", "not found", "missing", "no such file")


def stage_configs(cfg: PipelineConfig) -> list[tuple[str, str, StageConfig]]:
    """Resolve every stage's config (YAML + `set` + pipeline overrides) and validate all of them before any
    runs; only problems about input files that an earlier stage will write are left to run time."""
    env = {"root": cfg.output_dir, "data_root": cfg.data_root or cfg.output_dir}
    out, problems = [], []
    for entry in cfg.stages:
        sid = entry.get("id", entry["name"])
        cls = STAGES[entry["name"]].config_class()
        data: dict[str, Any] = {}
        if entry.get("config"):
            data.update(load_yaml(_resolve_path(entry["config"])))
        # the pipeline's seed beats the stage YAML's own (every shipped one says 0, so `knowzoom run --seed 1`
        # used to run seed 0 throughout); a stage's `set` or an override still picks its own
        data["seed"] = cfg.seed
        data.update(entry.get("set") or {})
        data.update(cfg.overrides.get(entry["name"], {}) or {})
        data.update(cfg.overrides.get(sid, {}) or {})
        try:
            scfg = config_from_dict(cls, _subst(data, env), f"stage {sid}", check=False)
        except ConfigError as e:
            problems.append(str(e))
            continue
        early = [p for p in scfg.validate() if not any(m in p.lower() for m in _MISSING_INPUT)]
        if early:
            problems.append(f"stage {sid}:\n" + "\n".join(f"  - {p}" for p in early))
        out.append((sid, entry["name"], scfg))
    if problems:
        raise ConfigError("pipeline has invalid stage configs:\n" + "\n".join(problems))
    return out


def run(cfg: PipelineConfig) -> dict[str, Any]:
    from tqdm.auto import tqdm

    resolved = stage_configs(cfg)
    selected = [(sid, name, c) for sid, name, c in resolved
                if (not cfg.only or sid in cfg.only) and sid not in cfg.skip]
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    bar = tqdm(selected, desc="pipeline", unit="stage", position=0)
    upstream_ran = False
    for sid, name, scfg in bar:
        bar.set_description(f"pipeline [{sid}]")
        t0 = time.time()
        scfg.check()  # inputs written by the stages before this one exist now
        # a stage whose inputs were just rewritten reruns even when its own config is unchanged
        results[sid] = run_stage(name, scfg, skip_if_done=not (cfg.force or upstream_ran))
        ran = not (isinstance(results[sid], dict) and results[sid].get("skipped"))
        upstream_ran = upstream_ran or (ran and name not in READ_ONLY_STAGES)
        timings[sid] = round(time.time() - t0, 1)
        if ran:
            log.info("stage %s done in %.1fs", sid, timings[sid])
        else:  # reused: the report keeps what the run that wrote the outputs took
            recorded = stage_seconds(scfg.output_dir)
            timings[sid] = recorded if recorded is not None else timings[sid]
            log.info("stage %s reused (its outputs took %s s)", sid, "?" if recorded is None else f"{recorded:.1f}")
    summary = {"stages": results, "seconds": timings, "output_dir": cfg.output_dir}
    if cfg.report:
        from pipeline.pipeline_report import write_pipeline_report

        summary["report"] = str(write_pipeline_report(cfg, resolved, results, timings))
    return summary
