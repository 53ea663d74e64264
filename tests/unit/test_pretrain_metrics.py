"""Rank 0's metrics endpoint: the DESIGN.md names, served on loopback, values as observed."""

from __future__ import annotations

import httpx

from jobs.pretrain.metrics import TrainMetrics, peak_flops


def test_train_metrics_are_served_with_design_names():
    m = TrainMetrics("run-1", "local", "127.0.0.1", 0)
    try:
        assert m.url.startswith("http://127.0.0.1:")
        m.tokens.inc(1000)  # tokens trained before a resume
        m.observe(step=7, loss=2.5, tokens_delta=512, tps=1234.0, goodput=0.9, mfu=None)
        m.restart("worker_died")
        m.ckpt.set(0.25)
        body = httpx.get(m.url, timeout=5).text
    finally:
        m.close()
    labels = 'cluster="local",run_id="run-1"'
    assert f"llmctl_train_step{{{labels}}} 7.0" in body
    assert f"llmctl_train_loss{{{labels}}} 2.5" in body
    assert f"llmctl_train_tokens_total{{{labels}}} 1512.0" in body
    assert f"llmctl_train_tokens_per_second{{{labels}}} 1234.0" in body
    assert f"llmctl_train_goodput_ratio{{{labels}}} 0.9" in body
    assert f"llmctl_train_checkpoint_seconds{{{labels}}} 0.25" in body
    assert f'llmctl_train_restarts_total{{cause="worker_died",{labels}}} 1.0' in body
    assert "llmctl_train_mfu_ratio" in body


def test_peak_flops_table():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops(None) is None and peak_flops("cpu") is None
