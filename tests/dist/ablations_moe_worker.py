"""Worker for tests/dist/test_ablations_dist.py's MoE case (marked slow): the `experts` and
`expert_ffn` ablations end to end in one process on a tiny MoE hybrid trained a few steps and
its real `stats` importance file (source `moe`), 2 KD steps, 2 seeds; then the same command
again (resume). Writes <workdir>/result.json."""

import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_minitron import dist as D  # noqa: E402
from megatron_minitron.ablations.stage import AblationsConfig, MoEAblationsConfig, run_ablations  # noqa: E402
from megatron_minitron.config import ParallelConfig, TrainConfig  # noqa: E402
from megatron_minitron.data.stage_data import datasets  # noqa: E402
from megatron_minitron.distill.stage import LossConfig  # noqa: E402
from megatron_minitron.importance.stage import StatsConfig, run_stats  # noqa: E402
from megatron_minitron.train.engine import (MicroBatches, build_trainable, lm_forward_step,  # noqa: E402
                                            save_trainable, train_step)
from tests.dist.tiny_teacher import TEACHER, data_cfg  # noqa: E402

MOE = dataclasses.replace(TEACHER, pattern="ME*E", num_moe_experts=8, moe_ffn_hidden_size=32, moe_router_topk=2,
                          moe_shared_expert_intermediate_size=32, moe_router_score_function="sigmoid",
                          moe_router_expert_bias=True)


def make_moe_teacher(work: Path) -> None:
    pc = ParallelConfig()
    par = D.init(pc, seed=3)
    train = TrainConfig(steps=10, global_batch_size=4, micro_batch_size=2, lr=3e-3, min_lr=3e-4, warmup_steps=1)
    t = build_trainable(MOE, par, train, pc)
    ds, _, _ = datasets(data_cfg(work), MOE.seq_length, 40, 4)
    data = MicroBatches(ds, 2, 4, par.dp, par.dp_rank)
    for _ in range(4):
        train_step(t, data, lm_forward_step, 2, MOE.seq_length, 2)
    save_trainable(t, work / "moe_teacher")
    D.shutdown()
    run_stats(StatsConfig(checkpoint=str(work / "moe_teacher"), output_dir=str(work / "moe_stats"),
                          data=data_cfg(work), samples=8, micro_batch_size=2, depth_samples=4,
                          save_interval=0))


def cfg(work: Path) -> AblationsConfig:
    return AblationsConfig(
        teacher=str(work / "no_dense_teacher"), importance=str(work / "none.pt"), output_dir=str(work / "abl"),
        only=["experts", "expert_ffn"], data=data_cfg(work), eval_iters=2, micro_batch_size=2,
        kd=TrainConfig(steps=2, global_batch_size=2, micro_batch_size=2, lr=3e-3, min_lr=3e-4,
                       warmup_steps=1, log_interval=1, eval_interval=1000, eval_iters=2, save_interval=1000),
        kd_loss=LossConfig(chunk_size=48), seeds=[1, 2],
        moe=MoEAblationsConfig(teacher=str(work / "moe_teacher"), importance=str(work / "moe_stats" / "importance.pt"),
                               kd_equal_active=True))


def main():
    work = Path(sys.argv[1])
    if not (work / "moe_stats" / "importance.pt").is_file():
        make_moe_teacher(work)
    first = run_ablations(cfg(work))
    results1 = json.loads((work / "abl" / "results_moe.json").read_text())
    second = run_ablations(cfg(work))  # resume: nothing re-measured
    results2 = json.loads((work / "abl" / "results_moe.json").read_text())
    (work / "result.json").write_text(json.dumps({
        "first": first, "second": second, "results1": results1, "results2": results2,
        "claims": json.loads((work / "abl" / "claims.json").read_text())}))


if __name__ == "__main__":
    main()
