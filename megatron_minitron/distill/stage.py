"""`distill` stage: train a student checkpoint against a frozen teacher checkpoint with
forward-KL logit distillation (paper sec. 3.6, DESIGN.md sec. 5) on megatron-core's
training machinery (train/engine.py: DDP, optimizer, OptimizerParamScheduler, pipeline
schedules, checkpoints).

loss = alpha_kd * mean_tokens KL(softmax(t/T) || softmax(s/T)) + (1 - alpha_kd) * CE;
alpha_kd = 1 is the paper's recipe (logits only), alpha_kd = 0 the cross-entropy baseline
(the teacher is then not run during training; it is only evaluated for the summary).

Context parallelism (parallel.cp > 1): student and teacher are built at the same CP layout
and both see this rank's load-balanced part of each sequence (train/cp.py); a cache's top-K
targets are split the same way. The losses follow pretrain's _lm_loss: this rank's token
sum x cp over the micro-batch's token count on the CP group (DDP averages over dp x cp);
reports hold each rank's own tokens, so every token is counted once.

Start: the student's weights come from `student` at step 0 (new optimizer). If output_dir
already holds a checkpoint of this run and resume=true, everything is restored exactly
(weights, optimizer, scheduler, iteration, data position).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch

from .. import dist as D
from ..config import (ConfigError, DataConfig, ModelConfig, ParallelConfig, TrainConfig, check_cp, check_ep_used,
                      check_moe_train, dump_json)
from ..data.stage_data import check_data, datasets
from ..model import count_parameters
from ..train import checkpoint as ckpt
from ..train import cp as cpsplit
from ..train.engine import (MicroBatches, Progress, build_trainable, cp_scaled, load_weights, runtime_for,
                            evaluate, fmt_eta,
                            forward_step_for, reduce_reports, resume_trainable, save_trainable,
                            train_step, valid_batches)
from ..train.pretrain import _tensorboard, world_size_from_env
from ..preempt import StopRequest, clear_record
from .cache import open_cache
from .loss import kd_loss
from .topk import topk_kd_loss
from .teacher import checksum, distill_forward_step, load_teacher, pair_shapes_fn


@dataclass
class LossConfig:
    temperature: float = 1.0  # KL at temperature T (plain KL, no T^2 factor); paper: 1
    alpha_kd: float = 1.0  # 1 = forward KL only (paper); 0 = cross-entropy only (baseline)
    # Tokens per chunk inside the loss; its extra memory is about 3 x chunk x V/tp fp32.
    # 1024 at 8192 tokens: a KD step (teacher logits counted) peaks at 0.94x a CE step with
    # bf16 logits, 2.95x with fp32 ones, where megatron's CE works in place
    # (scripts/bench_kd_memory.py; CPU, 8192 x 16384). 0 = all tokens at once.
    chunk_size: int = 1024

    def validate(self, prefix: str = "loss") -> None:
        if not self.temperature > 0:
            raise ConfigError(f"{prefix}.temperature={self.temperature} must be > 0 (paper: 1.0)")
        if not 0.0 <= self.alpha_kd <= 1.0:
            raise ConfigError(
                f"{prefix}.alpha_kd={self.alpha_kd} must be in [0, 1]: 1 = forward KL only, "
                "0 = cross-entropy only, between = a mix"
            )
        if self.chunk_size < 0:
            raise ConfigError(f"{prefix}.chunk_size={self.chunk_size} must be >= 0 (0 = no chunking)")


def _default_train() -> TrainConfig:
    return TrainConfig(steps=200, global_batch_size=16, micro_batch_size=8, lr=1e-3, min_lr=1e-4,
                       warmup_steps=10, weight_decay=0.01, log_interval=10, eval_interval=50,
                       eval_iters=8, save_interval=50)


@dataclass
class DistillConfig:
    student: str = "runs/default/pruned"  # checkpoint the student starts from (step 0)
    teacher: str = "runs/default/teacher"  # frozen teacher checkpoint (same vocabulary)
    # a `teacher-logits` cache of this teacher over this run's tokens: the KL is taken
    # against its top-K targets (distill/topk.py) and the teacher is never loaded; "" = the
    # teacher runs every step (full-vocabulary KD)
    teacher_cache: str = ""
    # their shapes for --dry-run / --print-config before the checkpoints exist: a model YAML
    # (configs/model/*.yaml), a recipe with a model: mapping, a plan.json (its target) or a
    # checkpoint; a checkpoint's own config wins once it exists
    student_model: str = ""
    teacher_model: str = ""
    output_dir: str = "runs/default/distilled"
    # Training sequence length; 0 = the student's model.seq_length. Both models are
    # position-table free (RoPE or none), so any length runs; the student's saved config
    # records the length it was trained at.
    seq_length: int = 0
    loss: LossConfig = field(default_factory=LossConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=_default_train)
    resume: bool = True  # continue from output_dir's latest checkpoint when there is one
    # Stop (after saving) once this many steps ran in THIS invocation; 0 = run to train.steps.
    # For jobs with a wall-clock limit: re-launch the same command to continue.
    exit_after_steps: int = 0

    def validate(self, dp: int = 1) -> None:
        for key in ("student", "teacher", "output_dir"):
            if not getattr(self, key):
                raise ConfigError(f"{key} is empty; give a path")
        if Path(self.output_dir).resolve() in (Path(self.student).resolve(), Path(self.teacher).resolve()):
            raise ConfigError(
                f"output_dir={self.output_dir!r} is the student or teacher checkpoint; "
                "write the distilled model to a new directory"
            )
        if self.seq_length < 0:
            raise ConfigError(f"seq_length={self.seq_length} must be >= 0 (0 = the student's)")
        if self.exit_after_steps < 0:
            raise ConfigError(f"exit_after_steps={self.exit_after_steps} must be >= 0")
        if self.teacher_cache and self.loss.alpha_kd == 0:
            raise ConfigError(f"teacher_cache={self.teacher_cache!r} with loss.alpha_kd=0: the cross-entropy "
                              "baseline reads no teacher; drop teacher_cache or set loss.alpha_kd > 0")
        self.loss.validate()
        self.parallel.validate(cp_ok=True)
        self.train.validate(max(dp, 1))
        self.data.validate()


def check_pair(student: ModelConfig, teacher: ModelConfig, tp: int, pp: int, ep: int = 1) -> None:
    """Teacher and student may differ in every pruned dimension but must share the
    vocabulary (the KL is over the same token ids) and both fit the (tp, pp) layout."""
    if student.vocab_size != teacher.vocab_size:
        raise ConfigError(
            f"vocabulary mismatch: student vocab_size={student.vocab_size}, teacher "
            f"vocab_size={teacher.vocab_size}; logit distillation needs the same tokenizer and "
            "vocabulary (prune the teacher without touching the vocabulary)"
        )
    student.validate(tp, pp, prefix="student model", ep=ep)
    teacher.validate(tp, pp, prefix="teacher model", ep=ep)
    check_ep_used(ep, student, teacher)


def validate_models(cfg: DistillConfig, student: ModelConfig, teacher: ModelConfig) -> None:
    """The student and teacher against the settings (the run, --dry-run, --print-config)."""
    check_pair(student, teacher, cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep)
    check_moe_train(cfg.train, student)
    seq = cfg.seq_length or student.seq_length  # both run at the distillation's length
    check_cp(replace(student, seq_length=seq), cfg.parallel, prefix="student model")
    check_cp(replace(teacher, seq_length=seq), cfg.parallel, prefix="teacher model")


def _kd_loss_func(loss_cfg: LossConfig, tp_group, batch: dict, teacher_logits, student_logits, cp_group=None):
    """Last-stage loss: (sum over tokens, tokens, report) as the schedules expect.

    Logits are [b, s, V/tp] (megatron returns them batch-first); kd_loss expects [s, b, v]
    logits and [b, s] labels/mask, which it transposes. The math is per token, so we hand it
    the logits as they are and the labels/mask transposed to [s, b]: its transpose maps them
    back onto the logits' [b, s] without copying the logits."""
    mask = batch["loss_mask"]
    loss, logs = kd_loss(
        student_logits, teacher_logits, labels=batch["labels"].t(), loss_mask=mask.t(),
        temperature=loss_cfg.temperature, alpha_kd=loss_cfg.alpha_kd, tp_group=tp_group,
        chunk_size=loss_cfg.chunk_size or None,
    )
    return _report(loss, logs, mask, cp_group)


