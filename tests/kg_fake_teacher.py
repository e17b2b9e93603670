"""A fake OpenAI-compatible teacher on loopback (http.server in a thread) that plants true and false QA.

It reads the facts in the prompt, finds each fact's node ids in the graph, and answers with QA items whose
truth it knows: planted true items are built from the facts exactly; planted false ones are corrupted in a
known way (wrong answer, fabricated fact, correct distractor, wrong true/false label, non-unique fill-in,
unknown entity, unknown relation, disconnected evidence). Each item carries `_planted` = true/false.
"""

from __future__ import annotations

import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kg_qa_builder.generate import Generator
from kg_qa_builder.graph import KnowledgeGraph


def _ids(kg: KnowledgeGraph, h: str, r: str, t: str) -> tuple[str, str, str] | None:
    for a in kg.link(h):
        for b in kg.link(t):
            if kg.has(a, r, b):
                return a, r, b
    return None


def plant_items(kg: KnowledgeGraph, gen: Generator, facts: list[list[str]], rng: random.Random) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for h_name, r, t_name in facts:
        tr = _ids(kg, h_name, r, t_name)
        if tr is None:
            continue
        spec = kg.schema.relations[r]
        h, _, t = tr
        answers = gen.step_set(gen.surface_set(h), r, True)
        if len(gen.surface_set(h)) != 1:
            continue
        ev = [[h_name, r, t_name]]
        q = spec.ask_tail[0].format(h=h_name)
        same_type = [n for n in kg.range_pool.get(r, []) if n not in answers and kg.type(n) == kg.type(t)
                     and not set(gen.surface_set(n)) & set(answers)]
        if not same_type:
            continue
        wrong = kg.name(rng.choice(same_type))
        mode = rng.choice(["true_fill", "true_mcq", "true_tf", "false_tf_true", "wrong_answer", "fabricated",
                           "correct_distractor", "tf_wrong_label", "not_unique", "unknown_entity",
                           "unknown_relation", "disconnected"])
        if mode == "true_fill" and len(answers) == 1:
            items.append({"question": q, "qtype": "fill", "answer": t_name, "evidence": ev, "_planted": True})
        elif mode == "true_mcq" and spec.closed and len(same_type) >= 3:
            ds = [kg.name(n) for n in rng.sample(same_type, 3)]
            if len({*ds, t_name}) < 4 or any(d in q for d in ds):
                continue
            opts = [t_name, *ds]
            rng.shuffle(opts)
            items.append({"question": q, "qtype": "mcq", "choices": [f"({'ABCD'[i]}) {o}" for i, o in enumerate(opts)],
                          "answer": "ABCD"[opts.index(t_name)], "evidence": ev, "_planted": True})
        elif mode == "true_tf":
            items.append({"question": "True or false: " + spec.statement.format(h=h_name, t=t_name) + ".",
                          "qtype": "tf", "answer": "true", "evidence": ev, "_planted": True})
        elif mode == "false_tf_true" and spec.closed:
            items.append({"question": "True or false: " + spec.statement.format(h=h_name, t=wrong) + ".",
                          "qtype": "tf", "answer": "false", "evidence": ev, "_planted": True})
        elif mode == "wrong_answer":
            items.append({"question": q, "qtype": "free", "answer": wrong, "evidence": ev, "_planted": False})
        elif mode == "fabricated":
            items.append({"question": q, "qtype": "fill", "answer": wrong, "evidence": [[h_name, r, wrong]], "_planted": False})
        elif mode == "correct_distractor" and len(answers) > 1:
            other = kg.name([a for a in answers if a != t][0])
            opts = [t_name, other, *[kg.name(n) for n in rng.sample(same_type, min(2, len(same_type)))]]
            items.append({"question": q, "qtype": "mcq", "choices": [f"({'ABCD'[i]}) {o}" for i, o in enumerate(opts)],
                          "answer": "A", "evidence": ev, "_planted": False})
        elif mode == "tf_wrong_label":
            lie = rng.random() < 0.5
            stmt = spec.statement.format(h=h_name, t=wrong if lie else t_name)
            items.append({"question": f"True or false: {stmt}.", "qtype": "tf", "answer": "true" if lie else "false",
                          "evidence": ev, "_planted": False})
        elif mode == "not_unique" and len(answers) > 1:
            items.append({"question": q, "qtype": "fill", "answer": t_name, "evidence": ev, "_planted": False})
        elif mode == "unknown_entity":
            items.append({"question": q.replace(h_name, "Zorblax-9"), "qtype": "fill", "answer": t_name,
                          "evidence": [["Zorblax-9", r, t_name]], "_planted": False})
        elif mode == "unknown_relation":
            items.append({"question": q, "qtype": "fill", "answer": t_name, "evidence": [[h_name, "is_loved_by", t_name]],
                          "_planted": False})
        elif mode == "disconnected" and len(facts) > 1:
            other = facts[-1]
            if other[0] in (h_name, t_name) or other[2] in (h_name, t_name):
                continue
            items.append({"question": q, "qtype": "fill", "answer": other[2], "evidence": [ev[0], other], "_planted": False})
    return items


class FakeTeacher:
    """Context manager: serves /v1/chat/completions on 127.0.0.1:<port>; `fail_first` 500s per request id."""

    def __init__(self, kg: KnowledgeGraph, seed: int = 0, fail_first: int = 0):
        self.kg = kg
        self.gen = Generator(kg, allowed=set(), seed=seed)
        self.seed = seed
        self.fail_first = fail_first
        self.calls = 0
        self.attempts: dict[str, int] = {}
        self.planted: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def handle(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        user = body["messages"][-1]["content"]
        with self.lock:
            self.calls += 1
            n = self.attempts[user] = self.attempts.get(user, 0) + 1
        if n <= self.fail_first:
            return 500, {"error": "planted failure"}
        facts = [line.split(" | ") for line in user.split("\n") if line.count(" | ") == 2]
        facts = [f for f in facts if f[0] != "head"]
        rng = random.Random(f"{self.seed}:{user}")
        items = plant_items(self.kg, self.gen, facts, rng)
        with self.lock:
            self.planted.extend(items)
        content = "```json\n" + json.dumps(items) + "\n```"
        return 200, {"choices": [{"message": {"role": "assistant", "content": content}}]}

    def __enter__(self) -> FakeTeacher:
        fake = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                code, resp = fake.handle(body)
                data = json.dumps(resp).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 128
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
