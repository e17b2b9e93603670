"""The reward log of an RL run read back, and its curves (`reward_curve.png`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PLOT_KEYS = {
    "tool-call rate": "episodes/tool_call_rate",
    "zoom success rate": "episodes/zoom_ok_rate",
    "accuracy": "episodes/accuracy",
    "format rate": "episodes/format_ok_rate",
}


def read_reward_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def view_accuracy(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Accuracy of the rollouts whose zoom covered the target ("on"), of the others ("off"), and of a uniform
    guess ("guess"), pooled over ROWS (rates of equal batches, as `rl.rewards.ZoomRewards` logs them); None
    where no rollout counts or the log predates these keys."""
    keys = ("episodes/on_target_rate", "episodes/correct_on_target_rate", "episodes/accuracy", "episodes/guess_rate")
    rows = [r for r in rows if all(isinstance(r.get(k), (int, float)) for k in keys)]
    on = sum(float(r[keys[0]]) for r in rows)
    right_on = sum(float(r[keys[1]]) for r in rows)
    right = sum(float(r[keys[2]]) for r in rows)
    off = len(rows) - on
    return {"on": right_on / on if on > 0 else None, "off": (right - right_on) / off if off > 1e-9 else None,
            "guess": sum(float(r[keys[3]]) for r in rows) / len(rows) if rows else None}


def plot_reward_curve(rows: list[dict[str, Any]], path: Path, smooth: int = 5) -> Path:
    """Tool-call rate, zoom success, accuracy and format rate (and the total reward) over steps, and whether
    the answers depend on the view: cumulative accuracy with the zoom on / off the target against a guess."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    window = max(1, min(smooth, len(rows)))

    def rolling(v: list[float]) -> list[float]:
        return [sum(v[max(0, i - window + 1): i + 1]) / len(v[max(0, i - window + 1): i + 1]) for i in range(len(v))]

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4))
    for label, key in PLOT_KEYS.items():
        v = [float(r.get(key, float("nan"))) for r in rows]
        (line,) = ax1.plot(steps, rolling(v), lw=2, label=f"{label} ({window}-step mean)" if window > 1 else label)
        if window > 1:
            ax1.plot(steps, v, lw=0.8, alpha=0.3, color=line.get_color())
    ax1.set_xlabel("step")
    ax1.set_ylabel("rate")
    ax1.set_ylim(-0.05, 1.05)
    ax1.legend()
    ax1.set_title("episodes")
    ax2.plot(steps, rolling([float(r.get("reward", float("nan"))) for r in rows]), lw=2, label="total reward")
    for k in ("rewards/accuracy/mean", "rewards/format/mean", "rewards/tool_bonus/mean"):
        ax2.plot(steps, rolling([float(r.get(k, float("nan"))) for r in rows]), ls="--", label=k.split("/")[1])
    ax2.set_xlabel("step")
    ax2.legend()
    ax2.set_title(f"rewards ({window}-step mean)" if window > 1 else "rewards")
    cumulative = [view_accuracy(rows[: i + 1]) for i in range(len(rows))]
    for key, label, style in (("on", "zoom on the target", "-"), ("off", "zoom off the target or none", "-"),
                              ("guess", "a uniform guess", ":")):
        ax3.plot(steps, [float("nan") if c[key] is None else c[key] for c in cumulative], ls=style, lw=2,
                 label=label)
    ax3.set_xlabel("step")
    ax3.set_ylabel("accuracy since step 1")
    ax3.set_ylim(-0.05, 1.05)
    ax3.legend()
    ax3.set_title("is the answer read from the zoom?")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
