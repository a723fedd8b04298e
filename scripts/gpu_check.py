"""Prepared GPU check (scripts/gpu_check.sh): one CUDA GPU, no network, a few minutes.

  1. kernels   a bf16 hybrid of about 1B parameters at 8192 tokens, logits with mamba_ssm's
               Triton SSD scan vs the same model with compat/ssd.py's pure-torch scan
  2. kd-memory peak memory (torch.cuda.max_memory_allocated) of the chunked vocab-parallel
               forward KL, forward + backward, at 8192 x 131072 bf16 logits, vs megatron's
               vocab-parallel cross-entropy on the same logits
  3. kd-step   distillation steps (teacher + student of that size, megatron schedule,
               optimizer): tokens/s, MFU (6 N tokens/s over the GPU's peak bf16 FLOP/s)
  4. estimate  the resource estimator (resources/estimate.py, impl "gpu") vs the step's
               measured peak

--dry runs the same code on CPU at toy sizes (compat scan against its step-by-step
reference, CPU timings): CI runs it so the script cannot rot. It reports no GPU figures.
Writes a JSON summary to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_minitron import dist as D  # noqa: E402
from megatron_minitron.config import ModelConfig, ParallelConfig, TrainConfig  # noqa: E402

# about 1.06B parameters (untied 131072-token embeddings: 0.54B)
GPU_MODEL = ModelConfig(
    pattern="M-M-M*-M-M-M*-M-M-", hidden_size=2048, ffn_hidden_size=8192, mamba_num_heads=64,
    mamba_head_dim=64, mamba_num_groups=8, mamba_state_dim=128, mamba_chunk_size=128,
    num_attention_heads=16, num_query_groups=8, kv_channels=128, vocab_size=131072,
    seq_length=8192, params_dtype="bf16")
DRY_MODEL = dataclasses.replace(
    GPU_MODEL, pattern="M-M*-", hidden_size=64, ffn_hidden_size=128, mamba_num_heads=4,
    mamba_head_dim=16, mamba_num_groups=2, mamba_state_dim=8, mamba_chunk_size=16,
    num_attention_heads=4, num_query_groups=2, kv_channels=16, vocab_size=1024, seq_length=64)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0}


def peak_flops() -> float:
    if os.environ.get("GPU_PEAK_TFLOPS"):
        return float(os.environ["GPU_PEAK_TFLOPS"]) * 1e12
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    for k, v in PEAK_TFLOPS.items():
        if k in name:
            return v * 1e12
    return float("nan")


def batch(cfg: ModelConfig, b: int, device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    s = cfg.seq_length
    tok = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
    return {"tokens": tok.to(device), "labels": torch.roll(tok, -1, 1).to(device),
            "loss_mask": torch.ones(b, s, device=device),
            "position_ids": torch.arange(s, device=device)[None].expand(b, -1)}


# ----------------------------------------------------------------------------- 1. kernels


def check_kernels(cfg: ModelConfig, par, dry: bool) -> dict:
    from megatron_minitron.compat import mcore, ssd
    from megatron_minitron.model import build_model, causal_mask

    if dry:  # compat scan vs its step-by-step recurrence (the kernel is absent)
        g = torch.Generator().manual_seed(1)
        b, l, h, p, ng, n = 1, 48, 4, 8, 2, 8
        x, dt = torch.randn(b, l, h, p, generator=g), torch.rand(b, l, h, generator=g)
        A = -torch.rand(h, generator=g) - 0.5
        B, C = torch.randn(b, l, ng, n, generator=g), torch.randn(b, l, ng, n, generator=g)
        y = ssd.chunk_scan_combined(x, dt, A, B, C, chunk_size=16)
        ref = ssd.ssd_recurrence_ref(x, dt, A, B, C)
        err = float((y - ref).abs().max() / ref.abs().max())
        return {"mode": "dry: compat scan vs recurrence", "rel_err": err, "ok": err < 1e-4}
    model = build_model(cfg, par).eval()
    bt = batch(cfg, 1, par.device)
    mask = causal_mask(cfg.seq_length, str(par.device))
    with torch.no_grad():
        fast = model(bt["tokens"], bt["position_ids"], mask).float()
        kernel = mcore.mamba_mixer_module.mamba_chunk_scan_combined
        mcore.mamba_mixer_module.mamba_chunk_scan_combined = ssd.chunk_scan_combined
        try:
            slow = model(bt["tokens"], bt["position_ids"], mask).float()
        finally:
            mcore.mamba_mixer_module.mamba_chunk_scan_combined = kernel
    err = float((fast - slow).abs().max() / slow.abs().max())
    del model
    # bf16 activations between layers: a few bf16 ulps relative to the logits' range
    return {"mode": "mamba_ssm Triton scan vs compat scan, 1B bf16, 8192 tokens",
            "rel_err": err, "ok": err < 5e-2}


# ----------------------------------------------------------------------------- 2. kd memory


def check_kd_memory(n_tokens: int, vocab: int, device, dry: bool) -> dict:
    from megatron_minitron.compat import mcore
    from megatron_minitron.distill.loss import vocab_parallel_forward_kl

    g = torch.Generator(device="cpu").manual_seed(2)
    s = (torch.randn(n_tokens, 1, vocab, generator=g) * 2).to(device, torch.bfloat16)
    t = (torch.randn(n_tokens, 1, vocab, generator=g) * 2).to(device, torch.bfloat16)
    labels = torch.randint(0, vocab, (n_tokens, 1), generator=g).to(device)
    out = {"tokens": n_tokens, "vocab": vocab}

    def measure(fn):
        if dry:
            t0 = time.time()
            fn()
            return float("nan"), time.time() - t0
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.time()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**30, time.time() - t0

    def kd():
        x = s.detach().requires_grad_(True)
        vocab_parallel_forward_kl(x, t, tp_group=None, chunk_size=1024).sum().backward()

    def ce():
        x = s.detach().requires_grad_(True)
        mcore.tensor_parallel.vocab_parallel_cross_entropy(x, labels).sum().backward()

    out["kd_peak_gib"], out["kd_s"] = measure(kd)
    out["ce_peak_gib"], out["ce_s"] = measure(ce)
    out["kd_over_ce"] = out["kd_peak_gib"] / out["ce_peak_gib"] if not dry else float("nan")
    return out


# ----------------------------------------------------------------------------- 3-4. kd step


def check_kd_step(cfg: ModelConfig, par, steps: int, dry: bool) -> dict:
    from megatron_minitron.distill.stage import LossConfig, _kd_loss_func
    from megatron_minitron.distill.teacher import distill_forward_step
    from megatron_minitron.model import build_model, count_parameters
    from megatron_minitron.resources import estimate as E
    from megatron_minitron.train.engine import build_trainable, runtime_for, train_step

    pc = ParallelConfig()
    tr = TrainConfig(steps=100, global_batch_size=1, micro_batch_size=1, warmup_steps=1)
    teacher = build_model(cfg, par, runtime=runtime_for(pc)).eval().requires_grad_(False)
    t = build_trainable(cfg, par, tr, pc)
    fwd = partial(distill_forward_step, teacher=teacher, student_hidden=cfg.hidden_size,
                  is_first_stage=True, is_last_stage=True,
                  loss_func=partial(_kd_loss_func, LossConfig(chunk_size=1024), par.pg.tp))
    data = iter([batch(cfg, 1, par.device, seed=i) for i in range(steps + 1)])
    train_step(t, data, fwd, 1, cfg.seq_length, 1)  # warm-up (allocations, autotuning)
    if not dry:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    for _ in range(steps):
        train_step(t, data, fwd, 1, cfg.seq_length, 1)
    if not dry:
        torch.cuda.synchronize()
    dt = (time.time() - t0) / steps
    n = count_parameters(cfg)["total"]
    tok_s = cfg.seq_length / dt
    # student forward + backward (6N) and teacher forward (2N) per token
    mfu = (8.0 * n * tok_s) / peak_flops() if not dry else float("nan")
    est = E.training(cfg, E.Layout(micro_batch_size=1, num_micro=1, distributed_optimizer=not dry),
                     impl="cpu" if dry else "gpu", stage="distill", kd_chunk=1024, teacher=cfg)
    out = {"params": n, "step_s": dt, "tokens_per_s": tok_s, "mfu": mfu,
           "estimate_gib": est.total / 2**30, "estimate_items_gib": {k: v / 2**30 for k, v in est.items.items()}}
    if not dry:
        measured = torch.cuda.max_memory_allocated() / 2**30
        no_runtime = (est.total - est.items.get("runtime", 0.0)) / 2**30  # allocator view
        out.update(measured_peak_gib=measured, estimate_without_runtime_gib=no_runtime,
                   estimate_error=(no_runtime - measured) / measured)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry", action="store_true", help="CPU, toy sizes, no GPU figures (CI)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default="runs/gpu_check/summary.json")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not a.dry and not cuda:
        print("gpu_check: no CUDA GPU here; run with --dry for the CPU dry mode", file=sys.stderr)
        return 2
    cfg = DRY_MODEL if a.dry else GPU_MODEL
    par = D.init(ParallelConfig(), seed=1234)
    res = {"mode": "dry (CPU, toy sizes: no GPU figures)" if a.dry else torch.cuda.get_device_name(0),
           "model": cfg.to_dict()}
    t0 = time.time()
    res["kernels"] = check_kernels(cfg, par, a.dry)
    print("[gpu_check] kernels:", json.dumps(res["kernels"]), flush=True)
    res["kd_memory"] = check_kd_memory(256 if a.dry else 8192, 1024 if a.dry else 131072,
                                       par.device, a.dry)
    print("[gpu_check] kd memory:", json.dumps(res["kd_memory"]), flush=True)
    res["kd_step"] = check_kd_step(cfg, par, 1 if a.dry else a.steps, a.dry)
    print("[gpu_check] kd step:", json.dumps({k: v for k, v in res["kd_step"].items()
                                               if k != "estimate_items_gib"}), flush=True)
    res["seconds"] = time.time() - t0
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    D.shutdown()
    ok = res["kernels"]["ok"]
    print(f"[gpu_check] {'OK' if ok else 'FAILED'} in {res['seconds']:.0f} s; summary {a.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
