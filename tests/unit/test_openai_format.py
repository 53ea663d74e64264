"""The /v1/completions wire format and bearer-token check."""

from __future__ import annotations

import pytest

from jobs.serve.metrics import ServeMetrics, percentile
from jobs.serve.openai import (
    SSE_DONE,
    BadRequest,
    Completion,
    apply_stop,
    authorized,
    completion_response,
    endpoint_kind,
    parse_chat_request,
    parse_completion_request,
    sse,
    stream_chunk,
    token_digest,
)


def test_parse_valid_and_defaults():
    r = parse_completion_request({"prompt": "こんにちは", "max_tokens": 8, "stop": "\n"})
    assert r.prompts == ["こんにちは"] and r.max_tokens == 8 and r.stop == ("\n",) and r.temperature == 0.0
    assert parse_completion_request({"prompt": ["a", "b"]}).prompts == ["a", "b"]


@pytest.mark.parametrize(
    ("body", "msg"),
    [
        ([], "JSON object"),
        ({}, "prompt"),
        ({"prompt": 3}, "prompt"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"prompt": "x", "temperature": 5}, "temperature"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x", "stream_options": {"include_usage": 1}}, "stream_options"),
        ({"prompt": "x", "n": 2}, "n:"),
    ],
)
def test_parse_rejects(body, msg):
    with pytest.raises(BadRequest, match=msg):
        parse_completion_request(body)


def test_chat_requests_and_responses():
    r = parse_chat_request(
        {
            "messages": [
                {"role": "system", "content": "丁寧に"},
                {"role": "user", "content": [{"type": "text", "text": "日本の"}, {"type": "text", "text": "首都は"}]},
            ],
            "max_completion_tokens": 5,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    assert r.chat and r.prompts == [] and r.max_tokens == 5 and r.stream and r.include_usage
    assert r.messages[1] == {"role": "user", "content": "日本の首都は"}
    for body, msg in [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, r"messages\[0\].role"),
        ({"messages": [{"role": "user", "content": 3}]}, r"messages\[0\].content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "only text"),
    ]:
        with pytest.raises(BadRequest, match=msg):
            parse_chat_request(body)
    body = completion_response("v1", [Completion("東京", 3, 2, "stop")], chat=True)
    assert body["object"] == "chat.completion" and body["choices"][0]["message"] == {
        "role": "assistant",
        "content": "東京",
    }
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    first = stream_chunk("id1", "v1", True, 0, "東", None, first=True)
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"] == {
        "content": "東",
        "role": "assistant",
    }
    plain = stream_chunk("id2", "v1", False, 0, "京", "length")
    assert plain["choices"][0] == {"index": 0, "text": "京", "finish_reason": "length", "logprobs": None}
    assert sse({"a": "東"}) == 'data: {"a": "東"}\n\n'.encode() and SSE_DONE == b"data: [DONE]\n\n"
    assert endpoint_kind("/svc/v1/chat/completions") == "chat" and endpoint_kind("/v1/completions") == "completions"
    assert endpoint_kind("/v1/embeddings") is None


def test_stop_and_auth():
    assert apply_stop("abc\ndef", ("\n",)) == ("abc", True)
    assert apply_stop("abc", ("z",)) == ("abc", False)
    d = token_digest("tok")
    assert authorized(None, None) and authorized("Bearer tok", d)
    assert not authorized(None, d) and not authorized("Bearer nope", d) and not authorized("tok", d)


def test_metrics_window_and_names():
    m = ServeMetrics("eu-1")
    for i in range(100):
        m.observe("v1", 500 if i < 3 else 200, i / 100, completion_tokens=2)
    w = m.window("v1", 0)
    assert w["requests"] == 100 and w["errors"] == 3 and w["p99_s"] == 0.98
    assert m.window("v2", 0)["requests"] == 0 and m.window("v1", 2e12)["requests"] == 0
    m.set_traffic("r1", {"v1": 1.0}, {})
    from prometheus_client import generate_latest

    text = generate_latest(m.registry).decode()
    assert 'llmctl_serve_requests_total{cluster="eu-1",code="500",version="v1"} 3.0' in text
    assert 'llmctl_serve_tokens_total{cluster="eu-1",version="v1"} 200.0' in text
    assert 'llmctl_serve_request_duration_seconds_count{cluster="eu-1",version="v1"} 100.0' in text
    assert 'llmctl_rollout_traffic_ratio{cluster="eu-1",rollout_id="r1",version="v1"} 1.0' in text
    engine = {"kv_cache_usage": 0.25, "running": 3.0, "waiting": 0.0, "peak_running": 7.0}
    m.observe_tokens("v1", {"ttft_s": 0.03, "itl_s": [0.004, 0.006], "engine": engine}, "r-a")
    m.observe_tokens("v2", {"ttft_s": 0.03, "engine": {}}, "r-b")  # an engine without figures (transformers)
    text = generate_latest(m.registry).decode()
    assert 'llmctl_serve_time_to_first_token_seconds_count{cluster="eu-1",version="v1"} 1.0' in text
    assert 'llmctl_serve_inter_token_latency_seconds_count{cluster="eu-1",version="v1"} 2.0' in text
    assert 'llmctl_serve_inter_token_latency_seconds_bucket{cluster="eu-1",le="0.005",version="v1"} 1.0' in text
    assert 'llmctl_serve_kv_cache_usage_ratio{cluster="eu-1",replica="r-a",version="v1"} 0.25' in text
    assert 'llmctl_serve_running_requests{cluster="eu-1",replica="r-a",version="v1"} 3.0' in text
    assert 'llmctl_serve_running_requests_peak{cluster="eu-1",replica="r-a",version="v1"} 7.0' in text
    assert 'version="v2"' not in text.split("llmctl_serve_kv_cache_usage_ratio gauge")[1]
    m.forget("v1")
    m.forget("v2")
    after = generate_latest(m.registry).decode()
    assert "llmctl_serve_kv_cache_usage_ratio{" not in after and "llmctl_serve_running_requests_peak{" not in after
    assert percentile([], 99) is None and percentile([1.0], 99) == 1.0
