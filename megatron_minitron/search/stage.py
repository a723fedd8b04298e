"""`search` stage: architecture search under a parameter budget (paper sec. 3.5, table 1).

    python -m megatron_minitron search -c RECIPE.yaml            # one process
    torchrun --nproc_per_node N -m megatron_minitron search -c RECIPE.yaml   # parallel.tp/pp/cp, DP = rest

  1. enumerate candidates (search/space.py: analytic counts, divisibility, budget);
  2. zero-shot score EVERY candidate without writing checkpoints: per candidate the plan is
     made in memory (plan.targets.make_plan), the pruned model is built at the search's
     TP/PP layout and each rank fills its shards straight from the teacher checkpoint's
     files (rewrite.stage.fill_from_source: only the rows/cols it keeps, no collectives, no
     teacher copy in memory); its LM loss is measured on the fixed validation set (the
     same samples at every layout; DP ranks split them);
  3. the top_k by zero-shot loss each get a plan.json, a pruned checkpoint (filled the same
     way), a short distillation from the teacher through the `distill` stage at the same
     layout (short_kd_steps steps), a validation loss on the same fixed set and a
     forward-throughput measurement at this layout;
  4. rank by distilled loss; losses within tie_tolerance (relative) of the best of their
     group are ordered by throughput (the paper picks #1 over #2, equal losses, for speed).

Rank 0 decides nothing alone: every rank computes the same plans and receives the same
all-reduced losses, so all ranks walk the same candidates; rank 0 writes the files.

Output (output_dir): candidates.json, table.md / table.json (like the paper's table 1),
loss_vs_throughput.png, chosen_plan.json (ready for `prune`), summary.json, and
search_state.json: every finished zero-shot score and short-KD result, so an interrupted
search re-run with the same config skips finished candidates; candidates/<name>/ keeps each
top-k candidate's plan, pruned and distilled checkpoints (the KD resumes from its last save).
A signal (SIGUSR1 / SIGTERM) or exit_duration_minutes stops between candidates, or inside a
short KD after its checkpoint (preempt.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import (ConfigError, DataConfig, ParallelConfig, TrainConfig, check_cp, check_ep_used,
                      check_moe_train)
from ..distill.stage import LossConfig
from .space import Budget, Candidate, SearchSpace, axes_of, enumerate_candidates

STATE_FILE = "search_state.json"
STATE_VERSION = 1


def _default_kd() -> TrainConfig:
    return TrainConfig(steps=20, global_batch_size=8, micro_batch_size=8, lr=1e-3, min_lr=1e-4,
                       warmup_steps=2, log_interval=5, eval_interval=1000, eval_iters=4,
                       save_interval=1000)


@dataclass
class SearchConfig:
    teacher: str = "runs/default/teacher"  # teacher checkpoint (run dir or iteration dir)
    # its shape for --dry-run / --print-config before the teacher exists: a model YAML
    # (configs/model/*.yaml), a recipe with a model: mapping, a plan.json (its target) or a
    # checkpoint; the checkpoint's own config wins once it exists
    teacher_model: str = ""
    importance: str = "runs/default/stats/importance.pt"  # `stats` output for that teacher
    output_dir: str = "runs/default/search"
    space: SearchSpace = field(default_factory=SearchSpace)
    # the bounds a candidate must meet, any combination (0 = off; search/space.py Budget):
    budget: int = 2_065_000  # total parameters (analytic, model.count_parameters), +- tolerance
    active_budget: int = 0  # parameters one token uses (MoE: top-k experts), +- tolerance
    tolerance: float = 0.05  # relative window of both parameter budgets
    memory_budget_gib: float = 0.0  # serving memory ceiling: bf16 weights + KV cache + Mamba state ...
    memory_seq_length: int = 0  # ... of sequences this long (0 = seq_length) ...
    memory_batch_size: int = 1  # ... this many at once ...
    memory_state_dtype: str = "fp32"  # ... with the Mamba SSM state in fp32 (as transformers) or bf16
    expert_score: str = "out"  # MoE teachers: how experts are ranked (as the plan stage)
    depth_metric: str = "kl"  # kl | cosine: which depth scores decide the layers dropped
    mamba_source: str = "x"  # as the plan stage
    mamba_metric: str = "l2"  # l2 | flap
    max_candidates: int = 0  # zero-shot score only the N closest to the budget; 0 = all
    top_k: int = 3  # candidates that get the short KD (paper: 22)
    short_kd_steps: int = 20  # steps of each short KD (tokens = steps x batch x seq)
    tie_tolerance: float = 0.005  # relative loss difference treated as a tie -> throughput
    data: DataConfig = field(default_factory=DataConfig)
    seq_length: int = 0  # evaluation / KD sequence length; 0 = the teacher's
    eval_iters: int = 4  # fixed validation set: eval_iters x micro_batch_size sequences
    micro_batch_size: int = 8
    throughput_iters: int = 4
    kd: TrainConfig = field(default_factory=_default_kd)  # short-KD recipe (steps = short_kd_steps)
    kd_loss: LossConfig = field(default_factory=LossConfig)
    # one `teacher-logits` cache every short KD reads (top-K targets, no teacher forward);
    # "" = the teacher runs in every KD step
    teacher_cache: str = ""
    # the layout the search runs at (torchrun: DP = world / (tp x pp x cp)); every candidate's
    # sizes divide by its tp / pp (and its Mamba heads per TP rank by cp), so the chosen
    # model also runs there
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    keep_checkpoints: bool = True  # keep each top-k candidate's pruned / distilled checkpoints
    resume: bool = True  # reuse search_state.json results of the same config
    stop_after: int = 0  # stop after N candidate results (zero-shot or KD) in this run; 0 = all
    # stop (exit 0, results so far kept; a short KD saves its checkpoint) after this many
    # minutes; 0 = no limit. Also on SIGUSR1 / SIGTERM (preempt.py). Re-run to resume.
    exit_duration_minutes: float = 0.0

    def kd_train(self) -> TrainConfig:
        return dataclasses.replace(self.kd, steps=self.short_kd_steps,
                                   eval_interval=max(self.short_kd_steps, 1),
                                   save_interval=max(self.short_kd_steps, 1),
                                   eval_iters=self.eval_iters)


# ----------------------------------------------------------------------------- validation


def validate(cfg: SearchConfig):
    """Every user error, before any model is built. Returns (teacher cfg, importance file,
    candidates, enumeration info, drop order)."""
    from ..importance.io import ImportanceFile
    from ..train import checkpoint as ckpt
    from ..data.stage_data import check_data

    validate_settings(cfg)
    if ckpt.resolve(cfg.teacher) is None:
        raise ConfigError(f"teacher={cfg.teacher!r}: no checkpoint there; pretrain or import a teacher "
                          "first (e.g. `pretrain -c configs/pretrain_default.yaml`)")
    t_cfg = ckpt.read_model_config(cfg.teacher)
    validate_teacher(cfg, t_cfg)
    imp = ImportanceFile.load(cfg.importance)  # ConfigError if missing / not ours
    if imp.model.to_dict() != t_cfg.to_dict():
        diff = {k: (v, imp.model.to_dict().get(k)) for k, v in t_cfg.to_dict().items()
                if imp.model.to_dict().get(k) != v}
        raise ConfigError(f"importance={cfg.importance!r} was collected on another model than "
                          f"teacher={cfg.teacher!r}: (teacher, importance) differ in {diff}; run `stats` "
                          "on this teacher")
    check_data(cfg.data, t_cfg)
    if cfg.teacher_cache:
        from ..distill.cache import TeacherCache

        kd = cfg.kd_train()
        TeacherCache(cfg.teacher_cache).match(
            teacher=cfg.teacher, data=cfg.data, seq=cfg.seq_length or t_cfg.seq_length,
            samples_needed=kd.steps * kd.global_batch_size, temperature=cfg.kd_loss.temperature)
    it_imp, it_t = imp.meta.get("checkpoint_iteration"), ckpt.read_meta(cfg.teacher).get("iteration")
    if it_imp is not None and it_t is not None and it_imp != it_t and int(os.environ.get("RANK", "0")) == 0:
        # same architecture, other weights (said once, by rank 0 of a launch)
        print(f"[search] warning: importance={cfg.importance!r} was collected at iteration {it_imp} but "
              f"teacher={cfg.teacher!r} is at iteration {it_t}; re-run `stats` on this checkpoint "
              "for keep sets that match its weights", flush=True)
    drop_order = depth_drop_order(cfg, t_cfg, imp)
    cands, info = candidates(cfg, t_cfg, drop_order)
    return t_cfg, imp, cands, info, drop_order


def validate_settings(cfg: SearchConfig, world: int | None = None) -> int:
    """Settings errors, no file read (the run, --dry-run and --print-config); world: the
    number of processes (default $WORLD_SIZE). Returns the data-parallel size."""
    from ..preempt import check_minutes

    cfg.parallel.validate(cp_ok=True)
    check_minutes(cfg.exit_duration_minutes)
    world = world or int(os.environ.get("WORLD_SIZE", "1"))
    mp = cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp
    from ..dist import check_world

    check_world(cfg.parallel, world)  # tp x pp x cp divides the world, ep divides DP
    dp = world // mp
    cfg.data.validate()
    if not cfg.output_dir:
        raise ConfigError("output_dir is empty; give a directory for the search results")
    for key in ("top_k", "short_kd_steps", "eval_iters", "micro_batch_size", "throughput_iters"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be > 0")
    for key in ("max_candidates", "stop_after", "seq_length"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be >= 0")
    if not 0 <= cfg.tie_tolerance < 1:
        raise ConfigError(f"tie_tolerance={cfg.tie_tolerance} must be in [0, 1) (relative loss difference)")
    if cfg.depth_metric not in ("kl", "cosine"):
        raise ConfigError(f"depth_metric={cfg.depth_metric!r}: use kl or cosine")
    budget_of(cfg, 1).validate()
    if cfg.memory_seq_length < 0:
        raise ConfigError(f"memory_seq_length={cfg.memory_seq_length} must be >= 0 (0 = seq_length)")
    if cfg.expert_score not in ("out", "mass", "freq"):
        raise ConfigError(f"expert_score={cfg.expert_score!r}: use out, mass or freq (as plan.expert_score)")
    if cfg.kd.warmup_steps >= cfg.short_kd_steps:
        raise ConfigError(f"kd.warmup_steps={cfg.kd.warmup_steps} must be < short_kd_steps="
                          f"{cfg.short_kd_steps}; lower kd.warmup_steps")
    cfg.kd_train().validate(dp, prefix="kd")
    if cfg.eval_iters % dp:
        raise ConfigError(f"eval_iters={cfg.eval_iters} is not divisible by the data-parallel size {dp}: "
                          "the fixed validation set (eval_iters x micro_batch_size samples) is split "
                          f"over DP ranks; use eval_iters={max(dp, cfg.eval_iters - cfg.eval_iters % dp)} "
                          "or another layout")
    cfg.kd_loss.validate("kd_loss")
    if cfg.teacher_cache and cfg.kd_loss.alpha_kd == 0:
        raise ConfigError(f"teacher_cache={cfg.teacher_cache!r} with kd_loss.alpha_kd=0: cross-entropy KDs "
                          "read no teacher; drop teacher_cache or set kd_loss.alpha_kd > 0")
    return dp


def budget_of(cfg: SearchConfig, teacher_seq: int) -> Budget:
    return Budget(params=cfg.budget, active_params=cfg.active_budget, memory_gib=cfg.memory_budget_gib,
                  tolerance=cfg.tolerance,
                  memory_seq_length=cfg.memory_seq_length or cfg.seq_length or teacher_seq,
                  memory_batch_size=cfg.memory_batch_size, memory_state_dtype=cfg.memory_state_dtype)


def validate_teacher(cfg: SearchConfig, t_cfg) -> None:
    """The teacher's model against the settings."""
    t_cfg.validate(cfg.parallel.tp, cfg.parallel.pp, prefix="teacher model", ep=cfg.parallel.ep)
    check_cp(dataclasses.replace(t_cfg, seq_length=cfg.seq_length or t_cfg.seq_length), cfg.parallel,
             prefix="teacher model")
    check_ep_used(cfg.parallel.ep, t_cfg)
    check_moe_train(cfg.kd, t_cfg, "kd")  # candidates keep the teacher's E layers
    if cfg.expert_score != "out" and not (t_cfg.is_moe and cfg.space.values("num_moe_experts", 0) != [0]):
        raise ConfigError(f"expert_score={cfg.expert_score!r} ranks the experts a candidate keeps, but no "
                          "candidate prunes experts (no E layer, or space.num_moe_experts not searched); "
                          "remove expert_score or search space.num_moe_experts")


