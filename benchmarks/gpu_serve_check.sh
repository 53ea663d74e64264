#!/usr/bin/env bash
# Serve the 13b preset (random weights, bf16) on ONE NVIDIA GPU through llmctl (its serving pod's
# server on vLLM) and through `vllm serve`, with the same prompts and concurrency, and print output
# tokens/s, time to first token and J/token (NVML energy). One prepared run, under 8 minutes.
# On a machine without a GPU it says so and exits 0. Usage: benchmarks/gpu_serve_check.sh [--requests N]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_serve_check: no NVIDIA GPU on this machine (nvidia-smi finds none); nothing to check"
  exit 0
fi
if ! "$PY" -c "import vllm, torch; assert torch.cuda.is_available()" 2>/dev/null; then
  echo "gpu_serve_check: needs vllm (the CUDA build) and a CUDA torch in $PY: scripts/setup installs vllm on a GPU machine" >&2
  exit 1
fi
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec timeout 480 "$PY" benchmarks/gpu_serve_check.py "$@"
