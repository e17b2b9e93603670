"""Single-view training data for a perception step (docs/tiny_model.md, "A perception step on single views"):
each oracle trajectory's crop, and each of make-scenes' swapped views of the same question, shown alone with the
question's text, as Trajectory JSONL that `knowzoom sft --trajectory_data` trains as it is.

    python tests/benchmarks/single_views.py --trajectories runs/x/sft_data/trajectories.jsonl \\
        --swap runs/x/scenes/swap/views.jsonl --out runs/x/views.jsonl

Only single-zoom trajectories of one image are used (the change pairs' two-image episodes are skipped). The
answer turn is the trajectory's own for its crop, and `tools.protocol.answer_think` with the view's words and
answer for a swapped view, so a trajectory folder rendered with `--think_asks` gives targets with the asked part.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def single_view(t: dict, file: str, shown: list[int], final: str, n: int) -> dict:
    """Trajectory record: system prompt, [view] + the question's text, the answer turn."""
    system = [m for m in t["messages"] if m["role"] == "system"]
    user = next(m for m in t["messages"] if m["role"] == "user")
    text = [c for c in user["content"] if c.get("type") == "text"][-1]["text"]
    messages = [*system, {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]},
                {"role": "assistant", "content": final}]
    return {"sample_id": f"{t['sample_id']}-view{n}", "messages": messages, "final_text": final,
            "observations": [{"name": "image_0", "file": file, "shown_size": shown}], "meta": {"kind": "view"}}


def main() -> None:
    from tools.protocol import answer_think, format_answer

    ap = argparse.ArgumentParser()
    ap.add_argument("--trajectories", required=True, help="oracle trajectories.jsonl (knowzoom sft's sft_data)")
    ap.add_argument("--swap", default="", help="make-scenes' swap/views.jsonl (--swap_views N)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    traj, rows, by_id = Path(args.trajectories), [], {}
    for line in traj.open(encoding="utf-8"):
        t = json.loads(line)
        if t["tool_calls"] != 1 or len(t["observations"]) != 2:
            continue
        by_id[t["sample_id"]] = t
        crop = t["observations"][-1]
        rows.append(single_view(t, str((traj.parent / crop["file"]).resolve()), crop["shown_size"],
                                t["final_text"], len(rows)))
    if args.swap:
        swap = Path(args.swap)
        for line in swap.open(encoding="utf-8"):
            r = json.loads(line)
            t = by_id.get(r["sample_id"])
            if t is not None:
                final = answer_think(r["sees"], r.get("asks")) + format_answer(r["answer"])
                rows.append(single_view(t, str((swap.parent / r["file"]).resolve()),
                                        t["observations"][-1]["shown_size"], final, len(rows)))
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"{len(rows)} single views -> {args.out}")


if __name__ == "__main__":
    main()
