"""`ablations` stage: the paper's ablations on a trained teacher and its importance file,
as a claims table (claim, the paper's finding, our figure, holds?).

    python -m megatron_minitron ablations -c configs/ablations_default.yaml   # one process

Every variant is a plan (plan.targets.make_plan with one setting changed). ZERO-SHOT: the
teacher's tensors are loaded once; each plan's pruned model is filled in memory by the
prune rules (rewrite/rules.py) and scored on the fixed validation set. KD: the plan is
pruned for real (`prune`), distilled from the teacher for `kd.steps` steps per seed
(`distill`, data order = the seed) and scored on the same fixed set; results are the mean
over seeds. Results are cached by the plan's keep sets, so a variant shared by two
ablations (or two settings that select the same sets) is measured once, and an interrupted
run resumes (results.json). Ablations (`only` selects a subset):

  group        group-aware vs group-unaware Mamba heads (zero-shot at each head target, KD at the first)
  source       Mamba score from x vs z vs y (zero-shot, every `source_targets` entry)
  flap         L2 vs FLAP (zero-shot at each head target and the default plan; KD on the default plan)
  heads        Mamba heads vs head channels at equal d_inner (zero-shot, KD, forward throughput)
  width_depth  width-only vs depth-only vs depth+width at the budget of dropping `depth_drop`
               layers: the best zero-shot candidate of each kind (search space), equal KD
  depth        depth ranking KL vs cosine: layers dropped, zero-shot loss after dropping
  ffn          FFN score before (eq. 26) vs after the activation on the default plan (zero-shot, KD)
  cache        KD of the default plan from a cache of the teacher's top-`cache_k` logits
               (`teacher-logits`, written per seed) vs online full-vocabulary KD (issue 22)
  experts      (MoE teacher, `moe`) routed experts pruned to moe.num_moe_experts by the default
               score (out) vs the alternatives (mass, freq) vs a seeded random keep set per seed
               (zero-shot; KD for moe.kd_scores and the random draws)
  expert_ffn   (MoE teacher) experts pruned vs every expert's FFN pruned to the closest total and
               the closest active parameter count (zero-shot, KD)

The MoE two run on cfg.moe.teacher / cfg.moe.importance with moe.kd_steps. With `only` empty
they are skipped when that teacher or its importance file is missing (the claims table gets
a line saying how to make them); named in `only`, a missing one is refused.

Outputs (output_dir): claims.md / claims.json, results.json (results_moe.json: the MoE
variants), candidates_loss_vs_throughput.png.

Files: stage.py the settings and the run; lab.py what every ablation shares (variants,
zero-shot scoring in memory, KD, the results cache); dense.py and moe.py the two groups;
claims.py the claims table's rows.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError, DataConfig, TrainConfig
from ..distill.stage import LossConfig
from ..plan.targets import TargetConfig
from ..search.space import SearchSpace
from . import claims as CL
from .dense import _run_dense
from .lab import ABLATIONS, DENSE, MOE
from .moe import _run_moe, moe_missing, validate_moe

def _default_kd() -> TrainConfig:
    return TrainConfig(steps=40, global_batch_size=16, micro_batch_size=8, lr=1e-3, min_lr=1e-4,
                       warmup_steps=4, log_interval=10, eval_interval=1000, eval_iters=4,
                       save_interval=1000)


@dataclass
class MoEAblationsConfig:
    """The MoE ablations (`experts`, `expert_ffn`) on a mixture-of-experts teacher trained like
    the dense one (configs/pretrain_moe_default.yaml) and its `stats` file (source `moe`)."""

    teacher: str = "runs/moe/teacher"
    importance: str = "runs/moe/stats/importance.pt"
    num_moe_experts: int = 0  # routed experts kept per E layer; 0 = half the teacher's
    scores: list[str] = field(default_factory=lambda: ["out", "mass", "freq"])  # experts: zero-shot
    kd_scores: list[str] = field(default_factory=lambda: ["out", "mass"])  # ... and after KD
    kd_steps: int = 0  # KD steps of every MoE variant; 0 = kd.steps
    kd_equal_active: bool = True  # expert_ffn: KD the equal-active pair too (else zero-shot only)


@dataclass
class AblationsConfig:
    teacher: str = "runs/default/teacher"
    importance: str = "runs/default/stats/importance.pt"  # needs x, z, y, flap, ffn, ffn_pre, kl, cosine
    output_dir: str = "runs/ablations"
    only: list[str] = field(default_factory=list)  # subset of ABLATIONS; empty = all (MoE: if trained)
    # the main job's plan target (configs/plan_default.yaml): flap and ffn ablate on it
    default_target: TargetConfig = field(default_factory=lambda: TargetConfig(
        hidden_size=160, ffn_hidden_size=384, mamba_num_heads=6, mamba_head_dim=24))
    head_targets: list[int] = field(default_factory=lambda: [4, 6])  # Mamba heads kept (group, flap)
    # (mamba_num_heads, mamba_head_dim) configurations for x vs z vs y; 0 keeps the teacher's
    source_targets: list[list[int]] = field(default_factory=lambda: [[4, 0], [0, 16], [6, 24]])
    depth_drop: int = 2  # width_depth: the budget is the teacher minus these many layers (KL order)
    depth_drops: list[int] = field(default_factory=lambda: [1, 2, 3])  # depth: layers dropped
    space: SearchSpace = field(default_factory=lambda: SearchSpace(  # width_depth candidates
        num_layers=[5, 6, 7], hidden_size=[192, 224, 256], ffn_hidden_size="256:768:128",
        mamba_num_heads=[4, 6, 8], mamba_head_dim=[16, 24, 32]))
    tolerance: float = 0.03  # width_depth: candidates within the budget +- this share
    max_per_kind: int = 8  # width_depth: zero-shot score at most this many per kind (closest first)
    data: DataConfig = field(default_factory=DataConfig)
    seq_length: int = 0  # 0 = the teacher's
    eval_iters: int = 8  # fixed validation set: eval_iters x micro_batch_size sequences
    micro_batch_size: int = 8
    throughput_iters: int = 4
    kd: TrainConfig = field(default_factory=_default_kd)
    kd_loss: LossConfig = field(default_factory=LossConfig)
    seeds: list[int] = field(default_factory=lambda: [1])  # KD data orders; results are their mean
    cache_k: int = 32  # cache: the teacher's top-K tokens cached per position
    cache_tolerance: float = 0.01  # cache: the claim holds when |cached - online| <= this on every seed
    # the teacher's logits of one seed's KD tokens kept in memory for that seed's other KDs
    # (exact: the KDs equal ones that run the teacher); 0 = run the teacher in every KD
    teacher_memo_gb: float = 4.0
    keep_checkpoints: bool = False
    resume: bool = True
    moe: MoEAblationsConfig = field(default_factory=MoEAblationsConfig)


# ----------------------------------------------------------------------------- checks


def validate(cfg: AblationsConfig) -> tuple[list[str], list[str]]:
    """Settings every ablation shares -> (dense ablations to run, MoE ablations to run)."""
    from ..plan.targets import EXPERT_SCORES

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("ablations run in one process (python, not torchrun)")
    bad = [a for a in cfg.only if a not in ABLATIONS]
    if bad:
        raise ConfigError(f"only={cfg.only}: unknown ablation(s) {bad}; choose from {list(ABLATIONS)}")
    for key in ("eval_iters", "micro_batch_size", "throughput_iters", "max_per_kind"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be > 0")
    if not cfg.seeds:
        raise ConfigError("seeds is empty; give at least one KD seed, e.g. [1]")
    if not cfg.teacher_memo_gb >= 0:
        raise ConfigError(f"teacher_memo_gb={cfg.teacher_memo_gb} must be >= 0 (0 = no memo)")
    if cfg.cache_k < 1 or not cfg.cache_tolerance >= 0:
        raise ConfigError(f"cache_k={cfg.cache_k} must be >= 1 and cache_tolerance={cfg.cache_tolerance} >= 0")
    cfg.data.validate()
    cfg.kd.validate(1, prefix="kd")
    cfg.kd_loss.validate("kd_loss")
    m = cfg.moe
    bad = [s for s in m.scores if s not in EXPERT_SCORES]
    if bad or not m.scores:
        raise ConfigError(f"moe.scores={m.scores}: choose from {list(EXPERT_SCORES)}")
    if any(s not in m.scores for s in m.kd_scores):
        raise ConfigError(f"moe.kd_scores={m.kd_scores} must be a subset of moe.scores={m.scores}")
    if m.kd_steps < 0 or m.num_moe_experts < 0:
        raise ConfigError("moe.kd_steps and moe.num_moe_experts must be >= 0 (0 = the default)")
    todo = cfg.only or list(ABLATIONS)
    return [a for a in todo if a in DENSE], [a for a in todo if a in MOE]


# ----------------------------------------------------------------------------- the stage


def run_ablations(cfg: AblationsConfig) -> dict:
    t_start = time.time()
    dense, moe = validate(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, detail, heads, plot = [], {}, [], None
    teacher = None
    if dense:
        rows, detail, head, plot = _run_dense(cfg, dense, out)
        teacher = detail.pop("teacher")
        heads.append(head)
    if moe:
        why = moe_missing(cfg)
        if why and cfg.only:  # asked for by name: refuse (validate_moe says why)
            validate_moe(cfg)
        if why:  # `only` empty: the dense table, and a line saying how to add the MoE rows
            print(f"[ablations] MoE ablations skipped: {why}", flush=True)
            rows.append(CL.moe_skipped(why))
        else:
            r, d, head = _run_moe(cfg, moe, out)
            rows += r
            detail["moe"] = d
            heads.append(head)
    title = "Ablations (paper sec. 4" + (", and MoE: issue 19" if moe else "") + ") on the default-scale teachers"
    md = (f"# {title}\n\n" + "\n\n".join(heads)
          + "\n\n" + CL.markdown(rows) + (f"\n![candidates]({Path(plot).name})\n" if plot else ""))
    (out / "claims.md").write_text(md)
    (out / "claims.json").write_text(json.dumps({"rows": rows, "detail": detail, "teacher": teacher}, indent=1))
    summary = {"stage": "ablations", "claims": rows, "output_dir": str(out),
               "elapsed_seconds": time.time() - t_start}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n" + md, flush=True)
    print(f"[ablations] wrote {out / 'claims.md'} in {summary['elapsed_seconds']:.0f} s", flush=True)
    return summary