def _report(loss, logs: dict, mask, cp_group=None):
    """(sum over tokens, tokens, report) from a token-mean loss and its logged terms.
    cp_group (size > 1, as engine._lm_loss): the report keeps this rank's own sums (each
    token counted once, where it is); the schedule gets the sum x cp and the micro-batch's
    token count over the CP group, since DDP averages the gradients over dp x cp ranks."""
    n = mask.sum()
    total = loss * n.clamp(min=1)  # kd_loss is the token mean; the schedule wants the sum
    report = {"loss": torch.stack([total.detach(), n.detach()]).float()}
    for k, v in logs.items():
        report[k] = torch.stack([v * n.clamp(min=1), n]).float()
    return (*cp_scaled(total, n, cp_group), report)


def run_distill(cfg: DistillConfig, teacher_memo=None) -> dict:
    """teacher_memo (teacher.TeacherMemo, in-process callers): the teacher's logits reused
    across runs over the same tokens; used at pp = cp = 1 with an online teacher, else unused
    (the summary's "teacher_memo" says which)."""
    # ---- every check that needs no process group, before any model is built
    dp = world_size_from_env() // (cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp)
    cfg.validate(dp)
    s_cfg = ckpt.read_model_config(cfg.student)
    t_cfg = ckpt.read_model_config(cfg.teacher)
    validate_models(cfg, s_cfg, t_cfg)
    seq = cfg.seq_length or s_cfg.seq_length
    s_cfg = replace(s_cfg, seq_length=seq)
    t_cfg = replace(t_cfg, seq_length=seq)
    data_summary = check_data(cfg.data, s_cfg)
    cache = open_cache(cfg.teacher_cache)
    samples_needed = cfg.train.steps * cfg.train.global_batch_size
    if cache is not None:
        cache.match(teacher=cfg.teacher, data=cfg.data, seq=seq, samples_needed=samples_needed,
                    temperature=cfg.loss.temperature)
    from ..resources.check import check

    check("distill", cfg)  # per-GPU memory estimate vs parallel.memory_limit_gb
    lc, tr = cfg.loss, cfg.train
    use_teacher_in_training = lc.alpha_kd > 0

    t_start = time.time()
    owns_pg = not torch.distributed.is_initialized()
    par = D.init(cfg.parallel, seed=tr.seed)
    out = Path(cfg.output_dir)
    if D.is_rank0():
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(dump_json(cfg))
    num_micro = tr.global_batch_size // (tr.micro_batch_size * par.dp)
    # with a cache, the training set of the cache's size: the order its samples were cached in
    train_ds, valid_ds, _ = datasets(cfg.data, seq, cache.samples if cache else samples_needed,
                                     tr.eval_iters * tr.micro_batch_size * par.dp)
    if cache is not None:
        try:
            cache.spot_check(train_ds, samples_needed)  # before any model is built
        except ConfigError:
            if owns_pg:
                D.shutdown()
            raise

    def val_loss(model) -> float:  # (split over the CP ranks when cp > 1)
        return evaluate(model, valid_batches(valid_ds, tr.micro_batch_size, tr.eval_iters, par),
                        forward_step_for(par), tr.eval_iters, par, seq, tr.micro_batch_size)

    # ---- models: the trainable student (DDP + optimizer) and the frozen teacher
    t = build_trainable(s_cfg, par, tr, cfg.parallel, initialize=False)  # loaded next
    resumed_from, prev_meta = None, {}
    if cfg.resume and ckpt.resolve(out) is not None:
        if ckpt.read_model_config(out) != s_cfg:
            raise ConfigError(
                f"{out} holds a checkpoint of a different model than student={cfg.student!r}; "
                "use another output_dir or resume=false"
            )
        prev_meta = resume_trainable(t, out)
        resumed_from = t.iteration
    else:
        load_weights(t, cfg.student)  # + the optimizer's fp32 main params
    teacher = None if cache else load_teacher(cfg.teacher, par, t_cfg,
                                              runtime=runtime_for(cfg.parallel))[0]  # no recompute: frozen
    teacher_sum = checksum(teacher) if teacher is not None else None
    n_trainable = sum(p.numel() for g in t.optimizer.param_groups for p in g["params"])

    s_params, t_params = count_parameters(s_cfg)["total"], count_parameters(t_cfg)["total"]
    D.print0(
        f"[distill] teacher {cfg.teacher} ({t_params:,} params) -> student {cfg.student} "
        f"({s_params:,} params); tp={par.tp} pp={par.pp} dp={par.dp}" + (f" cp={par.cp}" if par.cp > 1 else "")
        + f"; seq {seq}; "
        f"{num_micro} micro-batches of {tr.micro_batch_size} per step; alpha_kd={lc.alpha_kd} "
        f"T={lc.temperature}" + (f"; teacher top-{cache.k} from {cfg.teacher_cache}" if cache else "")
        + (f"; resumed at step {resumed_from}" if resumed_from is not None else "")
    )
    memo = (teacher_memo, teacher_sum) if (teacher_memo is not None and teacher is not None and par.pp == 1
                                           and par.cp == 1 and use_teacher_in_training) else None
    memo0 = (teacher_memo.hits, teacher_memo.misses) if memo else None
    if cache:  # the teacher's loss the cache recorded on its validation sequences
        teacher_val = cache.manifest["teacher_val_loss"]
    elif memo:  # the same validation batches as the memo's earlier runs: the same loss
        teacher_val = teacher_memo.value((teacher_sum, "val", repr(cfg.data), seq, tr.eval_iters,
                                          tr.micro_batch_size), lambda: val_loss(teacher))
    else:
        teacher_val = val_loss(teacher)
    if resumed_from is not None and prev_meta.get("student_val_before") is not None:
        student_before = prev_meta["student_val_before"]
    else:
        student_before = val_loss(t.model)
    D.print0(f"[distill] val loss: teacher {teacher_val:.4f}, student before {student_before:.4f}")

    # ---- the loop
    cp_group = par.pg.cp if par.cp > 1 else None
    if cache is not None:
        fwd = partial(_student_forward_step, partial(_cached_kd_loss_func, lc, par.pg.tp, cache, cp_group=cp_group),
                      cp_group=cp_group)
    elif use_teacher_in_training:
        fwd = partial(distill_forward_step, teacher=teacher, student_hidden=s_cfg.hidden_size,
                      is_first_stage=par.is_first_stage, is_last_stage=par.is_last_stage,
                      loss_func=partial(_kd_loss_func, lc, par.pg.tp, cp_group=cp_group), cp_group=cp_group,
                      memo=memo)
    else:
        fwd = partial(_student_forward_step,
                      lambda batch: partial(_kd_loss_func, lc, par.pg.tp, batch, None, cp_group=cp_group),
                      cp_group=cp_group)
    sched_kw = {"adjust_tensor_shapes_fn": pair_shapes_fn(t_cfg.hidden_size)} \
        if (teacher is not None and use_teacher_in_training and par.pp > 1) else None
    data = MicroBatches(train_ds, tr.micro_batch_size, tr.global_batch_size, par.dp,
                        par.dp_rank, start_step=t.iteration, device=par.device)
    tokens_per_step = tr.global_batch_size * seq
    meta = {"stage": "distill", "teacher": str(ckpt.require(cfg.teacher)),
            "student_init": str(ckpt.require(cfg.student)), "teacher_val_loss": teacher_val,
            "student_val_before": student_before, "teacher_cache": cfg.teacher_cache}
    history = []
    writer = _tensorboard(out / "tensorboard") if D.is_rank0() else None
    metrics = open(out / "metrics.jsonl", "a") if D.is_rank0() else None
    prog = Progress(tr.steps, t.iteration, D.is_rank0(), "distill")
    last_val, start_it, t_loop = None, t.iteration, time.time()
    stop, interrupted = StopRequest(tr.exit_duration_minutes, t_start).start(), None
    while t.iteration < tr.steps:
        t0 = time.time()
        res = train_step(t, data, fwd, num_micro, seq, tr.micro_batch_size, schedule_kwargs=sched_kw)
        rec = {"step": t.iteration, "loss": reduce_reports(res["reports"], par, "loss")}
        for k in ("kd", "ce"):
            if _has(lc, k):  # collective: every rank asks for the same keys
                rec[k] = reduce_reports(res["reports"], par, k)
        dt = time.time() - t0
        rec.update(lr=res["lr"], grad_norm=res["grad_norm"], tokens_per_s=tokens_per_step / dt)
        final = t.iteration == tr.steps
        if t.iteration % tr.eval_interval == 0 or final:
            last_val = rec["val_loss"] = val_loss(t.model)
        history.append(rec)
        prog.update(t.iteration, {"loss": rec["loss"], "lr": rec["lr"]})
        if D.is_rank0():
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
            if writer is not None:
                for k in ("loss", "kd", "ce", "lr", "grad_norm", "tokens_per_s", "val_loss"):
                    if k in rec:
                        writer.add_scalar(f"distill/{k}", rec[k], t.iteration)
                writer.flush()
        if t.iteration % tr.log_interval == 0 or "val_loss" in rec or final:
            prog.write(
                f"[distill] step {t.iteration}/{tr.steps} loss {rec['loss']:.4f}"
                + (f" KL {rec['kd']:.4f}" if "kd" in rec else "")
                + (f" CE {rec['ce']:.4f}" if "ce" in rec else "")
                + f" lr {rec['lr']:.3g} grad_norm {rec['grad_norm']:.3g} "
                f"tok/s {rec['tokens_per_s']:.0f} ETA {fmt_eta(prog.eta(t.iteration))}"
                + (f" | student val loss {last_val:.4f}" if "val_loss" in rec else "")
            )
        stop_now = cfg.exit_after_steps and t.iteration - start_it >= cfg.exit_after_steps
        asked = stop.poll() and not final  # signal / exit_duration_minutes, agreed by all ranks
        if t.iteration % tr.save_interval == 0 or final or stop_now or asked:
            save_trainable(t, out, dict(meta, val_loss=last_val))
        if asked:
            interrupted = stop.record(out, t.iteration, "checkpoint")
            break
        if stop_now:
            break
    stop.close()
    prog.close()
    if interrupted is not None:  # no final evaluation: the job is about to be killed
        if owns_pg:
            D.shutdown()
        return {"stage": "distill", "interrupted": interrupted, "iteration": t.iteration,
                "steps": tr.steps, "checkpoint": str(ckpt.resolve(out))}
    clear_record(out)
    if last_val is None:  # nothing left to train, or stopped between evaluations
        last_val = val_loss(t.model)
    if teacher is not None and checksum(teacher) != teacher_sum:  # cannot happen unless something wrote into it
        raise RuntimeError("the teacher's weights changed during distillation")
    summary = {
        "stage": "distill",
        "checkpoint": str(ckpt.resolve(out)),
        "teacher": meta["teacher"],
        "student_init": meta["student_init"],
        "teacher_parameters": t_params,
        "student_parameters": s_params,
        "trainable_parameters_this_rank": n_trainable,
        "teacher_val_loss": teacher_val,
        "student_val_before": student_before,
        "student_val_after": last_val,
        "loss": {"alpha_kd": lc.alpha_kd, "temperature": lc.temperature},
        # the teacher's side: online (full vocabulary, every step) or a cache's top-K
        "teacher_source": ({"cache": cfg.teacher_cache, "top_k": cache.k,
                            "teacher_val_samples": cache.manifest.get("valid_samples")}
                           if cache else "online"),
        "steps": tr.steps,
        "iteration": t.iteration,
        "resumed_from": resumed_from,
        "steps_this_run": t.iteration - start_it,
        "seq_length": seq,
        "tokens_seen": t.iteration * tokens_per_step,
        "train_seconds": time.time() - t_loop,
        "elapsed_seconds": time.time() - t_start,
        "unigram_baseline": data_summary.get("unigram_entropy"),
        # cp named when > 1 (the search's short-KD summaries are read with these four keys)
        "layout": {"tp": par.tp, "pp": par.pp, "ep": par.ep, "dp": par.dp, **({"cp": par.cp} if par.cp > 1 else {})},
        "teacher_checksum_rank0": teacher_sum,
        "teacher_unchanged": True if teacher is not None else None,
        # micro-batches whose teacher logits came from / went into teacher_memo this run
        "teacher_memo": ({"hits": teacher_memo.hits - memo0[0], "misses": teacher_memo.misses - memo0[1]}
                         if memo else None),
        "history": history,
    }
    if D.is_rank0():
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        metrics.close()
        if writer is not None:
            writer.close()
        D.print0(
            f"[distill] done in {summary['elapsed_seconds']:.0f}s: val loss teacher {teacher_val:.4f} | "
            f"student before {student_before:.4f} -> after {last_val:.4f} "
            f"(step {t.iteration}/{tr.steps}); checkpoint {summary['checkpoint']}"
        )
    if owns_pg:
        D.shutdown()
    return summary


