"""Zoom trajectories exported to LLaMA-Factory's multimodal sharegpt format: `messages`/`images` keys, roles that
LLaMA-Factory's sharegpt converter accepts, one image per `<image>` token, files present, dataset_info entry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.core.records import Trajectory


@pytest.fixture(scope="module")
def materialized(tmp_path_factory):
    from sft.data import materialize_trajectories, read_vqa
    from sft.toy import write_toy_scenes
    from tools.store import ImageStore
    from tools.zoom import ZoomConfig

    root = tmp_path_factory.mktemp("traj")
    manifest, vqa = write_toy_scenes(root / "scenes", n=3, size=1500, square=40)
    samples = read_vqa([vqa])
    path, _ = materialize_trajectories(samples, ImageStore.from_manifest(manifest), ZoomConfig(), root / "sft",
                                       progress=False)
    return path


def _check_llamafactory_row(row: dict, base: Path) -> None:
    """The checks LLaMA-Factory's SharegptDatasetConverter and its multimodal plugin make."""
    assert set(row) == {"messages", "images"}
    msgs = row["messages"]
    assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in msgs)
    body = msgs[1:] if msgs[0]["role"] == "system" else msgs
    for i, m in enumerate(body):
        assert m["role"] in (("user", "observation") if i % 2 == 0 else ("assistant", "function_call"))
    assert len(body) % 2 == 0 and body[-1]["role"] == "assistant"
    assert sum(m["content"].count("<image>") for m in msgs) == len(row["images"])
    assert all((base / p).is_file() for p in row["images"])


def test_materialized_trajectories_export_to_llamafactory(materialized: Path) -> None:
    base = materialized.parent
    info = json.loads((base / "dataset_info.json").read_text())
    entry = info["knowzoom_zoom_trajectories"]
    assert entry["formatting"] == "sharegpt" and entry["columns"] == {"messages": "messages", "images": "images"}
    assert entry["tags"]["observation_tag"] == "observation" and entry["tags"]["user_tag"] == "user"
    rows = json.loads((base / entry["file_name"]).read_text())
    trajs = [json.loads(x) for x in materialized.read_text().splitlines()]
    assert len(rows) == len(trajs) == 3
    for row, t in zip(rows, trajs, strict=True):
        _check_llamafactory_row(row, base)
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant", "observation", "assistant"]
        assert "<tool_call>" in row["messages"][2]["content"] and row["messages"][3]["content"].startswith("<image>")
        assert row["images"] == [o["file"] for o in t["observations"]]  # overview first, then the crop


def test_export_to_another_folder_keeps_paths_resolvable_and_merges_dataset_info(materialized: Path,
                                                                               tmp_path: Path) -> None:
    from sft.export import export_llamafactory

    (tmp_path / "dataset_info.json").write_text(json.dumps({"knowzoom_kgqa_train": {"file_name": "qa.json"}}))
    r = export_llamafactory(materialized, tmp_path, name="zoom")
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    assert set(info) == {"knowzoom_kgqa_train", "zoom"} and r["rows"] == 3
    for row in json.loads(Path(r["file"]).read_text()):
        _check_llamafactory_row(row, tmp_path)


def test_mismatched_images_are_refused() -> None:
    from sft.errors import TrajectoryError
    from sft.export import trajectory_to_sharegpt

    t = Trajectory(sample_id="x", messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]},
                                            {"role": "assistant", "content": "<answer>A</answer>"}])
    assert trajectory_to_sharegpt(t, ["a.png"])["messages"][0]["content"] == "<image>Q"
    with pytest.raises(TrajectoryError, match="1 <image> tokens but 2 images"):
        trajectory_to_sharegpt(t, ["a.png", "b.png"])
    bad = Trajectory(sample_id="y", messages=t.messages[:1])
    with pytest.raises(TrajectoryError, match="must end with the assistant"):
        trajectory_to_sharegpt(bad, ["a.png"])