def depth_drop_order(cfg: SearchConfig, t_cfg, imp) -> list[int]:
    """Every layer id, lowest depth importance first (paper sec. 3.4)."""
    from ..plan import keep as K

    types = K.pattern_layers(t_cfg.pattern)
    sc = imp.depth.get(cfg.depth_metric) if isinstance(imp.depth, dict) else None
    needs_depth = any(v < len(types) for v in cfg.space.values("num_layers", len(types)))
    if sc is not None and not torch.isnan(torch.as_tensor(sc, dtype=torch.float64)).any():
        drop_order = K.layers_to_drop(sc, t_cfg.pattern, len(types) - 1)
        drop_order += [i for i in range(len(types)) if i not in drop_order]
    elif needs_depth:
        raise ConfigError(f"the importance file has no complete depth scores for depth_metric="
                          f"{cfg.depth_metric!r}, but space.num_layers asks for fewer layers; re-run "
                          "`stats` with depth scoring, use the other metric, or search width only")
    else:
        drop_order = list(range(len(types)))  # unused: no candidate drops a layer
    return drop_order


def candidates(cfg: SearchConfig, t_cfg, drop_order: list[int]):
    """(candidates, enumeration info) of the space under the budget; none is an error."""
    b = budget_of(cfg, t_cfg.seq_length)
    cands, info = enumerate_candidates(t_cfg, cfg.space, b, drop_order=drop_order,
                                       tp=cfg.parallel.tp, pp=cfg.parallel.pp, ep=cfg.parallel.ep,
                                       cp=cfg.parallel.cp)
    if not cands:
        rej = ", ".join(f"{n} {why}" for why, n in info["rejected"].items() if n) or "none"
        windows = [f"{k}={v:,} -> [{int(v * (1 - b.tolerance)):,}, {int(v * (1 + b.tolerance)):,}]"
                   for k, v in (("budget", b.params), ("active_budget", b.active_params)) if v]
        windows += [f"memory_budget_gib={b.memory_gib:g}"] if b.memory_gib else []
        raise ConfigError(
            f"no candidate architecture: all {info['combinations']} combinations of the search space "
            f"were rejected ({rej}); the bounds are {', '.join(windows)} (tolerance={b.tolerance}). "
            "Widen `tolerance`, change the budgets, or widen the space "
            f"(space.* axes; grid {info['grid']})")
    if cfg.max_candidates:
        cands = cands[:cfg.max_candidates]
    return cands, info