def _has(lc: LossConfig, key: str) -> bool:
    return (key == "kd" and lc.alpha_kd > 0) or (key == "ce" and lc.alpha_kd < 1)


def cp_batch(batch: dict, cp_group) -> dict:
    """This CP rank's part of a micro-batch (train/cp.py split_batch); the whole sequences'
    tokens stay under "full_tokens" (a teacher cache checks them against its hashes).
    cp_group None: the batch as it is."""
    if cp_group is None or cp_group.size() == 1:
        return batch
    return dict(cpsplit.split_batch(batch, cp_group.size(), cp_group.rank()), full_tokens=batch["tokens"])


def _student_forward_step(loss_of, data_iterator, model, cp_group=None):
    """The student alone (the CE baseline, or KD from a teacher cache): loss_of(batch) is
    the last stage's loss function of the student's logits. Under CP the batch is this
    rank's part and no mask is passed (the CP attention masks its chunks itself)."""
    from ..model import causal_mask

    batch = cp_batch(next(data_iterator), cp_group)
    tokens = batch["tokens"]
    mask = None if "full_tokens" in batch else causal_mask(tokens.shape[1], str(tokens.device))
    s_out = model(tokens, batch["position_ids"], mask)
    return s_out, loss_of(batch)


def _cached_kd_loss_func(loss_cfg: LossConfig, tp_group, cache, batch: dict, cp_group=None):
    """The loss function of one micro-batch with its top-K targets read from `cache` (its
    tokens checked against the cached hashes first); as _kd_loss_func, logits [b, s, V/tp]
    with the targets [b, s, K] as they are and labels / mask transposed. Read on the last
    pipeline stage only (the one that calls it). Under CP the cached targets of the whole
    sequences are split along the sequence exactly as the tokens (train/cp.py split_seq)."""
    def loss_func(student_logits):
        idx = batch["index"].tolist()
        cache.check_tokens(idx, batch.get("full_tokens", batch["tokens"]))
        tg = cache.get(idx)
        if "full_tokens" in batch:  # [b, s, K] / [b, s] -> this rank's [b, s/cp, ...]
            tg = {k: cpsplit.split_seq(tg[k], cp_group.size(), cp_group.rank()) for k in ("ids", "logprobs", "log_rest")}
        dev = student_logits.device
        loss, logs = topk_kd_loss(
            student_logits, tg["ids"].to(dev), tg["logprobs"].to(dev), tg["log_rest"].to(dev),
            labels=batch["labels"].t(), loss_mask=batch["loss_mask"].t(), temperature=loss_cfg.temperature,
            alpha_kd=loss_cfg.alpha_kd, tp_group=tp_group, chunk_size=loss_cfg.chunk_size or None)
        return _report(loss, logs, batch["loss_mask"], cp_group)
    return loss_func
