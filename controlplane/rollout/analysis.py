"""Pure rollout decisions: the evaluation gate and the canary analysis.

No I/O here: the controller measures, these functions decide, the controller records the
decision with its figures. Both are unit-tested without a cluster.

Canary analysis of one traffic step, given the candidate's and the stable version's figures
over the step's window so far:

    candidate errors already exceed max_error_rate even if every remaining request of
    the window succeeded                                        -> ROLLBACK (early)
    window still open                                           -> WAIT
    fewer than min_requests candidate requests                  -> WAIT, until
        insufficient_traffic_factor x the window                -> ROLLBACK (no evidence)
    error rate > max_error_rate                                 -> ROLLBACK
    p99 > max_p99_latency_s                                     -> ROLLBACK
    p99 > max_latency_ratio x stable p99 (stable measured, and
        the gap above latency_slack_s)                          -> ROLLBACK
    otherwise                                                   -> ADVANCE, or PROMOTE at the last step
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class Action(StrEnum):
    WAIT = "wait"
    ADVANCE = "advance"
    PROMOTE = "promote"
    ROLLBACK = "rollback"
    REJECT = "reject"


@dataclass(frozen=True)
class Window:
    """What one version served in an analysis window."""

    requests: int = 0
    errors: int = 0
    p99_s: float | None = None
    p50_s: float | None = None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @classmethod
    def of(cls, stats: dict[str, Any]) -> Window:
        return cls(int(stats.get("requests", 0)), int(stats.get("errors", 0)), stats.get("p99_s"), stats.get("p50_s"))


@dataclass(frozen=True)
class Thresholds:
    max_error_rate: float
    max_p99_latency_s: float
    max_latency_ratio: float
    min_requests: int
    window_s: float
    latency_slack_s: float = 0.05
    insufficient_traffic_factor: float = 4.0

    @classmethod
    def of(cls, spec: Any) -> Thresholds:
        return cls(
            max_error_rate=spec.max_error_rate,
            max_p99_latency_s=spec.max_p99_latency_s,
            max_latency_ratio=spec.max_latency_ratio,
            min_requests=spec.min_requests,
            window_s=spec.analysis_window_s,
            latency_slack_s=spec.latency_slack_s,
            insufficient_traffic_factor=spec.insufficient_traffic_factor,
        )


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)


def analyze(
    th: Thresholds, candidate: Window, stable: Window, elapsed_s: float, step_index: int, n_steps: int
) -> Decision:
    """Decide one traffic step from the figures of its window so far."""
    figures = {
        "candidate": {**asdict(candidate), "error_rate": round(candidate.error_rate, 6)},
        "stable": {**asdict(stable), "error_rate": round(stable.error_rate, 6)},
        "elapsed_s": round(elapsed_s, 3),
        "thresholds": asdict(th),
    }
    # Early: the errors already seen exceed the budget of a full minimum window.
    if candidate.errors > th.max_error_rate * max(th.min_requests, candidate.requests):
        return Decision(
            Action.ROLLBACK,
            f"candidate error rate {candidate.error_rate:.1%} over {candidate.requests} requests "
            f"exceeds {th.max_error_rate:.1%}",
            figures,
        )
    if elapsed_s < th.window_s:
        return Decision(Action.WAIT, "window open", figures)
    if candidate.requests < th.min_requests:
        if elapsed_s >= th.window_s * th.insufficient_traffic_factor:
            return Decision(
                Action.ROLLBACK,
                f"insufficient traffic: {candidate.requests} candidate requests in {elapsed_s:.0f}s "
                f"(need {th.min_requests})",
                figures,
            )
        return Decision(Action.WAIT, f"waiting for {th.min_requests} candidate requests", figures)
    if candidate.error_rate > th.max_error_rate:
        return Decision(
            Action.ROLLBACK, f"candidate error rate {candidate.error_rate:.1%} exceeds {th.max_error_rate:.1%}", figures
        )
    p99 = candidate.p99_s or 0.0
    if p99 > th.max_p99_latency_s:
        return Decision(Action.ROLLBACK, f"candidate p99 {p99:.3f}s exceeds {th.max_p99_latency_s:.3f}s", figures)
    if stable.requests >= th.min_requests and stable.p99_s:
        ratio = p99 / stable.p99_s
        figures["latency_ratio"] = round(ratio, 3)
        if ratio > th.max_latency_ratio and p99 - stable.p99_s > th.latency_slack_s:
            return Decision(
                Action.ROLLBACK,
                f"candidate p99 {p99:.3f}s is {ratio:.2f}x stable's {stable.p99_s:.3f}s (max {th.max_latency_ratio}x)",
                figures,
            )
    if step_index + 1 >= n_steps:
        return Decision(Action.PROMOTE, "all traffic steps passed", figures)
    return Decision(Action.ADVANCE, f"step {step_index + 1}/{n_steps} passed", figures)


# --------------------------------------------------------------------------- the gate


@dataclass(frozen=True)
class GateResult:
    passed: bool
    failures: list[str]
    figures: dict[str, Any]


GATE_RULES: dict[str, tuple[str, str]] = {
    # minimum field -> (score key, direction)
    "jcommonsenseqa_accuracy": ("jcommonsenseqa_accuracy", "min"),
    "jsquad_exact_match": ("jsquad_exact_match", "min"),
    "max_heldout_perplexity": ("heldout_perplexity", "max"),
}


def required_tasks(minimums: dict[str, float | None]) -> list[str]:
    tasks = []
    for key, value in minimums.items():
        if value is not None and key in GATE_RULES:
            score = GATE_RULES[key][0]
            tasks.append("heldout" if score.startswith("heldout") else score.split("_")[0])
    return sorted(set(tasks))


def gate(minimums: dict[str, float | None], scores: dict[str, Any]) -> GateResult:
    """Every set minimum must be met by a measured score; a missing score fails."""
    failures = []
    for key, limit in minimums.items():
        if limit is None or key not in GATE_RULES:
            continue
        score_key, direction = GATE_RULES[key]
        value = scores.get(score_key)
        if not isinstance(value, int | float):
            failures.append(f"{score_key} not measured")
        elif direction == "min" and value < limit:
            failures.append(f"{score_key} {value:.4f} < minimum {limit}")
        elif direction == "max" and value > limit:
            failures.append(f"{score_key} {value:.4f} > maximum {limit}")
    figures = {"minimums": {k: v for k, v in minimums.items() if v is not None}, "scores": scores}
    return GateResult(not failures, failures, figures)
