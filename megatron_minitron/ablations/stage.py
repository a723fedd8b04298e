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

Outputs (output_dir): claims.md / claims.json, results.json, candidates_loss_vs_throughput.png.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ConfigError, DataConfig, ParallelConfig, TrainConfig
from ..distill.stage import LossConfig
from ..plan.targets import TargetConfig
from ..search.space import SearchSpace
from . import claims as CL

ABLATIONS = ("group", "source", "flap", "heads", "width_depth", "depth", "ffn")


def _default_kd() -> TrainConfig:
    return TrainConfig(steps=40, global_batch_size=16, micro_batch_size=8, lr=1e-3, min_lr=1e-4,
                       warmup_steps=4, log_interval=10, eval_interval=1000, eval_iters=4,
                       save_interval=1000)


@dataclass
class AblationsConfig:
    teacher: str = "runs/default/teacher"
    importance: str = "runs/default/stats/importance.pt"  # needs x, z, y, flap, ffn, ffn_pre, kl, cosine
    output_dir: str = "runs/ablations"
    only: list[str] = field(default_factory=list)  # subset of ABLATIONS; empty = all
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
    keep_checkpoints: bool = False
    resume: bool = True


# ----------------------------------------------------------------------------- checks


def validate(cfg: AblationsConfig):
    from ..importance.io import ImportanceFile
    from ..train import checkpoint as ckpt
    from ..data.stage_data import check_data

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
    cfg.data.validate()
    cfg.kd.validate(1, prefix="kd")
    cfg.kd_loss.validate("kd_loss")
    if ckpt.resolve(cfg.teacher) is None:
        raise ConfigError(f"teacher={cfg.teacher!r}: no checkpoint there; run scripts/run_default.sh "
                          "(or pretrain) first")
    t_cfg = ckpt.read_model_config(cfg.teacher)
    imp = ImportanceFile.load(cfg.importance)
    if imp.model.to_dict() != t_cfg.to_dict():
        raise ConfigError(f"importance={cfg.importance!r} was collected on another model than "
                          f"teacher={cfg.teacher!r}; run `stats` on this teacher")
    need = {"group": ["x"], "source": ["x", "z", "y"], "flap": ["x", "flap"], "heads": ["x"],
            "width_depth": ["kl"], "depth": ["kl", "cosine"], "ffn": ["ffn", "ffn_pre"]}
    have = _sources(imp)
    for a in cfg.only or ABLATIONS:
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


# ----------------------------------------------------------------------------- variants


