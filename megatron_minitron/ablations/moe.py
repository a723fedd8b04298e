"""The mixture-of-experts ablations (issue 19) on cfg.moe.teacher: experts (out vs mass /
freq vs seeded random keep sets) and expert_ffn (experts vs expert FFN at equal total and
active parameters); stage.py says what each measures."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config import ConfigError
from ..plan.targets import TargetConfig
from . import claims as CL
from .lab import MOE, Lab, Results, Variant, _fingerprint, _target, planned, run_kds

if TYPE_CHECKING:
    from .stage import AblationsConfig


def moe_missing(cfg: AblationsConfig) -> str:
    """Why the MoE ablations cannot run ("" when they can): teacher or importance file absent."""
    from ..train import checkpoint as ckpt

    m = cfg.moe
    if ckpt.resolve(m.teacher) is None:
        what = f"no MoE teacher at moe.teacher={m.teacher}"
    elif not os.path.isfile(m.importance):
        what = f"no MoE importance file at moe.importance={m.importance}"
    else:
        return ""
    return (f"{what}; make them with scripts/run_ablations.sh (or `pretrain -c "
            f"configs/pretrain_moe_default.yaml`, then `stats -c configs/stats_default.yaml "
            f"checkpoint=runs/moe/teacher output_dir=runs/moe/stats`)")


def validate_moe(cfg: AblationsConfig):
    from ..importance.io import ImportanceFile
    from ..train import checkpoint as ckpt
    from ..data.stage_data import check_data

    m = cfg.moe
    why = moe_missing(cfg)
    if why:
        raise ConfigError(f"the MoE ablations {list(MOE)}: {why}")
    t_cfg = ckpt.read_model_config(m.teacher)
    if not t_cfg.is_moe:
        raise ConfigError(f"moe.teacher={m.teacher!r} has no mixture-of-experts layer (pattern "
                          f"{t_cfg.pattern!r}); train configs/pretrain_moe_default.yaml")
    imp = ImportanceFile.load(m.importance)
    if imp.model.to_dict() != t_cfg.to_dict():
        raise ConfigError(f"moe.importance={m.importance!r} was collected on another model than "
                          f"moe.teacher={m.teacher!r}; run `stats` on this teacher")
    e = next((imp.layers.get(i, {}) for i, c in enumerate(t_cfg.pattern) if c == "E"), {})
    miss = [s for s in m.scores if not isinstance(e.get("experts"), dict) or s not in e["experts"]]
    if miss or "expert_ffn" not in e:
        raise ConfigError(f"moe.importance={m.importance!r} lacks the MoE scores (experts {miss}, "
                          "expert_ffn); re-run `stats` with `moe` in sources")
    kn = m.num_moe_experts or t_cfg.num_moe_experts // 2
    if not t_cfg.moe_router_topk <= kn < t_cfg.num_moe_experts:
        raise ConfigError(f"moe.num_moe_experts={kn}: keep between moe_router_topk="
                          f"{t_cfg.moe_router_topk} and {t_cfg.num_moe_experts - 1} of the teacher's "
                          f"{t_cfg.num_moe_experts} experts")
    check_data(cfg.data, t_cfg)
    return t_cfg, imp


def random_expert_plan(imp, target: TargetConfig, seed: int, ep: int = 1):
    """`make_plan(imp, target)` with every E layer's routed experts drawn at random: the
    baseline of the `experts` ablation. Per E layer i, uniform scores from a generator seeded
    by (seed, i) go through the real rule (keep.experts_keep: the same count per routing
    group), kept sorted; expert FFN keep sets, if the target prunes them, are the drawn
    experts' own top neurons. Deterministic; the plan is checked like any other (assemble_plan,
    the pruned model's validation), so `prune` and the in-memory rules accept it."""
    from ..plan import keep as K
    from ..plan.targets import assemble_plan, make_plan

    src = imp.model
    p = make_plan(imp, target, ep=ep)
    layers = {i: dict(e) for i, e in p.layers.items()}
    for i, e in layers.items():
        if "experts" not in e:
            continue
        g = torch.Generator().manual_seed(1_000_003 * int(seed) + int(i))
        drawn = K.experts_keep(torch.rand(src.num_moe_experts, generator=g), src.moe_router_num_groups,
                               len(e["experts"])).sort().values
        e["experts"] = drawn.tolist()
        if "expert_ffn" in e:
            rows = K.expert_ffn_keep(imp.layers[i]["expert_ffn"].float(), drawn, len(e["expert_ffn"][0]))
            e["expert_ffn"] = rows.sort(dim=-1).values.tolist()
    q = assemble_plan(src, p.hidden, layers, p.dropped_layers,
                      dict(p.settings, expert_score="random", expert_seed=int(seed)))
    try:
        q.target.validate(tp=1, pp=1, prefix="pruned model", ep=ep)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return q


