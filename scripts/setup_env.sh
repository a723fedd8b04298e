#!/usr/bin/env bash
# Create (or reuse) the repo's .venv and install megatron_minitron with what it needs.
# CPU machines get torch's CPU build (pinned, installed first so nothing pulls a CUDA
# build); a GPU node keeps whatever CUDA torch it has. Usage: scripts/setup_env.sh [VENV]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PY=${PYTHON:-python3}
TORCH_CPU=${TORCH_CPU:-torch==2.13.0}
MCORE=${MCORE:-megatron-core==0.16.1}
stamp="$VENV/.minitron-installed"
want="$TORCH_CPU $MCORE $(sha256sum setup.py | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    pip install -q torch
  else
    pip install -q "$TORCH_CPU"
  fi
fi
# numpy and packaging first: otherwise pip may try to build a numpy sdist for megatron-core
pip install -q numpy "packaging>=24.2"
case "$MCORE" in
  *0.19*|*0.2*) pip install -q --ignore-requires-python "$MCORE" ;;  # wheel is cp311-tagged
  *) pip install -q "$MCORE" ;;
esac
pip install -q -e ".[test]"
echo "$want" > "$stamp"
