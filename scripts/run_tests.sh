#!/usr/bin/env bash
# Set up .venv and run the whole test suite (unit + torchrun/gloo distributed tests) on
# megatron-core 0.16.1, then the smoke subset on megatron-core 0.19.2 in .venv-mcore019.
# SKIP_MCORE019=1 skips the second part.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONWARNINGS=ignore
bash scripts/setup_env.sh .venv
.venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
if [ "${SKIP_MCORE019:-0}" != "1" ]; then
  MCORE=megatron-core==0.19.2 bash scripts/setup_env.sh .venv-mcore019
  .venv-mcore019/bin/python -m pytest -q -p no:cacheprovider -m smoke tests
fi
