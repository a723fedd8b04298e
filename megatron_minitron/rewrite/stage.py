"""`prune` stage: rewrite a megatron distributed checkpoint to a plan, at any TP/PP.

How (every rank, under torchrun):
  1. build the PRUNED model at the requested TP/PP, uninitialized; expand its sharded
     state dict (the Mamba in_proj / conv1d factories become the separate global keys
     in_proj.weight.{z,x,B,C,dt}, conv1d.{weight,bias}.{x,B,C}); each ShardedTensor is a
     view of this rank's parameter slice;
  2. for each, rules.Rules gives the source key and, per dimension, the SOURCE indices
     that fill this shard (keep[off:off+n]); the rank reads the source chunks overlapping
     the bounding box of those indices (compat/torch_dist.Reader, no collectives), takes
     the exact rows/cols into the parameter, and checks that every parameter element was
     filled exactly once;
  3. compat/torch_dist.save of the pruned model into <dst>.partial (each rank one file of
     its main-replica shards, fsync'ed; rank 0 checks the shards tile every tensor and
     writes .metadata), + model_config.json = the pruned config, meta.json,
     pruning_plan.json, summary.json;
  4. verify: a fresh pruned model (NaN-filled) loads <dst>.partial through megatron's own
     dist_checkpointing loader, every tensor equals the written one exactly and a forward
     pass on a few tokens is finite;
  5. swap (rank 0): an atomic exchange of <dst>.partial and <dst> (Linux renameat2
     RENAME_EXCHANGE), then the old folder becomes <dst>.orig (or is deleted if
     keep_backup=false).

Memory per rank: its pruned shard (the model) + the source bounding boxes of that shard.
With the default sorted plans the box of a TP shard spans about that rank's share of the
source along the sharded dimension, so the bound is about (pruned share + source share);
with arbitrary (ranked) orders it can grow to the full source tensor along the TP axis of
the rank's PP stage (never another stage's layers).

Crash safety: <dst> only ever changes by one atomic rename/exchange of a complete,
verified folder, so a kill -9 at any moment leaves <dst> either untouched or the complete
new checkpoint. A journal <dst>.prune_journal.json (written before <dst>.partial exists,
removed last) plus a prune_id in the new meta.json let the next `prune` on the same
destination finish or roll back the bookkeeping (move the exchanged-out original to
<dst>.orig, delete a half-written <dst>.partial). Only on filesystems without
renameat2 is the swap two renames; a kill between them leaves <dst> absent with the
original at <dst>.orig, which the next run restores.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ConfigError, ParallelConfig, check_ep_used
from ..plan.targets import Plan
from . import rules

FAULT_ENV = "MINITRON_PRUNE_FAULT"  # test hook: SIGKILL rank 0 at this phase
PHASES = ("staged", "loaded", "written", "verified", "exchanged", "backed_up", "renamed_away")


@dataclass
class PruneConfig:
    checkpoint: str = "runs/teacher"  # source: run dir or iteration dir
    plan: str = "runs/plan/plan.json"
    # the source's and the plan target's shapes for --dry-run / --print-config before the
    # checkpoint / plan exist: a model YAML (configs/model/*.yaml), a recipe with a model:
    # mapping, a plan.json (its target) or a checkpoint; the real files win once they exist
    checkpoint_model: str = ""
    target_model: str = ""
    # new checkpoint folder; "" or the source path = in place (a run directory: only the
    # iteration folder its `latest` names is rewritten; the run's other files stay)
    output: str = "runs/pruned"
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # layout to write at
    keep_backup: bool = True  # keep the replaced folder as <output>.orig
    overwrite: bool = False  # allow replacing an existing output that is not the source
    verify: bool = True
    verify_tokens: int = 16
    fsync: bool = True  # flush the new files to disk before the swap (survives power loss)


# ----------------------------------------------------------------------------- helpers


def _fault(phase: str) -> None:
    if os.environ.get(FAULT_ENV) == phase:
        os.kill(os.getpid(), signal.SIGKILL)


def _paths(dst: Path) -> dict:
    return {"partial": dst.with_name(dst.name + ".partial"),
            "orig": dst.with_name(dst.name + ".orig"),
            "journal": dst.with_name(dst.name + ".prune_journal.json")}


def _prune_id(folder: Path) -> str | None:
    try:
        return json.loads((folder / "meta.json").read_text()).get("prune_id")
    except (OSError, ValueError):
        return None


def recover(dst: Path, log=print) -> None:
    """Finish or roll back an interrupted prune into `dst` (rank 0, before any work)."""
    p = _paths(dst)
    if not p["journal"].exists():
        if p["partial"].exists():
            raise ConfigError(f"{p['partial']} exists but no prune journal does; it is not ours "
                              "to delete: move it away and re-run")
        return
    j = json.loads(p["journal"].read_text())
    if dst.exists() and _prune_id(dst) == j["id"]:  # the swap happened
        if p["partial"].exists():  # the exchanged-out original
            if j.get("keep_backup", True) and not p["orig"].exists():
                os.replace(p["partial"], p["orig"])
                log(f"recover: original kept at {p['orig']}")
            else:
                shutil.rmtree(p["partial"])
    else:  # the swap did not happen: the original (if any) is intact
        if not dst.exists() and j.get("dst_existed") and p["orig"].exists():
            os.replace(p["orig"], dst)  # the two-rename fallback was interrupted
            log(f"recover: restored {dst} from {p['orig']}")
        if p["partial"].exists():
            shutil.rmtree(p["partial"])
            log(f"recover: removed the unfinished {p['partial']}")
    p["journal"].unlink()


def forward_logits(model, par, tokens: torch.Tensor) -> torch.Tensor | None:
    """Full-vocab logits [b, s, V] on the last PP stage (None elsewhere); forward only,
    through the pipeline schedule so PP > 1 works."""
    import torch.distributed as dist

    from ..compat import mcore
    from ..model import causal_mask

    got = []
    b, s = tokens.shape
    pos = torch.arange(s).unsqueeze(0).expand(b, s)

    def step(it, m):
        batch = next(it)
        out = m(batch[0], batch[1], causal_mask(s))

        def keep(o):
            got.append(o.detach())
            return o.sum() * 0, {}
        return out, keep

    model.eval()
    with torch.no_grad():
        mcore.get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([(tokens.to(par.device), pos.to(par.device))]),
            model=[model], num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=True)
    if not par.is_last_stage:
        return None
    local = got[0].float()
    if par.tp > 1:
        parts = [torch.empty_like(local) for _ in range(par.tp)]
        dist.all_gather(parts, local.contiguous(), group=par.pg.tp)
        local = torch.cat(parts, dim=-1)
    return local


# ----------------------------------------------------------------------------- the rewrite


def fill_from_source(model, tensors: list, plan: Plan, src_dir: Path, metadata=None) -> dict:
    """Fill every parameter shard of `model` (the pruned model; `tensors` = its expanded
    ShardedTensors, views of its parameters) from the source checkpoint. No collectives:
    each rank reads only the source chunks overlapping the bounding box of the rows/cols
    its shards keep. Returns byte counts: what was read (boxes) and written. metadata:
    torch_dist.check_files(src_dir) when the caller just ran it (not read twice)."""
    from ..compat import torch_dist

    read = written = 0
    filled = {}  # parameter storage -> elements filled: every element must be, exactly once
    rule = rules.Rules(plan)
    boxes: dict = {}
    with torch_dist.Reader(src_dir, metadata) as src, torch.no_grad(), torch_dist.OpThreads() as threads:
        for st in tensors:
            data = torch_dist.shard_data(st)  # [1, ...] per expert of a MoE layer
            src_key, idxs = rule(st.key)
            if src_key not in src:
                raise ConfigError(f"source checkpoint {src_dir} has no tensor {src_key!r} (needed for {st.key})")
            src_shape = src.shape(src_key)
            if len(src_shape) != len(idxs):
                raise ConfigError(f"{src_key}: source is {len(src_shape)}-D, rule has {len(idxs)} dims")
            # tensors of one kind share their index tensors (rules.Rules builds each once) and
            # shapes: their boxes are computed once (a few small tensor ops per dimension)
            bkey = (tuple(None if ix is None else id(ix) for ix in idxs), tuple(st.global_offset),
                    tuple(data.shape), src_shape)
            hit = boxes.get(bkey)
            if hit is None:
                hit = boxes[bkey] = (rules.shard_box(idxs, st.global_offset, tuple(data.shape), src_shape),
                                     idxs)  # idxs: keeps the ids in the key from being reused
            (lo, box, local), _ = hit
            region = src.read_box(src_key, lo, box, reuse=True)  # consumed before the next read
            threads.fit(region.numel())  # small gathers on one thread: waking the others costs more
            read += region.numel() * region.element_size()
            rules.take(region, local, out=data)
            written += data.numel() * data.element_size()
            ptr = data.untyped_storage().data_ptr()
            filled[ptr] = filled.get(ptr, 0) + data.numel()
    short = [n for n, prm in model.named_parameters() if filled.get(prm.untyped_storage().data_ptr()) != prm.numel()]
    if short:
        raise RuntimeError(f"the pruned model's parameters {short[:5]} are not exactly covered by its "
                           "sharded state dict; refusing to write a partly filled checkpoint")
    return {"bytes_read": read, "bytes_filled": written}


def global_param_count(tensors: list, model) -> int:
    """Parameters of the whole model, from its sharded tensors: every main-replica shard
    of a parameter once (TP-replicated norms, DP replicas and a tied output layer are
    replicas; buffers such as the MoE router's expert bias are not parameters), summed over
    all ranks; comparable to model.count_parameters. Collective."""
    import torch.distributed as dist

    from ..compat.mcore import is_main_replica

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    t = torch.tensor([sum(st.data.numel() for st in tensors if is_main_replica(st.replica_id)
                          and st.data.untyped_storage().data_ptr() in params)], dtype=torch.long)
    if dist.is_initialized():
        dist.all_reduce(t)
    return int(t)


def _wait_for_journal(dst: Path, timeout: float = 120.0) -> None:
    """Other ranks: wait until rank 0's recover() has cleared a stale journal (before the
    process group exists, so no barrier is available yet)."""
    if int(os.environ.get("RANK", "0")) == 0:
        return
    j, t0 = _paths(dst)["journal"], time.time()
    while j.exists() and time.time() - t0 < timeout:
        time.sleep(0.2)


def _same_path(a: str, b: str) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _in_place_target(path: str) -> Path:
    """The folder an in-place prune of `path` rewrites: the iteration folder itself, or the
    one a run / checkpoints directory's `latest` names -- read as text, so it is found
    even when an interrupted two-rename swap left that folder missing (recover() then
    restores it)."""
    from ..train import checkpoint as ckpt

    p = Path(path)
    if (p / ckpt.CONFIG_FILE).is_file() and (p / ckpt.META_FILE).is_file():
        return p
    for base in (p / "checkpoints", p):
        latest = base / "latest"
        if latest.is_file():
            return base / latest.read_text().strip()
    return p


def validate_settings(cfg: PruneConfig) -> None:
    """Settings errors, no file read (the run, --dry-run and --print-config)."""
    cfg.parallel.validate()
    if cfg.verify_tokens < 1:
        raise ConfigError(f"verify_tokens={cfg.verify_tokens} must be >= 1")


def validate_plan(cfg: PruneConfig, source, plan_source, target, where: str) -> None:
    """The source checkpoint's model (at `where`) against the plan's source (None: no plan
    yet) and the plan's target at the layout written."""
    if plan_source is not None and source.to_dict() != plan_source.to_dict():
        diff = {k: (v, plan_source.to_dict()[k]) for k, v in source.to_dict().items()
                if plan_source.to_dict()[k] != v}
        raise ConfigError(f"plan {cfg.plan} was made for another model than checkpoint {where}: "
                          f"(checkpoint, plan) differ in {diff}; re-run `plan` on this checkpoint's stats")
    target.validate(tp=cfg.parallel.tp, pp=cfg.parallel.pp, prefix="plan target", ep=cfg.parallel.ep)
    check_ep_used(cfg.parallel.ep, target)


