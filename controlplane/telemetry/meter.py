"""The job-side energy meter: each training worker measures its own GPUs and writes a file.

    meter = EnergyMeter(run_dir, attempt, node, gpu_indices=[0]).start()
    ...train...
    meter.stop()

samples the GPUs every `interval_s` (default 1 s) on a daemon thread and rewrites, atomically,
every `flush_every_s` and at `stop()`:

    <run_dir>/telemetry/energy/a<attempt>-<node>-<pid>.json =
        {"run_id", "attempt", "node", "pid", "t_start", "t_end", "status", "message",
         "gpus": [{"index", "uuid", "name", "seconds", "samples", "energy_j", "source",
                   "counter_j", "integrated_j", "counter_resets", "mean_power_w", "power_limit_w"}]}

`counter_j` is the NVML energy counter's increase over the window (null where the GPU has
no counter), `integrated_j` the integral of the sampled power over the same window;
`energy_j` is the counter where present. `llmctl run energy` sums every such file of the run
(all attempts, all nodes) into the ledger. If an `Assignment` is passed, the meter refreshes
it at each flush so the node's exporter keeps labelling the GPUs with the run id.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from controlplane.rundir import write_atomic
from controlplane.telemetry.assignments import Assignment
from controlplane.telemetry.sampler import STATUS_OK, NvmlSampler

log = logging.getLogger(__name__)


def energy_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "telemetry" / "energy"


class EnergyMeter:
    def __init__(
        self,
        run_dir: str | Path,
        attempt: int,
        node: str,
        gpu_indices: list[int] | None,
        nvml: Any | None = None,
        interval_s: float = 1.0,
        flush_every_s: float = 10.0,
        assignment: Assignment | None = None,
        sampler: NvmlSampler | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.attempt = attempt
        self.node = node
        self.interval_s = interval_s
        self.flush_every_s = flush_every_s
        self.assignment = assignment
        self.sampler = sampler or NvmlSampler(nvml, indices=gpu_indices, watch_events=False)
        self.path = energy_dir(self.run_dir) / f"a{attempt}-{node}-{os.getpid()}.json"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t_start: float | None = None
        self._t_end: float | None = None
        self._first: dict[int, float] = {}
        self._stats: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def start(self) -> EnergyMeter:
        if self.sampler.status != STATUS_OK:
            self.sampler.open()
        self._t_start = time.time()
        self._take()
        self.flush()
        if self.sampler.status == STATUS_OK:
            self._thread = threading.Thread(target=self._loop, name="llmctl-energy-meter", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        last_flush = time.monotonic()
        while not self._stop.wait(self.interval_s):
            try:
                self._take()
                if time.monotonic() - last_flush >= self.flush_every_s:
                    self.flush()
                    last_flush = time.monotonic()
            except Exception as exc:  # the meter must never take training down
                log.warning("energy meter: %s", exc)

    def _take(self) -> None:
        sample = self.sampler.sample()
        now = time.time()
        with self._lock:
            self._t_end = now
            for g in sample.gpus:
                st = self._stats.setdefault(
                    g.index,
                    {"index": g.index, "uuid": g.uuid, "name": g.name, "samples": 0, "t0": now, "t1": now,
                     "power_sum": 0.0, "power_n": 0, "counter_resets": 0, "lost": False},
                )  # fmt: skip
                if g.lost:
                    st["lost"] = True
                    continue
                st["samples"] += 1
                st["t1"] = now
                st["counter_j"] = g.energy_counter_j
                st["integrated_j"] = g.energy_integrated_j
                st["counter_resets"] = g.counter_resets
                if g.power_w is not None:
                    st["power_sum"] += g.power_w
                    st["power_n"] += 1
                if g.power_limit_w is not None:
                    st["power_limit_w"] = g.power_limit_w

    def record(self) -> dict[str, Any]:
        with self._lock:
            gpus = []
            for st in self._stats.values():
                counter = st.get("counter_j")
                integrated = st.get("integrated_j") or 0.0
                gpus.append(
                    {
                        "index": st["index"],
                        "uuid": st["uuid"],
                        "name": st["name"],
                        "seconds": max(0.0, st["t1"] - st["t0"]),
                        "samples": st["samples"],
                        "energy_j": counter if counter is not None else integrated,
                        "source": "counter" if counter is not None else "integrated",
                        "counter_j": counter,
                        "integrated_j": integrated,
                        "counter_resets": st["counter_resets"],
                        "mean_power_w": st["power_sum"] / st["power_n"] if st["power_n"] else None,
                        "power_limit_w": st.get("power_limit_w"),
                        "lost": st["lost"],
                    }
                )
            return {
                "run_id": self.run_dir.name,
                "attempt": self.attempt,
                "node": self.node,
                "pid": os.getpid(),
                "t_start": self._t_start,
                "t_end": self._t_end,
                "status": self.sampler.status,
                "message": self.sampler.message,
                "gpus": gpus,
            }

    def flush(self) -> None:
        write_atomic(self.path, json.dumps(self.record(), indent=1).encode())
        if self.assignment is not None:
            try:
                self.assignment.refresh()
            except OSError as exc:
                log.warning("energy meter: cannot refresh GPU assignment: %s", exc)

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 2 * self.interval_s))
        if self.sampler.status == STATUS_OK:
            self._take()
        self.flush()
        self.sampler.close()
        return self.record()

    def __enter__(self) -> EnergyMeter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def read_energy_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every meter file of a run (lenient: unreadable files are skipped)."""
    out = []
    d = energy_dir(run_dir)
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and isinstance(rec.get("gpus"), list):
            out.append(rec)
    return out
