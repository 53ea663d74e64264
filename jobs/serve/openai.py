"""The OpenAI wire format: `/v1/completions` and `/v1/chat/completions` requests, their
responses, streamed chunks (server-sent events) and the bearer-token check.

Pure and import-light: the Ray Serve router, the model replicas and the standalone server
share it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

MAX_TOKENS_LIMIT = 2048
MAX_PROMPTS = 32
MAX_MESSAGES = 256
LOOPBACK = ("127.0.0.1", "localhost", "::1")
CHAT_ROLES = ("system", "user", "assistant")


class BadRequest(ValueError):
    """A request the client must fix (HTTP 400)."""


@dataclass(frozen=True)
class CompletionRequest:
    """One request: `prompts` for /v1/completions, or `messages` for /v1/chat/completions."""

    prompts: list[str]
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    messages: list[dict[str, str]] = field(default_factory=list)
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says

    @property
    def chat(self) -> bool:
        return bool(self.messages)


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


def _number(body: dict[str, Any], name: str, default: float, hi: float) -> float:
    value = body.get(name, default)
    if value is None:
        value = default
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= hi:
        raise BadRequest(f"{name}: expected a number in 0..{hi}")
    return float(value)


def _common(body: Any) -> dict[str, Any]:
    """The sampling fields both endpoints share."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    if body.get("n", 1) != 1:
        raise BadRequest("n: only 1 is supported")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key, 16)
    if max_tokens is None:
        max_tokens = 16
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise BadRequest(f"{key}: expected an integer in 1..{MAX_TOKENS_LIMIT}")
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, list | tuple) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise BadRequest("stop: expected a string or up to 4 non-empty strings")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise BadRequest("seed: expected an integer")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream: expected true or false")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise BadRequest("ignore_eos: expected true or false")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise BadRequest("stream_options: expected {include_usage: true|false}")
    return {
        "max_tokens": max_tokens,
        "temperature": _number(body, "temperature", 0.0, 2.0),
        "top_p": _number(body, "top_p", 1.0, 1.0),
        "stop": tuple(stop),
        "seed": seed,
        "stream": stream,
        "include_usage": bool(options.get("include_usage", False)),
        "ignore_eos": ignore_eos,
    }


def parse_completion_request(body: Any) -> CompletionRequest:
    common = _common(body)
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise BadRequest("prompt: expected a string or a non-empty list of strings")
    if len(prompts) > MAX_PROMPTS:
        raise BadRequest(f"prompt: at most {MAX_PROMPTS} prompts per request")
    return CompletionRequest(prompts, **common)


def parse_chat_request(body: Any) -> CompletionRequest:
    common = _common(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or len(messages) > MAX_MESSAGES:
        raise BadRequest(f"messages: expected a non-empty list of at most {MAX_MESSAGES} messages")
    parsed = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            raise BadRequest(f"messages[{i}].role: expected one of {', '.join(CHAT_ROLES)}")
        content = m.get("content")
        if isinstance(content, list):  # the parts form: text parts only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise BadRequest(f"messages[{i}].content: only text parts are supported")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content: expected a string")
        parsed.append({"role": m["role"], "content": content})
    return CompletionRequest([], messages=parsed, **common)


def parse_request(kind: str, body: Any) -> CompletionRequest:
    """`kind`: 'completions' or 'chat'."""
    return parse_chat_request(body) if kind == "chat" else parse_completion_request(body)


def endpoint_kind(path: str) -> str | None:
    """'chat', 'completions', or None for a path that is neither."""
    if path.endswith("/v1/chat/completions"):
        return "chat"
    if path.endswith("/v1/completions"):
        return "completions"
    return None


def apply_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    cut = min((i for s in stop if (i := text.find(s)) >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def usage(results: list[Completion]) -> dict[str, int]:
    prompt_tokens = sum(r.prompt_tokens for r in results)
    completion_tokens = sum(r.completion_tokens for r in results)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def completion_response(model: str, results: list[Completion], chat: bool = False) -> dict[str, Any]:
    if chat:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": r.text},
                "finish_reason": r.finish_reason,
                "logprobs": None,
            }
            for i, r in enumerate(results)
        ]
    else:
        choices = [
            {"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
            for i, r in enumerate(results)
        ]
    return {
        "id": new_id(chat),
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(results),
    }


def stream_chunk(
    rid: str,
    model: str,
    chat: bool,
    index: int,
    text: str,
    finish_reason: str | None,
    first: bool = False,
) -> dict[str, Any]:
    """One streamed chunk: a text delta of choice `index` (chat chunks carry the role first)."""
    if chat:
        delta: dict[str, Any] = {"content": text}
        if first:
            delta["role"] = "assistant"
        choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
    else:
        choice = {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}
    return {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }


def usage_chunk(rid: str, model: str, chat: bool, counts: dict[str, int]) -> dict[str, Any]:
    """The last chunk when `stream_options.include_usage` is set: no choices, the request's usage."""
    return {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": counts,
    }


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event (`data: ...` and a blank line); a string is sent as is ([DONE])."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


SSE_DONE = sse("[DONE]")


async def sse_events(
    first: dict[str, Any],
    rest: AsyncIterator[dict[str, Any]],
    on_done: Callable[[dict[str, Any]], None],
    on_error: Callable[[Exception], None],
) -> AsyncIterator[bytes]:
    """A replica's stream ({"data": chunk}... {"meta": ...}) as server-sent events, [DONE] last.

    `on_done(meta)` runs after the last event; a failure mid-stream calls `on_error` and ends
    the stream with an error event (the status line was sent with the first chunk).
    """
    meta: dict[str, Any] = {}
    try:
        item = first
        while True:
            if "data" in item:
                yield sse(item["data"])
            else:
                meta = item["meta"]
            try:
                item = await rest.__anext__()
            except StopAsyncIteration:
                break
        yield SSE_DONE
        on_done(meta)
    except Exception as exc:
        on_error(exc)
        yield sse(error_body(type(exc).__name__, "server_error", 500))


def error_body(message: str, kind: str, code: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": code}}


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def authorized(header: str | None, digest: str | None) -> bool:
    """True if no token is configured, or the bearer token's digest matches (constant time)."""
    if not digest:
        return True
    if not header or not header.lower().startswith("bearer "):
        return False
    return hmac.compare_digest(token_digest(header[7:].strip()), digest)
