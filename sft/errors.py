"""Errors of the sft package family."""

from __future__ import annotations

from pipeline.core.errors import KnowZoomError


class SFTError(KnowZoomError):
    """Base exception class of the sft package."""


class SFTDataError(SFTError, ValueError):
    """SFT input data is missing, empty or inconsistent (e.g. a VQA sample's image is not in the store)."""


class SequenceTooLongError(SFTError, ValueError):
    """A rendered example is longer than max_length."""


class TrajectoryError(SFTError):
    """An oracle zoom trajectory could not be built for a sample (the zoom tool rejected the target box)."""