def _fingerprint(cfg: SearchConfig, teacher_it: Path) -> str:
    """What ONE candidate's results depend on. The candidate name fixes its sizes, so the
    space, budget, tolerance, max_candidates, top_k and tie_tolerance are left out: widening
    a search or raising top_k reuses every finished result."""
    d = dataclasses.asdict(cfg)
    for k in ("output_dir", "resume", "stop_after", "keep_checkpoints", "throughput_iters", "space",
              "budget", "tolerance", "max_candidates", "top_k", "tie_tolerance", "exit_duration_minutes",
              "teacher_model",  # a dry run's stand-in, never read by a run
              "active_budget", "memory_budget_gib", "memory_seq_length", "memory_batch_size",
              "memory_state_dtype"):
        d.pop(k)
    if not any(getattr(cfg.space, a) for a in ("num_moe_experts", "moe_ffn_hidden_size")):
        d.pop("expert_score")  # ranks experts only when their count or width is searched
    if not cfg.teacher_cache:
        d.pop("teacher_cache")  # (states written before the cache existed stay valid)
    d["teacher"] = str(Path(teacher_it).resolve())
    d["importance_mtime"] = os.path.getmtime(cfg.importance)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- state


class State:
    """search_state.json: finished zero-shot and KD results, written atomically after each."""

    def __init__(self, path: Path, fingerprint: str, resume: bool, write: bool = True):
        self.path = path
        self.write = write  # rank 0 writes; every rank keeps the same records in memory
        self.data = {"version": STATE_VERSION, "fingerprint": fingerprint, "zero_shot": {}, "kd": {}}
        if path.is_file() and resume:
            old = json.loads(path.read_text())
            if old.get("fingerprint") != fingerprint or old.get("version") != STATE_VERSION:
                raise ConfigError(
                    f"{path} holds a search with a different configuration (teacher, importance, data, "
                    "evaluation or KD settings changed); use another output_dir, or resume=false to "
                    "start over")
            self.data = old
        self.resumed = {"zero_shot": len(self.data["zero_shot"]), "kd": len(self.data["kd"])}

    def put(self, section: str, name: str, rec: dict) -> None:
        self.data[section][name] = dict(rec, id=uuid.uuid4().hex, finished_at=time.time())
        if not self.write:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


