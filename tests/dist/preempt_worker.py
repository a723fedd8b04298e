"""Worker for tests/dist/test_preempt_dist.py: stopping long stages on a signal.

  setup (1 process):       a briefly trained teacher checkpoint, its importance file and a
                           random student.
  interrupt (2 processes): pretrain at DP=2 with an exit_duration_minutes limit that has
                           passed at the first check (stops after step 1, no signal); then
                           distill at DP=2 (the test sends SIGUSR1 to the whole launch,
                           as Slurm's --signal does; the torchrun agent ignores it via
                           slurm/agent.sh), then stats at DP=2 (the test sends SIGTERM to
                           both workers), then search at DP=2 (SIGUSR1 to the whole launch
                           again). Each must return normally after its save.
  finish (2 processes):    the same three runs uninterrupted (references), then the
                           interrupted ones resumed to the end; the final checkpoints
                           are compared tensor by tensor.
Each rank writes its pid to <work>/pid_<rank> (the test signals the workers by pid).
"""

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from megatron_minitron import dist as D  # noqa: E402
from megatron_minitron.config import ParallelConfig, PretrainConfig, TrainConfig  # noqa: E402
from megatron_minitron.distill.stage import LossConfig, run_distill  # noqa: E402
from megatron_minitron.importance.stage import StatsConfig, run_stats  # noqa: E402
from megatron_minitron.search.stage import run_search  # noqa: E402
from tests.dist.distill_worker import STUDENT, TEACHER, data_cfg, distill_cfg, make_student  # noqa: E402
from tests.dist.search_worker import search_cfg  # noqa: E402  (same teacher config, work/stats)

KD = TrainConfig(steps=60, global_batch_size=4, micro_batch_size=2, lr=3e-3, min_lr=3e-4,
                 warmup_steps=2, clip_grad=1.0, eval_interval=1000, eval_iters=2,
                 save_interval=1000, log_interval=1000)


def kd(work: Path, name: str):
    return run_distill(distill_cfg(work, name, train=KD, loss=LossConfig(chunk_size=48)))


def stats(work: Path, name: str):
    return run_stats(StatsConfig(checkpoint=str(work / "teacher"), output_dir=str(work / name),
                                 data=data_cfg(work), samples=480, micro_batch_size=2,
                                 depth_samples=8, save_interval=3))


def pretrain(work: Path, name: str, **train_kw):
    from megatron_minitron.train.pretrain import run_pretrain

    tr = TrainConfig(steps=6, global_batch_size=4, micro_batch_size=2, lr=3e-3, min_lr=3e-4,
                     warmup_steps=1, eval_interval=1000, eval_iters=1, save_interval=1000,
                     log_interval=1000, **train_kw)
    return run_pretrain(PretrainConfig(output_dir=str(work / name), model=STUDENT, data=data_cfg(work),
                                       train=tr))


def setup(work: Path) -> None:
    from megatron_minitron.train.engine import (MicroBatches, build_trainable, lm_forward_step,
                                                save_trainable, train_step)
    from megatron_minitron.data.stage_data import datasets

    par = D.init(ParallelConfig(), seed=3)
    tr = TrainConfig(steps=10, global_batch_size=4, micro_batch_size=2, lr=3e-3, min_lr=3e-4,
                     warmup_steps=1)
    t = build_trainable(TEACHER, par, tr, ParallelConfig())
    ds, _, _ = datasets(data_cfg(work), TEACHER.seq_length, 40, 4)
    data = MicroBatches(ds, 2, 4, par.dp, par.dp_rank)
    for _ in range(4):
        train_step(t, data, lm_forward_step, 2, TEACHER.seq_length, 2)
    save_trainable(t, work / "teacher")
    make_student(work)
    run_stats(StatsConfig(checkpoint=str(work / "teacher"), output_dir=str(work / "stats"),
                          data=data_cfg(work), samples=8, micro_batch_size=2, depth_samples=4,
                          save_interval=0))
    D.shutdown()


def compare_checkpoints(a: Path, b: Path) -> float:
    from megatron_minitron.model import build_model
    from megatron_minitron.train import checkpoint as ckpt

    par = D.init(ParallelConfig(), seed=1)
    ma, mb = build_model(STUDENT, par), build_model(STUDENT, par)
    ckpt.load_model_weights(a, ma)
    ckpt.load_model_weights(b, mb)
    diff = torch.zeros((), dtype=torch.float64)
    for (na, pa), (nb, pb) in zip(ma.named_parameters(), mb.named_parameters()):
        assert na == nb
        diff = torch.maximum(diff, (pa.double() - pb.double()).abs().max())
    torch.distributed.all_reduce(diff, op=torch.distributed.ReduceOp.MAX)
    return float(diff)


def main():
    phase, work = sys.argv[1], Path(sys.argv[2])
    if phase == "setup":
        return setup(work)
    D.init(ParallelConfig(), seed=1)  # keeps the process group across the stage runs
    rank = torch.distributed.get_rank()
    (work / f"pid_{rank}").write_text(str(os.getpid()))
    out = {}
    if phase == "interrupt":
        out["pretrain"] = pretrain(work, "pt_resumed", exit_duration_minutes=1e-6)
        out["distill"] = kd(work, "kd_resumed")
        out["stats"] = stats(work, "stats_resumed")
        out["search"] = run_search(search_cfg(work, "search_resumed"))
    elif phase == "finish":
        out["pretrain_ref"] = pretrain(work, "pt_ref")
        out["pretrain_resumed"] = pretrain(work, "pt_resumed")
        out["pt_max_weight_diff"] = compare_checkpoints(work / "pt_ref", work / "pt_resumed")
        out["distill_ref"] = kd(work, "kd_ref")
        out["stats_ref"] = stats(work, "stats_ref")
        out["distill_resumed"] = kd(work, "kd_resumed")
        out["stats_resumed"] = stats(work, "stats_resumed")
        out["max_weight_diff"] = compare_checkpoints(work / "kd_ref", work / "kd_resumed")
        out["search_ref"] = run_search(search_cfg(work, "search_ref"))
        out["search_resumed"] = run_search(search_cfg(work, "search_resumed"))
    if rank == 0:
        (work / f"result_{phase}.json").write_text(json.dumps(out, default=str))
    D.shutdown()


if __name__ == "__main__":  # guard: the checkpoint writer's helper process re-imports __main__
    main()
