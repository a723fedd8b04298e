"""Benchmark: rewrite of a checkpoint to a plan vs a plain copy of the same folder.

    python scripts/bench_prune.py [--model configs/model/tiny_hybrid.yaml] [--workdir /tmp/bench_prune]

Saves a checkpoint of the model (random weights), makes a plan to about half the
parameters (random scores of the right shapes; timing does not depend on the scores),
then times, in one process:
  copy     shutil.copytree of the checkpoint folder (the physical limit),
  rewrite  the prune stage's load-trim-save (fill + save),
  total    the whole prune stage incl. model build, verification (reload + forward) and swap.
The LAST line is the ratio rewrite / copy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(REPO / "configs/model/tiny_hybrid.yaml"))
    ap.add_argument("--workdir", default="/tmp/bench_prune")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from megatron_minitron import dist as D
    from megatron_minitron.config import ModelConfig, ParallelConfig, build, load_yaml
    from megatron_minitron.importance.io import ImportanceFile
    from megatron_minitron.model import build_model
    from megatron_minitron.plan.targets import TargetConfig, make_plan
    from megatron_minitron.rewrite.stage import PruneConfig, run_prune
    from megatron_minitron.train import checkpoint as ckpt

    data = load_yaml(args.model)
    cfg = build(ModelConfig, data.get("model", data), "model.")
    wd = Path(args.workdir)
    shutil.rmtree(wd, ignore_errors=True)
    wd.mkdir(parents=True)
    par = D.init(ParallelConfig())
    model = build_model(cfg, par)
    src = ckpt.save(wd / "src", 0, cfg, {"model": model.sharded_state_dict()}, {"kind": "bench"})
    del model
    imp = ImportanceFile.random(cfg, torch.Generator().manual_seed(0))
    grp = cfg.mamba_num_groups
    tgt = TargetConfig(hidden_size=cfg.hidden_size * 3 // 4 // 8 * 8,
                       ffn_hidden_size=cfg.ffn_hidden_size // 2,
                       mamba_num_heads=max(grp, cfg.mamba_num_heads * 3 // 4 // grp * grp),
                       mamba_head_dim=cfg.mamba_head_dim * 3 // 4)
    plan = make_plan(imp, tgt)
    plan.save(wd / "plan.json")
    D.shutdown()
    size = sum(f.stat().st_size for f in src.rglob("*") if f.is_file())
    print(f"model {cfg.pattern} hidden {cfg.hidden_size}: {plan.params_before['total']:,} -> "
          f"{plan.params_after['total']:,} params; checkpoint {size / 2**20:.1f} MiB")

    copies, rewrites, totals = [], [], []
    for r in range(args.repeats):
        t = time.perf_counter()
        shutil.copytree(src, wd / f"copy{r}")
        copies.append(time.perf_counter() - t)
        s = run_prune(PruneConfig(checkpoint=str(src), plan=str(wd / "plan.json"), output=str(wd / f"pruned{r}")))
        rewrites.append(s["seconds"]["fill"] + s["seconds"]["save"])
        totals.append(s["seconds"]["total"])
    copy, rewrite, total = min(copies), min(rewrites), min(totals)
    print(json.dumps({"copy_s": copy, "rewrite_s": rewrite, "prune_stage_total_s": total,
                      "checkpoint_mib": size / 2**20, "repeats": args.repeats}))
    print(f"copy {copy:.3f}s  rewrite (load+trim+save) {rewrite:.3f}s  whole stage "
          f"(build+rewrite+verify+swap) {total:.3f}s")
    print(f"rewrite/copy ratio: {rewrite / copy:.2f}")


if __name__ == "__main__":
    main()
