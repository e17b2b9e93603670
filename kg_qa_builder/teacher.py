"""Teacher-LLM path: any OpenAI-compatible chat endpoint writes QA from a subgraph context.

Requests are built deterministically from the split's facts; calls run concurrently (asyncio + httpx) with
per-call timeouts and retries with exponential backoff; every answered request is appended durably to
`teacher_raw.jsonl` (JsonlAppender), so a killed run resumes by sending only the missing request ids and
never duplicates. Verification of the returned items happens afterwards (kg_qa_builder.verify).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from kg_qa_builder.errors import TeacherError
from kg_qa_builder.graph import KnowledgeGraph
from pipeline.core.records import JsonlAppender

SYSTEM_PROMPT = (
    "You write exam questions for Earth-observation experts from knowledge-graph facts. Use ONLY the facts "
    "given. Return a JSON list; each item has: question, qtype (one of mcq, tf, fill, free), choices (for "
    "mcq: 4 strings '(A) ...' to '(D) ...', otherwise []), answer (the option letter for mcq, 'true' or "
    "'false' for tf, a short exact answer otherwise), rationale (list of short steps), evidence (list of "
    "[head, relation, tail] facts copied from the context that prove the answer, in path order)."
)


@dataclass
class TeacherRequest:
    """One teacher call: a split, an anchor entity and the context facts shown to the teacher."""

    id: str
    split: str
    anchor: str
    context: list[list[str]]  # [[head name, relation, tail name], ...]
    n_items: int

    def messages(self) -> list[dict[str, str]]:
        facts = "\n".join(f"{h} | {r} | {t}" for h, r, t in self.context)
        user = (f"Facts (head | relation | tail):\n{facts}\n\nWrite {self.n_items} varied questions about "
                f"{self.anchor}. Reply with the JSON list only.")
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def build_requests(kg: KnowledgeGraph, parts: dict[str, set[tuple[str, str, str]]], n_by_split: dict[str, int],
                   *, n_items: int, context_triples: int, seed: int, skip_relations: set[str] | None = None
                   ) -> list[TeacherRequest]:
    """Deterministic requests: anchors drawn from each split's facts, context = their facts in that split."""
    skip = skip_relations or set()
    out: list[TeacherRequest] = []
    for split, n in n_by_split.items():
        if n <= 0:
            continue
        rng = random.Random(f"{seed}:{split}")
        by_node: dict[str, list[tuple[str, str, str]]] = {}
        for tr in sorted(parts[split]):
            if tr[1] in skip or not kg.schema.relations[tr[1]].qa:
                continue
            by_node.setdefault(tr[0], []).append(tr)
        anchors = sorted(by_node)
        if not anchors:
            continue
        for i in range(n):
            a = anchors[rng.randrange(len(anchors))]
            ctx = list(by_node[a])
            # one more hop from the anchor's neighbours, still inside the split
            for _h, _r, t in list(ctx):
                ctx.extend(by_node.get(t, [])[:3])
            ctx = ctx[:context_triples]
            names = [[kg.name(h), r, kg.name(t)] for h, r, t in ctx]
            rid = f"{split}-{i:06d}-" + hashlib.sha1(json.dumps([a, names]).encode()).hexdigest()[:8]
            out.append(TeacherRequest(rid, split, kg.name(a), names, n_items))
    return out


_JSON_RE = re.compile(r"\[.*\]|\{.*\}", re.S)


def parse_items(text: str) -> list[dict[str, Any]]:
    """The QA items in a teacher reply: a JSON list (or {"items": [...]}) possibly inside a code fence."""
    m = _JSON_RE.search(text or "")
    if not m:
        raise TeacherError("reply holds no JSON")
    try:
        data = json.loads(m.group(0))
    except json.JSONDecodeError as e:
        raise TeacherError(f"reply JSON invalid: {e}") from e
    if isinstance(data, dict):
        data = data.get("items") or data.get("questions") or [data]
    if not isinstance(data, list):
        raise TeacherError("reply JSON is not a list of items")
    return [d for d in data if isinstance(d, dict)]


@dataclass
class TeacherClient:
    """OpenAI-compatible /chat/completions client with concurrency, timeouts and retries."""

    base_url: str
    model: str = "teacher"
    api_key: str | None = None
    concurrency: int = 8
    timeout_s: float = 60.0
    max_retries: int = 3
    backoff_s: float = 0.5
    temperature: float = 0.7
    max_tokens: int = 1024

    async def _call(self, client: httpx.AsyncClient, req: TeacherRequest) -> dict[str, Any]:
        url = self.base_url.rstrip("/") + "/chat/completions"
        body = {"model": self.model, "messages": req.messages(), "temperature": self.temperature,
                "max_tokens": self.max_tokens}
        last = ""
        for attempt in range(self.max_retries + 1):
            try:
                r = await client.post(url, json=body, timeout=self.timeout_s)
                if r.status_code in (408, 409, 425, 429) or r.status_code >= 500:
                    last = f"HTTP {r.status_code}"
                else:
                    r.raise_for_status()
                    text = r.json()["choices"][0]["message"]["content"]
                    items = parse_items(text)
                    return {"id": req.id, "split": req.split, "items": items, "error": None, "attempts": attempt + 1}
            except (httpx.HTTPError, KeyError, IndexError, ValueError, TeacherError) as e:
                last = f"{type(e).__name__}: {e}"
            if attempt < self.max_retries:
                await asyncio.sleep(self.backoff_s * 2**attempt)
        return {"id": req.id, "split": req.split, "items": [], "error": last, "attempts": self.max_retries + 1}

    async def _run(self, reqs: list[TeacherRequest], appender: JsonlAppender, progress: Any) -> dict[str, int]:
        sem = asyncio.Semaphore(self.concurrency)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        counts = {"ok": 0, "failed": 0}
        limits = httpx.Limits(max_connections=self.concurrency)
        async with httpx.AsyncClient(headers=headers, limits=limits, trust_env=False) as client:

            async def one(req: TeacherRequest) -> None:
                async with sem:
                    rec = await self._call(client, req)
                appender.append(rec)  # single event-loop thread: appends never interleave
                counts["ok" if rec["error"] is None else "failed"] += 1
                progress.update(1)

            await asyncio.gather(*(one(r) for r in reqs))
        return counts

    def run(self, reqs: list[TeacherRequest], raw_path: str | Path) -> dict[str, int]:
        """Send every request whose id is not yet in raw_path; returns counts of this call."""
        from tqdm import tqdm

        with JsonlAppender(raw_path) as app:
            done = app.keys()
            todo = [r for r in reqs if r.id not in done]
            with tqdm(total=len(todo), desc="teacher", disable=len(todo) < 50) as bar:
                counts = asyncio.run(self._run(todo, app, bar))
        counts["skipped_done"] = len(reqs) - len(todo)
        return counts
