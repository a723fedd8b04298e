"""Checks of the distill stage, in two launches (tests/dist/test_distill_dist.py compares):

  ref (1 process):  pretrain a tiny teacher for a few steps (so its loss is not random);
                    `eval` of the teacher; a smaller random student saved as a checkpoint;
                    distill 4 steps at TP1/PP1 (reference); the same run interrupted after
                    2 steps and resumed; the cross-entropy baseline (alpha_kd=0).
  par (2 processes): the reference distillation at TP=2, at PP=2 and at DP=2.
Teacher cache (issue 22): ref writes caches of the teacher's top-4096 (= the vocabulary)
and top-8 at TP=1 and distills from each; par writes the top-8 cache again at TP=2 and at
DP=2 (two writers), distills at TP=2 and PP=2 from the TP=1 cache and at DP=2 (TP=1) from
the TP=2 cache.

Every run writes its summary.json under WORKDIR/<name>/; this worker adds a few files
(teacher checkpoint hashes, eval result).
"""

import hashlib
import json
import sys
from dataclasses import replace
from pathlib import Path

from megatron_minitron import dist as D
from megatron_minitron.config import (DataConfig, EvalConfig, ModelConfig, ParallelConfig,
                                      PretrainConfig, TrainConfig)
from megatron_minitron.distill.stage import DistillConfig, LossConfig, run_distill

TEACHER = ModelConfig(
    pattern="M-*-M-", hidden_size=64, ffn_hidden_size=128, mamba_num_heads=4,
    mamba_head_dim=16, mamba_num_groups=2, mamba_state_dim=8, mamba_chunk_size=16,
    num_attention_heads=4, num_query_groups=2, kv_channels=16, vocab_size=4096, seq_length=64,
)
# Smaller in depth, hidden, FFN, Mamba heads and attention heads; same vocabulary.
STUDENT = replace(TEACHER, pattern="M*M-", hidden_size=32, ffn_hidden_size=64,
                  mamba_num_heads=2, num_attention_heads=2, num_query_groups=2)
EVAL_ITERS, MBS = 2, 2
DISTILL_TRAIN = TrainConfig(steps=4, global_batch_size=4, micro_batch_size=MBS, lr=3e-3,
                            min_lr=3e-4, warmup_steps=1, clip_grad=1.0, eval_interval=2,
                            eval_iters=EVAL_ITERS, save_interval=100, log_interval=1)


def data_cfg(work: Path) -> DataConfig:
    info = json.loads((work / "data.json").read_text())
    return DataConfig(prefix=info["prefix"], tokenizer=info["tokenizer"], split="90,10,0")


def distill_cfg(work: Path, name: str, **kw) -> DistillConfig:
    base = dict(student=str(work / "student"), teacher=str(work / "teacher"),
                output_dir=str(work / name), data=data_cfg(work), train=DISTILL_TRAIN,
                loss=LossConfig(temperature=1.0, alpha_kd=1.0, chunk_size=48))
    base.update(kw)
    return DistillConfig(**base)


def logits_cfg(work: Path, name: str, **kw):
    from megatron_minitron.distill.logits_stage import TeacherLogitsConfig

    base = dict(teacher=str(work / "teacher"), output_dir=str(work / name), data=data_cfg(work),
                samples=DISTILL_TRAIN.steps * DISTILL_TRAIN.global_batch_size, top_k=8, micro_batch_size=MBS,
                shard_samples=4, eval_iters=EVAL_ITERS)
    base.update(kw)
    return TeacherLogitsConfig(**base)


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def make_student(work: Path) -> None:
    """A randomly initialised smaller model, saved as a checkpoint (step 0)."""
    from megatron_minitron.model import build_model
    from megatron_minitron.train import checkpoint as ckpt

    par = D.init(ParallelConfig(), seed=7)
    model = build_model(STUDENT, par)
    ckpt.save(work / "student", 0, STUDENT, {"model": model.sharded_state_dict()},
              {"stage": "test-student"})


def ref(work: Path) -> None:
    from megatron_minitron.train.pretrain import run_eval, run_pretrain

    data = data_cfg(work)
    run_pretrain(PretrainConfig(
        output_dir=str(work / "teacher"), model=TEACHER, data=data,
        train=TrainConfig(steps=30, global_batch_size=8, micro_batch_size=4, lr=3e-3,
                          min_lr=3e-4, warmup_steps=3, eval_interval=30, eval_iters=2,
                          save_interval=30, log_interval=10)))
    ev = run_eval(EvalConfig(checkpoint=str(work / "teacher"), output_dir=str(work / "eval_teacher"),
                             data=data, eval_iters=EVAL_ITERS, micro_batch_size=MBS))
    (work / "eval_teacher.json").write_text(json.dumps(ev))
    make_student(work)  # leaves the process group up: run_distill below then keeps it
    before = tree_hash(work / "teacher" / "checkpoints")
    run_distill(distill_cfg(work, "ref"))
    run_distill(distill_cfg(work, "resume", exit_after_steps=2))
    run_distill(distill_cfg(work, "resume"))
    run_distill(distill_cfg(work, "ce", loss=LossConfig(alpha_kd=0.0, chunk_size=48)))
    from megatron_minitron.distill.logits_stage import run_teacher_logits

    run_teacher_logits(logits_cfg(work, "cache_all", top_k=TEACHER.vocab_size))
    run_distill(distill_cfg(work, "cached_all", teacher_cache=str(work / "cache_all")))
    run_teacher_logits(logits_cfg(work, "cache8"))
    run_distill(distill_cfg(work, "cached8", teacher_cache=str(work / "cache8")))
    after = tree_hash(work / "teacher" / "checkpoints")
    (work / "teacher_files.json").write_text(json.dumps({"before": before, "after": after}))
    D.shutdown()


def par(work: Path) -> None:
    D.init(ParallelConfig(tp=2), seed=1)
    run_distill(distill_cfg(work, "tp2", parallel=ParallelConfig(tp=2)))
    run_distill(distill_cfg(work, "pp2", parallel=ParallelConfig(pp=2)))
    run_distill(distill_cfg(work, "dp2"))  # world 2 at tp=pp=1: data parallel
    from megatron_minitron.distill.logits_stage import run_teacher_logits

    run_teacher_logits(logits_cfg(work, "cache8_tp2", parallel=ParallelConfig(tp=2)))
    run_teacher_logits(logits_cfg(work, "cache8_dp2"))
    cache8 = str(work / "cache8")
    run_distill(distill_cfg(work, "cached8_tp2", teacher_cache=cache8, parallel=ParallelConfig(tp=2)))
    run_distill(distill_cfg(work, "cached8_pp2", teacher_cache=cache8, parallel=ParallelConfig(pp=2)))
    run_distill(distill_cfg(work, "cached8_from_tp2", teacher_cache=str(work / "cache8_tp2")))  # DP=2, TP=1
    D.shutdown()


if __name__ == "__main__":  # guard: the checkpoint writer's helper process re-imports __main__
    mode, workdir = sys.argv[1], Path(sys.argv[2])
    {"ref": ref, "par": par}[mode](workdir)
