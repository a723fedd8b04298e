#!/usr/bin/env python
"""Peak memory of one KD step vs one CE step, with the logits made by a model-like graph.

    python scripts/bench_kd_memory.py [--tokens 8192] [--vocab 0] [--hidden 1024]
                                      [--dtypes bf16,fp32] [--chunk 1024] [--device auto]

What one measured step does (each in a fresh subprocess, after a tiny warm-up):
  student: logits = h_s @ W_s^T, h_s [tokens, 1, hidden] and W_s [vocab, hidden] requiring
           grad (the last hidden state and the output layer); loss; backward.
  teacher (KD rows only): logits = h_t @ W_t^T under no_grad, INSIDE the step, so the
           teacher's logits count, as they do in the distill stage.
dtypes: bf16 = bf16 weights / hidden / logits, the loss math in fp32 inside the loss (the
real mixed-precision case); fp32 = everything fp32 (the second row).
Rows: megatron's tensor_parallel.vocab_parallel_cross_entropy (what pretrain's loss uses),
our chunked CE (the distill stage's CE baseline), our KD (forward KL) at --chunk and
unchunked. "peak" = peak memory of the step above the memory held before it (weights,
hidden states, labels): on a GPU torch.cuda.max_memory_allocated (reset before the step);
on CPU the process's peak RSS (VmHWM reset through /proc/self/clear_refs). It includes
what every method needs alike: the student logits, their gradient and the weight /
hidden gradients. Reported: peak / megatron CE peak and peak / size of one logits tensor
(tokens x vocab in the logits' dtype).

--vocab 0 picks the largest of 131072, 65536, 32768, 16384, 8192 whose fp32 step fits in
half the available memory (CPU: MemAvailable; GPU: free memory). The last lines are
`kd_vs_ce_peak_memory_ratio <dtype> <x>` (KD at --chunk over megatron CE).
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
DTYPES = {"bf16": ("bfloat16", 2), "fp32": ("float32", 4)}


def _status_kib(field):
    m = re.search(rf"{field}:\s+(\d+) kB", open("/proc/self/status").read())
    return int(m.group(1)) if m else None


def _reset_peak():
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


def child(method, chunk, a):
    import torch

    sys.path.insert(0, ROOT)
    from megatron_minitron.distill.loss import vocab_parallel_cross_entropy, vocab_parallel_forward_kl

    torch.set_num_threads(os.cpu_count() or 1)
    dtype = getattr(torch, DTYPES[a.dtype][0])
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    if method == "megatron_ce":
        import torch.distributed as dist
        from megatron.core import parallel_state, tensor_parallel

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)

    def loss(s, t, y):
        if method == "megatron_ce":
            return tensor_parallel.vocab_parallel_cross_entropy(s, y).sum()
        if method == "our_ce":
            return vocab_parallel_cross_entropy(s, y, chunk_size=chunk).sum()
        return vocab_parallel_forward_kl(s, t, 1.0, chunk_size=chunk).sum()

    def setup(n, v, h):
        g = torch.Generator().manual_seed(0)
        mk = lambda *shape: (torch.randn(*shape, generator=g) * shape[-1] ** -0.5).to(dev, dtype)  # noqa: E731
        return {"ws": mk(v, h).requires_grad_(True), "wt": mk(v, h), "hs": mk(n, 1, h).requires_grad_(True),
                "ht": mk(n, 1, h), "y": torch.randint(0, v, (n, 1), generator=g).to(dev)}

    def step(x):
        t = None
        if method == "kd":
            with torch.no_grad():
                t = x["ht"] @ x["wt"].t()  # teacher logits [n, 1, v], counted in the peak
        s = x["hs"] @ x["ws"].t()  # student logits [n, 1, v]
        loss(s, t, x["y"]).backward()

    step(setup(64, 256, 32))  # warm-up: every code path loaded before measuring
    x = setup(a.tokens, a.vocab, a.hidden)
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        exact = True
    else:
        base = _status_kib("VmRSS") * 1024
        exact = _reset_peak()
    t0 = time.perf_counter()
    step(x)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        import resource

        peak = (_status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    assert x["ws"].grad is not None and x["hs"].grad is not None
    print(json.dumps({"method": method, "chunk": chunk, "peak_mib": (peak - base) / MiB,
                      "seconds": time.perf_counter() - t0, "exact": exact,
                      "measure": "torch.cuda.max_memory_allocated" if cuda else "peak RSS (VmHWM)"}))


def _available_bytes(device):
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info()[0]
    m = re.search(r"MemAvailable:\s+(\d+) kB", open("/proc/meminfo").read())
    return int(m.group(1)) * 1024


def pick_vocab(tokens, hidden, device):
    """Largest vocab whose fp32 KD step (teacher + student logits, their fp32 copies and
    gradient: ~6 logits tensors, plus weights) fits in half the available memory."""
    avail = _available_bytes(device)
    for v in (131072, 65536, 32768, 16384, 8192):
        if 6 * tokens * v * 4 + 4 * v * hidden * 4 < avail / 2:
            return v
    return 8192


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per micro-batch (s*b)")
    ap.add_argument("--vocab", type=int, default=0, help="vocab (per TP rank); 0 = largest that fits")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--chunk", type=int, default=1024, help="the distill stage's loss.chunk_size")
    ap.add_argument("--device", default="auto", help="auto (cuda when present) | cpu | cuda")
    ap.add_argument("--dtype", default="bf16", help=argparse.SUPPRESS)
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "CHUNK"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.device == "auto":
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.child:
        child(a.child[0], None if a.child[1] == "None" else int(a.child[1]), a)
        return
    if a.vocab == 0:
        a.vocab = pick_vocab(a.tokens, a.hidden, a.device)
    methods = [("megatron_ce", None), ("our_ce", a.chunk), ("kd", a.chunk), ("kd", None)]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    ratios = {}
    print(f"tokens={a.tokens} vocab={a.vocab} hidden={a.hidden} device={a.device}; KD at chunk_size={a.chunk}")
    print(f"{'dtype':<6}{'method':<13}{'chunk':>7}{'peak MiB':>11}{'/ CE':>7}{'/ logits':>10}{'seconds':>9}")
    for dt in a.dtypes.split(","):
        logits_mib = a.tokens * a.vocab * DTYPES[dt][1] / MiB
        rows = {}
        for method, chunk in methods:
            cmd = [sys.executable, os.path.abspath(__file__), "--tokens", str(a.tokens), "--vocab", str(a.vocab),
                   "--hidden", str(a.hidden), "--device", a.device, "--dtype", dt, "--child", method, str(chunk)]
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
            if p.returncode != 0:
                sys.exit(f"{dt} {method} chunk={chunk} failed:\n{p.stderr[-3000:]}")
            rows[(method, chunk)] = r = json.loads(p.stdout.strip().splitlines()[-1])
            ce = rows[("megatron_ce", None)]["peak_mib"]
            print(f"{dt:<6}{method:<13}{str(chunk):>7}{r['peak_mib']:>11.0f}{r['peak_mib'] / ce:>7.2f}"
                  f"{r['peak_mib'] / logits_mib:>10.2f}{r['seconds']:>9.2f}", flush=True)
        ratios[dt] = (rows[("kd", a.chunk)]["peak_mib"] / rows[("megatron_ce", None)]["peak_mib"],
                      rows[("kd", a.chunk)]["peak_mib"] / logits_mib)
    print(f"(one logits tensor: {a.tokens} x {a.vocab}; measured as {r['measure']})")
    for dt, (vs_ce, vs_logits) in ratios.items():
        print(f"kd_vs_ce_peak_memory_ratio {dt} {vs_ce:.2f}  (KD peak = {vs_logits:.2f}x one {dt} logits tensor)")


if __name__ == "__main__":
    main()
