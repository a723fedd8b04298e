"""Measured host-memory peak of pretrain steps (or the stats stage's forward loop) on CPU vs
the resource estimator.

    python tests/dist/resources_worker.py OUT.json '{"hidden_size": 128, ...}' MBS NUM_MICRO [MODE]
    torchrun --nproc_per_node 2 tests/dist/resources_worker.py ... train '{"ep": 2}'

One shape per process: the growth of the anonymous resident set (RssAnon, sampled every
millisecond by a thread) from just before the model is built to its peak within two optimizer
steps (Adam state exists after the first) is compared with estimate.training(impl="cpu") for the same layout. MODE stats:
the stats stage's calibration loop instead (hooks of every source attached, forward without
logits, then the depth KL's skip-one-layer forwards in logits chunks; importance/stage.py's
_run without the data set and checkpoint), two micro-batches, vs estimate.stats. An optional
JSON of ParallelConfig fields (e.g. {"ep": 2}) sets the layout under torchrun; every rank
measures itself, OUT holds rank 0's figures and each rank's measurement. MODE params: no
measurement; for each layout of a JSON list, every rank's (dense, routed-expert) parameter
counts of the built model beside estimate.local_param_split's.
"""

import json
import sys
import threading
import time

import torch

from megatron_minitron import dist as D
from megatron_minitron.config import ModelConfig, ParallelConfig, TrainConfig
from megatron_minitron.resources import estimate as E
from megatron_minitron.train.engine import MicroBatches, build_trainable, lm_forward_step, train_step


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class AnonPeak:
    """Peak growth of the process's anonymous memory while the block runs. Not ru_maxrss: that
    counts mapped library pages too, which a kernel short of memory (a long CI session filling
    the page cache) takes back mid-run: it measured 404 MiB there for a shape that measures
    1109 MiB on a quiet machine."""

    def __enter__(self):
        self.base = self.peak = rss_anon()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon())

    @property
    def growth(self) -> float:
        return float(self.peak - self.base)


def samples(cfg: ModelConfig, n: int) -> list:
    g = torch.Generator().manual_seed(0)
    s = cfg.seq_length
    return [{"tokens": torch.randint(0, cfg.vocab_size, (s,), generator=g),
             "labels": torch.randint(0, cfg.vocab_size, (s,), generator=g),
             "loss_mask": torch.ones(s), "position_ids": torch.arange(s)} for _ in range(n)]


def train(cfg: ModelConfig, pc: ParallelConfig, par, mbs: int, nm: int):
    s = cfg.seq_length
    data = samples(cfg, 4 * mbs * nm * par.dp)
    tr = TrainConfig(steps=10, global_batch_size=mbs * nm * par.dp, micro_batch_size=mbs, warmup_steps=1)
    with AnonPeak() as peak:
        t = build_trainable(cfg, par, tr, pc)
        mb = MicroBatches(data, mbs, mbs * nm * par.dp, par.dp, par.dp_rank)
        for _ in range(2):
            train_step(t, mb, lm_forward_step, nm, s, mbs)
    measured = peak.growth
    lay = E.Layout(tp=pc.tp, dp=par.dp, ep=pc.ep, micro_batch_size=mbs, num_micro=nm,
                   sequence_parallel=pc.sequence_parallel and pc.tp > 1, distributed_optimizer=False,
                   moe_aux_loss=cfg.is_moe and tr.moe_aux_loss_coeff > 0)
    return measured, E.training(cfg, lay, impl="cpu")


def stats(cfg: ModelConfig, pc: ParallelConfig, par, mbs: int, chunk: int = 128):
    from megatron_minitron.importance.depth import accumulate_kl, hidden_out, pipeline_forward
    from megatron_minitron.importance.hooks import SOURCES, StatsCollector
    from megatron_minitron.model import build_model
    from megatron_minitron.train.engine import collate, runtime_for

    data = samples(cfg, 2 * mbs * par.dp)
    peak = AnonPeak().__enter__()
    # as the stage: built uninitialised (its checkpoint load fills it), here filled in place
    # (CPU initialisation would add a transient full-size master copy of every weight)
    model = build_model(cfg, par, initialize=False, runtime=runtime_for(pc, training=False)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, cfg.init_method_std)
    L = cfg.num_layers
    col = StatsCollector(model, cfg, par.tp, 0, list(SOURCES), device=par.device)
    col.acc["depth.kl_sum"] = torch.zeros(L, dtype=torch.float64)
    with torch.no_grad(), col:
        for k in range(2):
            lo = (k * par.dp + par.dp_rank) * mbs
            batch = collate(data[lo:lo + mbs], par.device)
            held = []
            with hidden_out(model):
                pipeline_forward(model, batch, held.append)
            col.count_samples(mbs)
            with col.paused():
                accumulate_kl(model, batch, held[0], L, 0, L, True, par.pg.tp,
                              col.acc["depth.kl_sum"], chunk_tokens=chunk)
    peak.__exit__(None, None, None)
    measured = peak.growth
    lay = E.Layout(tp=pc.tp, dp=par.dp, ep=pc.ep, micro_batch_size=mbs,
                   sequence_parallel=pc.sequence_parallel and pc.tp > 1)
    return measured, E.stats(cfg, lay, impl="cpu", depth=True, depth_chunk=chunk)


def params(cfg: ModelConfig, layouts: list) -> list:
    """[(layout, [(built dense, built expert, estimated dense, estimated expert) per rank])]."""
    from megatron_minitron.model import build_model

    out = []
    for lay in layouts:
        pc = ParallelConfig(**lay)
        par = D.init(pc, seed=3)
        model = build_model(cfg, par, initialize=False)
        expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
        dense = sum(p.numel() for p in model.parameters()) - expert
        pat = cfg.stage_patterns(par.pp)[par.pp_rank]
        est = E.local_param_split(cfg, pat, par.tp, par.is_first_stage, par.is_last_stage, par.ep)
        every = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(every, (dense, expert, *est))
        out.append((lay, every))
        del model
    return out


def main():
    out, shape, mbs, nm = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    mode = sys.argv[5] if len(sys.argv) > 5 else "train"
    layout = json.loads(sys.argv[6]) if len(sys.argv) > 6 else {}
    cfg = ModelConfig(**shape)
    if mode == "params":
        res = params(cfg, layout)
        if torch.distributed.get_rank() == 0:
            with open(out, "w") as f:
                json.dump(res, f)
        D.shutdown()
        return
    pc = ParallelConfig(distributed_optimizer="false", **layout)
    par = D.init(pc, seed=3)
    measured, est = (train(cfg, pc, par, mbs, nm) if mode == "train" else stats(cfg, pc, par, mbs))
    every = [measured]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        every = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(every, measured)
    res = {"shape": shape, "mbs": mbs, "mode": mode, "layout": layout, "measured": measured,
           "measured_per_rank": every, "estimate": est.total, "items": est.items,
           "error": (est.total - measured) / measured}
    if par.rank == 0:
        with open(out, "w") as f:
            json.dump(res, f)
        print(json.dumps(res))
    D.shutdown()


if __name__ == "__main__":
    main()