def _ffn_matching(t_cfg, plan, key: str) -> int:
    """The moe_ffn_hidden_size whose model is closest to `plan`'s in count_parameters[key]
    (total or active); ties: the wider."""
    from ..model import count_parameters

    want = plan.params_after[key]
    return min(range(1, t_cfg.moe_ffn_hidden_size),
               key=lambda f: (abs(count_parameters(dataclasses.replace(t_cfg, moe_ffn_hidden_size=f))[key]
                                  - want), -f))


def _run_moe(cfg: AblationsConfig, todo: list[str], out: Path) -> tuple[list, dict, str]:
    """`experts` and `expert_ffn` on cfg.moe.teacher -> (claims rows, detail, markdown header).

    experts: num_moe_experts pruned (to moe.num_moe_experts) by each of moe.scores, and by a
    random keep set per seed (random_expert_plan; draw s is distilled with KD seed s);
    zero-shot, and KD for moe.kd_scores and the random draws. expert_ffn: the same expert
    count (default score) vs moe_ffn_hidden_size pruned to the closest total and the closest
    active parameter count. Results: output_dir/results_moe.json (own fingerprint, so the
    dense results stay valid whether or not the MoE teacher exists)."""
    from ..model import count_parameters
    from ..plan.stage import PlanConfig

    m = cfg.moe
    mcfg = dataclasses.replace(cfg, teacher=m.teacher, importance=m.importance,
                               kd=dataclasses.replace(cfg.kd, steps=m.kd_steps or cfg.kd.steps))
    t_cfg, imp = validate_moe(cfg)
    seq = cfg.seq_length or t_cfg.seq_length
    res = Results(out / "results_moe.json", _fingerprint(mcfg), cfg.resume)
    n = t_cfg.num_moe_experts
    kn = m.num_moe_experts or n // 2
    default = PlanConfig().expert_score
    tgt = _target(num_moe_experts=kn)

    def record(v: Variant) -> Variant:
        res.d["variants"][v.name] = {"key": v.key, "params": v.plan.params_after["total"],
                                     "active": v.plan.params_after["active"], "settings": v.opts,
                                     "target": dataclasses.asdict(v.target)}
        return v

    def variant(name, target, **opts) -> Variant:
        return record(planned(imp, name, target, **opts))

    want: list[tuple[Variant, list[int]]] = []  # (variant, KD seeds)
    scores = list(m.scores) if "experts" in todo else [default]
    scores = [default] + [s for s in scores if s != default]
    by_score = {s: variant(f"experts:{s}", tgt, expert_score=s) for s in scores}
    for s, v in by_score.items():
        kd = s in m.kd_scores or (s == default and "expert_ffn" in todo)
        want.append((v, list(cfg.seeds) if kd else []))
    rand = {}
    if "experts" in todo:
        for s in cfg.seeds:
            v = Variant(f"experts:random:r{s}", tgt, {"expert_score": "random", "seed": s})
            v.plan = random_expert_plan(imp, tgt, s)
            rand[s] = record(v)
            want.append((v, [s]))
    ffn = {}
    if "expert_ffn" in todo:
        for b in ("total", "active"):
            f = _ffn_matching(t_cfg, by_score[default].plan, b)
            ffn[b] = variant(f"expert_ffn:{b}:f{f}", _target(moe_ffn_hidden_size=f))
            want.append((ffn[b], list(cfg.seeds) if b == "total" or m.kd_equal_active else []))
    print(f"[ablations] MoE: {len(want)} variants for {', '.join(todo)}; teacher {t_cfg.pattern} "
          f"{count_parameters(t_cfg)['total']:,} params ({count_parameters(t_cfg)['active']:,} active), "
          f"{n} experts -> {kn}", flush=True)

    # zero-shot, teacher in memory
    zs = [v for v, _ in want if v.key not in res.d["zero_shot"]]
    if zs or "teacher" not in res.d["zero_shot"]:
        lab = Lab(mcfg, t_cfg, seq)
        try:
            res.put("zero_shot", "teacher", {"loss": lab.teacher_loss, "tokens_per_s": lab.teacher_tps})
            for v in zs:
                if v.key in res.d["zero_shot"]:
                    continue
                model = lab.pruned(v.plan)
                rec = {"loss": lab.loss(model), "name": v.name}
                del model
                res.put("zero_shot", v.key, rec)
                print(f"[ablations] zero-shot {v.name}: {v.plan.params_after['total']:,} params "
                      f"({v.plan.params_after['active']:,} active), loss {rec['loss']:.4f}", flush=True)
        finally:
            lab.close()
    run_kds(mcfg, res, [(v, s) for v, seeds in want for s in seeds], seq, out / "kd_moe", "MoE ")

    Z = lambda v: res.d["zero_shot"][v.key]["loss"]  # noqa: E731
    K = lambda v, seeds: {f"s{s}": res.d["kd"][f"{v.key}/s{s}"]["loss"] for s in seeds  # noqa: E731
                          if f"{v.key}/s{s}" in res.d["kd"]}
    steps = f"{mcfg.kd.steps} x {len(cfg.seeds)} seed(s)"
    rows, detail = [], {}
    d0 = by_score[default]
    if "experts" in todo:
        r = {"default": default, "steps": steps, "zero_shot": {s: Z(v) for s, v in by_score.items()},
             "same_sets": {s: v.key == d0.key for s, v in by_score.items() if s != default},
             "kd": {s: K(v, cfg.seeds) for s, v in by_score.items() if s in m.kd_scores}}
        rows.append(CL.expert_score(r))
        detail["expert_score"] = r
        r = {"score": default, "steps": steps,
             "zero_shot": {"scored": Z(d0), "random": {f"r{s}": Z(v) for s, v in rand.items()}},
             "kd": {"scored": K(d0, cfg.seeds), "random": {f"s{s}": K(v, [s])[f"s{s}"] for s, v in rand.items()
                                                           if K(v, [s])}},
             "experts": {f"r{s}": {str(i): e["experts"] for i, e in v.plan.layers.items() if "experts" in e}
                         for s, v in rand.items()} | {default: {str(i): e["experts"] for i, e in
                                                               d0.plan.layers.items() if "experts" in e}}}
        rows.append(CL.expert_random(r))
        detail["expert_random"] = r
    if "expert_ffn" in todo:
        def side(v, label):
            return {"label": label, "params": v.plan.params_after["total"],
                    "active": v.plan.params_after["active"], "zero_shot": Z(v), "kd": K(v, cfg.seeds)}
        for b, v in ffn.items():
            r = {"steps": steps, "experts": side(d0, f"experts {n} -> {kn}"),
                 "ffn": side(v, f"expert FFN {t_cfg.moe_ffn_hidden_size} -> {v.plan.target.moe_ffn_hidden_size}")}
            rows.append(CL.experts_vs_ffn(r, b))
            detail[f"experts_vs_ffn_{b}"] = r
    teacher = res.d["zero_shot"]["teacher"]
    c = count_parameters(t_cfg)
    head = (f"MoE teacher (`{m.teacher}`) `{t_cfg.pattern}`, {n} experts top-{t_cfg.moe_router_topk}: "
            f"{c['total']:,} params ({c['active']:,} active), validation loss {teacher['loss']:.4f} on the "
            f"same held-out tokens. MoE KD = {mcfg.kd.steps} steps x {cfg.kd.global_batch_size} x {seq} "
            f"tokens per seed, seeds {cfg.seeds}; random experts: draw s is distilled with seed s.")
    detail["teacher"] = teacher
    return rows, detail, head
