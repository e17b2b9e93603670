"""Zoom trajectories → LLaMA-Factory's multimodal sharegpt format (what the reference paper's SFT ran on).

LLaMA-Factory's `data/README.md` (sharegpt, multimodal) and its `SharegptDatasetConverter`: a JSON list of
`{"messages": [{"role", "content"}, …], "images": [path, …]}`; an optional first `system` message; after it the
roles alternate user/observation (odd turns) and assistant/function_call (even turns) and the count is even;
each `<image>` in a content is one entry of `images`, in order (the multimodal plugin checks the counts); image
paths are relative to the dataset folder. The dataset is registered in `dataset_info.json` with
`formatting: sharegpt`, `columns: {messages, images}` and the role/content tags.

Our trajectories map directly: system → system, user → user, the model's tool-call turns stay `assistant` (their
`<tool_call>…</tool_call>` text is what the model must learn to write), and each tool result (the crop) becomes
an `observation`, which Qwen2-VL's template renders as the `<tool_response>` user turn our protocol uses.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pipeline.core.records import Trajectory, read_jsonl
from sft.errors import TrajectoryError

IMAGE_TOKEN = "<image>"
ROLE_MAP = {"system": "system", "user": "user", "assistant": "assistant", "tool": "observation"}
TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
        "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}


def _content_text(content: Any) -> tuple[str, int]:
    """A message content as text with one `<image>` per image part, and the number of image parts."""
    if isinstance(content, str):
        return content, content.count(IMAGE_TOKEN)
    parts, n = [], 0
    for c in content or []:
        if c.get("type") == "image":
            parts.append(IMAGE_TOKEN)
            n += 1
        elif c.get("type") == "text":
            parts.append(str(c.get("text", "")))
    return "".join(parts), n


def trajectory_to_sharegpt(t: Trajectory, image_paths: list[str]) -> dict[str, Any]:
    """One LLaMA-Factory sharegpt row of a trajectory; checks roles, alternation and image counts."""
    msgs = []
    n_images = 0
    for m in t.messages:
        role = ROLE_MAP.get(m.get("role"))
        if role is None:
            raise TrajectoryError(f"{t.sample_id}: message role {m.get('role')!r} has no sharegpt tag")
        text, n = _content_text(m.get("content"))
        n_images += n
        msgs.append({"role": role, "content": text})
    body = msgs[1:] if msgs and msgs[0]["role"] == "system" else msgs
    for i, m in enumerate(body):
        ok = ("user", "observation") if i % 2 == 0 else ("assistant", "function_call")
        if m["role"] not in ok:
            raise TrajectoryError(f"{t.sample_id}: turn {i} is {m['role']}, LLaMA-Factory expects one of {ok}")
    if len(body) % 2:
        raise TrajectoryError(f"{t.sample_id}: {len(body)} turns after the system message; it must end with the "
                              "assistant's answer")
    if n_images != len(image_paths):
        raise TrajectoryError(f"{t.sample_id}: {n_images} <image> tokens but {len(image_paths)} images")
    return {"messages": msgs, "images": list(image_paths)}


def export_llamafactory(traj_path: str | Path, out_dir: str | Path | None = None,
                        name: str = "knowzoom_zoom_trajectories") -> dict[str, Any]:
    """Write `<name>.json` (sharegpt rows) and add/replace its entry in `dataset_info.json` of `out_dir`
    (default: the trajectories' folder, so the relative image paths resolve as they are)."""
    traj_path = Path(traj_path)
    base = traj_path.parent
    out = Path(out_dir) if out_dir is not None else base
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for t in read_jsonl(traj_path, Trajectory):
        files = [base / o["file"] for o in t.observations]  # type: ignore[union-attr]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise TrajectoryError(f"{t.sample_id}: observation images missing: {missing[:2]}")  # type: ignore[union-attr]
        rows.append(trajectory_to_sharegpt(t, [os.path.relpath(f, out) for f in files]))  # type: ignore[arg-type]
    fname = f"{name}.json"
    tmp = out / (fname + ".tmp")
    tmp.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, out / fname)
    info_path = out / "dataset_info.json"
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.exists() else {}
    info[name] = {"file_name": fname, "formatting": "sharegpt",
                  "columns": {"messages": "messages", "images": "images"}, "tags": dict(TAGS)}
    info_path.write_text(json.dumps(info, indent=2), encoding="utf-8")
    return {"file": str(out / fname), "dataset_info": str(info_path), "rows": len(rows), "name": name}


__all__ = ["export_llamafactory", "trajectory_to_sharegpt", "TAGS", "ROLE_MAP"]
