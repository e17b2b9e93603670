"""Errors of the pipeline package family (configs, records, datasets, models)."""

from __future__ import annotations


class KnowZoomError(Exception):
    """Base exception class of the pipeline package."""


class ConfigError(KnowZoomError, ValueError):
    """A stage config is invalid; the message lists every problem and how to fix it."""


class RecordError(KnowZoomError, ValueError):
    """A JSONL record does not match its documented type."""


class DatasetNotFoundError(KnowZoomError, FileNotFoundError):
    """A dataset file or folder is missing."""


class ModelNotFoundError(KnowZoomError, FileNotFoundError):
    """A model id or path cannot be loaded offline."""


class EvalError(KnowZoomError):
    """An evaluation produced nothing to score (every episode failed); the message says why."""


class CheckpointMismatchError(KnowZoomError):
    """A training checkpoint's weights do not fit the model being trained (resume would start from wrong weights)."""
