#!/usr/bin/env bash
# slurm/pipeline.sh: the compression pipeline as dependent Slurm jobs, one job per stage; each
# starts only when the one before succeeded (--dependency=afterok).
#
# usage: slurm/pipeline.sh [OPTIONS] RECIPE.yaml [RECIPE.yaml ...] [STAGE.KEY=VALUE ...]
#
#   RECIPE.yaml          one per stage, in pipeline order. The stage comes from the file name
#                        (import_hf_*, stats_*, search_*, plan_*, prune_*, distill_*,
#                        export_hf_*, pretrain_*, eval_*), or write STAGE=RECIPE.yaml. Its
#                        job is slurm/<stage>.sbatch RECIPE.yaml [KEY=VALUE ...] (resources:
#                        that file's #SBATCH lines).
#   STAGE.KEY=VALUE      an override for one stage: only that stage's job gets KEY=VALUE,
#                        e.g. stats.samples=2048 or distill.train.steps=1000. STAGE is a stage
#                        of the chain (import-hf or import_hf), or its position (1 = the first
#                        recipe), needed when a stage appears twice: 5.train.steps=1000.
#                        An argument with no dot before its '=' is STAGE=RECIPE.yaml.
#   -n, --dry-run        check, print what each stage reads and writes and the sbatch
#                        commands; submit nothing (JOBID_N: the id stage N's job will get)
#   --sbatch STAGE=OPTS  sbatch options for one stage's job, split at spaces, e.g.
#                        --sbatch distill='--nodes=16 --time=48:00:00' (SBATCH_ARGS: every job)
#   --name NAME          the pipeline's state folder logs/pipeline/NAME/ (default: a hash of
#                        the stages and recipes)
#   --no-check           submit without the recipe check below
#   -h, --help           this text
#
# The paper's Nemotron-H 8B -> 4B chain; each recipe reads what the one before it writes
# (runs/nemotron_h_8b/teacher, .../stats, runs/nemotron_h_4b/search, .../pruned, ...):
#   slurm/pipeline.sh configs/import_hf_nemotron_h_8b.yaml configs/stats_nemotron_h_8b.yaml \
#       configs/search_nemotron_h_8b_to_4b.yaml configs/prune_nemotron_h_8b_to_4b.yaml \
#       configs/distill_nemotron_h_8b_to_4b.yaml configs/export_hf_nemotron_h_4b.yaml \
#       import-hf.hf_dir=/models/Nemotron-H-8B-Base-8K \
#       --sbatch search=--nodes=16 --sbatch distill=--nodes=16
# Without the search (the paper's 4B sizes given): configs/plan_nemotron_h_8b_to_4b.yaml in
# place of the search recipe (and of its --sbatch), and prune.plan=runs/nemotron_h_4b/plan/plan.json.
#
# Check, before anything is submitted: each recipe is loaded with its overrides as its job will
# load it (unknown keys, wrong types: refused), and every path a stage reads must be written
# by an earlier stage or exist (a dry run only marks it NOT FOUND); slurm/pipeline_check.py,
# run with $PYTHON (default .venv/bin/python). RECIPE paths are relative to where you run this;
# paths inside recipes and overrides to the repository root, where every job runs. Refusals:
# one line, exit 2.
#
# Resume: the state (job ids, each stage's job command, and a .done file each job writes when
# its stage completed) is in logs/pipeline/NAME/. The same command again skips completed
# stages, keeps queued or running jobs, and resubmits a failed stage with every stage after
# it (their old jobs, stuck on the failed dependency, are cancelled). A stage whose recipe
# or overrides changed (same NAME) is resubmitted with every stage after it; if its old job
# is still queued or running, the command is refused (scancel it, or use another --name).
# A job that hit its time limit requeues itself (slurm/minitron.sbatch) and resumes from its
# last save.
set -euo pipefail
HERE=$(pwd -P)
cd "$(dirname "$0")/.."
REPO=$(pwd -P)
SBATCH=${SBATCH:-sbatch}; SQUEUE=${SQUEUE:-squeue}; SCANCEL=${SCANCEL:-scancel}
PY=${PYTHON:-.venv/bin/python}
KNOWN=(import-hf stats search plan prune distill export-hf pretrain eval)

show_help() { awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0; }
die() { echo "error: $*" >&2; exit 2; }

DRY=0; NAME=""; CHECK=1; RECIPES=(); OVERRIDES=(); SBOPTS=()
while [ $# -gt 0 ]; do
  case "$1" in
    -n|--dry-run) DRY=1 ;;
    --name) [ $# -ge 2 ] || die "--name needs a value"; NAME=$2; shift ;;
    --name=*) NAME=${1#--name=} ;;
    --sbatch) [ $# -ge 2 ] || die "--sbatch needs STAGE=OPTIONS, e.g. --sbatch distill=--nodes=16"
              SBOPTS+=("$2"); shift ;;
    --sbatch=*) SBOPTS+=("${1#--sbatch=}") ;;
    --no-check) CHECK=0 ;;
    -h|--help) show_help ;;
    -*) die "unknown option $1 (slurm/pipeline.sh -h lists the options)" ;;
    *=*) lhs=${1%%=*}
         if [[ "$lhs" == *.* ]]; then OVERRIDES+=("$1"); else RECIPES+=("$1"); fi ;;
    *) RECIPES+=("$1") ;;
  esac
  shift
