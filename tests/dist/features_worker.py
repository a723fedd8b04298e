"""Precision and parallel features against their "off" twins, in ONE 2-process launch
(gloo, real megatron-core, real corpus). Writes WORKDIR/features.json; assertions live in
tests/dist/test_features_dist.py.

  precision  DP=2: an fp32 checkpoint C0; 4 steps from C0 in fp32 (plain optimizer), in
             bf16 with megatron's mixed-precision optimizer, and in bf16 with its
             distributed optimizer (state saved sharded by DP rank after 2 steps, resumed
             in a fresh model: the resumed steps must equal the continued ones); resuming
             that checkpoint at TP=2 is refused, rewritten reshardable at DP=2, then
             resumed at TP=2.
  recompute  DP=2, fp32: losses and every gradient of one step with recompute none /
             selective / full.
  sp         TP=2: the stats stage (every score) and the distill stage (per-step losses)
             with sequence parallelism vs without.
"""

import dataclasses
import json
import sys
import weakref
from pathlib import Path

import torch

from megatron_minitron import dist as D
from megatron_minitron.config import ConfigError, DataConfig, ParallelConfig, TrainConfig
from megatron_minitron.train import checkpoint as ckpt
from megatron_minitron.train.engine import (MicroBatches, build_trainable, lm_forward_step,
                                            load_weights, reduce_reports, resume_trainable,
                                            save_trainable, train_step)
from megatron_minitron.data.stage_data import datasets

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.dist.tiny_teacher import TEACHER  # noqa: E402

MODEL = TEACHER  # the tiny hybrid the dist workers share
BF16 = dataclasses.replace(MODEL, params_dtype="bf16")
TRAIN = TrainConfig(steps=100, global_batch_size=4, micro_batch_size=1, lr=3e-3, min_lr=3e-4,
                    warmup_steps=2, clip_grad=1.0)


def data_cfg(wd: Path) -> DataConfig:
    info = json.loads((wd / "data.json").read_text())
    return DataConfig(prefix=info["prefix"], tokenizer=info["tokenizer"], split="90,10,0")


def steps(t, ds, n, start=0):
    par = t.par
    data = MicroBatches(ds, TRAIN.micro_batch_size, TRAIN.global_batch_size, par.dp, par.dp_rank,
                        start_step=start)
    nm = TRAIN.global_batch_size // (TRAIN.micro_batch_size * par.dp)
    out = []
    for _ in range(n):
        r = train_step(t, data, lm_forward_step, nm, MODEL.seq_length, TRAIN.micro_batch_size)
        out.append(reduce_reports(r["reports"], par))
    return out


