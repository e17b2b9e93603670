"""Concise training progress for every Trainer-based stage (TRL SFT and GRPO).

The HF Trainer's default `ProgressCallback` writes every log event as a raw Python dict under the bar
(`{'loss': '7.313', 'grad_norm': '5.908', 'learning_rate': '0', 'entropy': ..., 'num_tokens': ...}`), a
dozen keys per line for GRPO. `ConciseProgressCallback` keeps the same tqdm bar and prints one short line per
log event with the few numbers a person watches (loss or reward, learning rate, token accuracy), and one
closing line with the run time. The full logs still reach `trainer.state.log_history` (and so metrics.json,
rewards.jsonl and the curves): only the display changes.
"""

from __future__ import annotations

from typing import Any

from transformers.trainer_callback import ProgressCallback

# (log key, label, format) in display order; the first present of a group is shown
_SHOW: tuple[tuple[str, str, str], ...] = (
    ("loss", "loss", "{:.4f}"),
    ("reward", "reward", "{:.3f}"),
    ("rewards/accuracy/mean", "acc", "{:.2f}"),
    ("rewards/tool_bonus/mean", "tool", "{:.2f}"),
    ("mean_token_accuracy", "tok-acc", "{:.1%}"),
    ("learning_rate", "lr", "{:.2e}"),
    ("grad_norm", "|g|", "{:.2f}"),
)


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def concise_line(logs: dict[str, Any], step: int, max_steps: int) -> str | None:
    """One short progress line for a Trainer log event (None when it carries nothing worth showing)."""
    if "train_runtime" in logs:
        rt = _num(logs.get("train_runtime")) or 0.0
        sps = _num(logs.get("train_steps_per_second"))
        loss = _num(logs.get("train_loss"))
        parts = [f"done: {step} steps in {rt:.0f} s"]
        if sps:
            parts.append(f"{sps:.2f} steps/s")
        if loss is not None:
            parts.append(f"mean loss {loss:.4f}")
        return " · ".join(parts)
    parts = []
    for key, label, fmt in _SHOW:
        v = _num(logs.get(key))
        if v is not None:
            parts.append(f"{label} {fmt.format(v)}")
    if not parts:
        return None
    return f"step {step}/{max_steps} · " + " · ".join(parts)


class ConciseProgressCallback(ProgressCallback):
    """The Trainer's tqdm bar, with concise log lines instead of raw dicts."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        line = concise_line(logs, state.global_step, state.max_steps)
        if line:
            self.training_bar.write(line)


def install() -> None:
    """Make every Trainer built after this call use `ConciseProgressCallback` (the Trainer picks its progress
    callback from `transformers.trainer.DEFAULT_PROGRESS_CALLBACK` when it is built)."""
    import transformers.trainer as hf_trainer

    if hf_trainer.DEFAULT_PROGRESS_CALLBACK is ProgressCallback:  # keep a notebook's own callback
        hf_trainer.DEFAULT_PROGRESS_CALLBACK = ConciseProgressCallback


__all__ = ["ConciseProgressCallback", "concise_line", "install"]
