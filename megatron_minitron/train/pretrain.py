"""`pretrain` and `eval` stages: LM training / validation loss of a hybrid model."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path


from .. import dist as D
from ..config import (ConfigError, DataConfig, EvalConfig, PretrainConfig, check_cp, check_ep_used,  # noqa: F401
                      check_moe_train, dump_json)
from ..data.stage_data import check_data, datasets
from ..model import build_model, count_parameters
from . import checkpoint as ckpt
from .engine import (MicroBatches, load_weights, Progress, build_trainable, evaluate, fmt_eta, forward_step_for,
                     reduce_reports, resume_trainable, save_trainable, train_step, valid_batches)


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def validate_pretrain(cfg: PretrainConfig, world: int) -> None:
    """Every settings error, no file read: the run, --dry-run and --print-config call it."""
    dp = world // (cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp)
    cfg.parallel.validate(cp_ok=True)
    cfg.model.validate(cfg.parallel.tp, cfg.parallel.pp, ep=cfg.parallel.ep)
    check_cp(cfg.model, cfg.parallel)
    check_ep_used(cfg.parallel.ep, cfg.model)
    check_moe_train(cfg.train, cfg.model)
    cfg.train.validate(max(dp, 1))
    cfg.data.validate()


def run_pretrain(cfg: PretrainConfig) -> dict:
    validate_pretrain(cfg, world_size_from_env())
    data_summary = check_data(cfg.data, cfg.model)
    if cfg.init_from:
        ckpt.require(cfg.init_from)

    from ..resources.check import check

    check("pretrain", cfg)  # per-GPU memory estimate vs parallel.memory_limit_gb
    t_start = time.time()
    owns_pg = not D.initialized()  # a caller's process group is left up
    par = D.init(cfg.parallel, seed=cfg.train.seed)
    out = Path(cfg.output_dir)
    if D.is_rank0():
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(dump_json(cfg))
    tr = cfg.train
    num_micro = tr.global_batch_size // (tr.micro_batch_size * par.dp)
    train_ds, valid_ds, _ = datasets(cfg.data, cfg.model.seq_length,
                                     tr.steps * tr.global_batch_size,
                                     tr.eval_iters * tr.micro_batch_size * par.dp)
    resuming = cfg.resume and ckpt.resolve(out) is not None
    # weights that a checkpoint load will overwrite are left uninitialised
    t = build_trainable(cfg.model, par, tr, cfg.parallel,
                        initialize=not (resuming or cfg.init_from))
    resumed_from = None
    if resuming:
        stored = ckpt.read_model_config(out)
        if stored != cfg.model:
            raise ConfigError(
                f"{out} holds a checkpoint of a different model; use another output_dir or "
                "resume=false with a fresh directory"
            )
        resume_trainable(t, out)
        resumed_from = t.iteration
    elif cfg.init_from:
        load_weights(t, cfg.init_from)

    params = count_parameters(cfg.model)
    D.print0(f"[pretrain] model {cfg.model.pattern!r}: {params['total']:,} parameters "
             f"({params['non_embedding']:,} non-embedding); tp={par.tp} pp={par.pp} dp={par.dp}"
             + (f" cp={par.cp}" if par.cp > 1 else "") + "; "
             f"{num_micro} micro-batches of {tr.micro_batch_size} per step"
             + (f"; resumed at step {resumed_from}" if resumed_from is not None else ""))
    data = MicroBatches(train_ds, tr.micro_batch_size, tr.global_batch_size, par.dp,
                        par.dp_rank, start_step=t.iteration, device=par.device)
    seq = cfg.model.seq_length
    step_fn = forward_step_for(par)  # splits each sequence over the CP ranks when cp > 1
    tokens_per_step = tr.global_batch_size * seq
    history = []
    writer = _tensorboard(out / "tensorboard") if D.is_rank0() else None
    prog = Progress(tr.steps, t.iteration, D.is_rank0(), "pretrain")
    metrics = open(out / "metrics.jsonl", "a") if D.is_rank0() else None
    last_val = None
    t_loop = time.time()
    start_it = t.iteration
    from ..preempt import StopRequest, clear_record

    stop, interrupted = StopRequest(tr.exit_duration_minutes, t_start).start(), None
    while t.iteration < tr.steps:
        t0 = time.time()
        res = train_step(t, data, step_fn, num_micro, seq, tr.micro_batch_size)
        loss = reduce_reports(res["reports"], par)
        dt = time.time() - t0
        rec = {"step": t.iteration, "loss": loss, "lr": res["lr"], "grad_norm": res["grad_norm"],
               "tokens_per_s": tokens_per_step / dt}
        history.append(rec)
        if t.iteration % tr.eval_interval == 0 or t.iteration == tr.steps:
            last_val = evaluate(t.model, valid_batches(valid_ds, tr.micro_batch_size, tr.eval_iters, par),
                                step_fn, tr.eval_iters, par, seq, tr.micro_batch_size)
            rec["val_loss"] = last_val
        prog.update(t.iteration, {"loss": loss, "lr": res["lr"]})
        if D.is_rank0():
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
            if writer is not None:
                for k in ("loss", "lr", "grad_norm", "tokens_per_s", "val_loss"):
                    if k in rec:
                        writer.add_scalar(f"train/{k}", rec[k], t.iteration)
        if t.iteration % tr.log_interval == 0 or "val_loss" in rec:
            prog.write(
                f"[pretrain] step {t.iteration}/{tr.steps} loss {loss:.4f} lr {res['lr']:.3g} "
                f"grad_norm {res['grad_norm']:.3g} tok/s {rec['tokens_per_s']:.0f} "
                f"ETA {fmt_eta(prog.eta(t.iteration))}"
                + (f" | val loss {last_val:.4f} ppl {math.exp(last_val):.2f}" if "val_loss" in rec else "")
            )
        asked = stop.poll() and t.iteration < tr.steps  # signal / exit_duration_minutes
        if t.iteration % tr.save_interval == 0 or t.iteration == tr.steps or asked:
            save_trainable(t, out, {"stage": "pretrain", "val_loss": last_val})
        if asked:
            interrupted = stop.record(out, t.iteration, "checkpoint")
            break
    stop.close()
    prog.close()
    if interrupted is not None:  # no final evaluation: the job is about to be killed
        if D.is_rank0():
            metrics.close()
        if owns_pg:
            D.shutdown()
        return {"stage": "pretrain", "interrupted": interrupted, "iteration": t.iteration,
                "steps": tr.steps, "checkpoint": str(ckpt.resolve(out))}
    clear_record(out)
    if last_val is None:  # nothing left to train (already at the last step)
        last_val = evaluate(t.model, valid_batches(valid_ds, tr.micro_batch_size, tr.eval_iters, par),
                            step_fn, tr.eval_iters, par, seq, tr.micro_batch_size)
    elapsed = time.time() - t_start
    summary = {
        "stage": "pretrain",
        "checkpoint": str(ckpt.resolve(out)),
        "parameters": params["total"],
        "non_embedding_parameters": params["non_embedding"],
        "steps": tr.steps,
        "resumed_from": resumed_from,
        "final_train_loss": history[-1]["loss"] if history else None,
        "val_loss": last_val,
        "val_ppl": math.exp(last_val),
        "unigram_baseline": data_summary.get("unigram_entropy"),
        "tokens_seen": tr.steps * tokens_per_step,
        "train_seconds": time.time() - t_loop,
        "steps_this_run": t.iteration - start_it,
        "elapsed_seconds": elapsed,
        "layout": {"tp": par.tp, "pp": par.pp, "ep": par.ep, "dp": par.dp, "cp": par.cp},
        "losses": [h["loss"] for h in history],
    }
    prev = out / "summary.json"
    if t.iteration == start_it and prev.is_file():
        # already trained (the teacher is reused): keep the record of the run that trained it
        summary = dict(json.loads(prev.read_text()), val_loss=last_val, val_ppl=math.exp(last_val),
                       reused=True, checkpoint=summary["checkpoint"])
    D.barrier()  # every rank has read the previous summary before rank 0 replaces it
    if D.is_rank0():
        ckpt._write_json_atomic(prev, summary)
        metrics.close()
        if writer is not None:
            writer.close()
        ub = summary["unigram_baseline"]
        D.print0(f"[pretrain] done in {elapsed:.0f}s: val loss {last_val:.4f} (ppl "
                 f"{math.exp(last_val):.1f})" + (f" vs unigram baseline {ub:.4f}" if ub else "")
                 + f"; checkpoint {summary['checkpoint']}")
    if owns_pg:
        D.shutdown()
    return summary


def eval_checkpoint(checkpoint, data: DataConfig, par, eval_iters: int, micro_batch_size: int,
                    split: str = "valid") -> dict:
    """Validation LM loss of a checkpoint on the fixed evaluation set (the first
    eval_iters x mbs x dp samples of `split`), in an already initialised process group."""
    model_cfg = ckpt.read_model_config(checkpoint)
    n = eval_iters * micro_batch_size * par.dp
    train_ds, valid_ds, test_ds = datasets(data, model_cfg.seq_length, n if split == "train" else 1, n)
    ds = {"train": train_ds, "valid": valid_ds, "test": test_ds}[split]
    if ds is None:
        raise ConfigError(f"the data split {data.split!r} has no {split} part")
    model = build_model(model_cfg, par, initialize=False)  # weights loaded next
    meta = ckpt.load_model_weights(checkpoint, model)
    loss = evaluate(model, valid_batches(ds, micro_batch_size, eval_iters, par),
                    forward_step_for(par), eval_iters, par, model_cfg.seq_length, micro_batch_size)
    return {
        "checkpoint": str(ckpt.require(checkpoint)),
        "iteration": meta.get("iteration"),
        "split": split,
        "loss": loss,
        "ppl": math.exp(loss),
        "tokens": n * model_cfg.seq_length,
        "parameters": count_parameters(model_cfg)["total"],
    }


def validate_eval(cfg: EvalConfig) -> None:
    """Settings errors, no file read (the run, --dry-run and --print-config)."""
    cfg.parallel.validate(cp_ok=True)
    cfg.data.validate()
    if cfg.split not in ("valid", "test", "train"):
        raise ConfigError(f"split={cfg.split!r}: use valid, test or train")
    for key in ("eval_iters", "micro_batch_size"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be positive")


def validate_eval_model(cfg: EvalConfig, model_cfg) -> None:
    """The checkpoint's model at the eval layout."""
    model_cfg.validate(cfg.parallel.tp, cfg.parallel.pp, prefix="checkpoint model", ep=cfg.parallel.ep)
    check_ep_used(cfg.parallel.ep, model_cfg)
    check_cp(model_cfg, cfg.parallel, prefix="checkpoint model")