done
[ ${#RECIPES[@]} -gt 0 ] || die "no recipe given: slurm/pipeline.sh RECIPE.yaml [RECIPE.yaml ...] [STAGE.KEY=VALUE ...] (-h for help)"
if [ -n "$NAME" ] && ! [[ "$NAME" =~ ^[A-Za-z0-9._-]+$ ]]; then
  die "--name $NAME: use letters, digits, '.', '_' and '-' (it names a folder in logs/pipeline/)"
fi

canon() {  # stage name as typed (import_hf / import-hf) -> import-hf, or "" when unknown
  local s=${1//_/-} k
  for k in "${KNOWN[@]}"; do [ "$k" = "$s" ] && { echo "$k"; return; }; done
  echo ""
}
stage_of_file() {  # recipe file name -> stage, or ""
  case "$(basename "$1")" in
    import_hf*|import-hf*) echo import-hf ;;
    export_hf*|export-hf*) echo export-hf ;;
    stats*) echo stats ;; plan*) echo plan ;; prune*) echo prune ;; distill*) echo distill ;;
    pretrain*) echo pretrain ;; search*) echo search ;; eval*) echo eval ;;
    *) echo "" ;;
  esac
}

STAGES=(); FILES=()
for r in "${RECIPES[@]}"; do
  if [[ "$r" == *=* ]]; then
    typed=${r%%=*}; f=${r#*=}; st=$(canon "$typed")
    if [ -z "$st" ]; then
      if [[ "$f" == *.yaml || "$f" == *.yml ]]; then
        die "$r: unknown stage '$typed' (no slurm/${typed//-/_}.sbatch); stages: ${KNOWN[*]}"
      fi
      die "$r: an override names its stage: STAGE.$r, e.g. stats.$r (slurm/pipeline.sh -h)"
    fi
  else
    f=$r; st=$(stage_of_file "$r")
    [ -n "$st" ] || die "cannot tell the stage of $r from its name; write STAGE=$r (stages: ${KNOWN[*]})"
  fi
  [[ "$f" == /* ]] || f="$HERE/$f"
  [ -f "$f" ] || die "recipe ${r#*=} does not exist"
  [[ "$f" == *.yaml ]] || die "recipe ${r#*=}: name it *.yaml (the sbatch files tell a recipe from overrides by that)"
  [ -f "slurm/${st//-/_}.sbatch" ] || die "$r: stage '$st' has no slurm/${st//-/_}.sbatch"
  f="$(cd "$(dirname "$f")" && pwd -P)/$(basename "$f")"
  [[ "$f" == "$REPO"/* ]] && f=${f#"$REPO"/}
  STAGES+=("$st"); FILES+=("$f")
done

chain() {  # "1 import-hf, 2 stats, ..."
  local i out=""
  for i in "${!STAGES[@]}"; do out+="${out:+, }$((i + 1)) ${STAGES[$i]}"; done
  echo "$out"
}
resolve() {  # TARGET (stage name or 1-based position) ARG -> 0-based stage index
  local t=$1 arg=$2 st i hits=()
  if [[ "$t" =~ ^[0-9]+$ ]]; then
    if [ "$t" -lt 1 ] || [ "$t" -gt ${#STAGES[@]} ]; then
      die "$arg: there is no stage $t (the chain: $(chain))"
    fi
    echo $((t - 1)); return
  fi
  st=$(canon "$t")
  [ -n "$st" ] || die "$arg: '$t' is not a stage; name a stage of the chain, or its position: $(chain)"
  for i in "${!STAGES[@]}"; do [ "${STAGES[$i]}" = "$st" ] && hits+=("$i"); done
  [ ${#hits[@]} -gt 0 ] || die "$arg: the chain has no $st stage (the chain: $(chain))"
  if [ ${#hits[@]} -gt 1 ]; then
    die "$arg: the chain has ${#hits[@]} $st stages; name one by its position, e.g. $((hits[0] + 1)).${arg#*.} (the chain: $(chain))"
  fi
  echo "${hits[0]}"
}

OV_IDX=(); OV_KV=()
for o in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do
  lhs=${o%%=*}; t=${lhs%%.*}; key=${lhs#*.}
  idx=$(resolve "$t" "$o")
  [[ "$key" =~ ^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$ ]] \
    || die "$o: '$key' is not a dotted.key (an override is STAGE.KEY=VALUE)"
  OV_IDX+=("$idx"); OV_KV+=("${o#*.}")
done
SB_IDX=(); SB_OPT=()
for s in ${SBOPTS[@]+"${SBOPTS[@]}"}; do
  [[ "$s" == *=* ]] || die "--sbatch $s: write STAGE=OPTIONS, e.g. --sbatch distill=--nodes=16"
  idx=$(resolve "${s%%=*}" "--sbatch $s")
  SB_IDX+=("$idx"); SB_OPT+=("${s#*=}")
done
job_of() {  # stage index -> JOB=(sbatch file, recipe, overrides)
  local i=$1 k
  JOB=("slurm/${STAGES[$i]//-/_}.sbatch" "${FILES[$i]}")
  for k in ${OV_IDX[@]+"${!OV_IDX[@]}"}; do [ "${OV_IDX[$k]}" = "$i" ] && JOB+=("${OV_KV[$k]}"); done
  return 0
}
opts_of() {  # stage index -> OPTS=(its --sbatch options, split at spaces)
  local i=$1 k w
  OPTS=()
  for k in ${SB_IDX[@]+"${!SB_IDX[@]}"}; do
    # shellcheck disable=SC2206  # split at spaces, as documented
    [ "${SB_IDX[$k]}" = "$i" ] && { w=(${SB_OPT[$k]}); OPTS+=("${w[@]}"); }
  done
  return 0
}

if [ -z "$NAME" ]; then
  NAME=$(printf '%s\n' "${STAGES[@]}" "${FILES[@]}" | sha1sum | cut -c1-10)
fi
STATE="logs/pipeline/$NAME"
echo "[pipeline] $NAME: ${STAGES[*]} (state in $STATE)"

if [ "$CHECK" = 1 ]; then
  command -v "$PY" >/dev/null 2>&1 \
    || die "cannot check the recipes: no python at $PY (set PYTHON=..., or --no-check to submit unchecked)"
  args=(); [ "$DRY" = 1 ] && args+=(--dry-run)
  for i in "${!STAGES[@]}"; do job_of "$i"; args+=(-- "${STAGES[$i]}" "${JOB[@]:1}"); done
  rc=0; "$PY" slurm/pipeline_check.py "${args[@]}" || rc=$?
  [ "$rc" = 0 ] || exit "$rc"
fi

job_alive() {  # a queued / running / requeued job still counts
  local id=$1 st
  st=$($SQUEUE -h -j "$id" -o %T 2>/dev/null | head -n 1 || true)
  case "$st" in PENDING|RUNNING|CONFIGURING|REQUEUED|REQUEUE_HOLD|REQUEUE_FED|SUSPENDED|COMPLETING|RESIZING) return 0 ;; esac
  return 1
}

[ "$DRY" = 1 ] || mkdir -p "$STATE"
prev=""; resubmit=0
for i in "${!STAGES[@]}"; do
  st=${STAGES[$i]}; n=$((i + 1)); key="$n-$st"
  done_file="$STATE/$key.done"; id_file="$STATE/$key.job"; cmd_file="$STATE/$key.cmd"
  job_of "$i"; opts_of "$i"
  fp=$(printf '%q ' "${JOB[@]}")
  old=$(cat "$id_file" 2>/dev/null || true); old_fp=$(cat "$cmd_file" 2>/dev/null || true)
  changed=0; [ -n "$old_fp" ] && [ "$old_fp" != "$fp" ] && changed=1
  alive=0; [ -n "$old" ] && job_alive "$old" && alive=1
  if [ "$resubmit" = 0 ] && [ "$changed" = 0 ] && [ -f "$done_file" ]; then
    echo "[pipeline] $key: done ($(cat "$done_file")), skipped"; prev=""; continue
  fi
  if [ "$resubmit" = 0 ] && [ "$alive" = 1 ]; then
    if [ "$changed" = 1 ]; then
      die "stage $n $st changed since job $old was submitted (was: $old_fp), and that job is still" \
          "queued or running: scancel $old first, or give another --name for a separate pipeline"
    fi
    echo "[pipeline] $key: job $old still queued or running, kept"; prev=$old; continue
  fi
  [ "$changed" = 1 ] && echo "[pipeline] $key: changed since its last submission (was: $old_fp): resubmitted with every stage after it"
  if [ "$alive" = 1 ]; then  # waits on a failed stage that is being replaced
    if [ "$DRY" = 1 ]; then echo "[pipeline] $key: would cancel job $old"
    else echo "[pipeline] $key: cancelling job $old"; $SCANCEL "$old" || true; fi
  fi
  resubmit=1
  # shellcheck disable=SC2206  # SBATCH and SBATCH_ARGS split at spaces, as documented
  cmd=($SBATCH --parsable ${SBATCH_ARGS:-})
  cmd+=(${OPTS[@]+"${OPTS[@]}"} --job-name "minitron-$st-$NAME" --export "ALL,MINITRON_DONE_FILE=$REPO/$done_file")
  [ -n "$prev" ] && cmd+=(--dependency "afterok:$prev")
  cmd+=("${JOB[@]}")
  if [ "$DRY" = 1 ]; then
    line=$(printf '%q ' "${cmd[@]}"); echo "${line% }"
    prev="JOBID_$n"
    continue
  fi
  rm -f "$done_file"
  out=$("${cmd[@]}")
  id=${out%%;*}
  [[ "$id" =~ ^[0-9]+$ ]] || { echo "error: sbatch answered '$out' for $key" >&2; exit 1; }
  echo "$id" > "$id_file"; printf '%s' "$fp" > "$cmd_file"
  echo "[pipeline] $key: submitted job $id${prev:+ (after $prev)}"
  prev=$id
done
