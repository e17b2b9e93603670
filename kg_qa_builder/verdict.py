"""The result type of every QA check (template verifier and scenario re-solver), below both so neither imports
the other to build one."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Verdict:
    """Verification result: ok, or a reason code and human-readable detail."""

    ok: bool
    reason: str = ""
    detail: str = ""
