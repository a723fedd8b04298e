#!/usr/bin/env bash
# Prepared GPU check (see scripts/gpu_check.py): on one CUDA GPU with mamba_ssm installed,
# no network, a few minutes:
#   bash scripts/gpu_check.sh                 # GPU figures -> runs/gpu_check/summary.json
#   bash scripts/gpu_check.sh --dry           # CPU dry mode (what CI runs; no GPU figures)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONWARNINGS=ignore
timeout "${GPU_CHECK_TIMEOUT:-480}" "$PY" scripts/gpu_check.py "$@"
