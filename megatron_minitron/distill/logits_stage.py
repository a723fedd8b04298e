"""`teacher-logits` stage (issue 22): run the teacher once over the training sequences a
distillation will read, and keep per token its top-K token ids, their log-probabilities and
the probability mass of all other tokens (cache.py: files and manifest). `distill` and the
search's short KDs then read them with `teacher_cache=DIR` instead of running the teacher.

The teacher runs at any (tp, pp) layout with data parallelism over shards: shard j (samples
[j*S, (j+1)*S)) goes to a data-parallel replica, whose last pipeline stage's TP rank 0
writes it (topk.teacher_topk gathers the K candidates of every vocabulary slice). Shards are
written atomically, so a killed run re-run with the same command keeps the finished ones
and ends with the same bytes as a run that was never stopped.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .. import dist as D
from ..config import ConfigError, DataConfig, ParallelConfig, dump_json
from . import cache as C


@dataclass
class TeacherLogitsConfig:
    teacher: str = "runs/default/teacher"  # the teacher checkpoint the distillation will name
    # its shape for --dry-run / --print-config before the checkpoint exists (as distill's)
    teacher_model: str = ""
    output_dir: str = "runs/default/teacher_logits"
    data: DataConfig = field(default_factory=DataConfig)  # the distillation's data settings
    seq_length: int = 0  # 0 = the teacher's model.seq_length; must equal the distillation's
    # training sequences to cache: at least the distillation's train.steps x global_batch_size
    # (the distill stage reads samples [0, steps x global_batch_size) at any layout)
    samples: int = 960
    top_k: int = 32  # token ids kept per position (1 .. vocabulary; = vocabulary: exact KD)
    temperature: float = 1.0  # the log-probs are of softmax(logits / T): the distill's loss.temperature
    logprob_dtype: str = "float32"  # float32 | float16 (bytes per token: cache.bytes_per_token)
    micro_batch_size: int = 8
    chunk_size: int = 1024  # tokens per top-K pass (one fp32 chunk x V/tp buffer); 0 = a whole micro-batch
    shard_samples: int = 64  # sequences per shard file: the unit of resume (a multiple of micro_batch_size)
    eval_iters: int = 8  # the teacher's validation loss (eval_iters x micro_batch_size x dp) for the manifest
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    resume: bool = True  # keep the finished shards of a cache of the same settings
    exit_duration_minutes: float = 0.0  # stop after the shard running at this time; 0 = no limit

    def validate(self, vocab: int = 0) -> None:
        from ..preempt import check_minutes

        for key in ("teacher", "output_dir"):
            if not getattr(self, key):
                raise ConfigError(f"{key} is empty; give a path")
        for key in ("samples", "top_k", "micro_batch_size", "shard_samples", "eval_iters"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 1")
        if self.seq_length < 0 or self.chunk_size < 0:
            raise ConfigError(f"seq_length={self.seq_length} and chunk_size={self.chunk_size} must be >= 0 "
                              "(0 = the teacher's / a whole micro-batch)")
        if self.logprob_dtype not in C.DTYPES:
            raise ConfigError(f"logprob_dtype={self.logprob_dtype!r}: use one of {sorted(C.DTYPES)}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature={self.temperature} must be > 0 (the distill's loss.temperature)")
        if self.shard_samples % self.micro_batch_size:
            raise ConfigError(f"shard_samples={self.shard_samples} must be a multiple of micro_batch_size="
                              f"{self.micro_batch_size}")
        if self.samples % self.micro_batch_size:
            raise ConfigError(f"samples={self.samples} must be a multiple of micro_batch_size="
                              f"{self.micro_batch_size} (e.g. {self.samples + (-self.samples) % self.micro_batch_size})")
        if vocab and self.top_k > vocab:
            raise ConfigError(f"top_k={self.top_k} is more than the teacher's vocabulary ({vocab}); "
                              f"top_k={vocab} caches every token (exact KD)")
        if Path(self.output_dir).resolve() == Path(self.teacher).resolve():
            raise ConfigError(f"output_dir={self.output_dir!r} is the teacher checkpoint; write the cache elsewhere")
        check_minutes(self.exit_duration_minutes)
        self.parallel.validate()
        self.data.validate()


def _manifest(cfg: TeacherLogitsConfig, t_cfg, seq: int) -> dict:
    """Everything that fixes the cache's bytes (the layout it ran at does not)."""
    return {"version": C.VERSION, "teacher": C.teacher_fingerprint(cfg.teacher), "model": t_cfg.to_dict(),
            "tokenizer": str(cfg.data.tokenizer), "tokenizer_sha256": C.tokenizer_sha256(cfg.data),
            "data": C.data_identity(cfg.data), "seq_length": seq, "samples": cfg.samples,
            "top_k": cfg.top_k, "temperature": cfg.temperature, "logprob_dtype": cfg.logprob_dtype,
            "shard_samples": cfg.shard_samples,
            "bytes_per_token": C.bytes_per_token(cfg.top_k, cfg.logprob_dtype)}


