"""Benchmark of the `stats` stage's accumulators, on the embedded default model and data.

1. DP scaling: the real stage (no depth KL, no partial saves) under torchrun with 1 and
   2 data-parallel processes (OMP_NUM_THREADS=1 each), samples/second from summary.json.
2. Hook overhead, in this process, on the same model and the same calibration batches:
   plain forwards vs forwards with every accumulator on (Mamba x/z/y, FLAP, FFN, attention,
   hidden, cosine), interleaved repetitions, best of each. The overhead ratio is the LAST
   line printed (target <= 1.10).

    .venv/bin/python scripts/bench_stats.py [--checkpoint runs/default/teacher]

Without the checkpoint a randomly initialised model of the same config is saved to a
temporary folder (the cost of the hooks does not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def dp_run(nproc: int, ckpt: str, samples: int, mbs: int, workdir: Path, tries: int = 2) -> float:
    """Best samples/s of `tries` runs of the real stage with `nproc` DP ranks."""
    return max(_dp_once(nproc, ckpt, samples, mbs, workdir / f"dp{nproc}_{i}") for i in range(tries))


def _dp_once(nproc: int, ckpt: str, samples: int, mbs: int, out: Path) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(_free_port()), "-m", "megatron_minitron", "stats",
           "-c", str(REPO / "configs/stats_default.yaml"), f"checkpoint={ckpt}",
           f"output_dir={out}", f"samples={samples}", f"micro_batch_size={mbs}",
           "depth_samples=0", "save_interval=0", "resume=false"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"DP={nproc} run failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())["samples_per_second_this_run"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="runs/default/teacher")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--dp-samples", type=int, default=48)
    ap.add_argument("--skip-dp", action="store_true")
    args = ap.parse_args()

    from megatron_minitron import dist as D
    from megatron_minitron.config import DataConfig, ParallelConfig, TrainConfig, build, load_yaml
    from megatron_minitron.importance.hooks import StatsCollector
    from megatron_minitron.importance.stage import StatsConfig
    from megatron_minitron.model import build_model, causal_mask
    from megatron_minitron.train import checkpoint as ckpt
    from megatron_minitron.train.engine import build_trainable, collate, save_trainable
    from megatron_minitron.train.pretrain import datasets

    os.chdir(REPO)
    scfg = build(StatsConfig, load_yaml(REPO / "configs/stats_default.yaml"))
    tmp = Path(tempfile.mkdtemp(prefix="bench_stats_"))
    par = D.init(ParallelConfig(), seed=1)
    if ckpt.resolve(args.checkpoint) is not None:
        path = args.checkpoint
        model_cfg = ckpt.read_model_config(path)
    else:
        from megatron_minitron.config import ModelConfig

        model_cfg = build(ModelConfig, load_yaml(REPO / "configs/model/tiny_hybrid.yaml")["model"])
        t = build_trainable(model_cfg, par, TrainConfig(steps=2, warmup_steps=1), ParallelConfig())
        path = str(tmp / "random_ckpt")
        save_trainable(t, path)
        print(f"[bench] no checkpoint at {args.checkpoint}: using a random-init {model_cfg.pattern!r} model")

    data: DataConfig = scfg.data
    seq = model_cfg.seq_length
    mbs = args.micro_batch_size
    model = build_model(model_cfg, par)
    ckpt.load_model_weights(path, model)
    model.eval()
    train_ds, _, _ = datasets(data, seq, None, 1)
    batches = [collate([train_ds[b * mbs + i] for i in range(mbs)]) for b in range(args.batches)]
    mask = causal_mask(seq)

    # One intra-op thread and this process's CPU time: the machine is shared, and CPU time
    # is what the hooks add (wall time under contention mostly measures the neighbours).
    torch.set_num_threads(1)

    def one(b, hooked: bool) -> tuple[float, float]:
        w0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad():
            if hooked:
                with col:
                    model(b["tokens"], b["position_ids"], mask)
            else:
                model(b["tokens"], b["position_ids"], mask)
        return time.process_time() - c0, time.perf_counter() - w0

    col = StatsCollector(model, model_cfg, 1, 0)  # every accumulator source
    for b in batches:  # warm-up
        one(b, False), one(b, True)
    # plain and hooked forwards of the same batch back to back, alternating which goes
    # first; per batch the best of `reps`, summed over batches
    best = {(i, h): [float("inf"), float("inf")] for i in range(len(batches)) for h in (0, 1)}
    for r in range(args.reps):
        for i, b in enumerate(batches):
            for h in ((0, 1) if r % 2 == 0 else (1, 0)):
                c, w = one(b, bool(h))
                best[i, h][0] = min(best[i, h][0], c)
                best[i, h][1] = min(best[i, h][1], w)
    p = sum(best[i, 0][0] for i in range(len(batches)))
    h = sum(best[i, 1][0] for i in range(len(batches)))
    pw = sum(best[i, 0][1] for i in range(len(batches)))
    hw = sum(best[i, 1][1] for i in range(len(batches)))
    n = args.batches * mbs
    print(f"[bench] model {model_cfg.pattern!r} hidden {model_cfg.hidden_size}, {n} samples x {seq} "
          f"tokens, 1 thread, best of {args.reps} per batch (plain / hooked interleaved):")
    print(f"[bench]   CPU time: plain {p:.3f}s ({n / p:.1f} samples/s), all accumulators {h:.3f}s "
          f"({n / h:.1f} samples/s)")
    print(f"[bench]   wall time: plain {pw:.3f}s, all accumulators {hw:.3f}s (ratio {hw / pw:.3f}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    D.shutdown()

    if not args.skip_dp:
        s1 = dp_run(1, path, args.dp_samples, mbs, tmp)
        s2 = dp_run(2, path, args.dp_samples, mbs, tmp)
        print(f"[bench] stats stage, {args.dp_samples} samples, 1 thread per rank: DP=1 {s1:.2f} "
              f"samples/s, DP=2 {s2:.2f} samples/s: scaling x{s2 / s1:.2f} (ideal x2.00; "
              f"{os.cpu_count()} CPU cores shared with other processes)")
    print(f"overhead ratio {h / p:.3f}")


if __name__ == "__main__":
    main()
