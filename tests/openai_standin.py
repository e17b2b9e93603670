"""A local stand-in of an OpenAI chat-completions server (the format of OpenAI's API reference, which vLLM's and
transformers' servers follow), strict about requests and exact about responses, for the OpenAI backend tests.

Requests are validated as the API does (400 `invalid_request_error` otherwise): roles; user content as text
or parts (`text`, `image_url` with a decodable data URL); assistant `tool_calls` entries with `id`, `type`
"function" and `function.arguments` as a *string*; every assistant `tool_calls` answered, in order, by `tool`
messages carrying its `tool_call_id` (text only); `tools` entries of type "function" with a JSON-schema object;
at most 4 stop strings. Responses: `chat.completion` objects whose message holds `content` (None when it
calls a tool) and `tool_calls` (arguments as a JSON string), with `finish_reason` "tool_calls" or "stop".

The scripted "model": until it has seen a crop (an image in a user message after the first one) it calls
zoom_in — returned in `message.tool_calls` even when the request sent no `tools` (as `transformers serve`
does) — then answers `<answer>{answer}</answer>`.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image


class BadRequest(Exception):
    pass


def _check_text_parts(content: Any, where: str) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list) or not all(isinstance(p, dict) and p.get("type") == "text"
                                                and isinstance(p.get("text"), str) for p in content):
        raise BadRequest(f"{where}: content must be a string or an array of text parts")


def _check_image(url: Any) -> None:
    if not isinstance(url, str) or not url.startswith("data:image/") or ";base64," not in url:
        raise BadRequest("image_url.url must be a URL or a base64 data URL")
    try:
        Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1], validate=True))).load()
    except Exception as e:  # noqa: BLE001
        raise BadRequest(f"image_url: cannot decode the image ({e})") from e


def validate(body: dict) -> None:
    """Raise BadRequest where the chat-completions API would answer 400."""
    if not isinstance(body.get("model"), str):
        raise BadRequest("model: required string")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("messages: non-empty array required")
    stop = body.get("stop")
    if stop is not None and (not isinstance(stop, (str, list)) or (isinstance(stop, list) and len(stop) > 4)):
        raise BadRequest("stop: a string or up to 4 strings")
    for t in body.get("tools") or []:
        fn = t.get("function") if isinstance(t, dict) else None
        if t.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
                or not isinstance(fn.get("parameters", {}), dict) or fn.get("parameters", {}).get("type") != "object":
            raise BadRequest("tools: each tool must be {type: function, function: {name, parameters: object}}")
    open_ids: list[str] = []
    for i, m in enumerate(msgs):
        role = m.get("role") if isinstance(m, dict) else None
        if open_ids and role != "tool":
            raise BadRequest(f"messages[{i}]: an assistant message with 'tool_calls' must be followed by tool "
                             f"messages responding to each 'tool_call_id' ({open_ids} unanswered)")
        if role in ("system", "developer"):
            _check_text_parts(m.get("content"), f"messages[{i}]")
        elif role == "user":
            c = m.get("content")
            if isinstance(c, list):
                for p in c:
                    if p.get("type") == "image_url":
                        _check_image((p.get("image_url") or {}).get("url"))
                    elif p.get("type") != "text" or not isinstance(p.get("text"), str):
                        raise BadRequest(f"messages[{i}]: unknown content part {p.get('type')!r}")
            elif not isinstance(c, str):
                raise BadRequest(f"messages[{i}]: user content must be a string or an array of parts")
        elif role == "assistant":
            calls = m.get("tool_calls")
            if m.get("content") is None and not calls:
                raise BadRequest(f"messages[{i}]: assistant content is required unless tool_calls is given")
            if m.get("content") is not None:
                _check_text_parts(m["content"], f"messages[{i}]")
            for c in calls or []:
                fn = c.get("function") or {}
                if not isinstance(c.get("id"), str) or c.get("type") != "function" or \
                        not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
                    raise BadRequest(f"messages[{i}].tool_calls: need id, type 'function', function.name and "
                                     "function.arguments as a string")
                open_ids.append(c["id"])
        elif role == "tool":
            if not open_ids or m.get("tool_call_id") != open_ids[0]:
                raise BadRequest(f"messages[{i}]: messages with role 'tool' must be a response to a preceding "
                                 "message with 'tool_calls'")
            open_ids.pop(0)
            _check_text_parts(m.get("content"), f"messages[{i}]")
        else:
            raise BadRequest(f"messages[{i}]: unknown role {role!r}")
    if open_ids:
        raise BadRequest(f"tool_calls {open_ids} were not answered")


class StandinServer:
    """Serve on 127.0.0.1 (a free port) in a thread; `requests` records every request body."""

    def __init__(self, *, answer: str = "A", bbox: list[int] | None = None, malformed_first: bool = False,
                 content_with_call: str | None = None):
        self.answer, self.bbox = answer, bbox or [0, 0, 60, 60]
        self.malformed_first, self.content_with_call = malformed_first, content_with_call
        self.requests: list[dict] = []
        self.rejected: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": "not found", "type": "invalid_request_error"}})
                try:
                    validate(body)
                except BadRequest as e:
                    outer.rejected.append(str(e))
                    return self._send(400, {"error": {"message": str(e), "type": "invalid_request_error",
                                                      "param": None, "code": None}})
                self._send(200, outer.reply(body))

            def _send(self, code: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}/v1"

    def __enter__(self) -> StandinServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def reply(self, body: dict) -> dict:
        msgs = body["messages"]
        first_user = next(i for i, m in enumerate(msgs) if m["role"] == "user")
        crops = sum(1 for m in msgs[first_user + 1:] if m["role"] == "user" and isinstance(m["content"], list)
                    and any(p.get("type") == "image_url" for p in m["content"]))
        calls_made = sum(1 for m in msgs if m["role"] == "assistant")
        if crops:
            message: dict[str, Any] = {"role": "assistant", "content": f"<answer>{self.answer}</answer>",
                                       "refusal": None}
            finish = "stop"
        else:
            args = json.dumps({"bbox": self.bbox, "source": "image_0"})
            if self.malformed_first and calls_made == 0:
                args = '{"bbox": [0, 0, 60, 60], "source": image_0'  # cut JSON, as a truncated call
            message = {"role": "assistant", "content": self.content_with_call, "refusal": None,
                       "tool_calls": [{"id": f"call_srv{calls_made}", "type": "function",
                                       "function": {"name": "zoom_in", "arguments": args}}]}
            finish = "tool_calls"
        return {"id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "created": int(time.time()),
                "model": body["model"], "system_fingerprint": None,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}
