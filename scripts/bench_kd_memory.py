#!/usr/bin/env python
"""Peak extra CPU memory of the KD loss forward+backward vs megatron's vocab-parallel CE.

    python scripts/bench_kd_memory.py [--tokens 4096] [--vocab 32768] [--dtype float32]
                                      [--with-reference]

Defaults (4096 x 32768 fp32 = 512 MiB per logit tensor) run in about a minute on 2 CPU
cores; --tokens 8192 gives the 1 GiB-per-tensor point (about 2 minutes).

Each measurement runs in a fresh subprocess (so allocator caches and import peaks of one
method do not leak into another). In the child: imports and a tiny warm-up run, then the
inputs are allocated and touched (student logits [s, 1, v] requiring grad, teacher logits,
labels), then the kernel's peak-RSS counter is reset (``echo 5 > /proc/self/clear_refs``;
fallback: ``getrusage`` high-water) and forward + backward run. "Peak extra" = peak RSS
during forward+backward minus RSS with the inputs allocated; it includes the gradient w.r.t.
the student logits (the same size for every method), so it is "gradient + temporaries".
torch's CPU allocator keeps no stats and tracemalloc does not see torch, hence RSS.

Rows: megatron ``tensor_parallel.vocab_parallel_cross_entropy`` (parallel_state initialised
with a world of 1 on gloo), our explicit-group CE, our KD loss at chunk_size None and 1024,
and (--with-reference) the plain-autograd F.kl_div reference. The logits are leaves here, so
every method's gradient (1x the logits) is a fresh tensor and counted. Note megatron's CE works IN PLACE on fp32 logits
(it overwrites them with the softmax and returns that buffer as the gradient), so its extra
memory is near zero for fp32 input but it destroys the logits; for bf16 input it makes an
fp32 copy. The last line is ``kd_vs_ce_peak_memory_ratio <x>`` for KD at chunk_size=1024.
"""

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1024 * 1024

METHODS = [
    ("megatron_ce", None),
    ("our_ce", None),
    ("our_ce", 1024),
    ("kd", None),
    ("kd", 1024),
    ("kd_reference", None),
]


def _status_kib(field):
    m = re.search(rf"{field}:\s+(\d+) kB", open("/proc/self/status").read())
    return int(m.group(1)) if m else None


def _reset_peak():
    """Reset VmHWM to the current RSS; False when the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child(method, chunk, tokens, vocab, dtype_name):
    """One measurement; prints a JSON line."""
    import resource

    import torch

    sys.path.insert(0, ROOT)
    from megatron_minitron.distill.loss import (
        forward_kl_reference,
        vocab_parallel_cross_entropy,
        vocab_parallel_forward_kl,
    )

    torch.set_num_threads(os.cpu_count() or 1)
    dtype = getattr(torch, dtype_name)

    if method == "megatron_ce":
        import torch.distributed as dist
        from megatron.core import parallel_state, tensor_parallel

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)

        def run(s, t, y):
            return tensor_parallel.vocab_parallel_cross_entropy(s, y).sum()

    elif method == "our_ce":

        def run(s, t, y):
            return vocab_parallel_cross_entropy(s, y, chunk_size=chunk).sum()

    elif method == "kd":

        def run(s, t, y):
            return vocab_parallel_forward_kl(s, t, 1.0, chunk_size=chunk).sum()

    elif method == "kd_reference":

        def run(s, t, y):
            return forward_kl_reference(s, t, 1.0).sum()

    else:
        raise ValueError(method)

    def inputs(n, v):
        g = torch.Generator().manual_seed(0)
        s = torch.randn(n, 1, v, generator=g).to(dtype).requires_grad_(True)  # [s, b, v]
        t = torch.randn(n, 1, v, generator=g).to(dtype)
        y = torch.randint(0, v, (n, 1), generator=g)
        return s, t, y

    # Warm-up on tiny inputs: loads every code path before measuring.
    s, t, y = inputs(64, 256)
    run(s, t, y).backward()
    del s, t, y

    s, t, y = inputs(tokens, vocab)
    base_kib = _status_kib("VmRSS")
    exact = _reset_peak()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    t0 = time.perf_counter()
    run(s, t, y).backward()
    elapsed = time.perf_counter() - t0
    if exact:
        peak_kib = _status_kib("VmHWM")
    else:  # high-water since process start; valid only when inputs dominate import peaks
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if maxrss_before > base_kib:
            print("warning: import-time peak above the input baseline", file=sys.stderr)
    assert s.grad is not None and s.grad.shape == s.shape
    print(
        json.dumps(
            {
                "method": method,
                "chunk": chunk,
                "extra_mib": (peak_kib - base_kib) / 1024,
                "base_mib": base_kib / 1024,
                "seconds": elapsed,
                "exact_peak_reset": exact,
            }
        )
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096, help="s*b flattened tokens")
    ap.add_argument("--vocab", type=int, default=32768, help="v_local")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--with-reference", action="store_true", help="add the F.kl_div row")
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "CHUNK"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        method, chunk = args.child
        child(method, None if chunk == "None" else int(chunk), args.tokens, args.vocab, args.dtype)
        return

    elem = {"float32": 4, "bfloat16": 2}[args.dtype]
    logit_mib = args.tokens * args.vocab * elem / MiB
    print(
        f"tokens={args.tokens} vocab={args.vocab} dtype={args.dtype}: one logit tensor = "
        f"{logit_mib:.0f} MiB; fp32 [tokens x vocab] = {args.tokens * args.vocab * 4 / MiB:.0f} MiB"
    )
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    rows = {}
    for method, chunk in METHODS:
        if method == "kd_reference" and not args.with_reference:
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--tokens", str(args.tokens),
               "--vocab", str(args.vocab), "--dtype", args.dtype, "--child", method, str(chunk)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode != 0:
            sys.exit(f"{method} chunk={chunk} failed:\n{proc.stderr[-3000:]}")
        rows[(method, chunk)] = json.loads(proc.stdout.strip().splitlines()[-1])

    print(f"{'method':<14}{'chunk':>7}{'peak extra MiB':>16}{'x logits':>10}{'fwd+bwd s':>11}")
    for (method, chunk), r in rows.items():
        print(
            f"{method:<14}{str(chunk):>7}{r['extra_mib']:>16.0f}"
            f"{r['extra_mib'] / logit_mib:>10.2f}{r['seconds']:>11.2f}"
        )
    if not all(r["exact_peak_reset"] for r in rows.values()):
        print("note: peak via getrusage high-water (clear_refs unavailable)")
    ce = rows[("megatron_ce", None)]["extra_mib"]
    # Guard the denominator: megatron's fp32 CE reuses the input buffer (near-zero extra).
    ce_denom = max(ce, 1.0)
    for chunk in (None, 1024):
        kd = rows[("kd", chunk)]["extra_mib"]
        print(f"ratio kd(chunk={chunk}) / megatron_ce peak extra memory: {kd / ce_denom:.2f}")
    if ("kd_reference", None) in rows:
        ref = rows[("kd_reference", None)]["extra_mib"]
        print(f"ratio kd(chunk=1024) / F.kl_div reference peak extra memory: "
              f"{rows[('kd', 1024)]['extra_mib'] / ref:.2f}")
    print(f"kd_vs_ce_peak_memory_ratio {rows[('kd', 1024)]['extra_mib'] / ce_denom:.3f}")


if __name__ == "__main__":
    main()
