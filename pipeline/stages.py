"""The stage registry: command name → (module, config class, run function).

Every stage is `run(cfg) -> dict` (a JSON-able summary) on its own config dataclass. Modules are imported
lazily so `knowzoom make-scenes` never imports torch. `run_stage` writes the resolved config and the
manifest before the stage and the DONE marker after it.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any

from pipeline.core.config import StageConfig
from pipeline.core.launch import run_recorded
from pipeline.core.manifest import is_done

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """A command: its run function `module.func`, and its config class `config` in `config_module` (default:
    the same module). A separate config module keeps `--help` and config parsing free of the stage's imports."""

    name: str
    module: str
    config: str
    func: str = "run"
    summary: str = ""
    config_module: str = ""

    def config_class(self) -> type[StageConfig]:
        """The config dataclass alone (imports only its module)."""
        return getattr(importlib.import_module(self.config_module or self.module), self.config)

    def load(self) -> tuple[type[StageConfig], Any]:
        mod = importlib.import_module(self.module)
        return self.config_class(), getattr(mod, self.func)


STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage("make-scenes", "tools.scenes", "MakeScenesConfig", summary="procedural UHR scenes (COGs) + VQA JSONL"),
        Stage("prepare-images", "tools.prepare", "PrepareImagesConfig", summary="rasters/JPEG/PNG → tiled COGs with overviews"),
        Stage("build-qa", "kg_qa_builder.stage", "BuildQAConfig", summary="knowledge graph → verified text QA JSONL"),
        Stage("build-kg-docs", "kg_qa_builder.documents", "BuildKGDocsConfig", summary="documents + teacher → verified graph facts with provenance"),
        Stage("build-model", "pipeline.models", "BuildModelConfig", summary="build the embedded tiny Qwen2.5-VL offline"),
        Stage("sft", "sft.stage", "SFTConfig", config_module="sft.config", summary="TRL SFT: text cold start and/or image pre-warm"),
        Stage("mine-hard", "pipeline.eval.mining", "MineHardConfig", summary="pass-rate mining of hard VQA samples"),
        Stage("rl", "rl.stage", "RLConfig", config_module="rl.config", summary="agentic GRPO with the zoom tool (TRL + Ray)"),
        Stage("eval", "pipeline.eval.evaluate", "EvalConfig", summary="Pass@1/Pass@k on XLRS-Bench or our VQA JSONL"),
        Stage("import-data", "pipeline.importers", "ImportDataConfig", summary="local copies of TBV text / SuperRS / HighRS / DeepEyes-47K → records"),
        Stage("serve-tools", "tools.serve", "ServeConfig", summary="zoom tool as HTTP API / MCP server"),
        Stage("run", "pipeline.runner", "PipelineConfig", summary="run the stages of a pipeline config in order"),
        Stage("ablate", "pipeline.ablate", "AblateConfig", summary="the paper's ablation: RL only / +pre-warm / +cold start"),
    ]
}


TRAINER_STAGES = ("sft", "rl")


def run_stage(name: str, cfg: StageConfig, *, skip_if_done: bool = False) -> dict[str, Any]:
    """Run one stage with manifest + DONE bookkeeping; skip when its outputs for this config exist.

    A stage with num_processes > 1 starts its ranks through `pipeline.core.launch` (this process keeps the
    bookkeeping); inside a job someone else launched (WORLD_SIZE set) only rank 0 writes it."""
    stage = STAGES[name]
    if skip_if_done and is_done(cfg):
        log.info("%s: outputs for this config exist in %s, skipping", name, cfg.output_dir)
        from pipeline.core.manifest import read_done

        return {"skipped": True, **((read_done(cfg.output_dir) or {}).get("summary") or {})}
    _, func = stage.load()
    if name in TRAINER_STAGES:  # concise progress lines instead of the Trainer's raw log dicts
        from pipeline.progress import install

        install()
    return run_recorded(name, cfg, func)
