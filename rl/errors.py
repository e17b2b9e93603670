"""Errors of the RL stage (GRPO with the zoom environment)."""

from __future__ import annotations

from pipeline.core.errors import KnowZoomError


class RLError(KnowZoomError):
    """Base exception class of the rl package (stage side; the verifier never raises on model output)."""


class RolloutFailureError(RLError):
    """More rollouts of one step raised than the configured failure rate allows."""


class EpisodeLostError(RLError):
    """An episode's state is gone from its worker (the actor restarted); the caller replays it."""


class ToolBackendError(RLError):
    """The tool backend (local store or Ray actor pool) could not serve a call after its retries."""


class ChatTemplateError(RLError):
    """The model's chat template cannot render or parse zoom tool calls."""
