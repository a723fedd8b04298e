"""Worker for tests/dist/test_search_dist.py: the `search` stage end to end, on a tiny
teacher trained a few steps and its real `stats` importance file.

`ref` (one process):

  1. teacher: 4 real training steps, saved as a checkpoint; `stats` on it;
  2. `full`: an uninterrupted search (3 candidates, top_k 2, 2 KD steps each);
  3. `res`: the same search stopped after 4 results (3 zero-shot + 1 KD), the state file
     snapshotted, then re-run with the same config (resume);
  4. `prune` of full/chosen_plan.json from the teacher (the plan is ready for `prune`);
  5. `cached`: the full search again (top_k 1) with its short KD reading a `teacher-logits`
     cache of every token (top-K = the vocabulary: the online KD's loss).
`par` (2 processes, one torchrun): the `full` search again at TP=2 (`tp2`), at DP=2 (`dp2`)
and at CP=2 (`cp2`: each sequence split over the two ranks, dp=1; its oracle is `dp2`).

Writes <workdir>/result.json; each search writes its own output_dir.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_minitron import dist as D  # noqa: E402
from megatron_minitron.config import ParallelConfig, TrainConfig  # noqa: E402
from megatron_minitron.distill.stage import LossConfig  # noqa: E402
from megatron_minitron.rewrite.stage import PruneConfig, run_prune  # noqa: E402
from megatron_minitron.search.space import SearchSpace  # noqa: E402
from megatron_minitron.search.stage import STATE_FILE, SearchConfig, run_search  # noqa: E402
from tests.dist.tiny_teacher import data_cfg, make_teacher  # noqa: E402

SPACE = SearchSpace(num_layers=[5, 6], hidden_size=[48, 64], ffn_hidden_size=[64, 128],
                    mamba_num_heads=[2, 4], mamba_head_dim=[8, 16])
BUDGET, TOL = 440_000, 0.03


def search_cfg(work: Path, name: str, **kw) -> SearchConfig:
    base = dict(teacher=str(work / "teacher"), importance=str(work / "stats" / "importance.pt"),
                output_dir=str(work / name), space=SPACE, budget=BUDGET, tolerance=TOL,
                max_candidates=3, top_k=2, short_kd_steps=2, tie_tolerance=0.0,
                data=data_cfg(work), eval_iters=2, micro_batch_size=2, throughput_iters=1,
                # global batch 4 in micro-batches of 2: 2 per step at DP=1, 1 per rank at DP=2;
                # micro-batch = the search's, so the distill stage's validation set is the search's
                kd=TrainConfig(steps=2, global_batch_size=4, micro_batch_size=2, lr=3e-3, min_lr=3e-4,
                               warmup_steps=1, log_interval=1),
                kd_loss=LossConfig(chunk_size=48))
    base.update(kw)
    return SearchConfig(**base)


def par(work: Path) -> None:
    """2 processes, one launch: the reference search at TP=2, then at DP=2 and CP=2."""
    D.init(ParallelConfig(), seed=1)  # kept across the searches
    res = {"tp2": run_search(search_cfg(work, "tp2", parallel=ParallelConfig(tp=2))),
           "dp2": run_search(search_cfg(work, "dp2")),
           "cp2": run_search(search_cfg(work, "cp2", parallel=ParallelConfig(cp=2))),
           # a wall-clock limit already passed at the first check: stops after one result
           "dp2_limit": run_search(search_cfg(work, "dp2_limit", exit_duration_minutes=1e-6))}
    if D.is_rank0():
        (work / "result_par.json").write_text(json.dumps(res, indent=1, default=str))
    D.shutdown()


def main():
    phase, work = sys.argv[1], Path(sys.argv[2])
    if phase == "par":
        return par(work)
    make_teacher(work)
    res = {"full": run_search(search_cfg(work, "full"))}
    res["stopped"] = run_search(search_cfg(work, "res", stop_after=4))
    res["state_after_stop"] = json.loads((work / "res" / STATE_FILE).read_text())
    res["resumed"] = run_search(search_cfg(work, "res"))
    res["state_after_resume"] = json.loads((work / "res" / STATE_FILE).read_text())
    res["prune_chosen"] = run_prune(PruneConfig(checkpoint=str(work / "teacher"),
                                                plan=str(work / "full" / "chosen_plan.json"),
                                                output=str(work / "chosen_pruned")))
    from megatron_minitron.distill.logits_stage import TeacherLogitsConfig, run_teacher_logits

    run_teacher_logits(TeacherLogitsConfig(teacher=str(work / "teacher"), output_dir=str(work / "cache"),
                                           data=data_cfg(work), samples=2 * 4, top_k=4096, micro_batch_size=2,
                                           shard_samples=4, eval_iters=2))
    res["cached"] = run_search(search_cfg(work, "cached", teacher_cache=str(work / "cache"), top_k=1))
    (work / "result.json").write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
