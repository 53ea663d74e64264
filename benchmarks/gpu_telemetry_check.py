"""Check the real NVML path on an NVIDIA GPU: power samples, counter vs integral, J/TFLOP, one cap.

Run through `benchmarks/gpu_telemetry_check.sh`. On one GPU it runs a bf16 matmul load with
torch and prints
  - power samples (W) while loaded,
  - the energy counter against the integral of sampled power over the same window (ratio),
  - joules per TFLOP of bf16 matmul work and the achieved TFLOP/s,
  - one power cap's effect on the same fixed amount of work: energy and time ratios (capped / default),
    set and restored through `controlplane.telemetry.power.apply_power_policy`.
Without a GPU (no NVML, no driver, no CUDA torch) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from typing import Any

from controlplane.spec import PowerSpec
from controlplane.telemetry.assignments import cuda_visible_gpus
from controlplane.telemetry.power import apply_power_policy
from controlplane.telemetry.sampler import STATUS_OK, NvmlSampler, load_nvml


class Window:
    """Samples one GPU every `interval_s` on a thread; energy by counter and by integral over the window."""

    def __init__(self, sampler: NvmlSampler, interval_s: float):
        self.sampler, self.interval_s = sampler, interval_s
        self.samples: list[tuple[float, float | None]] = []
        self._stop = threading.Event()

    def __enter__(self) -> Window:
        self.start = self.sampler.sample().gpus[0]
        self.t0 = time.monotonic()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            g = self.sampler.sample().gpus[0]
            self.samples.append((time.monotonic() - self.t0, g.power_w))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.end = self.sampler.sample().gpus[0]
        self.seconds = time.monotonic() - self.t0

    @property
    def counter_j(self) -> float | None:
        if self.end.energy_counter_j is None or self.start.energy_counter_j is None:
            return None
        return self.end.energy_counter_j - self.start.energy_counter_j

    @property
    def integrated_j(self) -> float:
        return self.end.energy_integrated_j - self.start.energy_integrated_j

    @property
    def joules(self) -> float:
        c = self.counter_j
        return c if c is not None else self.integrated_j


def nvml_index_of_cuda0(torch: Any, sampler: NvmlSampler) -> int:
    ids = sampler.identities()
    uuid = str(getattr(torch.cuda.get_device_properties(0), "uuid", "") or "").lower()
    for index, nvml_uuid in ids:
        if uuid and nvml_uuid.lower().removeprefix("gpu-") == uuid.removeprefix("gpu-"):
            return index
    visible = cuda_visible_gpus(ids)
    return visible[0][0] if visible else ids[0][0]


def main() -> int:
    ap = argparse.ArgumentParser(description="NVML telemetry check on a real GPU")
    ap.add_argument("--seconds", type=float, default=8.0, help="length of each measured phase")
    ap.add_argument("--size", type=int, default=8192, help="square bf16 matmul size")
    ap.add_argument("--cap-fraction", type=float, default=0.7, help="cap = this x the default limit")
    ap.add_argument("--interval", type=float, default=0.1, help="power sampling interval, s")
    args = ap.parse_args()

    nvml = load_nvml()
    probe = NvmlSampler(nvml, watch_events=False)
    if probe.open() != STATUS_OK:
        print(f"gpu_telemetry_check: no usable NVIDIA GPU here ({probe.message}); nothing to check")
        return 0
    try:
        import torch
    except ImportError:
        print("gpu_telemetry_check: torch is not installed; nothing to check")
        return 0
    if not torch.cuda.is_available():
        print(
            f"gpu_telemetry_check: NVML sees {len(probe.identities())} GPU(s) but torch has no CUDA; nothing to check"
        )
        return 0
    index = nvml_index_of_cuda0(torch, probe)
    probe.close()
    sampler = NvmlSampler(nvml, indices=[index], watch_events=False)
    sampler.open()
    g = sampler.sample().gpus[0]
    print(f"GPU {index}: {g.name} {g.uuid}, driver {sampler.driver_version}")
    print(
        f"  power source: {g.power_source}, energy source: {g.energy_source}, limit {g.power_limit_w} W "
        f"(allowed {g.power_limit_min_w}-{g.power_limit_max_w} W, default {g.power_limit_default_w} W)"
    )
    if g.unsupported:
        print(f"  not supported here: {', '.join(g.unsupported)}")

    n = args.size
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    flop_per_iter = 2.0 * n**3

    def run(iters: int) -> None:
        for _ in range(iters):
            torch.matmul(a, b)
        torch.cuda.synchronize()

    run(5)  # warm-up, and a first guess of the pace
    t = time.perf_counter()
    run(20)
    per_iter = (time.perf_counter() - t) / 20
    iters = max(20, int(args.seconds / per_iter))
    run(iters // 4)  # let clocks and power settle under load

    # 1) default limit: power samples, counter vs integral, J/TFLOP
    with Window(sampler, args.interval) as w0:
        run(iters)
    tflop = iters * flop_per_iter / 1e12
    powers = [p for _, p in w0.samples if p is not None]
    print(f"\nload: {iters} bf16 matmuls of {n}x{n} = {tflop:.1f} TFLOP in {w0.seconds:.2f} s")
    print(
        f"power samples every {args.interval:g} s (W): "
        + " ".join(f"{p:.0f}" for p in powers[:: max(1, len(powers) // 40)])
    )
    if powers:
        print(f"  mean {sum(powers) / len(powers):.1f} W, min {min(powers):.1f} W, max {max(powers):.1f} W")
    if w0.counter_j is not None:
        ratio = w0.counter_j / w0.integrated_j if w0.integrated_j > 0 else float("nan")
        print(
            f"energy: counter {w0.counter_j:.1f} J, integrated power {w0.integrated_j:.1f} J, "
            f"ratio counter/integrated {ratio:.3f}"
        )
    else:
        print(f"energy: no counter on this GPU; integrated power {w0.integrated_j:.1f} J")
    print(f"joules per TFLOP: {w0.joules / tflop:.2f} J/TFLOP at {tflop / w0.seconds:.1f} TFLOP/s")

    # 2) one power cap: the same work, capped, against the default
    default_w = g.power_limit_default_w or g.power_limit_w
    if not default_w:
        print("\npower cap: the GPU reports no limit; skipped")
        return 0
    cap_w = round(default_w * args.cap_fraction)
    handle = apply_power_policy(PowerSpec(cap_watts=float(cap_w)), [index], nvml=nvml)
    try:
        if handle.status != "capped":
            print(f"\npower cap: {handle.message}; skipped")
            return 0
        time.sleep(1.0)
        run(iters // 4)
        with Window(sampler, args.interval) as w1:
            run(iters)
    finally:
        handle.restore()
    capped = [p for _, p in w1.samples if p is not None]
    print(f"\npower cap {handle.applied_limit_w:.0f} W (default {default_w:.0f} W), same {tflop:.1f} TFLOP:")
    print(f"  mean power {sum(capped) / max(1, len(capped)):.1f} W, {w1.joules / tflop:.2f} J/TFLOP")
    print(f"  energy ratio capped/default: {w1.joules / w0.joules:.3f}")
    print(f"  time ratio capped/default:   {w1.seconds / w0.seconds:.3f}")
    after = sampler.sample().gpus[0]
    print(f"  limit restored to {after.power_limit_w} W")
    sampler.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
