#!/usr/bin/env bash
# The compression pipeline as dependent Slurm jobs: each stage is one job that starts only
# when the previous one succeeded (--dependency=afterok).
#
#   slurm/pipeline.sh [-n|--dry-run] [--name NAME] RECIPE.yaml [RECIPE.yaml ...]
#
# One RECIPE per stage, in pipeline order, e.g.
#   slurm/pipeline.sh configs/import_hf_8b.yaml configs/stats_8b.yaml configs/plan_8b.yaml \
#       configs/prune_8b.yaml configs/distill_nemotron_h_8b_to_4b.yaml configs/export_hf_4b.yaml
# The stage comes from the file name (import_hf_*, stats_*, plan_*, prune_*, distill_*,
# export_hf_*, also pretrain_*, search_*, eval_*), or is given as STAGE=RECIPE.yaml. Each
# job is slurm/<stage>.sbatch (its resources; extra sbatch options: SBATCH_ARGS).
#
# Resume: the state (job ids, and a .done file each job writes when its stage completed)
# lives in logs/pipeline/NAME/ (NAME defaults to a hash of the arguments). Running the same
# command again skips completed stages, keeps jobs that are still queued or running, and
# resubmits a failed stage with every stage after it (their old jobs, stuck on a failed
# dependency, are cancelled). A job that hit its time limit requeues itself
# (slurm/minitron.sbatch) and resumes from its last save.
# --dry-run prints the sbatch commands (and what would be skipped) without submitting.
set -euo pipefail
cd "$(dirname "$0")/.."
SBATCH=${SBATCH:-sbatch}; SQUEUE=${SQUEUE:-squeue}; SCANCEL=${SCANCEL:-scancel}
usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

DRY=0; NAME=""; RECIPES=()
while [ $# -gt 0 ]; do
  case "$1" in
    -n|--dry-run) DRY=1 ;;
    --name) NAME=${2:?--name needs a value}; shift ;;
    -h|--help) usage ;;
    -*) echo "error: unknown option $1" >&2; usage ;;
    *) RECIPES+=("$1") ;;
  esac
  shift
done
[ ${#RECIPES[@]} -gt 0 ] || usage

stage_of() {  # RECIPE -> stage name (or STAGE=RECIPE)
  local r=$1 base
  if [[ "$r" == *=* ]]; then echo "${r%%=*}"; return; fi
  base=$(basename "$r")
  case "$base" in
    import_hf*|import-hf*) echo import-hf ;;
    export_hf*|export-hf*) echo export-hf ;;
    stats*) echo stats ;; plan*) echo plan ;; prune*) echo prune ;; distill*) echo distill ;;
    pretrain*) echo pretrain ;; search*) echo search ;; eval*) echo eval ;;
    *) echo "" ;;
  esac
}

STAGES=(); FILES=()
for r in "${RECIPES[@]}"; do
  st=$(stage_of "$r"); f=${r#*=}
  if [ -z "$st" ]; then
    echo "error: cannot tell the stage of $r from its name; write STAGE=$r" >&2; exit 2
  fi
  sb="slurm/${st//-/_}.sbatch"
  [ -f "$sb" ] || { echo "error: $r: stage '$st' has no $sb" >&2; exit 2; }
  [ -f "$f" ] || { echo "error: recipe $f does not exist" >&2; exit 2; }
  STAGES+=("$st"); FILES+=("$f")
done

if [ -z "$NAME" ]; then
  NAME=$(printf '%s\n' "${STAGES[@]}" "${FILES[@]}" | sha1sum | cut -c1-10)
fi
STATE="logs/pipeline/$NAME"
[ "$DRY" = 1 ] || mkdir -p "$STATE"

job_alive() {  # a queued / running / requeued job still counts
  local id=$1 st
  st=$($SQUEUE -h -j "$id" -o %T 2>/dev/null | head -n 1 || true)
  case "$st" in PENDING|RUNNING|CONFIGURING|REQUEUED|REQUEUE_HOLD|REQUEUE_FED|SUSPENDED|COMPLETING|RESIZING) return 0 ;; esac
  return 1
}

echo "[pipeline] $NAME: ${STAGES[*]} (state in $STATE)"
prev=""; resubmit=0
for i in "${!STAGES[@]}"; do
  st=${STAGES[$i]}; f=${FILES[$i]}; key="$i-$st"
  done_file="$STATE/$key.done"; id_file="$STATE/$key.job"
  old=$(cat "$id_file" 2>/dev/null || true)
  if [ "$resubmit" = 0 ] && [ -f "$done_file" ]; then
    echo "[pipeline] $key: done ($(cat "$done_file")), skipped"; prev=""; continue
  fi
  if [ "$resubmit" = 0 ] && [ -n "$old" ] && job_alive "$old"; then
    echo "[pipeline] $key: job $old still queued or running, kept"; prev=$old; continue
  fi
  if [ -n "$old" ] && [ "$DRY" = 0 ] && job_alive "$old"; then
    $SCANCEL "$old" || true  # waits on a failed job that is being replaced
  fi
  resubmit=1
  cmd=($SBATCH --parsable ${SBATCH_ARGS:-} --job-name "minitron-$st-$NAME"
       --export "ALL,MINITRON_DONE_FILE=$PWD/$done_file")
  [ -n "$prev" ] && cmd+=(--dependency "afterok:$prev")
  cmd+=("slurm/${st//-/_}.sbatch" "$f")
  if [ "$DRY" = 1 ]; then
    printf '%q ' "${cmd[@]}"; echo
    prev="<job $key>"
    continue
  fi
  rm -f "$done_file"
  out=$("${cmd[@]}")
  id=${out%%;*}
  [[ "$id" =~ ^[0-9]+$ ]] || { echo "error: sbatch answered '$out' for $key" >&2; exit 1; }
  echo "$id" > "$id_file"
  echo "[pipeline] $key: submitted job $id${prev:+ (after $prev)}"
  prev=$id
done