class _Stop(Exception):
    """Raised between candidates; the message says why (stop_after or signal)."""


# ----------------------------------------------------------------------------- zero-shot


def _plan_for(imp, c: Candidate, cfg: SearchConfig, teacher_layers: int):
    from ..plan.targets import TargetConfig, make_plan

    src = imp.model
    # an axis at the teacher's value stays unpruned (0): a plan then needs no scores for it
    moe = {a: (getattr(c, a) if getattr(c, a) != getattr(src, a) else 0)
           for a in ("num_moe_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size")}
    mamba = (dict(mamba_num_heads=c.mamba_num_heads, mamba_head_dim=c.mamba_head_dim)
             if "M" in src.pattern else {})  # no Mamba layer: no Mamba target (refused if set)
    t = TargetConfig(hidden_size=c.hidden_size, ffn_hidden_size=c.ffn_hidden_size, **mamba,
                     num_layers=c.num_layers if c.num_layers < teacher_layers else 0,
                     depth_metric=cfg.depth_metric, **(moe if src.is_moe else {}))
    plan = make_plan(imp, t, mamba_source=cfg.mamba_source, mamba_metric=cfg.mamba_metric,
                     tp=cfg.parallel.tp, pp=cfg.parallel.pp, ep=cfg.parallel.ep,
                     expert_score=cfg.expert_score)
    got = (plan.target.pattern, plan.params_after["total"], plan.params_after["active"])
    if got != (c.pattern, c.params, c.active_params):
        raise RuntimeError(f"{c.name}: the plan (pattern, params, active) {got} disagrees with the "
                           f"enumerated candidate {(c.pattern, c.params, c.active_params)}")
    return plan


def _eval(model, ds, cfg: SearchConfig, par, seq: int) -> float:
    """LM loss on the fixed validation set: the first eval_iters x micro_batch_size samples
    whatever the layout (DP ranks split them: eval_iters / dp micro-batches each), so
    every layout scores the same tokens (under CP each sequence split over the CP ranks)."""
    from ..train.engine import MicroBatches, evaluate, forward_step_for

    data = MicroBatches(ds, cfg.micro_batch_size, cfg.eval_iters * cfg.micro_batch_size, par.dp,
                        par.dp_rank, start_step=0, device=par.device)
    return evaluate(model, data, forward_step_for(par), cfg.eval_iters // par.dp, par, seq,
                    cfg.micro_batch_size)


