"""Benchmark of the `stats` stage on the embedded default model and data.

1. DP scaling: the real stage under torchrun with 1 and 2 data-parallel processes, the same
   threads per rank (--threads, default 1), the same samples; samples/s of the steady loop
   (`samples_per_second_steady` in summary.json: the first step excluded: it includes
   torch.compile of megatron's fused MLP activation, 1.6-2.2 s per process on CPU, which
   every rank pays in parallel) and of the whole loop. Partial saves ON (the recipe's save_interval, asynchronous) so their cost
   is part of the figure. Target: DP=2 >= 1.8 x DP=1 on an idle 2-core machine. Beside
   them, two independent DP=1 stages at once (half the samples each, no collective): the
   machine's own limit for two busy processes.
2. Hook overhead on the WHOLE stage, in this process (world of one): the stage with every
   accumulator (Mamba x/z/y, FLAP, FFN, attention, hidden, cosine) plus depth KL, against
   the same stage with only the depth KL (no accumulating hook attached). Same samples,
   same depth forwards; runs interleaved, best of --reps; ratio of the loop's CPU time
   (and wall time). Target <= 1.05.
3. Hook overhead on one forward (plain vs hooked, interleaved), for reference.
The LAST line printed is the whole-stage overhead ratio.

    .venv/bin/python scripts/bench_stats.py [--checkpoint runs/default/teacher]
    # idle-machine figures (the coordinator's run):
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_stats.py --dp-samples 1024 --reps 3

Without the checkpoint a randomly initialised model of the same config is saved to a
temporary folder (neither cost depends on the weights).
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


def _stage_args(ckpt: str, out: Path, samples: int, mbs: int, extra: list[str]) -> list[str]:
    return ["-c", str(REPO / "configs/stats_default.yaml"), f"checkpoint={ckpt}", f"output_dir={out}",
            f"samples={samples}", f"micro_batch_size={mbs}", "resume=false", *extra]


def _stage_cmd(nproc: int, ckpt: str, out: Path, samples: int, mbs: int, threads: int):
    # without the rendezvous variables an in-process init of this script exported
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(_free_port()), "-m", "megatron_minitron", "stats",
           *_stage_args(ckpt, out, samples, mbs, ["depth_samples=0"])]
    return cmd, env


def _finish(p: subprocess.Popen, what: str, out: Path) -> dict:
    so, se = p.communicate()
    if p.returncode:
        raise SystemExit(f"{what} run failed:\n{so[-3000:]}\n{se[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def dp_run(nproc: int, ckpt: str, samples: int, mbs: int, threads: int, workdir: Path,
           tries: int, copies: int = 1) -> dict:
    """Best (steady samples/s) of `tries` runs of the real stage with `nproc` DP ranks.
    copies=2: two independent single-process stages at once, each on samples/2 (no
    collective between them): the machine's own limit for two busy processes; their
    samples/s are summed."""
    best, seen = None, []
    for i in range(tries):
        procs = []
        for c in range(copies):
            out = workdir / f"dp{nproc}x{copies}_{i}_{c}"
            cmd, env = _stage_cmd(nproc, ckpt, out, samples // copies, mbs, threads)
            procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True), out))
        runs = [_finish(p, f"DP={nproc} x{copies}", out) for p, out in procs]
        s = {k: sum(r[k] for r in runs) for k in ("samples_per_second_steady",
                                                  "samples_per_second_this_run")}
        seen.append(s["samples_per_second_steady"])
        if best is None or s["samples_per_second_steady"] > best["samples_per_second_steady"]:
            best = s
    return dict(best, spread=f"{min(seen):.1f}..{max(seen):.1f}")


def whole_stage(ckpt: str, samples: int, depth: int, mbs: int, reps: int, workdir: Path) -> dict:
    """Interleaved in-process runs of the stage, hooks on / off; best loop CPU and wall."""
    from megatron_minitron.config import build, load_yaml
    from megatron_minitron.importance.stage import ALL_SOURCES, StatsConfig, run_stats

    base = load_yaml(REPO / "configs/stats_default.yaml")
    best = {k: [float("inf"), float("inf")] for k in ("on", "off")}
    for r in range(reps):
        for mode in (("on", "off") if r % 2 == 0 else ("off", "on")):
            cfg = build(StatsConfig, dict(base, checkpoint=ckpt, output_dir=str(workdir / f"stage_{mode}"),
                                          samples=samples, depth_samples=depth, micro_batch_size=mbs,
                                          resume=False, save_interval=0,
                                          sources=list(ALL_SOURCES) if mode == "on" else ["kl"]))
            s = run_stats(cfg)
            best[mode][0] = min(best[mode][0], s["collect_cpu_seconds_rank0"])
            best[mode][1] = min(best[mode][1], s["collect_seconds"])
    return best


def one_forward(model_cfg, path: str, batches: int, mbs: int, reps: int) -> tuple:
    """Plain vs hooked forwards of the same batches (1 thread, CPU time), best of reps."""
    from megatron_minitron import dist as D
    from megatron_minitron.config import DataConfig, ParallelConfig, build, load_yaml
    from megatron_minitron.importance.hooks import StatsCollector
    from megatron_minitron.importance.stage import StatsConfig
    from megatron_minitron.model import build_model, causal_mask
    from megatron_minitron.train import checkpoint as ckpt
    from megatron_minitron.train.engine import collate
    from megatron_minitron.data.stage_data import datasets

    scfg = build(StatsConfig, load_yaml(REPO / "configs/stats_default.yaml"))
    data: DataConfig = scfg.data
    par = D.init(ParallelConfig(), seed=1)
    seq = model_cfg.seq_length
    model = build_model(model_cfg, par)
    ckpt.load_model_weights(path, model)
    model.eval()
    train_ds, _, _ = datasets(data, seq, None, 1)
    bs = [collate([train_ds[b * mbs + i] for i in range(mbs)]) for b in range(batches)]
    mask = causal_mask(seq)
    col = StatsCollector(model, model_cfg, 1, 0)

    def one(b, hooked: bool) -> float:
        c0 = time.process_time()
        with torch.no_grad():
            if hooked:
                with col:
                    model(b["tokens"], b["position_ids"], mask)
            else:
                model(b["tokens"], b["position_ids"], mask)
        return time.process_time() - c0

    for b in bs:
        one(b, False), one(b, True)
    best = {(i, h): float("inf") for i in range(len(bs)) for h in (0, 1)}
    for r in range(reps):
        for i, b in enumerate(bs):
            for h in ((0, 1) if r % 2 == 0 else (1, 0)):
                best[i, h] = min(best[i, h], one(b, bool(h)))
    D.shutdown()
    return sum(best[i, 0] for i in range(len(bs))), sum(best[i, 1] for i in range(len(bs)))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="runs/default/teacher")
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dp-samples", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per rank (both runs)")
    ap.add_argument("--stage-samples", type=int, default=64)
    ap.add_argument("--stage-depth-samples", type=int, default=8,
                    help="default 8 of 64 = the recipe's ratio (16 of 128)")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--skip-dp", action="store_true")
    ap.add_argument("--skip-stage", action="store_true", help="only the DP scaling runs")
    args = ap.parse_args()
    os.chdir(REPO)
    torch.set_num_threads(args.threads)

    from megatron_minitron.config import ModelConfig, ParallelConfig, TrainConfig, build, load_yaml
    from megatron_minitron.train import checkpoint as ckpt

    tmp = Path(tempfile.mkdtemp(prefix="bench_stats_"))
    if ckpt.resolve(args.checkpoint) is not None:
        path = args.checkpoint
        model_cfg = ckpt.read_model_config(path)
    else:
        from megatron_minitron import dist as D
        from megatron_minitron.train.engine import build_trainable, save_trainable

        model_cfg = build(ModelConfig, load_yaml(REPO / "configs/model/tiny_hybrid.yaml")["model"])
        t = build_trainable(model_cfg, D.init(ParallelConfig(), seed=1),
                            TrainConfig(steps=2, warmup_steps=1), ParallelConfig())
        path = str(tmp / "random_ckpt")
        save_trainable(t, path)
        D.shutdown()
        print(f"[bench] no checkpoint at {args.checkpoint}: using a random-init {model_cfg.pattern!r} model")
    mbs, load = args.micro_batch_size, os.getloadavg()[0]

    if not args.skip_stage:
        p, h = one_forward(model_cfg, path, args.batches, mbs, max(args.reps, 3))
        n = args.batches * mbs
        print(f"[bench] one forward, {n} samples x {model_cfg.seq_length} tokens, {args.threads} thread(s), "
              f"CPU time best of {max(args.reps, 3)}: plain {p:.3f}s, all accumulators {h:.3f}s "
              f"(ratio {h / p:.3f})")

    if not args.skip_dp:
        s1 = dp_run(1, path, args.dp_samples, mbs, args.threads, tmp, args.reps)
        s2 = dp_run(2, path, args.dp_samples, mbs, args.threads, tmp, args.reps)
        s11 = dp_run(1, path, args.dp_samples, mbs, args.threads, tmp, args.reps, copies=2)
        a, b, c = (x["samples_per_second_steady"] for x in (s1, s2, s11))
        w = {k: x["samples_per_second_this_run"] for k, x in (("1", s1), ("2", s2), ("11", s11))}
        print(f"[bench] DP scaling, stats stage, {args.dp_samples} samples, {args.threads} thread(s) per "
              f"rank, async partial saves every 8 steps, best of {args.reps} (range): steady DP=1 {a:.2f} "
              f"({s1['spread']}) samples/s, DP=2 {b:.2f} ({s2['spread']}) samples/s: x{b / a:.2f} (whole loop incl. warm-up step: x{w['2'] / w['1']:.2f}; ideal "
              f"x2.00; load average {load:.1f} at start on {os.cpu_count()} cores)")
        print(f"[bench] the machine's limit: two independent DP=1 stages at once, {args.dp_samples // 2} "
              f"samples each, summed: steady {c:.2f} ({s11['spread']}) samples/s = x{c / a:.2f} DP=1 (whole loop "
              f"x{w['11'] / w['1']:.2f}); DP=2 reaches {b / c:.3f} of it (whole loop {w['2'] / w['11']:.3f})")

    if args.skip_stage:
        return
    best = whole_stage(path, args.stage_samples, args.stage_depth_samples, mbs, args.reps, tmp)
    on, off = best["on"], best["off"]
    print(f"[bench] whole stage, {args.stage_samples} samples ({args.stage_depth_samples} with depth KL, "
          f"{model_cfg.num_layers} skip-one-layer forwards each), best of {args.reps}: hooks off "
          f"{off[0]:.2f}s CPU / {off[1]:.2f}s wall, all accumulators {on[0]:.2f}s CPU / {on[1]:.2f}s "
          f"wall (wall ratio {on[1] / off[1]:.3f}; load average {os.getloadavg()[0]:.1f})")
    print(f"overhead ratio (whole stage, CPU time) {on[0] / off[0]:.3f}")


if __name__ == "__main__":
    main()
