#!/usr/bin/env bash
# The main job on the embedded default (CPU, 2 cores), every stage the same command a user
# types: set up .venv, prepare the real corpus, pretrain the small hybrid teacher (reused
# if already trained), importance statistics at TP=2 (torchrun, 2 processes), plan to about
# half the parameters, prune (rewrite the checkpoint), distil from the teacher, the same
# number of cross-entropy steps as a baseline, and a report (runs/default/report/report.md).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONWARNINGS=ignore
bash scripts/setup_env.sh .venv
PY=.venv/bin/python
RUN=${RUN_DIR:-runs/default}
M="$PY -m megatron_minitron"
TORCHRUN="$PY -m torch.distributed.run --nproc_per_node 2 --master_port ${MASTER_PORT:-29531}"
t0=$(date +%s)
stamp() { echo "[main job] $1 done at +$(( $(date +%s) - t0 )) s"; }
$M prepare-data -c configs/prepare_data_default.yaml;                              stamp prepare-data
$M pretrain -c configs/pretrain_default.yaml output_dir=$RUN/teacher;              stamp pretrain
OMP_NUM_THREADS=1 $TORCHRUN -m megatron_minitron stats -c configs/stats_default.yaml \
    checkpoint=$RUN/teacher output_dir=$RUN/stats parallel.tp=2;                     stamp stats
$M plan -c configs/plan_default.yaml importance=$RUN/stats/importance.pt output_dir=$RUN/plan
stamp plan
$M prune -c configs/prune_default.yaml checkpoint=$RUN/teacher plan=$RUN/plan/plan.json \
    output=$RUN/pruned overwrite=true;                                               stamp prune
$M distill -c configs/distill_default.yaml student=$RUN/pruned teacher=$RUN/teacher \
    output_dir=$RUN/distilled;                                                       stamp distill
$M distill -c configs/distill_default.yaml student=$RUN/pruned teacher=$RUN/teacher \
    output_dir=$RUN/ce_baseline loss.alpha_kd=0;                                     stamp ce-baseline
$M report -c configs/report_default.yaml run_dir=$RUN;                              stamp report
echo "[main job] finished in $(( $(date +%s) - t0 )) s; report: $RUN/report/report.md"
