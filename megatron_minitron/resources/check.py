"""The resource check every training / calibration stage runs before launch.

    python -m megatron_minitron STAGE -c recipe.yaml --dry-run [--world-size N]

prints the per-GPU estimate (estimate.py) at the stage's layout and exits (preflight.py:
the settings checked as the run checks them, the models' shapes before their checkpoints
exist, the target device and its memory); a normal run performs the same check first and refuses to start when the estimate exceeds
`parallel.memory_limit_gb` (0 = the device's memory: the GPU's, or on CPU the host's
memory shared by the ranks of this node), naming settings that would make it fit (for
MoE models also parallel.ep). A layout the stage could not run at all (an ep that does not
divide the data-parallel size or the experts, MoE training at tp > 1 without sequence
parallelism) is refused first, naming the fix.

Context parallelism: the estimate counts each rank's seq / cp tokens (estimate.py); a
layout that does not fit is offered the smallest parallel.cp that makes it fit (listed first
when the sequence-proportional items are most of the estimate), among the layouts the CP
stages run (check_cp: the sequence, and each TP rank's Mamba heads and groups, split).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

from ..config import CP_STAGES, ConfigError, ModelConfig, ParallelConfig, check_cp
from . import estimate as E

CHECKED = ("pretrain", "distill", "stats", "eval", "prune", "teacher-logits")  # the runs that check
ESTIMATED = CHECKED + ("search",)  # the dry runs that estimate (search: its KD and forwards)
TRAINING = ("pretrain", "distill", "search")


def impl() -> str:
    """The device this host runs on."""
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def host_memory_gb() -> float:
    """This host's memory per rank of the node ($LOCAL_WORLD_SIZE ranks share it)."""
    import psutil

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return psutil.virtual_memory().total / E.GiB / max(local, 1)


def device_limit_gb(limit_gb: float, device: Optional[str] = None) -> float:
    """limit_gb, or (0) the memory of this host's device: its GPU's, or on CPU the host's
    memory per rank."""
    if limit_gb > 0:
        return limit_gb
    import torch

    if (device or impl()) == "gpu" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / E.GiB
    return host_memory_gb()


