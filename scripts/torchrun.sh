#!/usr/bin/env bash
# One node: the torchrun line for any stage.
#   scripts/torchrun.sh STAGE RECIPE.yaml [dotted.key=value ...]
# NPROC (default: GPUs on this node, else 2), NNODES/NODE_RANK/MASTER_ADDR/MASTER_PORT for a
# hand-made multi-node launch, DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 STAGE RECIPE.yaml [key=value ...]" >&2; exit 2; }
STAGE=$1; RECIPE=$2; shift 2
cd "$(dirname "$0")/.."
if [ -z "${NPROC:-}" ]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [ "${NPROC:-0}" -gt 0 ] || NPROC=2
fi
PY=${PYTHON:-.venv/bin/python}
cmd=("$PY" -m torch.distributed.run --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}"
     --nproc_per_node "$NPROC" --master_addr "${MASTER_ADDR:-127.0.0.1}"
     --master_port "${MASTER_PORT:-29500}"
     -m megatron_minitron "$STAGE" --config "$RECIPE" "$@")
if [ "${DRY_RUN:-0}" = "1" ]; then
  printf '%q ' "${cmd[@]}"; echo
else
  exec "${cmd[@]}"
fi
