"""The supervisor's pure arithmetic: hang timeout, backoff, rollback windows, numerical
faults, Young/Daly checkpoint interval, MTBF. Used by `policy.decide` (which re-exports these
names as part of its stable API) and by the month-long failure simulator.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from controlplane.spec import FaultToleranceSpec

DEFAULT_MTBF_S = 24 * 3600.0


def hang_timeout_s(spec: FaultToleranceSpec, median_step_s: float | None) -> float:
    """clamp(factor x median step time, min, max); the max when no step time is known yet."""
    if median_step_s is None or median_step_s <= 0:
        return spec.hang_timeout_max_s
    return min(max(spec.hang_timeout_factor * median_step_s, spec.hang_timeout_min_s), spec.hang_timeout_max_s)


def backoff_delay_s(spec: FaultToleranceSpec, restarts_without_progress: int) -> float:
    """initial x 2**k, capped; k = restarts in a row without progress (0 after progress)."""
    k = max(0, restarts_without_progress)
    if spec.backoff_initial_s <= 0:
        return 0.0
    if k > 60:
        return spec.backoff_max_s
    return min(spec.backoff_initial_s * (2**k), spec.backoff_max_s)


def rollback_plan(
    verified_steps: Sequence[int], bad_step: int, skip_steps: Sequence[tuple[int, int]] = ()
) -> tuple[int, tuple[tuple[int, int], ...]]:
    """(max_resume_step, skip windows): the newest verified checkpoint strictly before `bad_step`
    (0 = start from scratch) and the windows so far plus [ckpt+1 .. bad_step] (half-open)."""
    before = [s for s in verified_steps if s < bad_step]
    target = max(before) if before else 0
    window = (target + 1, bad_step + 1)
    windows = tuple(sorted(set(skip_steps) | {window}))
    return target, windows


def numerical_fault(losses: Sequence[float], spike_factor: float, window: int) -> tuple[int, str] | None:
    """(index into `losses`, kind) of the first NaN/Inf or spike above spike_factor x the median
    of the previous `window` losses (at least 5 of them), else None."""
    for i, loss in enumerate(losses):
        if not math.isfinite(loss):
            return i, "nan_loss"
        prev = [x for x in losses[max(0, i - window) : i] if math.isfinite(x)]
        if len(prev) >= 5:
            med = statistics.median(prev)
            if med > 0 and loss > spike_factor * med:
                return i, "loss_spike"
    return None


def young_daly_interval(save_cost_s: float, mtbf_s: float) -> float:
    """The Young/Daly optimal time between checkpoints: sqrt(2 x save cost x MTBF), seconds."""
    if save_cost_s <= 0 or mtbf_s <= 0:
        raise ValueError("save cost and MTBF must be positive")
    return math.sqrt(2.0 * save_cost_s * mtbf_s)


def interval_steps(save_cost_s: float, mtbf_s: float, step_time_s: float, *, max_steps: int | None = None) -> int:
    """The Young/Daly interval converted to steps at the measured step time (at least 1)."""
    if step_time_s <= 0:
        raise ValueError("step time must be positive")
    steps = max(1, round(young_daly_interval(save_cost_s, mtbf_s) / step_time_s))
    return min(steps, max_steps) if max_steps else steps


def mtbf_estimate_s(elapsed_s: float, failures: int, prior_mtbf_s: float | None = None) -> float:
    """MTBF from `failures` seen in `elapsed_s` of run time, smoothed by one pseudo-failure at
    the prior (the spec's mtbf_hours, else a day) so early estimates are not wild."""
    prior = prior_mtbf_s or DEFAULT_MTBF_S
    return (max(0.0, elapsed_s) + prior) / (max(0, failures) + 1)


def restarts_without_progress(progressed: Sequence[bool]) -> int:
    """Given per-attempt 'made progress' flags (attempt 1 first), the restarts (attempt > 1) in a
    row at the end that made none."""
    n = 0
    for i in range(len(progressed) - 1, 0, -1):  # index 0 is attempt 1, never a restart
        if progressed[i]:
            break
        n += 1
    return n
