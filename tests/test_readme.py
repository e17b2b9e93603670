"""The README's commands are real: every `knowzoom STAGE --config FILE [--field value]` it shows names an
existing stage and config, and the config validates (inputs that earlier stages write may be missing)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from pipeline.core.config import config_from_dict, load_yaml, parse_overrides
from pipeline.runner import _MISSING_INPUT
from pipeline.stages import STAGES

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
COMMANDS = [line.strip() for block in re.findall(r"```bash\n(.*?)```", README, re.S)
            for line in block.splitlines() if line.strip().startswith("knowzoom ")]


def test_readme_shows_commands():
    assert len(COMMANDS) >= 10
    assert Path(ROOT / "docs/trajectory.png").stat().st_size > 10_000


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_validates(command):
    argv = shlex.split(command.split("#")[0])[1:]
    stage, rest = argv[0], argv[1:]
    if stage == "plan":  # `knowzoom plan CONFIG`: not a stage; its config file exists
        assert (ROOT / rest[0]).exists() and all(a.startswith("--") for a in rest[1::2])
        return
    assert stage in STAGES, f"README uses unknown stage {stage}"
    cls, _ = STAGES[stage].load()
    data = {}
    if "--config" in rest:
        i = rest.index("--config")
        data.update(load_yaml(ROOT / rest[i + 1]))
        rest = rest[:i] + rest[i + 2:]
    elif stage == "run" and rest:
        data.update(load_yaml(ROOT / rest[0]))
        rest = rest[1:]
    data.update(parse_overrides(cls, rest))
    cfg = config_from_dict(cls, data, command, check=False)
    problems = [p for p in cfg.validate() if not any(m in p.lower() for m in _MISSING_INPUT)]
    assert not problems, problems
    if stage == "run":
        from pipeline.runner import stage_configs

        stage_configs(cfg)  # every stage config of the pipeline validates too
