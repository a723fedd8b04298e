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

DENSE = ("group", "source", "flap", "heads", "width_depth", "depth", "ffn")
MOE = ("experts", "expert_ffn")  # on the MoE teacher (AblationsConfig.moe)
ABLATIONS = DENSE + MOE


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
            "width_depth": ["kl"], "depth": ["kl", "cosine"], "ffn": ["ffn", "ffn_pre"]}
    have = _sources(imp)
    for a in todo:
        miss = [s for s in need[a] if s not in have]
        if miss:
            raise ConfigError(f"ablation {a!r} needs importance sources {miss} that {cfg.importance} "
                              f"lacks (has {sorted(have)}); re-run `stats` with them in sources")
    check_data(cfg.data, t_cfg)
    return t_cfg, imp


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


def _box(st) -> tuple:
    """A ShardedTensor's slice of its global tensor."""
    from ..compat import torch_dist

    return tuple(slice(o, o + n) for o, n in zip(st.global_offset, torch_dist.shard_data(st).shape))


def _global_tensors(tensors) -> dict:
    """key -> the full global tensor (a copy), assembled from one process's shards: at
    TP=EP=1 a key is either one shard or split along prepended axes (megatron's
    SequentialMLP: one [1, ...] chunk of the [experts, ...] tensor per local expert)."""
    from ..compat import torch_dist

    out = {}
    for st in tensors:
        if tuple(st.global_shape) == tuple(st.data.shape):
            out[st.key] = st.data.detach().clone()
            continue
        if st.key not in out:
            out[st.key] = torch.zeros(st.global_shape, dtype=st.data.dtype)
        out[st.key][_box(st)] = torch_dist.shard_data(st).detach()
    return out


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
        self.source = _global_tensors(mcore.sharded_tensors(teacher))
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
        from ..compat import mcore, torch_dist
        from ..model import build_model
        from ..rewrite import rules

        # every sharded tensor is filled below
        model = build_model(dataclasses.replace(plan.target, seq_length=self.seq), self.par,
                            initialize=False)
        rule = rules.Rules(plan)
        full: dict = {}  # pruned global tensors of keys split into shards (MoE: one per expert)
        with torch.no_grad():
            for st in mcore.sharded_tensors(model):
                src_key, idxs = rule(st.key)
                if tuple(st.global_shape) == tuple(st.data.shape):
                    rules.take(self.source[src_key], idxs, out=st.data)
                    continue
                if st.key not in full:
                    full[st.key] = rules.take(self.source[src_key], idxs)
                torch_dist.shard_data(st).copy_(full[st.key][_box(st)])
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
    head = (f"Teacher `{pattern}` {params(t_cfg):,} params, validation loss {teacher['loss']:.4f} on "
            f"{cfg.eval_iters * cfg.micro_batch_size} x {seq} held-out tokens (the same for every "
            f"variant). KD = {cfg.kd.steps} steps x {cfg.kd.global_batch_size} x {seq} tokens "
            f"({cfg.kd.steps * cfg.kd.global_batch_size * seq:,} tokens) per seed, seeds {cfg.seeds}, "
            f"forward KL at T={cfg.kd_loss.temperature}, lr {cfg.kd.lr}.")
    detail["teacher"] = teacher
    return rows, detail, head, plot


# ----------------------------------------------------------------------------- MoE (issue 19)


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
    from ..plan.targets import make_plan

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
        v = Variant(name, target, opts)
        try:
            v.plan = make_plan(imp, target, **opts)
        except ConfigError as e:
            raise ConfigError(f"ablation variant {name}: {e}") from None
        return record(v)

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
    todo_kd = []
    for v, seeds in want:
        for s in seeds:
            if f"{v.key}/s{s}" not in res.d["kd"] and (v.key, s) not in [(w.key, t) for w, t in todo_kd]:
                todo_kd.append((v, s))
    for i, (v, s) in enumerate(todo_kd):
        print(f"[ablations] MoE KD {i + 1}/{len(todo_kd)}: {v.name} seed {s} ({mcfg.kd.steps} steps)", flush=True)
        rec = _kd_one(mcfg, v, s, seq, out / "kd_moe" / f"{v.key}-s{s}")
        rec["name"] = v.name
        res.put("kd", f"{v.key}/s{s}", rec)
        print(f"[ablations] KD {v.name} seed {s}: loss {rec['loss']:.4f} ({rec['seconds']:.0f} s)", flush=True)

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