def _same(a: dict, b: dict) -> bool:
    keys = set(a) | set(b)
    keys -= {"complete", "teacher_val_loss", "seconds", "layout", "bytes", "written_at"}
    return all(a.get(k) == b.get(k) for k in keys)


def validate_models(cfg: TeacherLogitsConfig, t_cfg) -> None:
    cfg.validate(t_cfg.vocab_size)
    t_cfg.validate(cfg.parallel.tp, cfg.parallel.pp, prefix="teacher model", ep=cfg.parallel.ep)


def run_teacher_logits(cfg: TeacherLogitsConfig) -> dict:
    from ..data.stage_data import check_data, datasets
    from ..model import causal_mask
    from ..preempt import StopRequest, clear_record
    from ..train import checkpoint as ckpt
    from ..train.engine import Progress, collate, evaluate, lm_forward_step, runtime_for, valid_batches
    from ..compat import mcore
    from .teacher import load_teacher
    from .topk import teacher_topk

    cfg.validate()
    t_cfg = ckpt.read_model_config(cfg.teacher)
    validate_models(cfg, t_cfg)
    seq = cfg.seq_length or t_cfg.seq_length
    t_cfg = replace(t_cfg, seq_length=seq)
    check_data(cfg.data, t_cfg)
    out = Path(cfg.output_dir)
    want = _manifest(cfg, t_cfg, seq)
    old = None
    if (out / C.MANIFEST).is_file():
        try:
            old = json.loads((out / C.MANIFEST).read_text())
        except ValueError:
            old = None
        if old is not None and not _same(old, want) and cfg.resume:
            diff = sorted(k for k in set(old) | set(want) if k not in ("complete", "teacher_val_loss", "seconds",
                                                                       "layout", "bytes", "written_at")
                          and old.get(k) != want.get(k))
            raise ConfigError(f"output_dir={cfg.output_dir!r} holds a cache of other settings ({', '.join(diff)}); "
                              "use another output_dir, or resume=false to overwrite it")

    t_start = time.time()
    owns_pg = not torch.distributed.is_initialized()
    par = D.init(cfg.parallel)
    n_shards = C.num_shards(cfg.samples, cfg.shard_samples)
    if D.is_rank0():
        if old is not None and (not cfg.resume or not _same(old, want)):
            shutil.rmtree(out / "shards", ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(dump_json(cfg))
        tmp = out / (C.MANIFEST + ".tmp")
        tmp.write_text(json.dumps(dict(want, complete=False), indent=2))
        tmp.replace(out / C.MANIFEST)
    D.barrier()
    # the shards left to write, the same list on every rank
    todo = D.broadcast_object([j for j in range(n_shards) if not C.shard_done(out, j)])
    train_ds, valid_ds, _ = datasets(cfg.data, seq, cfg.samples, cfg.eval_iters * cfg.micro_batch_size * par.dp)
    teacher, _, _ = load_teacher(cfg.teacher, par, t_cfg, runtime=runtime_for(cfg.parallel, training=False))
    writer = par.is_last_stage and par.tp_rank == 0
    D.print0(f"[teacher-logits] teacher {cfg.teacher} -> {out}: {cfg.samples} sequences x {seq} tokens, "
             f"top-{cfg.top_k} ({C.bytes_per_token(cfg.top_k, cfg.logprob_dtype)} bytes/token, "
             f"{cfg.logprob_dtype}); {n_shards} shards of {cfg.shard_samples}, {n_shards - len(todo)} already "
             f"written; tp={par.tp} pp={par.pp} dp={par.dp}")
    fb = mcore.get_forward_backward_func()
    tp_group = par.pg.tp if par.tp > 1 else None
    rounds = -(-len(todo) // par.dp)
    prog = Progress(rounds, 0, D.is_rank0(), "teacher-logits")
    stop, interrupted = StopRequest(cfg.exit_duration_minutes, t_start).start(), None
    t_loop = time.time()
    for i in range(rounds):
        pos = i * par.dp + par.dp_rank
        if pos < len(todo):
            j = todo[pos]
            a, b = C.shard_range(j, cfg.shard_samples, cfg.samples)
            got: list = []
            micro = [collate([train_ds[s] for s in range(m, m + cfg.micro_batch_size)], par.device)
                     for m in range(a, b, cfg.micro_batch_size)]

            def step(it, model):
                batch = next(it)
                tokens = batch["tokens"]
                logits = model(tokens, batch["position_ids"], causal_mask(tokens.shape[1], str(tokens.device)))

                def loss(out_t):
                    got.append(teacher_topk(out_t, cfg.top_k, cfg.temperature, tp_group, cfg.chunk_size or None))
                    return torch.zeros((), device=out_t.device), torch.ones((), dtype=torch.int, device=out_t.device), {}
                return logits, loss

            with torch.no_grad():
                fb(forward_step_func=step, data_iterator=iter(micro), model=[teacher], num_microbatches=len(micro),
                   seq_length=seq, micro_batch_size=cfg.micro_batch_size, forward_only=True)
            if writer:
                ids, lps, rest = (torch.cat([g[x] for g in got]) for x in range(3))
                hashes = [C.token_hash(train_ds[s]["tokens"]) for s in range(a, b)]
                C.write_shard(out, j, a, {"ids": ids.to(torch.int32).cpu().numpy(),
                                          "logprobs": lps.cpu().numpy(), "log_rest": rest.cpu().numpy(),
                                          "hash": hashes}, C.Shard(b - a, seq, cfg.top_k, cfg.logprob_dtype))
                C.hold(f"after:{j}")
        prog.update(i + 1, {"tok/s": f"{(i + 1) * par.dp * cfg.shard_samples * seq / (time.time() - t_loop):.0f}"})
        if stop.poll() and i + 1 < rounds:
            interrupted = stop.record(out, n_shards - len(todo) + (i + 1) * par.dp, "shards")
            break
    stop.close()
    prog.close()
    D.barrier()
    if interrupted is not None:
        if owns_pg:
            D.shutdown()
        return {"stage": "teacher-logits", "interrupted": interrupted, "output_dir": str(out)}
    clear_record(out)
    val = evaluate(teacher, valid_batches(valid_ds, cfg.micro_batch_size, cfg.eval_iters, par), lm_forward_step,
                   cfg.eval_iters, par, seq, cfg.micro_batch_size)
    missing = [j for j in range(n_shards) if not C.shard_done(out, j)]
    if missing:  # cannot happen unless files were removed while it ran
        raise RuntimeError(f"{out}: shards {missing[:5]} are missing after the run")
    nbytes = sum((out / "shards" / f"{j:06d}.bin").stat().st_size for j in range(n_shards))
    summary = dict(want, complete=True, teacher_val_loss=val, valid_samples=cfg.eval_iters * cfg.micro_batch_size * par.dp,
                   bytes=nbytes, seconds=time.time() - t_start, layout={"tp": par.tp, "pp": par.pp, "dp": par.dp},
                   written_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if D.is_rank0():
        tmp = out / (C.MANIFEST + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(out / C.MANIFEST)
        D.print0(f"[teacher-logits] done in {summary['seconds']:.0f}s: {nbytes / 2**20:.1f} MiB "
                 f"({nbytes / (cfg.samples * seq):.0f} bytes/token); teacher val loss {val:.4f}; {out / C.MANIFEST}")
    D.barrier()
    if owns_pg:
        D.shutdown()
    return dict(summary, stage="teacher-logits", output_dir=str(out))
