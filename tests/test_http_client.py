"""pipeline/core/http.py, the one retrying HTTP client of the teacher and the OpenAI backend, against a
scripted loopback server: what is retried, what is final at once, the backoff, sync and async alike."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from pipeline.core.http import HTTPRetryError, RetryPolicy, apost_json, post_json, retryable


def _reply(content: str) -> dict:
    return {"choices": [{"message": {"role": "assistant", "content": content}}]}


@contextlib.contextmanager
def scripted(*answers: tuple[int, object]) -> Iterator[tuple[str, list[dict]]]:
    """A loopback server answering each POST with the next (status, body); the last one repeats."""
    seen: list[dict] = []

    class H(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            status, body = answers[min(len(seen), len(answers)) - 1]
            raw = (body if isinstance(body, str) else json.dumps(body)).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *a: object) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/v1", seen
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    waited: list[float] = []
    monkeypatch.setattr("pipeline.core.http.time.sleep", waited.append)
    return waited


def content(r: httpx.Response) -> str:
    return r.json()["choices"][0]["message"]["content"]


def test_retryable_statuses_and_backoff() -> None:
    assert [s for s in (200, 400, 401, 404, 408, 409, 422, 425, 429, 500, 503) if retryable(s)] == \
        [408, 409, 425, 429, 500, 503]
    assert [RetryPolicy(5, 0.5, 8.0).delay(a) for a in range(6)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert RetryPolicy(5, 0.5).delay(5) == 16.0


def test_sync_retries_a_5xx_then_reads(sleeps: list[float]) -> None:
    with scripted((503, {"error": "busy"}), (200, _reply("hi"))) as (url, seen), httpx.Client() as c:
        assert post_json(c, url, {"q": 1}, content, RetryPolicy(3, 0.5, 8.0)) == ("hi", 2)
    assert seen == [{"q": 1}, {"q": 1}] and sleeps == [0.5]


def test_sync_stops_at_once_on_a_status_a_retry_cannot_change(sleeps: list[float]) -> None:
    with scripted((401, {"error": "no key"})) as (url, seen), httpx.Client() as c:
        with pytest.raises(HTTPRetryError, match="HTTP 401") as ei:
            post_json(c, url, {}, content, RetryPolicy(3))
    assert ei.value.attempts == 1 and len(seen) == 1 and sleeps == []


def test_async_retries_unusable_replies_then_gives_up() -> None:
    async def go(url: str) -> None:
        async with httpx.AsyncClient() as c:
            await apost_json(c, url, {}, lambda r: json.loads(content(r)), RetryPolicy(2, 0.001),
                             timeout_s=5, retry_on=(ValueError,))

    with scripted((200, _reply("not json"))) as (url, seen):
        with pytest.raises(HTTPRetryError, match="JSONDecodeError") as ei:
            asyncio.run(go(url))
    assert ei.value.attempts == 3 and len(seen) == 3


def test_teacher_does_not_retry_a_refused_request(tmp_path) -> None:
    """A 401 from the teacher endpoint is final: one call, not max_retries + 1 (it used to retry every 4xx)."""
    from kg_qa_builder.teacher import TeacherClient, TeacherRequest

    req = TeacherRequest("r1", "train", "NDVI", [["NDVI", "uses_band", "Red"]], 2)
    with scripted((401, {"error": "bad key"})) as (url, seen):
        counts = TeacherClient(url, max_retries=2, backoff_s=0.001, timeout_s=5).run([req], tmp_path / "raw.jsonl")
    rec = json.loads((tmp_path / "raw.jsonl").read_text())
    assert counts["failed"] == 1 and len(seen) == 1 and rec["attempts"] == 1 and "HTTP 401" in rec["error"]


def test_openai_backend_retries_too_early(sleeps: list[float]) -> None:
    """425 Too Early is retried by both clients now (the backend used to give up on it)."""
    from rl.backends import OpenAIBackend

    with scripted((425, {"error": "too early"}), (200, _reply("<answer>A</answer>"))) as (url, seen):
        be = OpenAIBackend(url, "m", max_retries=1, timeout_s=5)
        out = be.generate([[{"role": "user", "content": "hi"}]], [[]], max_new_tokens=4, temperature=0, top_p=1,
                          stop=["</answer>"])
    assert out == ["<answer>A</answer>"] and len(seen) == 2 and sleeps == [0.5]
