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


def plot_reward_curve(rows: list[dict[str, Any]], path: Path, smooth: int = 5) -> Path:
    """Tool-call rate, zoom success, accuracy and format rate (and the total reward) over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    window = max(1, min(smooth, len(rows)))

    def rolling(v: list[float]) -> list[float]:
        return [sum(v[max(0, i - window + 1): i + 1]) / len(v[max(0, i - window + 1): i + 1]) for i in range(len(v))]

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
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
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
