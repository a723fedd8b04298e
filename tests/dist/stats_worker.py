"""Worker for tests/dist/test_stats_dist.py: the `stats` stage on one tiny checkpoint and
the same calibration samples, in two launches:

  ref (1 process):  make checkpoint C (a few real training steps); stats at TP=1 (reference);
                    interrupted (stop_after) + resumed collection; a calibration request
                    larger than the data (must fail before any model is built).
  par (2 processes, ONE torchrun): stats at TP=2, PP=2 and DP=2 (parallel state re-initialised
                    between layouts); DP=2 interrupted + resumed.

Each run writes <workdir>/<name>/importance.pt; result_<phase>.json holds the rest.
"""

import json
import sys
from pathlib import Path

from megatron_minitron import dist as D
from megatron_minitron.config import ConfigError, ParallelConfig
from megatron_minitron.importance.stage import StatsConfig, run_stats

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.dist.tiny_teacher import data_cfg, train_and_save  # noqa: E402

SAMPLES, MBS, DEPTH = 10, 2, 6  # 10 = uneven over DP=2 (last step: rank 1 gets nothing)


def stats(workdir: Path, name: str, pc: ParallelConfig, **kw) -> dict:
    cfg = StatsConfig(checkpoint=str(workdir / "ckpt"), output_dir=str(workdir / name),
                      parallel=pc, data=data_cfg(workdir), samples=SAMPLES,
                      micro_batch_size=MBS, depth_samples=DEPTH, save_interval=1)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return run_stats(cfg)


def make_checkpoint(workdir: Path, par, pc) -> None:
    train_and_save(workdir, workdir / "ckpt", par, pc, steps=3)


def main():
    phase, workdir = sys.argv[1], Path(sys.argv[2])
    out = {}
    par = D.init(ParallelConfig(), seed=1234)  # keeps the process group across stage runs
    if phase == "ckpt_only":
        make_checkpoint(workdir, par, ParallelConfig())
    elif phase == "ref":
        make_checkpoint(workdir, par, ParallelConfig())
        out["ref"] = stats(workdir, "ref", ParallelConfig())
        # interrupted after 2 of 5 steps, then resumed (a fresh StatsCollector from the file)
        out["res_a"] = stats(workdir, "resumed", ParallelConfig(), stop_after=2)
        out["res_b"] = stats(workdir, "resumed", ParallelConfig())
        try:
            stats(workdir, "too_many", ParallelConfig(), samples=10**7, depth_samples=0)
            out["too_many"] = None
        except ConfigError as e:
            out["too_many"] = str(e)
    elif phase == "par":
        for name, pc in (("tp2", ParallelConfig(tp=2)), ("pp2", ParallelConfig(pp=2)),
                         ("dp2", ParallelConfig())):
            out[name] = stats(workdir, name, pc)
        out["dp2_res_a"] = stats(workdir, "dp2_resumed", ParallelConfig(), stop_after=1)
        out["dp2_res_b"] = stats(workdir, "dp2_resumed", ParallelConfig())
    if D.is_rank0():
        (workdir / f"result_{phase}.json").write_text(json.dumps(out, indent=2))
    D.shutdown()


if __name__ == "__main__":
    main()
