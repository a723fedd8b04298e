"""`plan` stage: importance file + target -> plan.json (rank 0 computes; every rank of
`prune` reads it). Writes <output_dir>/plan.json, summary.json and plan_summary.txt."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ParallelConfig, check_ep_used
from .targets import MOE_AXES, TargetConfig, make_plan, summary_lines


@dataclass
class PlanConfig:
    importance: str = "runs/stats/importance.pt"
    output_dir: str = "runs/plan"
    target: TargetConfig = field(default_factory=TargetConfig)
    mamba_source: str = "x"  # x | z | y: which activation scores Mamba heads/channels
    mamba_metric: str = "l2"  # l2 (paper eq. 19-24) | flap (sec. 3.3)
    order: str = "sorted"  # sorted | ranked (functionally identical; see targets.make_plan)
    # FFN neuron score: post = linear_fc2 input, after the activation (Model Optimizer's);
    # pre = first projection output, before it (paper eq. 26)
    ffn_source: str = "post"
    # aware (eq. 17: heads ranked within their group) | unaware (ablation baseline: ranked
    # over the layer, then forced into groups; changes the function, never use it for real)
    mamba_grouping: str = "aware"
    # which score ranks each MoE layer's routed experts for target.num_moe_experts: out (the
    # expert output's norm weighted by its routing weight) | mass (routing weight summed over
    # tokens) | freq (tokens routed to it)
    expert_score: str = "out"
    # The layout the PRUNED model will run at: sizes must divide by it.
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


def plan_for(cfg: PlanConfig, imp):
    """The plan stage's make_plan call with every setting of the recipe (the run and its
    dry run both use it)."""
    return make_plan(imp, cfg.target, mamba_source=cfg.mamba_source, mamba_metric=cfg.mamba_metric,
                     order=cfg.order, tp=cfg.parallel.tp, pp=cfg.parallel.pp,
                     ffn_source=cfg.ffn_source, mamba_grouping=cfg.mamba_grouping,
                     ep=cfg.parallel.ep, expert_score=cfg.expert_score)


def run_plan(cfg: PlanConfig) -> dict:
    from ..importance.io import ImportanceFile

    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: rank 0 plans, the rest idle
        return {}
    cfg.parallel.validate()
    imp = ImportanceFile.load(cfg.importance)
    check_ep_used(cfg.parallel.ep, imp.model)
    plan = plan_for(cfg, imp)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan.save(out / "plan.json")
    lines = summary_lines(plan)
    (out / "plan_summary.txt").write_text("\n".join(lines) + "\n")
    s, t = plan.source, plan.target
    summary = {
        "plan": str(out / "plan.json"),
        "importance": str(cfg.importance),
        "source": s.to_dict(), "target": t.to_dict(),
        "dropped_layers": plan.dropped_layers,
        "params_before": plan.params_before, "params_after": plan.params_after,
        "param_share_kept": plan.params_after["total"] / plan.params_before["total"],
        "axes": {a: {"before": getattr(s, a), "after": getattr(t, a),
                     "kept": getattr(t, a) / getattr(s, a)}
                 for a in ("hidden_size", "ffn_hidden_size", "mamba_num_heads", "mamba_head_dim",
                           "num_attention_heads", "num_layers") + (MOE_AXES if s.is_moe else ())
                 if getattr(s, a)},
        "settings": plan.settings,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n".join(lines), flush=True)
    print(f"plan written to {out / 'plan.json'}", flush=True)
    return summary
