#!/usr/bin/env python
"""Distillation overhead, measured side by side in one run:

  1. step time of one distillation step divided by [one student training step with the LM
     cross-entropy + one teacher forward] on the same micro-batches, in this process, on
     the same threads. Target <= 1.15.
       distill step = teacher forward (no grad) + student forward + KD loss + backward +
                      optimizer step, through megatron's schedule exactly as the distill
                      stage runs it;
       student step = student forward + megatron's vocab-parallel cross entropy + backward
                      + optimizer step (the same schedule; what pretraining the student
                      would cost), plus the teacher forward alone (what any KD pays).
  2. peak memory of one KD step / one CE step (scripts/bench_kd_memory.py, each step in a
     fresh subprocess, same threads): logits made by an output layer (hidden x vocab
     weights), bf16 weights / hidden states / logits as users run them, the loss math in
     fp32 inside the loss. Target <= 1.5.
       KD step = teacher logits (no grad, counted) + student logits + our chunked forward
                 KL at --chunk + backward (logits, weight and hidden gradients);
       CE step = student logits + megatron's tensor_parallel.vocab_parallel_cross_entropy
                 + backward (what a student training step without a teacher pays).
     Default: 8192 tokens (the real micro-batch; the chunking bounds the loss's extra memory
     per 8192 tokens) x 16384 vocab, bf16 only: about a minute. --memory-full: the largest
     tokens x vocab this machine's memory allows (up to the real 8192 x 131072) in bf16 and
     fp32: ~15 minutes or more on 2 CPU cores.

    python scripts/bench_distill.py [--seq 256] [--mbs 4] [--micro 2] [--repeats 5]
                                    [--memory-full] [--mem-tokens N] [--mem-vocab N]
                                    [--skip-memory]

Models: the embedded default teacher (configs/model/tiny_hybrid.yaml, fp32 as its CPU recipe
trains it) and a pruned-size student (hidden 192, FFN 512, 6 Mamba heads; sizes via
--teacher-hidden/--student-hidden) with random weights (timing does not depend on the
weights). Each step-time figure is the best (min) of --repeats alternating measurements
after a warm-up (the median-based ratio is printed as well).
The last line printed is `distill_step_time_ratio <x>`.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def memory_ratio(tokens: int, vocab: int, dtypes: str, chunk: int) -> float | None:
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_kd_memory.py"), "--tokens", str(tokens),
           "--vocab", str(vocab), "--dtypes", dtypes, "--chunk", str(chunk)]
    # the child starts its own one-process group: drop the rendezvous variables of ours
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    print(res.stdout.rstrip())
    if res.returncode != 0:
        print(res.stderr[-3000:], file=sys.stderr)
        return None
    m = re.search(r"kd_vs_ce_peak_memory_ratio bf16 ([0-9.]+)", res.stdout)  # the real (bf16) case
    return float(m.group(1)) if m else None


def auto_memory_size() -> tuple[int, int]:
    """Largest tokens x vocab (powers of two, vocab up to 131072) whose ~6 logit-sized fp32
    buffers (inputs, gradient, temporaries, megatron's CE copy) fit in half the free RAM."""
    avail = int(re.search(r"MemAvailable:\s+(\d+)", open("/proc/meminfo").read()).group(1)) * 1024
    budget = avail // 2
    tokens, vocab = 8192, 131072
    while tokens * vocab * 4 * 6 > budget and (tokens > 1024 or vocab > 8192):
        if vocab > 32768 or tokens <= 1024:
            vocab //= 2
        else:
            tokens //= 2
    return tokens, vocab


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--mbs", type=int, default=4, help="micro-batch size")
    ap.add_argument("--micro", type=int, default=2, help="micro-batches per step")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--teacher-hidden", type=int, default=256, help="FFN = 3 x hidden")
    ap.add_argument("--student-hidden", type=int, default=192, help="FFN = 8/3 x hidden")
    ap.add_argument("--chunk", type=int, default=1024, help="KD loss chunk size (tokens)")
    ap.add_argument("--memory-full", action="store_true",
                    help="memory at the largest tokens x vocab this machine allows (up to the real 8192 x 131072), "
                         "bf16 and fp32: ~15 min or more on 2 cores (default: 8192 x 16384, bf16, ~40 s)")
    ap.add_argument("--mem-tokens", default="", help="memory case tokens (default 8192; auto with --memory-full)")
    ap.add_argument("--mem-vocab", default="", help="memory case vocab (default 16384; auto with --memory-full)")
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()

    import torch

    from megatron_minitron import dist as D
    from megatron_minitron.config import ModelConfig, ParallelConfig, TrainConfig, build, load_yaml
    from megatron_minitron.distill.stage import LossConfig, _kd_loss_func
    from megatron_minitron.distill.teacher import distill_forward_step
    from megatron_minitron.model import build_model, causal_mask
    from megatron_minitron.train.engine import build_trainable, lm_forward_step, train_step

    t_cfg = build(ModelConfig, load_yaml(ROOT / "configs/model/tiny_hybrid.yaml")["model"], "model.")
    t_cfg = replace(t_cfg, seq_length=args.seq, hidden_size=args.teacher_hidden,
                    ffn_hidden_size=3 * args.teacher_hidden)
    s_cfg = replace(t_cfg, hidden_size=args.student_hidden,
                    ffn_hidden_size=args.student_hidden * 8 // 3, mamba_num_heads=6)
    t_start = time.perf_counter()
    par = D.init(ParallelConfig(), seed=1)
    train = TrainConfig(steps=1000, global_batch_size=args.mbs * args.micro,
                        micro_batch_size=args.mbs, lr=1e-4, min_lr=1e-5, warmup_steps=1)
    t = build_trainable(s_cfg, par, train, ParallelConfig())
    teacher = build_model(t_cfg, par)
    teacher.eval()
    teacher.requires_grad_(False)

    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.micro):
        tok = torch.randint(0, t_cfg.vocab_size, (args.mbs, args.seq + 1), generator=g)
        batches.append({"tokens": tok[:, :-1], "labels": tok[:, 1:],
                        "loss_mask": torch.ones(args.mbs, args.seq),
                        "position_ids": torch.arange(args.seq).expand(args.mbs, -1)})
    lc = LossConfig(alpha_kd=1.0, chunk_size=args.chunk)
    kd_step = lambda it, m: distill_forward_step(  # noqa: E731
        it, m, teacher=teacher, student_hidden=s_cfg.hidden_size, is_first_stage=True,
        is_last_stage=True, loss_func=lambda b, tl, sl: _kd_loss_func(lc, None, b, tl, sl))

    def time_distill() -> float:
        t0 = time.perf_counter()
        train_step(t, iter(batches), kd_step, args.micro, args.seq, args.mbs)
        return time.perf_counter() - t0

    def time_student() -> float:
        t0 = time.perf_counter()
        train_step(t, iter(batches), lm_forward_step, args.micro, args.seq, args.mbs)
        return time.perf_counter() - t0

    @torch.no_grad()
    def time_teacher() -> float:
        t0 = time.perf_counter()
        for b in batches:
            teacher(b["tokens"], b["position_ids"], causal_mask(args.seq))
        return time.perf_counter() - t0

    for f in (time_distill, time_student, time_teacher):  # warm-up
        f()
    dist_t, stud_t, teach_t = [], [], []
    for _ in range(args.repeats):
        dist_t.append(time_distill())
        stud_t.append(time_student())
        teach_t.append(time_teacher())
    # min over repeats: the least disturbed run of each (the CPU may be shared); the
    # median-based ratio is printed too.
    md, ms, mt = (min(x) for x in (dist_t, stud_t, teach_t))
    ratio = md / (ms + mt)
    med = statistics.median(dist_t) / (statistics.median(stud_t) + statistics.median(teach_t))
    threads = torch.get_num_threads()
    print(f"models: teacher {t_cfg.pattern} h={t_cfg.hidden_size}, student h={s_cfg.hidden_size}, "
          f"vocab {t_cfg.vocab_size}, {t_cfg.params_dtype}; batch {args.micro} x {args.mbs} x {args.seq} tokens; "
          f"{threads} threads; best of {args.repeats} (median-based ratio {med:.3f}); "
          f"step-time part {time.perf_counter() - t_start:.0f} s")
    print(f"distill step (teacher fwd + student fwd + KD + backward + optimizer) {md * 1e3:.1f} ms | "
          f"student CE step (fwd + megatron CE + backward + optimizer) {ms * 1e3:.1f} ms + teacher forward "
          f"{mt * 1e3:.1f} ms = {(ms + mt) * 1e3:.1f} ms", flush=True)
    D.shutdown()

    mem = None
    if not args.skip_memory:
        tokens, vocab = auto_memory_size() if args.memory_full else (8192, 16384)
        tokens = int(args.mem_tokens) if args.mem_tokens not in ("", "auto") else tokens
        vocab = int(args.mem_vocab) if args.mem_vocab not in ("", "auto") else vocab
        dtypes = "bf16,fp32" if args.memory_full else "bf16"
        print(f"KD step vs CE step peak memory at {tokens} tokens x {vocab} vocab, {dtypes} "
              f"(real case 8192 x 131072{'' if args.memory_full else '; --memory-full for the largest this machine allows'}):"
              "\n  KD = teacher logits (no grad) + student logits + chunked forward KL + backward;"
              " CE = student logits + megatron vocab-parallel CE + backward", flush=True)
        t0 = time.perf_counter()
        mem = memory_ratio(tokens, vocab, dtypes, args.chunk)
        print(f"(memory part {time.perf_counter() - t0:.0f} s)")
    if mem is not None:
        print(f"kd_vs_megatron_ce_peak_memory_ratio {mem:.3f} (bf16; target <= 1.5)")
    print(f"step time: distill / (student step + teacher forward) = {ratio:.3f} (target <= 1.15)")
    print(f"distill_step_time_ratio {ratio:.3f}")


if __name__ == "__main__":
    main()
