"""The tiny teacher shared by the search and ablations workers: its config, the data config
read from <work>/data.json, and make_teacher (4 real training steps, saved to <work>/teacher,
then `stats` on it into <work>/stats). The features, foundation and stats workers use the
same tiny hybrid (TEACHER) as their model; the stats worker trains it with train_and_save."""

import json
from pathlib import Path

from megatron_minitron import dist as D
from megatron_minitron.config import DataConfig, ModelConfig, ParallelConfig, TrainConfig
from megatron_minitron.importance.stage import StatsConfig, run_stats
from megatron_minitron.train.engine import MicroBatches, build_trainable, lm_forward_step, save_trainable, train_step
from megatron_minitron.data.stage_data import datasets

TEACHER = ModelConfig(
    pattern="M-*-M-", hidden_size=64, ffn_hidden_size=128, mamba_num_heads=4,
    mamba_head_dim=16, mamba_num_groups=2, mamba_state_dim=8, mamba_chunk_size=16,
    num_attention_heads=4, num_query_groups=2, kv_channels=16, vocab_size=4096, seq_length=64,
)


def data_cfg(work: Path) -> DataConfig:
    info = json.loads((work / "data.json").read_text())
    return DataConfig(prefix=info["prefix"], tokenizer=info["tokenizer"], split="90,10,0")


def train_and_save(work: Path, out: Path, par, pc: ParallelConfig, steps: int) -> None:
    """`steps` real training steps of TEACHER (global batch 4, micro-batch 2) on the work's
    data, saved as a checkpoint at `out`; par: the initialised parallel state."""
    train = TrainConfig(steps=10, global_batch_size=4, micro_batch_size=2, lr=3e-3, min_lr=3e-4,
                        warmup_steps=1)
    t = build_trainable(TEACHER, par, train, pc)
    ds, _, _ = datasets(data_cfg(work), TEACHER.seq_length, 40, 4)
    data = MicroBatches(ds, 2, 4, par.dp, par.dp_rank)
    for _ in range(steps):
        train_step(t, data, lm_forward_step, 2, TEACHER.seq_length, 2)
    save_trainable(t, out)


def make_teacher(work: Path) -> None:
    pc = ParallelConfig()
    train_and_save(work, work / "teacher", D.init(pc, seed=3), pc, steps=4)
    D.shutdown()
    run_stats(StatsConfig(checkpoint=str(work / "teacher"), output_dir=str(work / "stats"),
                          data=data_cfg(work), samples=8, micro_batch_size=2, depth_samples=4,
                          save_interval=0))
