# Sourced (not run) by scripts/run_default.sh and scripts/run_ablations.sh after they set
# JOB (the log prefix): strict mode, the repo root, the .venv, and the variables and stamp()
# both use. RUN_DIR overrides the main job's run folder (runs/default).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONWARNINGS=ignore
bash scripts/setup_env.sh .venv
PY=.venv/bin/python
RUN=${RUN_DIR:-runs/default}
M="$PY -m megatron_minitron"
t0=$(date +%s)
stamp() { echo "[$JOB] $1 done at +$(( $(date +%s) - t0 )) s"; }
