"""Measured host-memory peak of pretrain steps on CPU vs the resource estimator.

    python tests/dist/resources_worker.py OUT.json '{"hidden_size": 128, ...}' MBS NUM_MICRO

One shape per process (ru_maxrss only grows): the growth of the maximum resident set from
just before the model is built to the end of two optimizer steps (Adam state exists after
the first) is compared with estimate.training(impl="cpu") for the same layout.
"""

import json
import resource
import sys

import torch

from megatron_minitron import dist as D
from megatron_minitron.config import ModelConfig, ParallelConfig, TrainConfig
from megatron_minitron.resources import estimate as E
from megatron_minitron.train.engine import MicroBatches, build_trainable, lm_forward_step, train_step


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main():
    out, shape, mbs, nm = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    cfg = ModelConfig(**shape)
    pc = ParallelConfig(distributed_optimizer="false")
    par = D.init(pc, seed=3)
    g = torch.Generator().manual_seed(0)
    s = cfg.seq_length
    data = [{"tokens": torch.randint(0, cfg.vocab_size, (s,), generator=g),
             "labels": torch.randint(0, cfg.vocab_size, (s,), generator=g),
             "loss_mask": torch.ones(s), "position_ids": torch.arange(s)} for _ in range(4 * mbs * nm)]
    tr = TrainConfig(steps=10, global_batch_size=mbs * nm, micro_batch_size=mbs, warmup_steps=1)
    base = rss_mib()
    t = build_trainable(cfg, par, tr, pc)
    mb = MicroBatches(data, mbs, mbs * nm, 1, 0)
    for _ in range(2):
        train_step(t, mb, lm_forward_step, nm, s, mbs)
    measured = (rss_mib() - base) * 2 ** 20
    est = E.training(cfg, E.Layout(micro_batch_size=mbs, num_micro=nm, distributed_optimizer=False),
                     impl="cpu")
    res = {"shape": shape, "mbs": mbs, "measured": measured, "estimate": est.total,
           "items": est.items, "error": (est.total - measured) / measured}
    with open(out, "w") as f:
        json.dump(res, f)
    print(json.dumps(res))
    D.shutdown()


if __name__ == "__main__":
    main()
