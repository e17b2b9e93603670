"""Foundation: packages resolve to this repo, configs validate with useful messages, records round-trip."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from pipeline.core.config import StageConfig, hfield, load_config
from pipeline.core.errors import ConfigError, RecordError
from pipeline.core.records import JsonlAppender, TextQA, VQASample, read_jsonl, write_jsonl

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["pipeline", "tools", "kg_qa_builder", "rl", "sft"])
def test_packages_resolve_to_this_repo(name):
    mod = __import__(name)
    assert Path(mod.__file__).resolve().parent == ROOT / name


@dataclasses.dataclass
class _Cfg(StageConfig):
    steps: int = hfield(3, help="steps")
    lr: float = hfield(1e-3, help="learning rate")
    flag: bool = hfield(False, help="a flag")
    names: list[str] = hfield(["a"], help="names")

    def validate(self):
        p = super().validate()
        if self.steps < 1:
            p.append("steps: must be >= 1; set --steps 1 or more")
        return p


def test_config_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("steps: 5\nlr: 0.1\n")
    cfg = load_config(_Cfg, f, ["--lr", "0.5", "--flag", "--names", "x,y"])
    assert (cfg.steps, cfg.lr, cfg.flag, cfg.names) == (5, 0.5, True, ["x", "y"])


def test_config_errors_list_every_problem(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("stepz: 5\nlr: fast\n")
    with pytest.raises(ConfigError) as e:
        load_config(_Cfg, f)
    assert "stepz" in str(e.value) and "lr" in str(e.value)
    with pytest.raises(ConfigError, match="steps: must be >= 1"):
        load_config(_Cfg, None, ["--steps", "0"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(_Cfg, tmp_path / "missing.yaml")


def test_records_roundtrip_and_durable_append(tmp_path):
    qa = TextQA(id="q1", question="Which band?", qtype="mcq", answer="B", choices=["(A) x", "(B) y"])
    v = VQASample(id="v1", images=["s0"], question="Colour?", answer="A", choices=["(A) red", "(B) blue"],
                  targets=[{"image": 0, "bbox": [1, 2, 3, 4]}])
    write_jsonl(tmp_path / "qa.jsonl", [qa])
    assert list(read_jsonl(tmp_path / "qa.jsonl", TextQA)) == [qa]
    p = tmp_path / "v.jsonl"
    with JsonlAppender(p) as a:
        a.append(VQASample.from_dict(dataclasses.asdict(v)))
    with p.open("a") as f:
        f.write('{"id": "v2", "ima')  # a killed writer leaves a partial line
    with JsonlAppender(p) as a:
        assert a.keys() == {"v1"}
    assert [r.id for r in read_jsonl(p, VQASample)] == ["v1"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "question": "q", "qtype": "essay", "answer": "a"}) + "\n")
    with pytest.raises(RecordError, match="bad.jsonl:1"):
        list(read_jsonl(bad, TextQA))


def test_readme_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = next(b.strip() for b in blocks if "pytest" in b)
    assert test_cmd in ci