def precision(wd: Path, ds) -> dict:
    res = {}
    pc = ParallelConfig()
    par = D.init(pc, seed=1234)
    t0 = build_trainable(MODEL, par, TRAIN, pc)
    save_trainable(t0, wd / "c0")
    t = build_trainable(MODEL, par, TRAIN, pc, initialize=False)
    load_weights(t, wd / "c0")
    res["fp32"] = steps(t, ds, 4)

    t = build_trainable(BF16, par, TRAIN, pc, initialize=False)
    load_weights(t, wd / "c0")  # fp32 checkpoint -> bf16 weights, fp32 main params
    opt = t.optimizer.chained_optimizers[0]
    res["bf16_param_dtypes"] = sorted({str(p.dtype) for p in t.model.module.parameters()})
    res["bf16_main_dtypes"] = sorted({str(p.dtype) for g in opt.optimizer.param_groups
                                      for p in g["params"]})
    res["bf16_optimizer"] = type(opt).__name__
    res["bf16"] = steps(t, ds, 4)

    pcd = ParallelConfig(distributed_optimizer="true")
    t = build_trainable(BF16, par, TRAIN, pcd, initialize=False)
    load_weights(t, wd / "c0")
    res["dist_optimizer"] = type(t.optimizer.chained_optimizers[0]).__name__
    first = steps(t, ds, 2)
    save_trainable(t, wd / "r1")
    res["r1_files"] = sorted(p.name for p in ckpt.require(wd / "r1").iterdir())
    res["bf16_dist"] = first + steps(t, ds, 2, start=2)
    t2 = build_trainable(BF16, par, TRAIN, pcd, initialize=False)
    resume_trainable(t2, wd / "r1")
    res["bf16_dist_resumed"] = steps(t2, ds, 2, start=t2.iteration)

    # layout change: TP=2 (DP=1) cannot read DP-sharded state; reshard once at DP=2
    pc2 = ParallelConfig(tp=2, distributed_optimizer="true")
    par2 = D.init(pc2, seed=1234)
    t3 = build_trainable(BF16, par2, TRAIN, pc2, initialize=False)
    try:
        resume_trainable(t3, wd / "r1")
        res["refused"] = ""
    except ConfigError as e:
        res["refused"] = str(e)
    par = D.init(pcd, seed=1234)
    pcr = ParallelConfig(distributed_optimizer="true", optimizer_checkpoint="reshardable")
    t4 = build_trainable(BF16, par, TRAIN, pcr, initialize=False)
    resume_trainable(t4, wd / "r1")  # rewrites r1 reshardable
    res["r1_format"] = ckpt.read_meta(wd / "r1")["optimizer"]["format"]
    par2 = D.init(pc2, seed=1234)
    t5 = build_trainable(BF16, par2, TRAIN, pc2, initialize=False)
    resume_trainable(t5, wd / "r1")
    res["bf16_dist_tp2"] = steps(t5, ds, 2, start=t5.iteration)
    return res


def grads_of(t, ds) -> tuple[float, list]:
    """Loss and every parameter's gradient (DP-reduced main_grad) of one step, no update."""
    from megatron_minitron.compat import mcore

    par = t.par
    data = MicroBatches(ds, TRAIN.micro_batch_size, TRAIN.global_batch_size, par.dp, par.dp_rank)
    nm = TRAIN.global_batch_size // (TRAIN.micro_batch_size * par.dp)
    t.model.train()
    t.model.zero_grad_buffer()
    live, peak = [0], [0]

    class Box:  # holds one saved tensor; freed with the autograd graph that saved it
        __slots__ = ("t", "__weakref__")

    def pack(x):  # peak bytes autograd holds for backward (recompute lowers it)
        b, n = Box(), x.numel() * x.element_size()
        b.t = x
        live[0] += n
        peak[0] = max(peak[0], live[0])
        weakref.finalize(b, lambda: live.__setitem__(0, live[0] - n))
        return b

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda b: b.t):
        reports = mcore.get_forward_backward_func()(
            forward_step_func=lm_forward_step, data_iterator=data, model=[t.model],
            num_microbatches=nm, seq_length=MODEL.seq_length,
            micro_batch_size=TRAIN.micro_batch_size, forward_only=False)
    grads = [p.main_grad.clone() for p in t.model.module.parameters()]
    return reduce_reports(reports, par), grads, peak[0]


def recompute(wd: Path, ds) -> dict:
    pc = ParallelConfig()
    par = D.init(pc, seed=1234)
    out = {}
    ref_loss, ref_g = None, None
    for mode in ("none", "selective", "full"):
        t = build_trainable(MODEL, par, dataclasses.replace(TRAIN, recompute=mode), pc,
                            initialize=False)
        load_weights(t, wd / "c0")
        loss, g, saved = grads_of(t, ds)
        if ref_g is None:
            ref_loss, ref_g = loss, g
        out[mode] = {"loss": loss, "loss_diff": abs(loss - ref_loss), "saved_bytes": saved,
                     "grad_max_diff": max(float((a - b).abs().max()) for a, b in zip(g, ref_g)),
                     "grad_max": max(float(a.abs().max()) for a in ref_g)}
        if mode == "full":
            from megatron_minitron.compat import mcore
            out["full_native"] = mcore.STACK_HAS_FULL_RECOMPUTE
            out["full_wrapped"] = any("forward" in vars(l) for l in t.model.module.decoder.layers)
    return out


