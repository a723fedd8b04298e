"""The resource check every training / calibration stage runs before launch.

    python -m megatron_minitron STAGE -c recipe.yaml --dry-run [--world-size N]

prints the per-GPU estimate (estimate.py) at the stage's layout and exits; a normal run
performs the same check first and refuses to start when the estimate exceeds
`parallel.memory_limit_gb` (0 = the device's memory: the GPU's, or on CPU the host's
memory shared by the ranks of this node), naming settings that would make it fit (for
MoE models also parallel.ep). A layout the stage could not run at all (an ep that does not
divide the data-parallel size or the experts, MoE training at tp > 1 without sequence
parallelism) is refused first, naming the fix.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

from ..config import ConfigError, ModelConfig
from . import estimate as E

CHECKED = ("pretrain", "distill", "stats", "eval", "prune")


def impl() -> str:
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def device_limit_gb(limit_gb: float) -> float:
    if limit_gb > 0:
        return limit_gb
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / E.GiB
    import psutil

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return psutil.virtual_memory().total / E.GiB / max(local, 1)


def _dp(world: int, tp: int, pp: int) -> int:
    return max(1, world // (tp * pp))


def _layout(parallel, world: int, mbs: int, seq: int, global_batch: int = 0,
            recompute: str = "none", train=None) -> E.Layout:
    """The stage's layout; global_batch > 0 (training): micro-batches per step from it;
    train: the stage's TrainConfig (the MoE router's aux loss)."""
    from ..train.engine import use_distributed_optimizer

    dp = _dp(world, parallel.tp, parallel.pp)
    return E.Layout(tp=parallel.tp, pp=parallel.pp, dp=dp, micro_batch_size=mbs, seq_length=seq,
                    num_micro=global_batch // (mbs * dp) if global_batch else 1,
                    sequence_parallel=parallel.sequence_parallel and parallel.tp > 1,
                    recompute=recompute, distributed_optimizer=use_distributed_optimizer(parallel),
                    ep=parallel.ep, moe_dispatcher=parallel.moe_dispatcher,
                    moe_aux_loss=train is not None and train.moe_aux_loss_coeff > 0)


def plan_for(stage: str, cfg, world: int):
    """(estimate function of a Layout, the stage's Layout, model config) for a stage config.
    The model config is the one the layout is checked against (distill: the student; the
    teacher is checked beside it, see models_of)."""
    from ..train import checkpoint as ckpt

    kind = impl()
    if stage == "pretrain":
        tr = cfg.train
        lay = _layout(cfg.parallel, world, tr.micro_batch_size, cfg.model.seq_length,
                      tr.global_batch_size, tr.recompute, tr)
        return (lambda l: E.training(cfg.model, l, kind, "pretrain")), lay, cfg.model
    if stage == "distill":
        tr = cfg.train
        s_cfg, t_cfg = ckpt.read_model_config(cfg.student), ckpt.read_model_config(cfg.teacher)
        seq = cfg.seq_length or s_cfg.seq_length
        lay = _layout(cfg.parallel, world, tr.micro_batch_size, seq, tr.global_batch_size,
                      tr.recompute, tr)
        chunk = cfg.loss.chunk_size or None
        return (lambda l: E.training(s_cfg, l, kind, "distill", kd_chunk=chunk, teacher=t_cfg)), lay, s_cfg
    if stage == "stats":
        m = ckpt.read_model_config(cfg.checkpoint)
        seq = cfg.seq_length or m.seq_length
        lay = _layout(cfg.parallel, world, cfg.micro_batch_size, seq)
        depth = "kl" in cfg.sources and cfg.depth_samples > 0
        return (lambda l: E.stats(m, l, kind, depth, cfg.depth_chunk_tokens)), lay, m
    if stage == "eval":  # forward only, LM loss: the stats estimate without depth KL
        m = ckpt.read_model_config(cfg.checkpoint)
        lay = _layout(cfg.parallel, world, cfg.micro_batch_size, m.seq_length)
        return (lambda l: E.stats(m, l, kind, depth=False)), lay, m
    if stage == "prune":
        m = ckpt.read_model_config(cfg.checkpoint)
        return (lambda l: E.prune(m, kind)), E.Layout(), m
    raise ConfigError(f"no resource estimate for stage {stage!r}; stages with one: {', '.join(CHECKED)}")


def models_of(stage: str, cfg) -> list[ModelConfig]:
    """Every model the stage builds at its layout (distill: student and teacher)."""
    from ..train import checkpoint as ckpt

    if stage == "pretrain":
        return [cfg.model]
    if stage == "distill":
        return [ckpt.read_model_config(cfg.student), ckpt.read_model_config(cfg.teacher)]
    return [ckpt.read_model_config(cfg.checkpoint)]


def layout_problem(models: list[ModelConfig], lay: E.Layout, world: int, train: bool,
                   whole_world: bool = True) -> Optional[str]:
    """Why the stage cannot run at this layout at all (None: it can), naming the fix.
    whole_world=False: a world size that tp x pp does not divide is let through (a dry run
    without --world-size estimates one model replica; torchrun refuses the real run)."""
    if whole_world and world % (lay.tp * lay.pp):
        return (f"world size {world} is not a multiple of parallel.tp x parallel.pp = "
                f"{lay.tp * lay.pp}")
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
        except ConfigError as e:
            return str(e)
    if train and moe and lay.tp > 1 and not lay.sequence_parallel:
        return (f"MoE training at parallel.tp={lay.tp} needs sequence parallelism (megatron's "
                "MoELayer refuses it without); set parallel.sequence_parallel=true")
    return None


def _valid(models: list[ModelConfig], lay: E.Layout, world: int, train: bool = False) -> bool:
    return layout_problem(models, lay, world, train) is None


def suggestions(fn, lay: E.Layout, m, world: int, limit_gb: float,
                stage: str) -> list[str]:
    """Single-key changes (then pairs) of the layout that bring the estimate under the limit.
    m: the model config, or the list of all models of the stage (checked at each layout)."""
    train = stage in ("pretrain", "distill")
    models = list(m) if isinstance(m, (list, tuple)) else [m]
    moe = [x for x in models if x.is_moe]
    moves = []
    if train:
        for r in ("selective", "full"):
            if lay.recompute != r:
                moves.append((f"train.recompute={r}", {"recompute": r}))
    b = lay.micro_batch_size
    while b > 1:
        b //= 2
        key = "train.micro_batch_size" if train else "micro_batch_size"
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
        new.dp = _dp(world, new.tp, new.pp)
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
    return out[:6]


def report(stage: str, cfg, world: int) -> tuple[E.Estimate, float, list[str]]:
    fn, lay, m = plan_for(stage, cfg, world)
    models = models_of(stage, cfg) if stage != "prune" else [m]
    if stage != "prune":
        problem = layout_problem(models, lay, world, stage in ("pretrain", "distill"),
                                 whole_world=False)
        if problem:
            raise ConfigError(f"{stage}: {problem}")
    est = fn(lay)
    limit = device_limit_gb(getattr(cfg.parallel, "memory_limit_gb", 0.0))
    fixes = [] if E.fits(est, limit) else suggestions(fn, lay, models, world, limit, stage)
    return est, limit, fixes


def describe(stage: str, est: E.Estimate, limit: float, world: int, lay_text: str) -> str:
    head = (f"[{stage}] estimated memory per {'GPU' if impl() == 'gpu' else 'rank (CPU)'} "
            f"at {lay_text}, world size {world} (pipeline stage {est.pp_stage}):")
    return f"{head}\n{est.table()}\n  limit {limit:8.2f} GiB: " + \
        ("fits" if E.fits(est, limit) else "DOES NOT FIT")


def check(stage: str, cfg, world: Optional[int] = None, dry_run: bool = False) -> E.Estimate:
    """Print (dry run) or enforce the estimate. Raises ConfigError naming the fixes."""
    world = world or int(os.environ.get("WORLD_SIZE", "1"))
    est, limit, fixes = report(stage, cfg, world)
    p = cfg.parallel
    lay_text = (f"tp={p.tp} pp={p.pp}" + (f" ep={p.ep}" if p.ep > 1 else "")
                + (" sp" if p.sequence_parallel else ""))
    text = describe(stage, est, limit, world, lay_text)
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