def run_prune(cfg: PruneConfig) -> dict:
    from .. import dist as D
    from ..compat import mcore, torch_dist
    from ..model import build_model
    from ..train import checkpoint as ckpt

    t0 = time.time()
    # ---- validation before any work
    validate_settings(cfg)
    in_place = cfg.output == "" or _same_path(cfg.output, cfg.checkpoint)
    if not in_place and _in_place_target(cfg.checkpoint).resolve().is_relative_to(Path(cfg.output).resolve()):
        in_place = True  # the output is the run dir (or checkpoints dir) holding the source
    # in place: only the iteration folder is rewritten; a run directory's metrics,
    # TensorBoard logs, older iterations and config stay as they are
    dst = (_in_place_target(cfg.checkpoint) if in_place else Path(cfg.output)).resolve()
    if int(os.environ.get("RANK", "0")) == 0:
        recover(dst, print)  # finish / roll back an interrupted prune into dst first
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _wait_for_journal(dst)
    src_it = ckpt.require(cfg.checkpoint)
    plan = Plan.load(cfg.plan)
    src_cfg = ckpt.read_model_config(src_it)
    validate_plan(cfg, src_cfg, plan.source, plan.target, str(src_it))
    src_md = torch_dist.check_files(src_it)  # a missing / truncated shard or .metadata: refused now
    p = _paths(dst)
    if not in_place and _same_path(str(dst), str(src_it)):
        in_place = True
    if in_place and not _same_path(str(dst), str(src_it)):
        raise ConfigError(f"in-place prune of {cfg.checkpoint}: its latest checkpoint is {src_it}, "
                          f"not {dst}; fix {Path(dst).parent / 'latest'} or give the iteration folder")

    owns_pg = not D.initialized()  # a process group found up is left up
    par = D.init(cfg.parallel)
    rank0 = D.is_rank0()
    log = D.print0
    err = None
    if rank0:
        try:
            if dst.exists() and not in_place and not cfg.overwrite:
                raise ConfigError(f"output={dst} exists; choose another output, set overwrite=true, "
                                  "or prune in place with output=<checkpoint>")
            if dst.exists() and cfg.keep_backup and p["orig"].exists():
                raise ConfigError(f"backup {p['orig']} already exists; move it away or set keep_backup=false")
            if in_place and not dst.exists():
                raise ConfigError(f"in-place source {dst} does not exist")
        except ConfigError as e:
            err = str(e)
    err = D.broadcast_object(err)
    if err:
        if owns_pg:
            D.shutdown()
        raise ConfigError(err)

    prune_id = D.broadcast_object(uuid.uuid4().hex)
    partial = p["partial"]
    if rank0:
        dst.parent.mkdir(parents=True, exist_ok=True)  # output=new/dirs/pruned: made, as plan does
        ckpt._write_json_atomic(p["journal"], {"id": prune_id, "dst": str(dst), "dst_existed": dst.exists(),
                                               "keep_backup": cfg.keep_backup, "in_place": in_place})
        partial.mkdir(parents=True)
        _fault("staged")
    D.barrier()

    # ---- build the pruned model at the requested layout (no init: every element is filled)
    t = time.time()
    model = build_model(plan.target, par, initialize=False)
    tensors, objects = mcore.sharded_parts(model)
    t_build = time.time() - t
    t = time.time()
    io = fill_from_source(model, tensors, plan, src_it, metadata=src_md)
    t_fill = time.time() - t
    log(f"prune: filled the pruned model ({plan.params_after['total']:,} params) from {src_it} "
        f"in {t_fill:.2f}s")
    if rank0:
        _fault("loaded")

    # ---- save into <dst>.partial (one file per rank, fsync'ed, then .metadata on rank 0)
    t = time.time()
    torch_dist.save(tensors, objects, partial, rank=par.rank, group=None, fsync=cfg.fsync)
    D.barrier()
    if rank0:
        _fault("written")
        ckpt._write_json_atomic(partial / "pruning_plan.json", plan.to_dict())
        ckpt._write_json_atomic(partial / ckpt.CONFIG_FILE, plan.target.to_dict())
        ckpt._write_json_atomic(partial / ckpt.META_FILE, {
            "iteration": 0, "prune_id": prune_id, "pruned_from": str(src_it), "plan": str(cfg.plan),
            "written_at": {"tp": par.tp, "pp": par.pp, "ep": par.ep}, "megatron_core": mcore.MCORE_VERSION})
    D.barrier()
    t_save = time.time() - t

    # ---- verify: reload into a fresh model, exact equality, finite forward
    t = time.time()
    verified = None
    if cfg.verify:
        model2 = build_model(plan.target, par, initialize=False)
        with torch.no_grad():  # anything the loader misses stays NaN and fails the check
            for prm in model2.parameters():
                prm.fill_(float("nan"))
        ckpt.load_model_weights(partial, model2)
        mismatch = [n for (n, a), (_, b) in zip(model.named_parameters(), model2.named_parameters())
                    if a.shape != b.shape or not torch.equal(a, b)]
        g = torch.Generator().manual_seed(0)
        toks = torch.randint(0, plan.target.vocab_size, (1, cfg.verify_tokens), generator=g)
        logits = forward_logits(model2, par, toks)
        finite = True if logits is None else bool(torch.isfinite(logits).all())
        bad = torch.tensor([len(mismatch) + (0 if finite else 1)], dtype=torch.long)
        import torch.distributed as dist
        dist.all_reduce(bad)
        if int(bad):
            if rank0:
                shutil.rmtree(partial, ignore_errors=True)
                p["journal"].unlink(missing_ok=True)
            if owns_pg:
                D.shutdown()
            raise RuntimeError(f"verification of {partial} failed (tensors differ: {mismatch[:5]}, "
                               f"finite logits: {finite}); the original is untouched")
        verified = {"tensors_equal": True, "finite_logits": True, "tokens": cfg.verify_tokens}
        del model2
    t_verify = time.time() - t
    built = global_param_count(tensors, model)

    # ---- summary (inside the new checkpoint) and the swap
    summary = {
        "source": str(src_it), "output": str(dst), "in_place": in_place, "plan": str(cfg.plan),
        "source_model": plan.source.to_dict(), "pruned_model": plan.target.to_dict(),
        "params_before": plan.params_before["total"], "params_after": plan.params_after["total"],
        "params_built": built, "written_at": {"tp": par.tp, "pp": par.pp, "ep": par.ep, "dp": par.dp},
        "bytes_read_rank0": io["bytes_read"], "bytes_filled_rank0": io["bytes_filled"],
        "seconds": {"build": t_build, "fill": t_fill, "save": t_save, "verify": t_verify}, "verified": verified,
        "backup": str(p["orig"]) if cfg.keep_backup else None,
    }
    if rank0:
        (partial / "summary.json").write_text(json.dumps(summary, indent=2))
        _fault("verified")
        if dst.exists():
            if ckpt.exchange(partial, dst):  # dst = new, partial = old: one atomic step
                _fault("exchanged")
                if cfg.keep_backup:
                    os.replace(partial, p["orig"])
                else:
                    shutil.rmtree(partial)
                _fault("backed_up")
            else:  # fallback: two renames (recover() repairs a kill in between)
                os.replace(dst, p["orig"])
                _fault("renamed_away")
                os.replace(partial, dst)
                if not cfg.keep_backup:
                    shutil.rmtree(p["orig"])
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(partial, dst)
        p["journal"].unlink(missing_ok=True)
        summary["seconds"]["total"] = time.time() - t0
        (dst / "summary.json").write_text(json.dumps(summary, indent=2))
        s, g = plan.source, plan.target
        log(f"prune: {s.pattern} -> {g.pattern}; params {plan.params_before['total']:,} -> "
            f"{plan.params_after['total']:,} ({plan.params_after['total'] / plan.params_before['total']:.1%}); "
            f"built {built:,}; written at TP={par.tp} PP={par.pp} EP={par.ep} to {dst}"
            + (f" (original kept at {p['orig']})" if dst.exists() and cfg.keep_backup and p['orig'].exists() else "")
            + f"; verified={bool(verified)}; {summary['seconds']['total']:.1f}s")
    D.barrier()
    if owns_pg:
        D.shutdown()
    return summary
