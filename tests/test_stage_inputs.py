"""Bad stage inputs through the `knowzoom` CLI (its `main()`, in process): each gives one message that says
what to fix, on stderr, and a non-zero exit — never a raw traceback, never a silent acceptance (issue 14)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_server_api import make_server_images

from pipeline.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stage_inputs")
    manifest = make_server_images(root / "imgs")
    (root / "binary.yaml").write_bytes(b"\x00\x01\xff\xfe\x89PNG binary garbage")
    (root / "nul.yaml").write_bytes(b"seed: 1\x00\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "a_folder").mkdir()
    (root / "a_file").write_text("not a folder\n")
    (root / "empty.jsonl").write_text("")
    sample = {"id": "q1", "images": ["scene_a"], "question": "Colour?", "answer": "A",
              "choices": ["(A) red", "(B) blue"], "qtype": "single"}
    (root / "vqa_number_answer.jsonl").write_text(json.dumps({**sample, "answer": 5}) + "\n")
    (root / "vqa_number_question.jsonl").write_text(json.dumps({**sample, "question": 12}) + "\n")
    (root / "vqa_ok.jsonl").write_text(json.dumps(sample) + "\n")
    (root / "text.jsonl").write_text("")
    return {"root": root, "manifest": manifest}


def _cases(f: dict[str, Path]) -> list[tuple[str, list[str], str]]:
    r, m = f["root"], str(f["manifest"])
    out = str(r / "out")
    ev = ["eval", "--images_manifest", m, "--model", str(r / "no_model"), "--output_dir", out]
    return [
        ("binary config file", ["eval", "--config", str(r / "binary.yaml")], "not a text file"),
        ("config with NUL bytes", ["eval", "--config", str(r / "nul.yaml")], "binary file"),
        ("config that is a list", ["eval", "--config", str(r / "list.yaml")], "top level must be a mapping"),
        ("folder as --config", ["eval", "--config", str(r / "a_folder")], "is a folder"),
        ("missing --config", ["eval", "--config", str(r / "nope.yaml")], "does not exist"),
        ("existing file as output_dir", ["make-scenes", "--output_dir", str(r / "a_file")], "is not a folder"),
        ("below a file as output_dir", ["make-scenes", "--output_dir", str(r / "a_file" / "sub")], "is a file"),
        ("/proc as output_dir", ["make-scenes", "--output_dir", "/proc/self/knowzoom"], "kernel file system"),
        ("/sys as output_dir", ["build-qa", "--output_dir", "/sys/kernel/knowzoom"], "kernel file system"),
        ("number answer in a VQA line", [*ev, "--dataset_path", str(r / "vqa_number_answer.jsonl")],
         "answer must be a JSON string"),
        ("number question in a VQA line", [*ev, "--dataset_path", str(r / "vqa_number_question.jsonl")],
         "question must be a JSON string"),
        ("--temperature nan", [*ev, "--dataset_path", str(r / "vqa_ok.jsonl"), "--temperature", "nan"], "NaN"),
        ("--sample_temperature NaN", [*ev, "--dataset_path", str(r / "vqa_ok.jsonl"), "--sample_temperature", "NaN"],
         "NaN"),
        ("sft --max_steps -1", ["sft", "--text_data", str(r / "text.jsonl"), "--max_steps", "-1",
                                "--output_dir", out], "max_steps: -1 is not a step count"),
        ("empty image manifest (eval)", ["eval", "--images_manifest", str(r / "empty.jsonl"), "--model",
                                         str(r / "no_model"), "--dataset_path", str(r / "vqa_ok.jsonl"),
                                         "--output_dir", out], "lists no images"),
        ("empty image manifest (serve-tools)", ["serve-tools", "--manifest", str(r / "empty.jsonl"),
                                                "--gdal_lockdown", "false", "--output_dir", out], "nothing to serve"),
        ("bad manifest line (serve-tools)", ["serve-tools", "--manifest", str(r / "vqa_ok.jsonl"),
                                             "--gdal_lockdown", "false", "--output_dir", out], "manifest_errors: skip"),
    ]


CASE_NAMES = [c[0] for c in _cases({"root": Path("/x"), "manifest": Path("/x/m")})]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_stage_input_gives_one_clear_message(files, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    _, argv, expect = next(c for c in _cases(files) if c[0] == case)
    rc = main(argv)
    cap = capsys.readouterr()
    text = cap.out + cap.err
    assert rc != 0, (case, text[-500:])
    assert "Traceback" not in text, (case, text[-2000:])
    errors = [ln for ln in cap.err.splitlines() if ln.startswith("knowzoom ")]
    assert len(errors) == 1 and ": error: " in errors[0], (case, cap.err[-1000:])
    assert expect in cap.err, (case, expect, cap.err[-1000:])


def test_sft_max_steps_zero_means_epochs() -> None:
    from pipeline.core.config import load_config
    from sft.config import SFTConfig

    cfg = load_config(SFTConfig, None, ["--text_data", "t.jsonl", "--output_dir", "runs/x"])
    assert cfg.max_steps == 0 and cfg.num_train_epochs > 0
