"""Setup for tests/dist/test_kill_sweep.py (one process): a tiny source checkpoint inside a
run directory with extra files (metrics, TensorBoard-like logs, an older iteration, a
config), a plan that prunes every axis, and a trained teacher / random student for the
distill target. Also the reference launcher `ref_cli` (the CLI with old iterations kept,
so every saved iteration of an uninterrupted run can be compared with)."""

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from megatron_minitron import dist as D
from megatron_minitron.config import ModelConfig, ParallelConfig

MODEL = ModelConfig(pattern="M-*-M-", hidden_size=64, ffn_hidden_size=128, mamba_num_heads=4,
                    mamba_head_dim=16, mamba_num_groups=2, mamba_state_dim=8, mamba_chunk_size=16,
                    num_attention_heads=4, num_query_groups=2, kv_channels=16, vocab_size=4096,
                    seq_length=32)
STUDENT = replace(MODEL, pattern="M*-", hidden_size=32, ffn_hidden_size=64, mamba_num_heads=2)


def setup(wd: Path):
    from megatron_minitron.importance.io import ImportanceFile
    from megatron_minitron.model import build_model
    from megatron_minitron.plan.targets import TargetConfig, make_plan
    from megatron_minitron.train import checkpoint as ckpt

    par = D.init(ParallelConfig(), seed=1)
    m = build_model(MODEL, par)
    run = wd / "run"
    ckpt.save(run, 1, MODEL, {"model": m.sharded_state_dict()}, {"kind": "kill-test", "note": "older"})
    with torch.no_grad():
        for prm in m.parameters():
            prm.add_(0.01)
    ckpt.save(run, 2, MODEL, {"model": m.sharded_state_dict()}, {"kind": "kill-test"})
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 8.3}\n{"step": 2, "loss": 8.1}\n')
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events.out.tfevents.1.test").write_bytes(b"\x00tb-bytes")
    (run / "config.json").write_text(json.dumps({"stage": "pretrain", "model": MODEL.to_dict()}))
    imp = ImportanceFile.random(MODEL, torch.Generator().manual_seed(3))
    make_plan(imp, TargetConfig(hidden_size=48, ffn_hidden_size=96, mamba_num_heads=2, mamba_head_dim=12,
                                num_attention_heads=2, num_layers=5), order="ranked", tp=2).save(wd / "plan.json")
    s = build_model(STUDENT, par)
    ckpt.save(wd / "student", 0, STUDENT, {"model": s.sharded_state_dict()}, {"kind": "kill-test-student"})
    D.shutdown()


def ref_cli(argv):
    """The CLI, keeping every iteration (checkpoint._prune_old off): the reference run."""
    from megatron_minitron import __main__ as cli
    from megatron_minitron.train import checkpoint as ckpt

    ckpt._prune_old = lambda *a, **k: None
    return cli.main(argv)


if __name__ == "__main__":  # guard: megatron's async writer re-imports __main__
    if sys.argv[1] == "setup":
        setup(Path(sys.argv[2]))
    else:
        sys.exit(ref_cli(sys.argv[2:]))
