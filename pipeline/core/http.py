"""The one HTTP client of the project's OpenAI-compatible calls: POST JSON, retry with exponential backoff.

Used by the teacher client (kg_qa_builder/teacher.py, async, also behind build-kg-docs) and the OpenAI
generation backend (rl/backends.py, sync). A transport error or a retryable status (408, 409, 425, 429, 5xx)
is retried; any other non-2xx status is final at once (a retry cannot change it); a 2xx body is handed to
`read`, whose listed exceptions (`retry_on`: a reply the caller cannot use) are retried too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

T = TypeVar("T")

RETRY_STATUS = frozenset({408, 409, 425, 429})


def retryable(status: int) -> bool:
    """True for statuses a later attempt may not see again: timeouts, conflicts, rate limits, server errors."""
    return status in RETRY_STATUS or status >= 500


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry: `max_retries` after the first attempt, waiting
    `first_backoff_s * 2**attempt` seconds between attempts (at most `cap_s` when set)."""

    max_retries: int = 3
    first_backoff_s: float = 0.5
    cap_s: float | None = None

    def delay(self, attempt: int) -> float:
        d = self.first_backoff_s * 2**attempt
        return d if self.cap_s is None else min(self.cap_s, d)


class HTTPRetryError(Exception):
    """A POST that failed after all its attempts, or at once on a status a retry cannot change."""

    def __init__(self, url: str, last: str, attempts: int):
        self.url, self.last, self.attempts = url, last, attempts
        super().__init__(f"{url}: {last}")


class _Retry(Exception):
    """This attempt failed in a way a later one may not (its message says how)."""


def _read(r: httpx.Response, read: Callable[[httpx.Response], T], retry_on: tuple[type[BaseException], ...],
          url: str, attempt: int) -> T:
    """read(r) for a usable reply; _Retry for one worth retrying; HTTPRetryError when final."""
    if r.is_success:
        try:
            return read(r)
        except retry_on as e:
            raise _Retry(f"{type(e).__name__}: {e}") from None
    why = f"HTTP {r.status_code}: {r.text[:200]}"
    if not retryable(r.status_code):
        raise HTTPRetryError(url, why, attempt + 1)
    raise _Retry(why)


def _timeout(timeout_s: float | None) -> dict[str, Any]:
    return {} if timeout_s is None else {"timeout": timeout_s}


def post_json(client: httpx.Client, url: str, body: Any, read: Callable[[httpx.Response], T], policy: RetryPolicy,
              *, timeout_s: float | None = None, retry_on: tuple[type[BaseException], ...] = ()) -> tuple[T, int]:
    """POST `body` as JSON until `read` accepts a reply: (its value, attempts made); else HTTPRetryError."""
    last = ""
    for attempt in range(policy.max_retries + 1):
        try:
            return _read(client.post(url, json=body, **_timeout(timeout_s)), read, retry_on, url, attempt), attempt + 1
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}"
        except _Retry as e:
            last = str(e)
        if attempt < policy.max_retries:
            time.sleep(policy.delay(attempt))
    raise HTTPRetryError(url, last, policy.max_retries + 1)


async def apost_json(client: httpx.AsyncClient, url: str, body: Any, read: Callable[[httpx.Response], T],
                     policy: RetryPolicy, *, timeout_s: float | None = None,
                     retry_on: tuple[type[BaseException], ...] = ()) -> tuple[T, int]:
    """`post_json` for an async client (waits with asyncio.sleep, so other calls go on meanwhile)."""
    last = ""
    for attempt in range(policy.max_retries + 1):
        try:
            r = await client.post(url, json=body, **_timeout(timeout_s))
            return _read(r, read, retry_on, url, attempt), attempt + 1
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}"
        except _Retry as e:
            last = str(e)
        if attempt < policy.max_retries:
            await asyncio.sleep(policy.delay(attempt))
    raise HTTPRetryError(url, last, policy.max_retries + 1)


__all__ = ["RETRY_STATUS", "retryable", "RetryPolicy", "HTTPRetryError", "post_json", "apost_json"]