def run_eval(cfg: EvalConfig) -> dict:
    validate_eval(cfg)
    model_cfg = ckpt.read_model_config(cfg.checkpoint)
    validate_eval_model(cfg, model_cfg)
    data_summary = check_data(cfg.data, model_cfg)
    from ..resources.check import check

    check("eval", cfg)  # per-GPU memory estimate vs parallel.memory_limit_gb
    owns_pg = not D.initialized()  # a process group found up is left up
    par = D.init(cfg.parallel)
    res = eval_checkpoint(cfg.checkpoint, cfg.data, par, cfg.eval_iters, cfg.micro_batch_size, cfg.split)
    summary = {"stage": "eval", **res, "unigram_baseline": data_summary.get("unigram_entropy"),
               "layout": {"tp": par.tp, "pp": par.pp, "ep": par.ep, "dp": par.dp, "cp": par.cp}}
    out = Path(cfg.output_dir or Path(cfg.checkpoint) / "eval")
    if D.is_rank0():
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        D.print0(f"[eval] {summary['checkpoint']}: {cfg.split} loss {res['loss']:.4f} ppl "
                 f"{res['ppl']:.2f} on {res['tokens']:,} tokens")
    if owns_pg:
        D.shutdown()
    return summary


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        return None
    return SummaryWriter(str(path))
