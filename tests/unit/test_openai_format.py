"""The /v1/completions wire format and bearer-token check."""

from __future__ import annotations

import pytest

from jobs.serve.metrics import ServeMetrics, percentile
from jobs.serve.openai import BadRequest, apply_stop, authorized, parse_completion_request, token_digest


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
        ({"prompt": "x", "stream": True}, "stream"),
        ({"prompt": "x", "n": 2}, "n:"),
    ],
)
def test_parse_rejects(body, msg):
    with pytest.raises(BadRequest, match=msg):
        parse_completion_request(body)


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
    assert percentile([], 99) is None and percentile([1.0], 99) == 1.0
