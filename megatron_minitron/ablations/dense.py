"""The dense ablations (paper sec. 4) on cfg.teacher: group, source, flap, heads,
width_depth, depth and ffn (stage.py says what each measures)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config import ConfigError
from . import claims as CL
from .lab import Lab, Results, Variant, _depth_drop, _fingerprint, _target, kd_key, planned, run_kds

if TYPE_CHECKING:
    from .stage import AblationsConfig


def validate_dense(cfg: AblationsConfig, todo: list[str]):
    from ..importance.io import ImportanceFile
    from ..train import checkpoint as ckpt
    from ..data.stage_data import check_data

    if ckpt.resolve(cfg.teacher) is None:
        raise ConfigError(f"teacher={cfg.teacher!r}: no checkpoint there; run scripts/run_default.sh "
                          "(or pretrain) first")
    t_cfg = ckpt.read_model_config(cfg.teacher)
    imp = ImportanceFile.load(cfg.importance)
    if imp.model.to_dict() != t_cfg.to_dict():
        raise ConfigError(f"importance={cfg.importance!r} was collected on another model than "
                          f"teacher={cfg.teacher!r}; run `stats` on this teacher")
    need = {"group": ["x"], "source": ["x", "z", "y"], "flap": ["x", "flap"], "heads": ["x"],
            "width_depth": ["kl"], "depth": ["kl", "cosine"], "ffn": ["ffn", "ffn_pre"], "cache": ["x", "ffn"]}
    have = _sources(imp)
    for a in todo:
        miss = [s for s in need[a] if s not in have]
        if miss:
            raise ConfigError(f"ablation {a!r} needs importance sources {miss} that {cfg.importance} "
                              f"lacks (has {sorted(have)}); re-run `stats` with them in sources")
    check_data(cfg.data, t_cfg)
    return t_cfg, imp


def _sources(imp) -> set[str]:
    have = set()
    for e in imp.layers.values():
        have |= set(e.get("mamba", {})) | {k for k in ("flap", "ffn", "ffn_pre", "attn") if k in e}
    for k, v in (imp.depth or {}).items():
        if not torch.isnan(torch.as_tensor(v, dtype=torch.float64)).any():
            have.add(k)
    return have


def _run_dense(cfg: AblationsConfig, todo: list[str], out: Path) -> tuple[list, dict, str, str]:
    """The dense ablations on cfg.teacher -> (claims rows, detail, markdown header, plot)."""
    from ..model import count_parameters
    from ..plan.targets import make_plan
    from ..search.space import enumerate_candidates

    t_cfg, imp = validate_dense(cfg, todo)
    seq = cfg.seq_length or t_cfg.seq_length
    res = Results(out / "results.json", _fingerprint(cfg), cfg.resume)
    pattern = t_cfg.pattern
    n_layers = t_cfg.num_layers
    params = lambda c: count_parameters(c)["total"]  # noqa: E731

    def variant(name, target, **opts) -> Variant:
        v = planned(imp, name, target, **opts)
        res.d["variants"][name] = {"key": v.key, "params": v.plan.params_after["total"],
                                   "pattern": v.plan.target.pattern, "settings": opts,
                                   "target": dataclasses.asdict(target)}
        return v

    # ---- the variants each ablation needs: (variant, zero-shot?, kd?, throughput?)
    want: list[tuple[Variant, bool, bool, bool]] = []
    D0 = cfg.default_target
    if "group" in todo:
        for i, h in enumerate(cfg.head_targets):
            for g in ("aware", "unaware"):
                want.append((variant(f"group:h{h}:{g}", _target(mamba_num_heads=h), mamba_grouping=g),
                             True, i == 0, False))
    if "source" in todo:
        for h, p in cfg.source_targets:
            for s in ("x", "z", "y"):
                want.append((variant(f"source:h{h or t_cfg.mamba_num_heads}p{p or t_cfg.mamba_head_dim}:{s}",
                                     _target(mamba_num_heads=h, mamba_head_dim=p), mamba_source=s),
                             True, False, False))
    if "flap" in todo:
        for h in cfg.head_targets:
            for m in ("l2", "flap"):
                want.append((variant(f"flap:h{h}:{m}", _target(mamba_num_heads=h), mamba_metric=m),
                             True, False, False))
        for m in ("l2", "flap"):
            want.append((variant(f"flap:default:{m}", D0, mamba_metric=m), True, True, False))
    if "heads" in todo:
        nh, hd = t_cfg.mamba_num_heads, t_cfg.mamba_head_dim
        want.append((variant("heads:heads", _target(mamba_num_heads=nh // 2)), True, True, True))
        want.append((variant("heads:channels", _target(mamba_head_dim=hd // 2)), True, True, True))
    if "ffn" in todo:
        for f in ("pre", "post"):
            want.append((variant(f"ffn:default:{f}", D0, ffn_source=f), True, True, False))
    if "cache" in todo:  # the default plan, online KD (shared with flap / ffn) and cached top-K KD
        want.append((variant("cache:default", D0), False, True, False))
    depth_rows = {}
    if "depth" in todo:
        for n in cfg.depth_drops:
            if n >= n_layers:
                continue
            for m in ("kl", "cosine"):
                drop = _depth_drop(imp, pattern, m, n)
                v = variant(f"depth:drop{n}:{m}", _target(drop_layers=drop))
                want.append((v, True, False, False))
                depth_rows.setdefault(n, {})[m] = {"layers": sorted(drop), "name": v.name}
    wd = {}
    if "width_depth" in todo:
        drop = _depth_drop(imp, pattern, "kl", cfg.depth_drop)
        budget = params(make_plan(imp, _target(drop_layers=drop)).target)
        order = _depth_drop(imp, pattern, "kl", n_layers - 1)
        order += [i for i in range(n_layers) if i not in order]
        cands, _ = enumerate_candidates(t_cfg, cfg.space, budget, cfg.tolerance, order)
        kinds: dict[str, list] = {"width-only": [], "depth-only": [], "depth+width": []}
        for c in cands:
            width_same = all(getattr(c, a) == getattr(t_cfg, a) for a in
                             ("hidden_size", "ffn_hidden_size", "mamba_num_heads", "mamba_head_dim"))
            k = "width-only" if c.num_layers == n_layers else "depth-only" if width_same else "depth+width"
            kinds[k].append(c)
        wd = {"budget": budget, "kinds": {}}
        for k, cs in kinds.items():
            cs.sort(key=lambda c: abs(c.params - budget))
            names = []
            for c in cs[:cfg.max_per_kind]:
                t = _target(hidden_size=c.hidden_size, ffn_hidden_size=c.ffn_hidden_size,
                            mamba_num_heads=c.mamba_num_heads, mamba_head_dim=c.mamba_head_dim,
                            num_layers=c.num_layers if c.num_layers < n_layers else 0)
                v = variant(f"wd:{k}:{c.name}", t)
                want.append((v, True, False, True))
                names.append(v.name)
            wd["kinds"][k] = names

    by_name = {v.name: v for v, *_ in want}
    print(f"[ablations] {len(want)} variants ({len({v.key for v, *_ in want})} distinct plans) for "
          f"{', '.join(todo)}; teacher {pattern} {params(t_cfg):,} params", flush=True)

    # ---- 1. zero-shot (+ throughput), one process group, teacher in memory
    zs = [(v, tp) for v, z, _, tp in want if z and (v.key not in res.d["zero_shot"] or
                                                    (tp and "tokens_per_s" not in res.d["zero_shot"][v.key]))]
    if zs or "teacher" not in res.d["zero_shot"]:
        lab = Lab(cfg, t_cfg, seq)
        try:
            res.put("zero_shot", "teacher", {"loss": lab.teacher_loss, "tokens_per_s": lab.teacher_tps})
            seen = {}
            for v, tp in zs:
                if v.key in seen and (not tp or "tokens_per_s" in seen[v.key]):
                    continue
                model = lab.pruned(v.plan)
                rec = {"loss": lab.loss(model), "name": v.name}
                if tp:
                    rec["tokens_per_s"] = lab.throughput(model)
                del model
                seen[v.key] = rec
                res.put("zero_shot", v.key, rec)
                print(f"[ablations] zero-shot {v.name}: {v.plan.params_after['total']:,} params, "
                      f"loss {rec['loss']:.4f}" + (f", {rec['tokens_per_s']:,.0f} tok/s" if tp else ""), flush=True)
        finally:
            lab.close()
    Z = lambda name: res.d["zero_shot"][by_name[name].key]["loss"]  # noqa: E731

    # ---- width_depth: the best zero-shot candidate of each kind gets the KD
    if wd:
        wd["best"] = {}
        for k, names in wd["kinds"].items():
            if names:
                best = min(names, key=Z)
                wd["best"][k] = best
                want.append((by_name[best], False, True, False))

    # ---- 2. KD, per seed
    kds = [(v, s) for v, _, kd, _ in want for s in (cfg.seeds if kd else [])]
    if "cache" in todo:  # the online reference first in its seed: it runs the teacher (no memo hit)
        kds = ([(by_name["cache:default"], s) for s in cfg.seeds] + kds
               + [(by_name["cache:default"], s, cfg.cache_k) for s in cfg.seeds])
    run_kds(cfg, res, kds, seq, out / "kd")

    def K(name):
        vals = [res.d["kd"][kd_key(by_name[name], s)]["loss"] for s in cfg.seeds
                if kd_key(by_name[name], s) in res.d["kd"]]
        return sum(vals) / len(vals) if vals else None

    steps = f"{cfg.kd.steps} x {len(cfg.seeds)} seed(s)"
    # ---- 3. claims
    rows, detail = [], {}
    if "group" in todo:
        r = {"zero_shot": {}, "kd": None}
        for i, h in enumerate(cfg.head_targets):
            a, u = by_name[f"group:h{h}:aware"], by_name[f"group:h{h}:unaware"]
            r["zero_shot"][f"{h} heads"] = {"aware": Z(a.name), "unaware": Z(u.name), "same_sets": a.key == u.key}
            if i == 0:
                r["kd"] = {"aware": K(a.name), "unaware": K(u.name), "steps": steps} if a.key != u.key else None
        rows.append(CL.group_aware(r))
        detail["group"] = r
    if "source" in todo:
        r = {}
        for h, p in cfg.source_targets:
            tag = f"h{h or t_cfg.mamba_num_heads}p{p or t_cfg.mamba_head_dim}"
            r[f"{h or t_cfg.mamba_num_heads} heads x {p or t_cfg.mamba_head_dim}"] = \
                {s: Z(f"source:{tag}:{s}") for s in "xzy"}
        rows.append(CL.mamba_source(r))
        detail["source"] = r
    if "flap" in todo:
        r = {"zero_shot": {f"{h} heads": {m: Z(f"flap:h{h}:{m}") for m in ("l2", "flap")} for h in cfg.head_targets}}
        r["zero_shot"]["default plan"] = {m: Z(f"flap:default:{m}") for m in ("l2", "flap")}
        r["kd"] = {"l2": K("flap:default:l2"), "flap": K("flap:default:flap"), "steps": steps}
        rows.append(CL.flap(r))
        detail["flap"] = r
    if "heads" in todo:
        r = {"steps": steps}
        for k in ("heads", "channels"):
            v = by_name[f"heads:{k}"]
            z = res.d["zero_shot"][v.key]
            r[k] = {"label": f"{v.plan.target.mamba_num_heads}x{v.plan.target.mamba_head_dim}",
                    "params": v.plan.params_after["total"], "zero_shot": z["loss"], "kd": K(v.name),
                    "tokens_per_s": z["tokens_per_s"]}
        rows.append(CL.heads_vs_channels(r))
        detail["heads"] = r
    if wd:
        r = {"budget": wd["budget"], "steps": steps, "rows": {}}
        for k, name in wd["best"].items():
            v = by_name[name]
            r["rows"][k] = {"label": f"{v.plan.target.pattern} h{v.plan.target.hidden_size} "
                                     f"ffn{v.plan.target.ffn_hidden_size} {v.plan.target.mamba_num_heads}x"
                                     f"{v.plan.target.mamba_head_dim}",
                            "params": v.plan.params_after["total"], "zero_shot": Z(name), "kd": K(name)}
        rows.append(CL.width_vs_depth(r))
        detail["width_depth"] = dict(r, candidates={k: [{"name": n, "zero_shot": Z(n),
                                                         "params": by_name[n].plan.params_after["total"],
                                                         "tokens_per_s": res.d["zero_shot"][by_name[n].key].get("tokens_per_s")}
                                                        for n in names] for k, names in wd["kinds"].items()})
    if depth_rows:
        r = {n: {m: {"layers": e["layers"], "loss": Z(e["name"])} for m, e in d.items()} for n, d in depth_rows.items()}
        rows.append(CL.depth_metric(r))
        detail["depth"] = r
    if "ffn" in todo:
        from ..plan.stage import PlanConfig

        r = {"zero_shot": {f: Z(f"ffn:default:{f}") for f in ("pre", "post")},
             "kd": {"pre": K("ffn:default:pre"), "post": K("ffn:default:post"), "steps": steps},
             "default": PlanConfig().ffn_source}
        rows.append(CL.ffn_source(r))
        detail["ffn"] = r

    if "cache" in todo:
        v = by_name["cache:default"]
        on = {f"s{s}": res.d["kd"][kd_key(v, s)] for s in cfg.seeds if kd_key(v, s) in res.d["kd"]}
        ca = {f"s{s}": res.d["kd"][kd_key(v, s, cfg.cache_k)] for s in cfg.seeds
              if kd_key(v, s, cfg.cache_k) in res.d["kd"]}
        r = {"k": cfg.cache_k, "steps": steps, "tolerance": cfg.cache_tolerance,
             "online": {s: x["loss"] for s, x in on.items()}, "cached": {s: x["loss"] for s, x in ca.items()},
             # median step times; online only where the KD ran the teacher (not from the memo)
             "step_seconds": {"online": {s: x.get("step_seconds") for s, x in on.items()
                                         if not (x.get("teacher_memo") or {}).get("hits")},
                              "cached": {s: x.get("step_seconds") for s, x in ca.items()}},
             "cache_seconds": {s: x.get("cache_seconds") for s, x in ca.items()},
             "bytes_per_token": next((x.get("cache_bytes_per_token") for x in ca.values()), None)}
        rows.append(CL.teacher_cache(r))
        detail["cache"] = r

    teacher = res.d["zero_shot"]["teacher"]
    plot = None
    if wd:
        from ..report.plots import loss_vs_throughput

        pts = [{"label": "teacher", "tokens_per_s": teacher["tokens_per_s"], "loss": teacher["loss"],
                "params": params(t_cfg)}]
        for k, names in wd["kinds"].items():
            for n in names:
                z = res.d["zero_shot"][by_name[n].key]
                tag = {"width-only": "W", "depth-only": "D", "depth+width": "DW"}[k]
                pts.append({"label": f"{tag} {by_name[n].plan.target.num_layers}L",
                            "tokens_per_s": z.get("tokens_per_s"), "loss": z["loss"],
                            "params": by_name[n].plan.params_after["total"]})
        plot = loss_vs_throughput(pts, out / "candidates_loss_vs_throughput.png",
                                  "candidates (W width-only, D depth-only, DW both), zero-shot")
    head = (f"Teacher `{pattern}` {params(t_cfg):,} params, validation loss {teacher['loss']:.4f} on "
            f"{cfg.eval_iters * cfg.micro_batch_size} x {seq} held-out tokens (the same for every "
            f"variant). KD = {cfg.kd.steps} steps x {cfg.kd.global_batch_size} x {seq} tokens "
            f"({cfg.kd.steps * cfg.kd.global_batch_size * seq:,} tokens) per seed, seeds {cfg.seeds}, "
            f"forward KL at T={cfg.kd_loss.temperature}, lr {cfg.kd.lr}.")
    detail["teacher"] = teacher
    return rows, detail, head, plot
