"""Errors of the kg_qa_builder package family (graph loading, QA generation, teacher calls)."""

from __future__ import annotations

from pipeline.core.errors import KnowZoomError


class KGError(KnowZoomError):
    """Base exception class of the knowledge-graph / QA builder."""


class KGLoadError(KGError, ValueError):
    """The graph sources are invalid; the message lists every problem with file and line."""


class SchemaError(KGLoadError):
    """The schema itself is malformed (unknown type in a relation, missing template)."""


class LeakageError(KGError, AssertionError):
    """A fact used by a test/val question also appears in a training question."""


class GenerationError(KGError, RuntimeError):
    """QA generation could not meet its configured targets."""


class TeacherError(KGError, RuntimeError):
    """The teacher endpoint failed after all retries, or answered with something unusable."""
