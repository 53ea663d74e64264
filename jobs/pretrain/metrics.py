"""The `llmctl_train_*` Prometheus metrics, served by rank 0 (127.0.0.1 unless configured)."""

from __future__ import annotations

from typing import Any

# Dense bf16 peak FLOP/s by GPU name fragment, for the MFU ratio (none on CPU: no honest peak).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


def peak_flops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    for key, value in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return value
    return None


class TrainMetrics:
    def __init__(self, run_id: str, cluster: str, host: str, port: int) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

        self.registry = CollectorRegistry()
        labels = ["cluster", "run_id"]
        lv = {"cluster": cluster, "run_id": run_id}

        def gauge(name: str, doc: str):
            return Gauge(name, doc, labels, registry=self.registry).labels(**lv)

        self.step = gauge("llmctl_train_step", "Completed global optimizer steps.")
        self.loss = gauge("llmctl_train_loss", "Training loss of the last step.")
        self.tps = gauge("llmctl_train_tokens_per_second", "Training throughput, tokens/s (all workers).")
        self.mfu = gauge("llmctl_train_mfu_ratio", "Model FLOPs utilisation (6*N*tokens/s over peak).")
        self.goodput = gauge("llmctl_train_goodput_ratio", "Step time over wall time in this attempt.")
        self.ckpt = gauge("llmctl_train_checkpoint_seconds", "Seconds training was blocked by the last checkpoint.")
        self.tokens = Counter(
            "llmctl_train_tokens", "Tokens trained in the run.", labels, registry=self.registry
        ).labels(**lv)
        self._restarts = Counter(
            "llmctl_train_restarts", "Restarts by cause (worker replaced in-attempt, resume).", labels + ["cause"],
            registry=self.registry,
        )  # fmt: skip
        self._lv = lv
        self.server, _ = start_http_server(port, addr=host, registry=self.registry)
        self.host, self.port = host, self.server.server_port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def restart(self, cause: str, n: float = 1.0) -> None:
        self._restarts.labels(**self._lv, cause=cause).inc(n)

    def observe(self, step: int, loss: float, tokens_delta: int, tps: float, goodput: float, mfu: float | None) -> None:
        self.step.set(step)
        self.loss.set(loss)
        self.tokens.inc(tokens_delta)
        self.tps.set(tps)
        self.goodput.set(goodput)
        if mfu is not None:
            self.mfu.set(mfu)

    def close(self) -> Any:
        self.server.shutdown()
        self.server.server_close()
