#!/usr/bin/env bash
# The main job on the embedded default (CPU, 2 cores): set up .venv, prepare the real
# corpus, pretrain the small hybrid teacher (reused if already trained), evaluate it.
# Every stage is the same command a user types; NPROC=2 runs torchrun stages on 2 ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONWARNINGS=ignore OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
bash scripts/setup_env.sh .venv
PY=.venv/bin/python
RUN=${RUN_DIR:-runs/default}
t0=$(date +%s)
$PY -m megatron_minitron prepare-data -c configs/prepare_data_default.yaml
$PY -m megatron_minitron pretrain -c configs/pretrain_default.yaml output_dir=$RUN/teacher
$PY -m megatron_minitron eval -c configs/eval_default.yaml checkpoint=$RUN/teacher
echo "[main job] finished in $(( $(date +%s) - t0 )) s; outputs under $RUN/"