@dataclass
class Variant:
    name: str
    target: TargetConfig
    opts: dict = field(default_factory=dict)  # make_plan keyword settings
    plan: object = None

    @property
    def key(self) -> str:
        """The plan's keep sets (not its settings): equal keys prune identically."""
        d = self.plan.to_dict()
        blob = json.dumps({k: d[k] for k in ("target", "kept_layers", "hidden", "layers")}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _target(base: TargetConfig | None = None, **kw) -> TargetConfig:
    return dataclasses.replace(base or TargetConfig(), **kw)


def _depth_drop(imp, pattern: str, metric: str, n: int) -> list[int]:
    from ..plan import keep as K

    return K.layers_to_drop(imp.depth[metric], pattern, n)


# ----------------------------------------------------------------------------- measuring


class Lab:
    """Zero-shot scoring in one process group: the teacher's full tensors in memory."""

    def __init__(self, cfg: AblationsConfig, t_cfg, seq: int):
        from .. import dist as D
        from ..compat import mcore
        from ..model import build_model
        from ..train import checkpoint as ckpt
        from ..data.stage_data import datasets

        self.cfg, self.seq = cfg, seq
        self.par = D.init(ParallelConfig(tp=1, pp=1), seed=cfg.kd.seed)
        _, self.valid_ds, _ = datasets(cfg.data, seq, 1, cfg.eval_iters * cfg.micro_batch_size)
        teacher = build_model(dataclasses.replace(t_cfg, seq_length=seq), self.par, initialize=False)
        ckpt.load_model_weights(ckpt.require(cfg.teacher), teacher)
        self.source = {st.key: st.data.detach().clone() for st in mcore.sharded_tensors(teacher)}
        self.teacher_loss = self.loss(teacher)
        self.teacher_tps = self.throughput(teacher)
        del teacher

    def loss(self, model) -> float:
        from ..train.engine import evaluate, lm_forward_step, valid_batches

        return evaluate(model, valid_batches(self.valid_ds, self.cfg.micro_batch_size, self.cfg.eval_iters,
                                             self.par), lm_forward_step, self.cfg.eval_iters, self.par,
                        self.seq, self.cfg.micro_batch_size)

    @torch.no_grad()
    def throughput(self, model, repeats: int = 3) -> float:
        """Forward tokens/s on this machine, best of `repeats` timings."""
        from ..model import causal_mask

        b, s = self.cfg.micro_batch_size, self.seq
        tok = torch.randint(0, 1000, (b, s), generator=torch.Generator().manual_seed(0))
        pos = torch.arange(s)[None].expand(b, -1)
        mask = causal_mask(s)
        model.eval()
        model(tok, pos, mask)
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(self.cfg.throughput_iters):
                model(tok, pos, mask)
            best = min(best, time.perf_counter() - t0)
        return self.cfg.throughput_iters * b * s / best

    def pruned(self, plan):
        """The plan's pruned model, filled from the teacher's tensors by the prune rules."""
        from ..compat import mcore
        from ..model import build_model
        from ..rewrite import rules

        # every sharded tensor is filled below
        model = build_model(dataclasses.replace(plan.target, seq_length=self.seq), self.par,
                            initialize=False)
        rule = rules.Rules(plan)
        with torch.no_grad():
            for st in mcore.sharded_tensors(model):
                src_key, idxs = rule(st.key)
                rules.take(self.source[src_key], idxs, out=st.data)
        return model

    def close(self) -> None:
        from .. import dist as D

        D.shutdown()


def _kd_one(cfg: AblationsConfig, v: Variant, seed: int, seq: int, workdir: Path) -> dict:
    """prune + distill (seed = data order) + score on the fixed validation set."""
    from .. import dist as D
    from ..distill.stage import DistillConfig, run_distill
    from ..rewrite.stage import PruneConfig, run_prune
    from ..train import checkpoint as ckpt
    from ..train.pretrain import eval_checkpoint

    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    v.plan.save(workdir / "plan.json")
    t0 = time.time()
    run_prune(PruneConfig(checkpoint=str(ckpt.require(cfg.teacher)), plan=str(workdir / "plan.json"),
                          output=str(workdir / "pruned"), keep_backup=False, overwrite=True, verify=False))
    train = dataclasses.replace(cfg.kd, seed=cfg.kd.seed + seed, eval_interval=cfg.kd.steps,
                                save_interval=cfg.kd.steps)
    data = dataclasses.replace(cfg.data, seed=cfg.data.seed + seed)
    run_distill(DistillConfig(student=str(workdir / "pruned"), teacher=str(ckpt.require(cfg.teacher)),
                              output_dir=str(workdir / "distilled"), seq_length=seq, loss=cfg.kd_loss,
                              data=data, train=train, resume=False))
    par = D.init(ParallelConfig(tp=1, pp=1))
    try:
        loss = eval_checkpoint(workdir / "distilled", cfg.data, par, cfg.eval_iters, cfg.micro_batch_size)["loss"]
    finally:
        D.shutdown()
    if not cfg.keep_checkpoints:
        shutil.rmtree(workdir / "pruned", ignore_errors=True)
        shutil.rmtree(workdir / "distilled" / "checkpoints", ignore_errors=True)
    return {"loss": loss, "seconds": time.time() - t0,
            "tokens": cfg.kd.steps * cfg.kd.global_batch_size * seq}


# ----------------------------------------------------------------------------- state


class Results:
    """results.json: {"fingerprint", "zero_shot": {key: {...}}, "kd": {key/seed: {...}}}."""

    def __init__(self, path: Path, fingerprint: str, resume: bool):
        self.path = path
        self.d = {"fingerprint": fingerprint, "zero_shot": {}, "kd": {}, "variants": {}}
        if resume and path.is_file():
            old = json.loads(path.read_text())
            if old.get("fingerprint") == fingerprint:
                self.d = old
            else:
                print(f"[ablations] {path} was made with other settings; starting over", flush=True)

    def put(self, section: str, key: str, rec: dict) -> None:
        self.d[section][key] = rec
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.d, indent=1))
        os.replace(tmp, self.path)


