"""CPU cost of the node exporter: 8 (fake) GPUs sampled at 1 Hz and served to a scraper.

Starts `llmctl telemetry serve --fake-gpus 8 --interval 1` and, beside it, a baseline process
that imports the same modules and sleeps. After both have settled it measures each process's
own CPU time (user + system, from /proc/<pid>/stat, 10 ms ticks) over the same ~20 s wall window while this script
scrapes /metrics every `--scrape-every` seconds, and prints CPU seconds per wall second for
both and their ratio. Goal: the exporter under 1% of one core.

    python benchmarks/telemetry_overhead.py [--seconds 20] [--gpus 8] [--scrape-every 1]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
BASELINE = (
    "import time, prometheus_client, pynvml, controlplane.cli.main, controlplane.telemetry.exporter, "
    "controlplane.telemetry.fake_nvml; time.sleep(3600)"
)


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process, including threads that have exited (each scrape runs on its own thread)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--scrape-every", type=float, default=1.0)
    ap.add_argument("--settle", type=float, default=3.0, help="seconds to wait after start-up before measuring")
    args = ap.parse_args()
    if not Path("/proc/self/stat").exists():
        print("telemetry_overhead: needs Linux /proc", file=sys.stderr)
        return 1
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with tempfile.TemporaryDirectory() as tmp:
        env["LLMCTL_HOME"] = tmp
        port_file = Path(tmp) / "port"
        cmd = [sys.executable, "-m", "controlplane.cli.main", "telemetry", "serve", "--fake-gpus", str(args.gpus)]
        cmd += ["--interval", "1", "--port", "0", "--port-file", str(port_file), "--node", "bench"]
        exporter = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        baseline = subprocess.Popen([sys.executable, "-c", BASELINE], cwd=REPO, env=env)
        try:
            deadline = time.monotonic() + 60
            while not port_file.exists():
                if exporter.poll() is not None or time.monotonic() > deadline:
                    print("telemetry_overhead: exporter did not start", file=sys.stderr)
                    return 1
                time.sleep(0.1)
            url = f"http://127.0.0.1:{int(port_file.read_text())}/metrics"
            time.sleep(args.settle)
            with httpx.Client(timeout=5) as client:
                size = len(client.get(url).content)
                c0, b0, t0 = cpu_seconds(exporter.pid), cpu_seconds(baseline.pid), time.monotonic()
                scrapes = 0
                while time.monotonic() - t0 < args.seconds:
                    client.get(url).raise_for_status()
                    scrapes += 1
                    time.sleep(max(0.0, args.scrape_every - (time.monotonic() - t0) % args.scrape_every))
                c1, b1, t1 = cpu_seconds(exporter.pid), cpu_seconds(baseline.pid), time.monotonic()
        finally:
            for p in (exporter, baseline):
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)
    wall = t1 - t0
    exp_ratio, base_ratio = (c1 - c0) / wall, (b1 - b0) / wall
    print(f"exporter: {args.gpus} fake GPUs sampled at 1 Hz, {scrapes} scrapes of {size} bytes over {wall:.1f} s")
    print(f"exporter CPU: {c1 - c0:.3f} s / {wall:.1f} s wall = {exp_ratio:.4%} of one core")
    print(f"baseline CPU (idle process, same imports): {b1 - b0:.3f} s = {base_ratio:.4%} of one core")
    print(f"exporter minus baseline: {exp_ratio - base_ratio:.4%} of one core (goal < 1%)")
    if base_ratio > 0:
        print(f"ratio exporter / baseline: {exp_ratio / base_ratio:.1f}x")
    else:
        print("ratio exporter / baseline: n/a (the idle baseline used less than one 10 ms tick)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