@torch.no_grad()
def throughput(model, par, vocab_size: int, micro_batch_size: int, seq: int, iters: int) -> float:
    """Forward tokens/s of `model` at this layout (random tokens, full sequences, through the
    pipeline schedule; under CP each rank runs its part of them), best of two timings; per
    model replica, the same on every rank (the slowest rank's time)."""
    from ..importance.depth import pipeline_forward

    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, vocab_size, (micro_batch_size, seq), generator=g)
    batch = {"tokens": tok.to(par.device),
             "position_ids": torch.arange(seq, device=par.device)[None].expand(micro_batch_size, -1)}
    model.eval()
    cp_group = par.pg.cp if par.cp > 1 else None
    pipeline_forward(model, batch, lambda _: None, cp_group)  # warm-up
    best = math.inf
    for _ in range(2):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            pipeline_forward(model, batch, lambda _: None, cp_group)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    t = torch.tensor([best], dtype=torch.float64, device=par.device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return iters * micro_batch_size * seq / float(t)


def _progress(total: int, done: int, desc: str, enabled: bool = True):
    from ..train.engine import Progress

    return Progress(total, done, enabled, desc)


# ----------------------------------------------------------------------------- ranking


def rank(results: list[dict], tie_tolerance: float) -> list[dict]:
    """Sort by distilled loss; a run of candidates within tie_tolerance (relative) of the best
    remaining one is ordered by throughput, higher first (paper: #1 over #2 for speed)."""
    rest = sorted(results, key=lambda r: (r["distilled_loss"], -r["tokens_per_s"], r["name"]))
    out = []
    while rest:
        best = rest[0]["distilled_loss"]
        tie = [r for r in rest if r["distilled_loss"] <= best + tie_tolerance * abs(best)]
        tie.sort(key=lambda r: (-r["tokens_per_s"], r["distilled_loss"], r["name"]))
        out += tie
        rest = [r for r in rest if r not in tie]
    return [dict(r, rank=i + 1) for i, r in enumerate(out)]


COLUMNS = [("rank", "#"), ("num_layers", "layers"), ("hidden_size", "hidden"), ("ffn_hidden_size", "FFN"),
           ("mamba_num_heads", "Mamba heads"), ("mamba_head_dim", "head dim"), ("params", "params"),
           ("active_params", "active"), ("memory_bytes", "memory"),
           ("zero_shot_loss", "zero-shot loss"), ("distilled_loss", "distilled loss"),
           ("tokens_per_s", "tokens/s")]
MOE_COLUMNS = [("num_moe_experts", "experts"), ("moe_ffn_hidden_size", "expert FFN"),
               ("moe_shared_expert_intermediate_size", "shared FFN")]


def columns(moe: bool, mamba: bool = True) -> list:
    """The table's columns: a teacher without Mamba layers has no Mamba columns, an MoE
    teacher's add its three axes after the dense ones."""
    dense = COLUMNS[:6] if mamba else COLUMNS[:4]
    return dense + (MOE_COLUMNS if moe else []) + COLUMNS[6:]


def axes_of_row(row: dict) -> list:
    return [a for a, _ in COLUMNS[1:6] + MOE_COLUMNS if row.get(a)]


def _count(v: int) -> str:
    return f"{v / 1e6:.3f}M" if v < 1e9 else f"{v / 1e9:.2f}B"


def table_markdown(rows: list[dict], teacher: dict | None = None, moe: bool = False,
                   mamba: bool = True) -> str:
    def fmt(k, v):
        if v is None:
            return "-"
        if k in ("zero_shot_loss", "distilled_loss"):
            return f"{v:.4f}"
        if k in ("params", "active_params"):
            return _count(v)
        if k == "memory_bytes":
            return f"{v / 2 ** 30:.2f} GiB" if v >= 2 ** 30 else f"{v / 2 ** 20:.1f} MiB"
        if k == "tokens_per_s":
            return f"{v:,.0f}"
        return str(v)

    cols = columns(moe, mamba)
    lines = ["| " + " | ".join(h for _, h in cols) + " |",
             "|" + "|".join("---:" for _ in cols) + "|"]
    for r in ([teacher] if teacher else []) + rows:
        lines.append("| " + " | ".join(fmt(k, r.get(k)) for k, _ in cols) + " |")
    return "\n".join(lines) + "\n"


def _sizes(cfg, budget: Budget) -> dict:
    from ..model import count_parameters

    return {"active_params": count_parameters(cfg)["active"],
            "memory_bytes": int(budget.memory(cfg)["total"])}


def _budget_dict(cfg: SearchConfig) -> dict:
    return {k: getattr(cfg, k) for k in ("budget", "active_budget", "tolerance", "memory_budget_gib",
                                         "memory_seq_length", "memory_batch_size", "memory_state_dtype")}


def _plot(rows: list[dict], zero_shot: list[dict], teacher: dict | None, path: Path) -> str | None:
    """Four panels: distilled loss vs throughput (the top-k), and every candidate's zero-shot
    loss against its total parameters, active parameters and serving memory."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axs = plt.subplots(2, 2, figsize=(10, 7))
    ax = axs[0][0]
    ax.scatter([r["tokens_per_s"] for r in rows], [r["distilled_loss"] for r in rows], c="C0",
               label="candidates after short KD")
    for r in rows:
        ax.annotate(f"#{r['rank']} {r['name']}", (r["tokens_per_s"], r["distilled_loss"]), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    if teacher and teacher.get("tokens_per_s"):
        ax.scatter([teacher["tokens_per_s"]], [teacher["zero_shot_loss"]], c="C3", marker="*", s=120,
                   label="teacher")
    ax.set_xlabel("forward throughput (tokens/s, this machine)")
    ax.set_ylabel("validation LM loss")
    ax.set_title("loss vs throughput", fontsize=9)
    ax.legend(fontsize=7)
    top = {r["name"] for r in rows}
    for ax, key, label, scale in ((axs[0][1], "params", "total parameters (M)", 1e6),
                                  (axs[1][0], "active_params", "active parameters per token (M)", 1e6),
                                  (axs[1][1], "memory_bytes", "serving memory (MiB)", 2 ** 20)):
        zs = [r for r in zero_shot if r.get(key) is not None]
        ax.scatter([r[key] / scale for r in zs], [r["zero_shot_loss"] for r in zs],
                   c=["C1" if r["name"] in top else "C7" for r in zs], s=14)
        if teacher and teacher.get(key):
            ax.scatter([teacher[key] / scale], [teacher["zero_shot_loss"]], c="C3", marker="*", s=120)
        ax.set_xlabel(label)
        ax.set_ylabel("zero-shot loss")
        ax.set_title(f"zero-shot loss vs {label.split(' (')[0]} (orange: short-KD top-k)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


# ----------------------------------------------------------------------------- the stage


def run_search(cfg: SearchConfig) -> dict:
    from .. import dist as D
    from ..compat import mcore
    from ..distill.stage import DistillConfig, run_distill
    from ..model import build_model
    from ..preempt import StopRequest
    from ..rewrite.stage import fill_from_source
    from ..train import checkpoint as ckpt
    from ..data.stage_data import datasets

    t_start = time.time()
    t_cfg, imp, cands, info, drop_order = validate(cfg)
    teacher_it = ckpt.require(cfg.teacher)
    seq = cfg.seq_length or t_cfg.seq_length
    out = Path(cfg.output_dir)
    owns_pg = not torch.distributed.is_initialized()
    par = D.init(cfg.parallel, seed=cfg.kd.seed)
    rank0 = D.is_rank0()
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
    D.barrier()
    try:
        state = State(out / STATE_FILE, _fingerprint(cfg, teacher_it), cfg.resume, write=rank0)
    except ConfigError:
        if owns_pg:
            D.shutdown()
        raise
    D.barrier()  # every rank read the file before rank 0 writes it again
    n_layers = t_cfg.num_layers
    say = D.print0
    budget = budget_of(cfg, t_cfg.seq_length)
    say(f"[search] {len(cands)} candidates within {budget.describe()} "
        f"(of {info['combinations']} combinations; rejected {info['rejected']}); teacher "
        f"{t_cfg.pattern} {_params(t_cfg):,} params; depth order ({cfg.depth_metric}) {drop_order}; "
        f"tp={par.tp} pp={par.pp} dp={par.dp}" + (f" cp={par.cp}" if par.cp > 1 else "")
        + (f"; resuming: {state.resumed['zero_shot']} zero-shot and {state.resumed['kd']} KD results "
           "already done" if any(state.resumed.values()) else ""))
    budget_left = [cfg.stop_after or math.inf]
    # signals / exit_duration_minutes: checked between candidates (every rank agrees)
    stop = StopRequest(cfg.exit_duration_minutes, t_start).start()

    def finished_one() -> None:
        budget_left[0] -= 1
        if budget_left[0] <= 0:
            raise _Stop("stop_after")
        if stop.poll():
            raise _Stop("preempt")

    stopped, interrupted, kd_stop = None, None, None
    _, valid_ds, _ = datasets(cfg.data, seq, 1, cfg.eval_iters * cfg.micro_batch_size)
    try:
        # ---- 1. zero-shot scores: each candidate's pruned model at this layout, filled from
        # the teacher checkpoint's shards (no teacher in memory, nothing written)
        todo = [c for c in cands if c.name not in state.data["zero_shot"]] + \
            ([None] if "__teacher__" not in state.data["zero_shot"] else [])
        if todo:
            if None in todo:  # the teacher's own loss: the reference row of the table
                teacher = build_model(dataclasses.replace(t_cfg, seq_length=seq), par, initialize=False)
                ckpt.load_model_weights(teacher_it, teacher)
                state.put("zero_shot", "__teacher__", {
                    "name": "teacher", "params": _params(t_cfg), **_sizes(t_cfg, budget),
                    "zero_shot_loss": _eval(teacher, valid_ds, cfg, par, seq), "distilled_loss": None,
                    "tokens_per_s": throughput(teacher, par, t_cfg.vocab_size, cfg.micro_batch_size,
                                               seq, cfg.throughput_iters),
                    **{a: (n_layers if a == "num_layers" else getattr(t_cfg, a)) for a in axes_of(t_cfg)}})
                del teacher
            todo = [c for c in todo if c is not None]
            prog = _progress(len(cands), len(cands) - len(todo), "search zero-shot", rank0)
            for c in todo:
                t0 = time.time()
                plan = _plan_for(imp, c, cfg, n_layers)
                model = build_model(dataclasses.replace(plan.target, seq_length=seq), par, initialize=False)
                fill_from_source(model, mcore.sharded_parts(model)[0], plan, teacher_it)
                loss = _eval(model, valid_ds, cfg, par, seq)
                del model
                state.put("zero_shot", c.name, dict(c.to_dict(), zero_shot_loss=loss,
                                                      seconds=time.time() - t0))
                prog.update(0, {"cand": c.name, "loss": loss})
                prog.write(f"[search] zero-shot {c.name}: {c.params:,} params, loss {loss:.4f}")
                finished_one()
            prog.close()
        zs = [state.data["zero_shot"][c.name] for c in cands]
        zs.sort(key=lambda r: (r["zero_shot_loss"], r["name"]))
        top = zs[:cfg.top_k]

        # ---- 2. short KD of the top_k at this layout, evaluation on the same set, throughput
        prog = _progress(len(top), sum(r["name"] in state.data["kd"] for r in top), "search short KD", rank0)
        for r in top:
            name = r["name"]
            if name in state.data["kd"]:
                continue
            t0 = time.time()
            c = next(c for c in cands if c.name == name)
            cdir = out / "candidates" / name
            plan = _plan_for(imp, c, cfg, n_layers)
            s_cfg = dataclasses.replace(plan.target, seq_length=seq)
            # leftovers of an interrupted KD resume only if they belong to this configuration
            marker = cdir / "fingerprint.txt"
            if rank0:
                if cdir.exists() and (not cfg.resume or not marker.is_file()
                                      or marker.read_text() != state.data["fingerprint"]):
                    shutil.rmtree(cdir)
                cdir.mkdir(parents=True, exist_ok=True)
                marker.write_text(state.data["fingerprint"])
                plan.save(cdir / "plan.json")
            D.barrier()
            if ckpt.resolve(cdir / "pruned") is None:  # the student: pruned in memory, saved once
                model = build_model(s_cfg, par, initialize=False)
                fill_from_source(model, mcore.sharded_parts(model)[0], plan, teacher_it)
                ckpt.save(cdir / "pruned", 0, plan.target, {"model": model.sharded_state_dict()},
                          {"stage": "search-candidate", "pruned_from": str(teacher_it),
                           "plan": str(cdir / "plan.json")})
                del model
            train = cfg.kd_train()
            if cfg.exit_duration_minutes:  # the KD stops (after a save) when the search's time is up
                left = cfg.exit_duration_minutes - (time.time() - t_start) / 60
                train = dataclasses.replace(train, exit_duration_minutes=max(left, 1e-6))
            kd = run_distill(DistillConfig(
                student=str(cdir / "pruned"), teacher=str(teacher_it), output_dir=str(cdir / "distilled"),
                seq_length=seq, loss=cfg.kd_loss, data=cfg.data, train=train, resume=True,
                parallel=cfg.parallel, teacher_cache=cfg.teacher_cache))
            if kd.get("interrupted"):  # it saved its checkpoint; the search stops too
                stopped, kd_stop = "preempt", kd["interrupted"]
                break
            model = build_model(s_cfg, par, initialize=False)  # weights loaded next
            ckpt.load_model_weights(cdir / "distilled", model)
            loss = _eval(model, valid_ds, cfg, par, seq)
            tps = throughput(model, par, s_cfg.vocab_size, cfg.micro_batch_size, seq, cfg.throughput_iters)
            del model
            D.barrier()
            if rank0 and not cfg.keep_checkpoints:  # plan.json and the KD summary stay
                shutil.rmtree(cdir / "pruned", ignore_errors=True)
                shutil.rmtree(cdir / "distilled" / "checkpoints", ignore_errors=True)
            state.put("kd", name, {"distilled_loss": loss, "tokens_per_s": tps,
                                   "kd_train_loss_last": kd["history"][-1]["loss"] if kd.get("history") else None,
                                   "kd_steps": cfg.short_kd_steps,
                                   "kd_tokens": cfg.short_kd_steps * cfg.kd.global_batch_size * seq,
                                   "checkpoint": str(cdir / "distilled"),
                                   "plan": str(cdir / "plan.json"), "seconds": time.time() - t0})
            prog.update(0, {"cand": name, "loss": loss})
            prog.write(f"[search] short KD {name}: distilled loss {loss:.4f} (zero-shot "
                       f"{r['zero_shot_loss']:.4f}), {tps:,.0f} tokens/s")
            finished_one()
        prog.close()
    except _Stop as e:
        stopped = str(e)
    finally:
        stop.close()
    if stopped == "preempt":
        if kd_stop is not None:
            stop.reason = stop.reason or kd_stop["reason"]
        interrupted = stop.record(out, len(state.data["kd"]), "search state" + (
            " and the running short KD's checkpoint" if kd_stop is not None else ""))
    summary = _outputs(cfg, state, cands, info, drop_order, stopped, interrupted, teacher_it, out,
                       t_start, budget, t_cfg) if rank0 else None
    summary = D.broadcast_object(summary)  # every rank returns the same summary
    if owns_pg:
        D.shutdown()
    return summary


def _outputs(cfg: SearchConfig, state: State, cands, info, drop_order, stopped, interrupted,
             teacher_it, out: Path, t_start: float, budget: Budget, t_cfg) -> dict:
    """Rank 0: candidates.json, table.{json,md}, plot, chosen_plan.json, summary.json (also
    after a stop: what is finished so far)."""
    # sizes as this run counts them: a resumed record keeps those of the run that scored it,
    # and the memory bound's batch / length are no part of the fingerprint
    now = {c.name: c.to_dict() for c in cands}
    zs_all = sorted((dict(v, **now.get(k, {})) for k, v in state.data["zero_shot"].items() if k != "__teacher__"),
                    key=lambda r: (r["zero_shot_loss"], r["name"]))
    (out / "candidates.json").write_text(json.dumps({
        "budget": cfg.budget, "tolerance": cfg.tolerance, "budgets": _budget_dict(cfg), "enumerated": len(cands),
        "combinations": info["combinations"], "rejected": info["rejected"], "grid": info["grid"],
        "drop_order": drop_order, "candidates": zs_all}, indent=1))
    if stopped:
        summary = {"stage": "search", "stopped": True, "zero_shot_done": len(zs_all),
                   "kd_done": len(state.data["kd"]), "output_dir": str(out)}
        if interrupted:
            summary["interrupted"] = interrupted
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        why = f"stop_after={cfg.stop_after} results" if stopped == "stop_after" else interrupted["reason"]
        print(f"[search] stopped ({why}); re-run the same command to continue", flush=True)
        return summary
    from ..preempt import clear_record

    clear_record(out)
    top = sorted((dict(state.data["zero_shot"][c.name], **now[c.name]) for c in cands),
                 key=lambda r: (r["zero_shot_loss"], r["name"]))[:cfg.top_k]
    kd_rows = [dict(r, **state.data["kd"][r["name"]]) for r in top]
    rows = rank(kd_rows, cfg.tie_tolerance)
    teacher_row = dict(state.data["zero_shot"]["__teacher__"], **_sizes(t_cfg, budget), rank="teacher")
    moe, mamba = "num_moe_experts" in teacher_row, "mamba_num_heads" in teacher_row
    tcols = [k for k, _ in columns(moe, mamba)]
    table = {"columns": tcols, "teacher": {k: teacher_row.get(k) for k in tcols},
             "rows": [{**{k: r.get(k) for k in tcols}, "name": r["name"], "pattern": r["pattern"]} for r in rows]}
    (out / "table.json").write_text(json.dumps(table, indent=1))
    md = table_markdown(rows, teacher_row, moe, mamba)
    (out / "table.md").write_text(
        f"# Architecture search (paper table 1)\n\nBudget: {budget.describe()}; "
        f"{len(cands)} candidates scored zero-shot; top {len(top)} after {cfg.short_kd_steps} KD steps; "
        f"ties within {cfg.tie_tolerance:.1%} broken by throughput.\n\n" + md)
    plot = _plot(rows, zs_all, teacher_row, out / "loss_vs_throughput.png")
    chosen = rows[0]
    shutil.copyfile(chosen["plan"], out / "chosen_plan.json")
    summary = {
        "stage": "search", "stopped": False, "teacher": str(teacher_it), "importance": cfg.importance,
        "budget": cfg.budget, "tolerance": cfg.tolerance, "budgets": _budget_dict(cfg), "candidates": len(cands),
        "combinations": info["combinations"], "rejected": info["rejected"], "top_k": len(top),
        "short_kd_steps": cfg.short_kd_steps, "chosen": {k: chosen[k] for k in
                                                          ["name", "pattern", "params", "active_params",
                                                           "memory_bytes", *axes_of_row(chosen),
                                                           "zero_shot_loss", "distilled_loss", "tokens_per_s"]},
        "chosen_plan": str(out / "chosen_plan.json"), "table": rows, "teacher_row": teacher_row,
        "plot": plot, "resumed": state.resumed, "elapsed_seconds": time.time() - t_start,
        # measured cost per candidate at this layout (mean over the results of every run)
        "seconds_per_candidate": {sec: _mean([v["seconds"] for k, v in state.data[sec].items()
                                              if k != "__teacher__" and "seconds" in v])
                                  for sec in ("zero_shot", "kd")},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n" + md, flush=True)
    print(f"[search] chosen #1 {chosen['name']} ({chosen['params']:,} params, distilled loss "
          f"{chosen['distilled_loss']:.4f}); plan for `prune`: {out / 'chosen_plan.json'}; "
          f"{summary['elapsed_seconds']:.0f}s; per candidate: zero-shot "
          f"{_fmt_s(summary['seconds_per_candidate']['zero_shot'])}, short KD "
          f"{_fmt_s(summary['seconds_per_candidate']['kd'])}", flush=True)
    return summary


def _fmt_s(x) -> str:
    return "-" if x is None else f"{x:.1f}s"


def _mean(xs: list) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _params(cfg) -> int:
    from ..model import count_parameters

    return count_parameters(cfg)["total"]
