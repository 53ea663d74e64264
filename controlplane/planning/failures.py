"""Failure models for the simulator: causes, rates per GPU, and how each failure shows itself.

The default is Meta's Llama 3 pre-training record ("The Llama 3 Herd of Models", 2024, section
3.3.4, Table 5): 419 unexpected interruptions in a 54-day snapshot on 16,384 H100 GPUs, split
by root cause. We use the table's interruption COUNTS, which add up to 419; the printed
percentages do not all match them (148 "faulty GPU" interruptions are 35.3% of 419, while the
table prints 30.1%). Rates are scaled per GPU-hour, so a cluster of G GPUs sees
G x 419 / (16,384 x 54 x 24) failures an hour (one every ~55 h on 928 GPUs).

How a failure shows itself decides what it costs:
- crash: a process dies; the job exits and the supervisor notices within `detect_s`.
- hang: collectives stall (a switch, a NIC, an NCCL watchdog); nothing exits, and the
  supervisor's hang timeout has to expire first.
- numerical: silent data corruption shows up as a loss spike; the policy rolls back.
`node` marks causes that take one node out (the policy counts failures per node).

A model file (`--failures FILE`, YAML) has the same shape as `FailureModelSpec` below.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from controlplane.spec import StrictModel, load_spec


class FailureCause(StrictModel):
    name: str = Field(description="Root cause, e.g. 'faulty GPU'.")
    count: float = Field(ge=0, description="Interruptions observed with this cause.")
    kind: Literal["crash", "hang", "numerical"] = Field(
        "crash", description="How it shows: a crash (exit), a hang (timeout) or a numerical fault (loss spike)."
    )
    node: bool = Field(True, description="Whether it is attributable to one node (counts toward exclusion).")


class FailureModelSpec(StrictModel):
    source: str = Field("", description="Where the counts come from.")
    observed_gpus: int = Field(gt=0, description="GPUs of the cluster the counts were observed on.")
    observed_days: float = Field(gt=0, description="Days the counts cover.")
    causes: list[FailureCause] = Field(min_length=1, description="Counts by root cause.")

    @property
    def total(self) -> float:
        return sum(c.count for c in self.causes)

    def per_gpu_hour(self) -> float:
        return self.total / (self.observed_gpus * self.observed_days * 24.0)

    def per_gpu_mtbf_hours(self) -> float:
        rate = self.per_gpu_hour()
        return float("inf") if rate <= 0 else 1.0 / rate

    def cluster_mtbf_hours(self, gpus: int, scale: float = 1.0) -> float:
        rate = self.per_gpu_hour() * gpus * scale
        return float("inf") if rate <= 0 else 1.0 / rate


def _c(name: str, count: int, kind: str = "crash", node: bool = True) -> FailureCause:
    return FailureCause(name=name, count=count, kind=kind, node=node)


LLAMA3 = FailureModelSpec(
    source="Llama 3 (Meta, 2024), Table 5: 419 unexpected interruptions, 54 days, 16,384 H100 GPUs",
    observed_gpus=16384,
    observed_days=54.0,
    causes=[
        _c("faulty GPU", 148),
        _c("GPU HBM3 memory", 72),
        _c("software bug", 54, node=False),
        _c("network switch/cable", 35, "hang", node=False),
        _c("host maintenance", 32),
        _c("GPU SRAM memory", 19),
        _c("GPU system processor", 17),
        _c("NIC", 7, "hang"),
        _c("NCCL watchdog timeout", 7, "hang", node=False),
        _c("silent data corruption", 6, "numerical"),
        _c("GPU thermal interface/sensor", 6),
        _c("SSD", 3),
        _c("power supply", 3),
        _c("server chassis", 2),
        _c("IO expansion board", 2),
        _c("dependency", 2, node=False),
        _c("CPU", 2),
        _c("system memory", 2),
    ],
)


def load_failure_model(path: str | None) -> FailureModelSpec:
    return LLAMA3 if path is None else load_spec(FailureModelSpec, path)