def _dp(world: int, tp: int, pp: int, cp: int = 1) -> int:
    return max(1, world // (tp * pp * cp))


def _layout(parallel, world: int, mbs: int, seq: int, global_batch: int = 0,
            recompute: str = "none", train=None, kind: str = "gpu") -> E.Layout:
    """The stage's layout on device `kind`; global_batch > 0 (training): micro-batches per
    step from it; train: the stage's TrainConfig (the MoE router's aux loss)."""
    # as train.engine.use_distributed_optimizer, for the target device: auto = on GPU only
    dist_opt = parallel.distributed_optimizer == "true" or (
        parallel.distributed_optimizer == "auto" and kind == "gpu")
    cp = getattr(parallel, "cp", 1)
    dp = _dp(world, parallel.tp, parallel.pp, cp)
    return E.Layout(tp=parallel.tp, pp=parallel.pp, dp=dp, cp=cp, micro_batch_size=mbs, seq_length=seq,
                    num_micro=global_batch // (mbs * dp) if global_batch else 1,
                    sequence_parallel=parallel.sequence_parallel and parallel.tp > 1,
                    recompute=recompute, distributed_optimizer=dist_opt,
                    ep=parallel.ep, moe_dispatcher=parallel.moe_dispatcher,
                    moe_aux_loss=train is not None and train.moe_aux_loss_coeff > 0)


def stage_models(stage: str, cfg) -> dict[str, ModelConfig]:
    """The models a stage's real run reads (role -> config): pretrain its recipe's, distill
    the student's and teacher's checkpoints, the others their checkpoint's."""
    from ..train import checkpoint as ckpt

    if stage == "pretrain":
        return {"model": cfg.model}
    if stage == "distill":
        return {"student": ckpt.read_model_config(cfg.student),
                "teacher": ckpt.read_model_config(cfg.teacher)}  # (with a teacher_cache: not loaded)
    if stage == "teacher-logits":
        return {"model": ckpt.read_model_config(cfg.teacher)}
    if stage in CHECKED:
        return {"model": ckpt.read_model_config(cfg.checkpoint)}
    raise ConfigError(f"no resource estimate for stage {stage!r}; stages with one: {', '.join(CHECKED)}")


def _cache_k(cfg) -> int:
    """top_k of a distillation's teacher_cache (its manifest), 0 without one (or before the
    cache exists: the teacher is then counted, the larger estimate)."""
    import json
    from pathlib import Path

    path = getattr(cfg, "teacher_cache", "")
    m = Path(path) / "manifest.json" if path else None
    if m is None or not m.is_file():
        return 0
    try:
        return int(json.loads(m.read_text()).get("top_k", 0))
    except (ValueError, TypeError):
        return 0


def plan_for(stage: str, cfg, world: int, models: Optional[dict] = None, kind: Optional[str] = None):
    """(estimate function of a Layout, the stage's Layout, model config) for a stage config.
    models: role -> ModelConfig (default: stage_models, what the run reads); kind: "gpu" |
    "cpu" (default: this host's). The model config is the one the layout is checked
    against (distill: the student; the teacher is checked beside it, see models_of)."""
    models = models if models is not None else stage_models(stage, cfg)
    kind = kind or impl()
    if stage == "pretrain":
        tr, m = cfg.train, models["model"]
        lay = _layout(cfg.parallel, world, tr.micro_batch_size, m.seq_length,
                      tr.global_batch_size, tr.recompute, tr, kind)
        return (lambda l: E.training(m, l, kind, "pretrain")), lay, m
    if stage == "distill":
        tr = cfg.train
        s_cfg, t_cfg = models["student"], models["teacher"]
        seq = cfg.seq_length or s_cfg.seq_length
        lay = _layout(cfg.parallel, world, tr.micro_batch_size, seq, tr.global_batch_size,
                      tr.recompute, tr, kind)
        chunk = cfg.loss.chunk_size or None
        k = _cache_k(cfg)
        return (lambda l: E.training(s_cfg, l, kind, "distill", kd_chunk=chunk, teacher=None if k else t_cfg,
                                     cache_k=k)), lay, s_cfg
    if stage == "stats":
        m = models["model"]
        seq = cfg.seq_length or m.seq_length
        lay = _layout(cfg.parallel, world, cfg.micro_batch_size, seq, kind=kind)
        depth = "kl" in cfg.sources and cfg.depth_samples > 0
        return (lambda l: E.stats(m, l, kind, depth, cfg.depth_chunk_tokens)), lay, m
    if stage == "eval":  # forward only, LM loss: the stats estimate without depth KL
        m = models["model"]
        lay = _layout(cfg.parallel, world, cfg.micro_batch_size, m.seq_length, kind=kind)
        return (lambda l: E.stats(m, l, kind, depth=False)), lay, m
    if stage == "teacher-logits":  # eval's forward, plus the top-K's fp32 chunk buffer
        m = models["model"]
        seq = cfg.seq_length or m.seq_length
        lay = _layout(cfg.parallel, world, cfg.micro_batch_size, seq, kind=kind)

        def est(l: E.Layout) -> E.Estimate:
            e = E.stats(m, l, kind, depth=False)
            rows = min(cfg.chunk_size or l.micro_batch_size * seq, l.micro_batch_size * seq)
            e.items["top-k buffer"] = rows * m.vocab_size / l.tp * 4
            return e
        return est, lay, m
    if stage == "prune":
        m = models["model"]
        return (lambda l: E.prune(m, kind)), E.Layout(), m
    if stage == "search":
        return _search_plan(cfg, world, models, kind)
    raise ConfigError(f"no resource estimate for stage {stage!r}; stages with one: {', '.join(CHECKED)}")


def _search_plan(cfg, world: int, models: dict, kind: str):
    """search: the larger per-GPU need of its two phases over every candidate: the zero-shot
    and throughput forwards (micro_batch_size, no teacher in memory: shards are filled from
    the teacher's files) and the short KD (kd.*, the teacher beside the student).
    models: teacher, and candidates (a list of ModelConfig)."""
    t_cfg, cands = models["teacher"], models["candidates"]
    seq = cfg.seq_length or t_cfg.seq_length
    kd = cfg.kd_train()
    lay = _layout(cfg.parallel, world, kd.micro_batch_size, seq, kd.global_batch_size,
                  kd.recompute, kd, kind)
    chunk = cfg.kd_loss.chunk_size or None
    k = _cache_k(cfg)

    def phases(c: ModelConfig, l: E.Layout) -> E.Estimate:
        zs = dataclasses.replace(l, micro_batch_size=cfg.micro_batch_size, num_micro=1,
                                 recompute="none")
        kd_est = E.training(c, l, kind, "distill", kd_chunk=chunk, teacher=None if k else t_cfg, cache_k=k)
        zs_est = E.stats(c, zs, kind, depth=False)
        est = kd_est if kd_est.total >= zs_est.total else zs_est
        what = "short KD" if est is kd_est else f"zero-shot forward (micro_batch_size={cfg.micro_batch_size})"
        return E.Estimate("search", est.items, est.pp_stage, [
            f"binding: the {what} of the candidate needing the most of {len(cands)}: "
            f"{len(c.pattern.replace('|', ''))} layers, hidden {c.hidden_size}, FFN "
            f"{c.ffn_hidden_size}, {c.mamba_num_heads} Mamba heads x {c.mamba_head_dim}"])

    # the candidate that binds at the recipe's layout; the suggestions move its layout
    worst = max(cands, key=lambda c: phases(c, lay).total)
    return (lambda l: phases(worst, l)), lay, worst


def models_of(stage: str, cfg, models: Optional[dict] = None) -> list[ModelConfig]:
    """Every model the stage builds at its layout (distill: student and teacher; search: the
    teacher and every candidate)."""
    models = models if models is not None else stage_models(stage, cfg)
    out = []
    for v in models.values():
        out.extend(v if isinstance(v, list) else [v])
    return out


def layout_problem(models: list[ModelConfig], lay: E.Layout, world: int, train: bool,
                   whole_world: bool = True) -> Optional[str]:
    """Why the stage cannot run at this layout at all (None: it can), naming the fix.
    whole_world=False: a world size that tp x pp does not divide is let through (a dry run
    without --world-size estimates one model replica; torchrun refuses the real run)."""
    if whole_world and world % (lay.tp * lay.pp * lay.cp):
        return (f"world size {world} is not a multiple of parallel.tp x parallel.pp"
                + (" x parallel.cp" if lay.cp > 1 else "") + f" = {lay.tp * lay.pp * lay.cp}")
    moe = any(m.is_moe for m in models)
    if lay.ep > 1 and not moe:
        return (f"parallel.ep={lay.ep} splits mixture-of-experts layers, but no model has one; "
                "use parallel.ep=1")
    if lay.dp % lay.ep:
        ok = [e for e in range(1, lay.dp + 1) if lay.dp % e == 0]
        return (f"parallel.ep={lay.ep} does not divide the data-parallel size {lay.dp} (world "
                f"size {world} / tp x pp; a dry run takes it from --world-size); choose "
                f"parallel.ep in {ok}")
    for m in models:
        try:
            m.validate(lay.tp, lay.pp, ep=lay.ep)
            if lay.cp > 1:
                check_cp(dataclasses.replace(m, seq_length=lay.seq_length or m.seq_length),
                         _cp_parallel(lay))
        except ConfigError as e:
            return str(e)
    if train and moe and lay.tp > 1 and not lay.sequence_parallel:
        return (f"MoE training at parallel.tp={lay.tp} needs sequence parallelism (megatron's "
                "MoELayer refuses it without); set parallel.sequence_parallel=true")
    return None


def _cp_parallel(lay: E.Layout) -> ParallelConfig:
    return ParallelConfig(tp=lay.tp, pp=lay.pp, cp=lay.cp, ep=lay.ep,
                          sequence_parallel=lay.sequence_parallel)


def _seq_share(est: E.Estimate) -> float:
    """The fraction of an estimate that grows with the sequence (what CP splits)."""
    seq_items = ("activations", "logits", "teacher cache", "depth_kl", "moe_dispatch")
    return sum(v for k, v in est.items.items() if k in seq_items) / max(est.total, 1.0)


def smallest_cp(fn, lay: E.Layout, models: list[ModelConfig], world: int, limit_gb: float,
                train: bool, whole_world: bool = False) -> list[tuple[int, dict, E.Estimate]]:
    """The smallest parallel.cp above the layout's (doubling, up to 64, at the same tp / pp;
    dp = world / (tp x pp x cp), and within the world when the world is given) whose
    estimate fits: [(cp, the other changes it needs, estimate)]. A training stage also
    tries train.recompute=selective, then full: each kept when it needs a smaller cp than
    the lighter recompute before it. [] when none fits."""
    tries = [{}] + ([{"recompute": r} for r in ("selective", "full") if r != lay.recompute]
                    if train and lay.recompute != "full" else [])
    out = []
    for extra in tries:
        cp = lay.cp * 2
        while cp <= 64 and (not out or cp < out[-1][0]):
            if whole_world and world % (lay.tp * lay.pp * cp):
                break
            new = dataclasses.replace(lay, cp=cp, dp=_dp(world, lay.tp, lay.pp, cp), **extra)
            if _valid(models, new, world, train):
                est = fn(new)
                if E.fits(est, limit_gb):
                    out.append((cp, extra, est))
                    break
            cp *= 2
    return out


def _valid(models: list[ModelConfig], lay: E.Layout, world: int, train: bool = False) -> bool:
    return layout_problem(models, lay, world, train) is None


def suggestions(fn, lay: E.Layout, m, world: int, limit_gb: float,
                stage: str, whole_world: bool = False) -> list[str]:
    """Single-key changes (then pairs) of the layout that bring the estimate under the limit.
    m: the model config, or the list of all models of the stage (checked at each layout).
    In a CP stage the smallest parallel.cp that fits is one of them (the first when the
    sequence-proportional items are at least half of the estimate)."""
    train = stage in TRAINING
    tkey = "kd" if stage == "search" else "train"  # the training section's keys
    models = list(m) if isinstance(m, (list, tuple)) else [m]
    moe = [x for x in models if x.is_moe]
    moves = []
    if train:
        for r in ("selective", "full"):
            if lay.recompute != r:
                moves.append((f"{tkey}.recompute={r}", {"recompute": r}))
    b = lay.micro_batch_size
    while b > 1:
        b //= 2
        key = f"{tkey}.micro_batch_size" if train else "micro_batch_size"
        moves.append((f"{key}={b}", {"micro_batch_size": b}))
    for tp in (lay.tp * 2, lay.tp * 4, lay.tp * 8):
        moves.append((f"parallel.tp={tp}", {"tp": tp}))
        if not lay.sequence_parallel:
            moves.append((f"parallel.tp={tp} parallel.sequence_parallel=true",
                          {"tp": tp, "sequence_parallel": True}))
    if lay.tp > 1 and not lay.sequence_parallel:
        moves.append(("parallel.sequence_parallel=true", {"sequence_parallel": True}))
    for pp in (lay.pp * 2, lay.pp * 4):
        moves.append((f"parallel.pp={pp}", {"pp": pp}))
    if train and not lay.distributed_optimizer:
        moves.append(("parallel.distributed_optimizer=true", {"distributed_optimizer": True}))
    if moe:  # expert parallelism: each rank holds num_moe_experts / ep routed experts
        for ep in (lay.ep * 2, lay.ep * 4, lay.ep * 8):
            moves.append((f"parallel.ep={ep}", {"ep": ep}))

    def fitting(name: str, change: dict) -> Optional[str]:
        new = dataclasses.replace(lay, **change)
        new.dp = _dp(world, new.tp, new.pp, new.cp)
        if not _valid(models, new, world, train):
            return None
        est = fn(new)
        return f"{name} ({est.total / E.GiB:.1f} GiB)" if E.fits(est, limit_gb) else None

    out = [f for f in (fitting(n, c) for n, c in moves) if f]
    if not out and train:  # pairs: recompute full with each layout move
        out = [f for f in (fitting(f"train.recompute=full {n}", dict(c, recompute="full"))
                           for n, c in moves if "recompute" not in c) if f]
    if not out and moe:  # pairs: an ep move with each other layout move
        out = [f for f in (fitting(f"{n} {n2}", dict(c, **c2)) for n, c in moves if "ep" in c
                           for n2, c2 in moves if "ep" not in c2) if f]
    if stage in CP_STAGES:
        texts = [f"parallel.cp={cp}" + "".join(f" {tkey}.{k}={v}" for k, v in extra.items())
                 + f" ({est.total / E.GiB:.1f} GiB: each sequence split over {cp} ranks)"
                 for cp, extra, est in smallest_cp(fn, lay, models, world, limit_gb, train, whole_world)]
        if texts:
            out = texts + out if _seq_share(fn(lay)) >= 0.5 else out[:6 - len(texts)] + texts
    return out[:6]


def report(stage: str, cfg, world: int, models: Optional[dict] = None, kind: Optional[str] = None,
           limit: Optional[float] = None, whole_world: bool = False
           ) -> tuple[E.Estimate, float, list[str]]:
    """(estimate, limit GiB, fixes) at the stage's layout. models / kind: as plan_for; limit:
    the limit in GiB (default: parallel.memory_limit_gb or this host's device memory);
    whole_world: refuse a world size tp x pp does not divide (a dry run given --world-size)."""
    models = models if models is not None else stage_models(stage, cfg)
    fn, lay, _ = plan_for(stage, cfg, world, models, kind)
    every = models_of(stage, cfg, models)
    if stage != "prune":
        problem = layout_problem(every, lay, world, stage in TRAINING, whole_world=whole_world)
        if problem:
            raise ConfigError(f"{stage}: {problem}")
    est = fn(lay)
    if limit is None:
        limit = device_limit_gb(getattr(cfg.parallel, "memory_limit_gb", 0.0))
    fixes = [] if E.fits(est, limit) else suggestions(fn, lay, every, world, limit, stage, whole_world)
    return est, limit, fixes


def layout_text(p) -> str:
    return (f"tp={p.tp} pp={p.pp}" + (f" ep={p.ep}" if p.ep > 1 else "")
            + (f" cp={p.cp}" if getattr(p, "cp", 1) > 1 else "") + (" sp" if p.sequence_parallel else ""))


def describe(stage: str, est: E.Estimate, limit: float, world: int, lay_text: str,
             kind: Optional[str] = None) -> str:
    per = "host (one process)" if stage == "prune" else (
        "GPU" if (kind or impl()) == "gpu" else "rank (CPU)")
    where = (f"writing at {lay_text}" if stage == "prune" else
             f"at {lay_text}, world size {world} (pipeline stage {est.pp_stage})")
    head = f"[{stage}] estimated memory per {per} {where}:"
    notes = "".join(f"\n  ({n})" for n in est.notes)
    return f"{head}\n{est.table()}{notes}\n  limit {limit:8.2f} GiB: " + \
        ("fits" if E.fits(est, limit) else "DOES NOT FIT")


def check(stage: str, cfg, world: Optional[int] = None, dry_run: bool = False) -> E.Estimate:
    """The real run's check (this host's device, the models its checkpoints hold); dry_run:
    print the estimate instead. Raises ConfigError naming the fixes."""
    world = world or int(os.environ.get("WORLD_SIZE", "1"))
    est, limit, fixes = report(stage, cfg, world)
    text = describe(stage, est, limit, world, layout_text(cfg.parallel))
    fit = E.fits(est, limit)
    if dry_run:
        print(text + ("" if fit else "\n  would fit with: " + ("; ".join(fixes) or "none found")))
        if not fit:
            raise ConfigError(f"{stage}: the estimate {est.total / E.GiB:.1f} GiB exceeds "
                              f"parallel.memory_limit_gb={limit:.1f}")
        return est
    if not fit:
        raise ConfigError(
            f"{stage} would need about {est.total / E.GiB:.1f} GiB per "
            f"{'GPU' if impl() == 'gpu' else 'rank'} (limit {limit:.1f} GiB, "
            "parallel.memory_limit_gb):\n" + est.table() + "\nit fits with: "
            + ("; ".join(fixes) if fixes else "no single change found; add GPUs or lower the "
               "sequence length") + "\n(set parallel.memory_limit_gb higher to override)")
    return est
