#!/usr/bin/env bash
# The paper's ablations as a claims table (runs/ablations/claims.md), one command, on the main
# job's teacher and importance file, plus the MoE rows (issue 19: expert scores vs random
# experts, experts vs expert FFN) on a small MoE hybrid trained the same way
# (configs/pretrain_moe_default.yaml -> runs/moe/teacher, its stats -> runs/moe/stats).
# Missing pieces are made first with the main job's own commands (prepare-data, pretrain,
# stats: about 5 minutes on 2 idle cores; the MoE teacher and its stats about 7 more); a
# finished main job (scripts/run_default.sh) or MoE teacher is reused as is. The dense
# ablations: 814 s measured on 2 idle cores (configs/ablations_default.yaml: 2 seeds x 40 KD
# steps); the MoE ones: see README ("Ablations"). Re-running resumes from
# runs/ablations/results.json and results_moe.json. Extra arguments go to the ablations
# stage, e.g.
#   bash scripts/run_ablations.sh seeds=[1] kd.steps=20 only=[group,heads]
#   bash scripts/run_ablations.sh only=[experts,expert_ffn] moe.kd_steps=20
JOB=ablations
set -euo pipefail
source "$(dirname "$0")/_common.sh"  # cd to the repo, .venv, PY RUN M t0 stamp
OUT=${ABLATIONS_DIR:-runs/ablations}
MOE=${MOE_RUN_DIR:-runs/moe}
$M prepare-data -c configs/prepare_data_default.yaml;                              stamp prepare-data
$M pretrain -c configs/pretrain_default.yaml output_dir=$RUN/teacher;              stamp "pretrain (reused when trained)"
# the ablations need the Mamba x/z/y, FLAP, both FFN scores and both depth rankings
if ! $PY - "$RUN/stats/importance.pt" <<'EOF'
import sys
from megatron_minitron.importance.io import ImportanceFile
try:
    imp = ImportanceFile.load(sys.argv[1])
except Exception:
    sys.exit(1)
sys.exit(0 if any("ffn_pre" in e for e in imp.layers.values()) else 1)
EOF
then
  OMP_NUM_THREADS=1 $PY -m torch.distributed.run --nproc_per_node 2 --master_port ${MASTER_PORT:-29533} \
      -m megatron_minitron stats -c configs/stats_default.yaml checkpoint=$RUN/teacher \
      output_dir=$RUN/stats parallel.tp=2 resume=false;                             stamp stats
fi
# the MoE teacher (the tiny MoE hybrid, the default teacher's recipe) and its expert scores
$M pretrain -c configs/pretrain_moe_default.yaml output_dir=$MOE/teacher;          stamp "MoE pretrain (reused when trained)"
if ! $PY - "$MOE/stats/importance.pt" <<'EOF'
import sys
from megatron_minitron.importance.io import ImportanceFile
try:
    imp = ImportanceFile.load(sys.argv[1])
except Exception:
    sys.exit(1)
sys.exit(0 if any("experts" in e for e in imp.layers.values()) else 1)
EOF
then
  OMP_NUM_THREADS=1 $PY -m torch.distributed.run --nproc_per_node 2 --master_port ${MASTER_PORT:-29533} \
      -m megatron_minitron stats -c configs/stats_default.yaml checkpoint=$MOE/teacher \
      output_dir=$MOE/stats parallel.tp=2 resume=false;                             stamp "MoE stats"
fi
$M ablations -c configs/ablations_default.yaml teacher=$RUN/teacher \
    importance=$RUN/stats/importance.pt moe.teacher=$MOE/teacher \
    moe.importance=$MOE/stats/importance.pt output_dir=$OUT "$@";                   stamp ablations
echo "[ablations] finished in $(( $(date +%s) - t0 )) s; claims table: $OUT/claims.md"
