#!/usr/bin/env bash
# Exercise the real NVML path on a machine with an NVIDIA GPU: a short bf16 matmul load, power
# samples, energy counter vs integrated power, joules per TFLOP, and one power cap's effect.
# On a machine without a GPU it says so and exits 0. Usage: benchmarks/gpu_telemetry_check.sh [--seconds S]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if ! command -v nvidia-smi >/dev/null 2>&1 && ! { ldconfig -p 2>/dev/null | grep -q 'libnvidia-ml\.so\.1'; }; then
  echo "gpu_telemetry_check: no NVIDIA driver on this machine (no nvidia-smi, no libnvidia-ml.so.1); nothing to check"
  exit 0
fi
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" benchmarks/gpu_telemetry_check.py "$@"
