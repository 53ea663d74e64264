"""One version's request handling on top of an engine: the replica side of serving.

A Ray Serve model replica and the standalone server both hold one `Responder`. It applies
the drill switch, runs the request through the engine and shapes the OpenAI response:

    complete(kind, body) -> {"response": <OpenAI JSON>, "meta": {...}}
    stream(kind, body)   -> {"data": <OpenAI chunk>}... then {"meta": {...}}

`meta` is what the router's metrics need and the client never sees: time to first token,
inter-token gaps, token counts and the engine's KV-cache usage. Times are measured here,
from the request's arrival at the replica.

Drill switch (documented fault injection for canary drills and tests): `{"error_rate": 0.3,
"delay_s": 1.5, "seed": 0}` makes the replica raise on that fraction of requests and/or
sleep that long before generating. The model is real; so is the fault. Empty in production.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from typing import Any

from jobs.serve.engine import Delta, Engine
from jobs.serve.openai import (
    Completion,
    CompletionRequest,
    completion_response,
    new_id,
    parse_request,
    stream_chunk,
    usage,
    usage_chunk,
)

MAX_GAPS = 512  # inter-token gaps reported per request
COALESCE_S = 0.02  # streamed tokens closer together than this leave in one chunk


class DrillError(RuntimeError):
    """A failure injected on purpose by the drill switch."""


class Clock:
    """Time to first token and the gaps between tokens of one request, per choice."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.ttft_s: float | None = None
        self.gaps: list[float] = []
        self._last: dict[int, float] = {}

    def tick(self, d: Delta) -> None:
        if not d.tokens:
            return
        now = time.perf_counter()
        if self.ttft_s is None:
            self.ttft_s = now - self.start
        last = self._last.get(d.index)
        if last is not None and len(self.gaps) < MAX_GAPS:
            self.gaps.append((now - last) / d.tokens)
        self._last[d.index] = now


class Responder:
    def __init__(self, engine: Engine, version: str, drill: dict[str, Any] | None = None):
        self.engine = engine
        self.version = version
        drill = drill or {}
        self.error_rate = float(drill.get("error_rate", 0.0))
        self.delay_s = float(drill.get("delay_s", 0.0))
        self.rng = random.Random(drill.get("seed", 0))

    async def _drill(self) -> None:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.error_rate and self.rng.random() < self.error_rate:
            raise DrillError(f"drill: injected failure in {self.version}")

    def _meta(self, clock: Clock, results: list[Completion]) -> dict[str, Any]:
        counts = usage(results)
        return {
            "ttft_s": clock.ttft_s,
            "itl_s": clock.gaps,
            "seconds": time.perf_counter() - clock.start,
            "prompt_tokens": counts["prompt_tokens"],
            "completion_tokens": counts["completion_tokens"],
            "engine": self.engine.stats(),
        }

    async def complete(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        req = parse_request(kind, body)
        clock = Clock()
        await self._drill()
        texts: dict[int, list[str]] = {}
        tokens: dict[int, int] = {}
        prompt_tokens: dict[int, int] = {}
        reasons: dict[int, str] = {}
        async for d in self.engine.stream(req):
            clock.tick(d)
            texts.setdefault(d.index, []).append(d.text)
            tokens[d.index] = tokens.get(d.index, 0) + d.tokens
            prompt_tokens[d.index] = d.prompt_tokens
            if d.finish_reason:
                reasons[d.index] = d.finish_reason
        results = [
            Completion("".join(texts[i]), prompt_tokens[i], tokens[i], reasons.get(i, "length")) for i in sorted(texts)
        ]
        return {
            "response": completion_response(self.version, results, chat=req.chat),
            "meta": self._meta(clock, results),
        }

    async def stream(self, kind: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        req: CompletionRequest = parse_request(kind, body)
        clock = Clock()
        await self._drill()
        rid = new_id(req.chat)
        sent: dict[int, float] = {}  # when each choice's last chunk left
        pending: dict[int, str] = {}
        counts: dict[int, list[int]] = {}
        async for d in self.engine.stream(req):
            clock.tick(d)
            first = d.index not in sent
            c = counts.setdefault(d.index, [d.prompt_tokens, 0])
            c[1] += d.tokens
            text = pending.pop(d.index, "") + d.text
            now = time.perf_counter()
            # Tokens closer together than COALESCE_S travel as one chunk: each Ray hop costs per
            # chunk, and a chunk waits at most one inter-token gap for its company.
            if first or d.finish_reason or now - sent[d.index] >= COALESCE_S:
                sent[d.index] = now
                yield {"data": stream_chunk(rid, self.version, req.chat, d.index, text, d.finish_reason, first)}
            else:
                pending[d.index] = text
        for index, text in pending.items():  # an engine that ended a choice without saying why
            yield {"data": stream_chunk(rid, self.version, req.chat, index, text, "length")}
        results = [Completion("", p, n, "") for p, n in counts.values()]
        if req.include_usage:
            yield {"data": usage_chunk(rid, self.version, req.chat, usage(results))}
        yield {"meta": self._meta(clock, results)}

    def describe(self) -> dict[str, Any]:
        return {"version": self.version, "engine": self.engine.name, "device": self.engine.device}