def _fingerprint(cfg: AblationsConfig) -> str:
    from ..train import checkpoint as ckpt

    d = {"teacher": str(ckpt.require(cfg.teacher).resolve()), "importance_mtime": os.path.getmtime(cfg.importance),
         "data": dataclasses.asdict(cfg.data), "seq": cfg.seq_length, "eval": [cfg.eval_iters, cfg.micro_batch_size],
         "kd": dataclasses.asdict(cfg.kd), "kd_loss": dataclasses.asdict(cfg.kd_loss)}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- the stage


def run_ablations(cfg: AblationsConfig) -> dict:
    from ..model import count_parameters
    from ..plan.targets import make_plan
    from ..search.space import enumerate_candidates

    t_start = time.time()
    t_cfg, imp = validate(cfg)
    todo = cfg.only or list(ABLATIONS)
    seq = cfg.seq_length or t_cfg.seq_length
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = Results(out / "results.json", _fingerprint(cfg), cfg.resume)
    pattern = t_cfg.pattern
    n_layers = t_cfg.num_layers
    params = lambda c: count_parameters(c)["total"]  # noqa: E731

    def variant(name, target, **opts) -> Variant:
        v = Variant(name, target, opts)
        try:
            v.plan = make_plan(imp, target, **opts)
        except ConfigError as e:
            raise ConfigError(f"ablation variant {name}: {e}") from None
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
    kd_todo = []
    for v, _, kd, _ in want:
        for s in cfg.seeds if kd else []:
            if f"{v.key}/s{s}" not in res.d["kd"] and (v.key, s) not in [(w.key, t) for w, t in kd_todo]:
                kd_todo.append((v, s))
    for i, (v, s) in enumerate(kd_todo):
        print(f"[ablations] KD {i + 1}/{len(kd_todo)}: {v.name} seed {s} ({cfg.kd.steps} steps)", flush=True)
        rec = _kd_one(cfg, v, s, seq, out / "kd" / f"{v.key}-s{s}")
        rec["name"] = v.name
        res.put("kd", f"{v.key}/s{s}", rec)
        print(f"[ablations] KD {v.name} seed {s}: loss {rec['loss']:.4f} ({rec['seconds']:.0f} s)", flush=True)

    def K(name):
        vals = [res.d["kd"][f"{by_name[name].key}/s{s}"]["loss"] for s in cfg.seeds
                if f"{by_name[name].key}/s{s}" in res.d["kd"]]
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
    md = (f"# Ablations (paper sec. 4) on the embedded default teacher\n\nTeacher `{pattern}` "
          f"{params(t_cfg):,} params, validation loss {teacher['loss']:.4f} on "
          f"{cfg.eval_iters * cfg.micro_batch_size} x {seq} held-out tokens (the same for every "
          f"variant). KD = {cfg.kd.steps} steps x {cfg.kd.global_batch_size} x {seq} tokens "
          f"({cfg.kd.steps * cfg.kd.global_batch_size * seq:,} tokens) per seed, seeds {cfg.seeds}, "
          f"forward KL at T={cfg.kd_loss.temperature}, lr {cfg.kd.lr}.\n\n" + CL.markdown(rows)
          + (f"\n![candidates]({Path(plot).name})\n" if plot else ""))
    (out / "claims.md").write_text(md)
    (out / "claims.json").write_text(json.dumps({"rows": rows, "detail": detail, "teacher": teacher}, indent=1))
    summary = {"stage": "ablations", "claims": rows, "output_dir": str(out),
               "elapsed_seconds": time.time() - t_start}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n" + md, flush=True)
    print(f"[ablations] wrote {out / 'claims.md'} in {summary['elapsed_seconds']:.0f} s", flush=True)
    return summary