def sp(wd: Path, dcfg: DataConfig) -> dict:
    from megatron_minitron.distill.stage import DistillConfig, run_distill
    from megatron_minitron.importance.io import ImportanceFile
    from megatron_minitron.importance.stage import StatsConfig, run_stats

    from megatron_minitron.model import build_model, causal_mask
    from megatron_minitron.train.engine import runtime_for

    out = {}
    for flag in (False, True):
        pc = ParallelConfig(tp=2, sequence_parallel=flag)
        name = "sp" if flag else "nosp"
        # the setting takes effect: the residual stream is split along the sequence
        par = D.init(pc, seed=1234)
        m = build_model(MODEL, par, runtime=runtime_for(pc, TRAIN))
        rows = []
        h = m.decoder.layers[0].norm.register_forward_hook(lambda mod, a, o: rows.append(o.shape[0]))
        with torch.no_grad():
            tok = torch.zeros(1, MODEL.seq_length, dtype=torch.long)
            m(tok, torch.arange(MODEL.seq_length)[None], causal_mask(MODEL.seq_length))
        h.remove()
        out[f"norm_rows_{name}"] = rows[0]
        run_stats(StatsConfig(checkpoint=str(wd / "c0"), output_dir=str(wd / f"stats_{name}"),
                              parallel=pc, data=dcfg, samples=8, micro_batch_size=2,
                              depth_samples=4, save_interval=0, resume=False,
                              depth_chunk_tokens=48))
        tr = dataclasses.replace(TRAIN, steps=3, warmup_steps=1, eval_interval=100,
                                 save_interval=100, log_interval=1, eval_iters=1)
        run_distill(DistillConfig(student=str(wd / "c0"), teacher=str(wd / "r1"),
                                  output_dir=str(wd / f"distill_{name}"), parallel=pc, data=dcfg,
                                  train=tr, resume=False))
    if D.is_rank0():
        a = ImportanceFile.load(wd / "stats_nosp" / "importance.pt")
        b = ImportanceFile.load(wd / "stats_sp" / "importance.pt")
        diffs = {}

        def cmp(prefix, x, y):
            if isinstance(x, dict):
                for k in x:
                    cmp(f"{prefix}.{k}", x[k], y[k])
            elif isinstance(x, (list, tuple)):
                for i, (u, v) in enumerate(zip(x, y)):
                    cmp(f"{prefix}[{i}]", u, v)
            elif isinstance(x, torch.Tensor) and x.is_floating_point():
                d = float(((x - y).abs() / (y.abs().max() + 1e-30)).max()) if x.numel() else 0.0
                diffs[prefix] = d

        cmp("layers", a.layers, b.layers)
        cmp("hidden", a.hidden, b.hidden)
        cmp("depth", a.depth, b.depth)
        out["stats_rel_diff"] = diffs
        out["stats_count"] = len(diffs)
        for name in ("nosp", "sp"):
            recs = [json.loads(l) for l in (wd / f"distill_{name}" / "metrics.jsonl").read_text().splitlines()]
            out[f"distill_{name}"] = [r["loss"] for r in recs if "loss" in r]
    return out


def main():
    wd = Path(sys.argv[1])
    dcfg = data_cfg(wd)
    D.init(ParallelConfig(), seed=1234)
    train_ds, _, _ = datasets(dcfg, MODEL.seq_length, 400, 8)
    res = {"precision": precision(wd, train_ds)}
    res["recompute"] = recompute(wd, train_ds)
    res["sp"] = sp(wd, dcfg)
    if D.is_rank0():
        (wd / "features.json").write_text(json.dumps(res, indent=1))
    D.shutdown()


if __name__ == "__main__":
    main()
