"""Worker for tests/dist/test_ablations_dist.py: the `ablations` stage end to end in one
process on a tiny teacher trained a few steps and its real `stats` importance file (every
dense ablation, 2 KD steps, one seed; no MoE teacher, so the MoE rows are one skipped line),
then the same command again (resume), and the `flap` and `ffn` KDs once more without the
teacher memo (teacher_memo_gb=0: the teacher runs in every KD). Writes <workdir>/result.json."""

import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_minitron import dist as D  # noqa: E402
from megatron_minitron.ablations.stage import AblationsConfig, MoEAblationsConfig, run_ablations  # noqa: E402
from megatron_minitron.config import ParallelConfig, TrainConfig  # noqa: E402
from megatron_minitron.distill.stage import LossConfig  # noqa: E402
from megatron_minitron.plan.targets import TargetConfig  # noqa: E402
from megatron_minitron.search.space import SearchSpace  # noqa: E402
from megatron_minitron.train.pretrain import eval_checkpoint  # noqa: E402
from tests.dist.tiny_teacher import data_cfg, make_teacher  # noqa: E402


def cfg(work: Path) -> AblationsConfig:
    return AblationsConfig(
        teacher=str(work / "teacher"), importance=str(work / "stats" / "importance.pt"),
        output_dir=str(work / "abl"),
        default_target=TargetConfig(hidden_size=48, ffn_hidden_size=64, mamba_num_heads=2, mamba_head_dim=8),
        head_targets=[2], source_targets=[[2, 0], [0, 8]], depth_drop=1, depth_drops=[1, 2],
        space=SearchSpace(num_layers=[5, 6], hidden_size=[48, 64], ffn_hidden_size=[64, 128],
                          mamba_num_heads=[2, 4], mamba_head_dim=[8, 16]),
        tolerance=0.05, max_per_kind=2, data=data_cfg(work), eval_iters=2, micro_batch_size=2,
        throughput_iters=1,
        kd=TrainConfig(steps=2, global_batch_size=2, micro_batch_size=2, lr=3e-3, min_lr=3e-4,
                       warmup_steps=1, log_interval=1, eval_interval=1000, eval_iters=2, save_interval=1000),
        kd_loss=LossConfig(chunk_size=48), seeds=[1], keep_checkpoints=True,
        moe=MoEAblationsConfig(teacher=str(work / "no_moe_teacher")))  # absent: the MoE rows are skipped


def main():
    work = Path(sys.argv[1])
    make_teacher(work)
    first = run_ablations(cfg(work))
    results1 = json.loads((work / "abl" / "results.json").read_text())
    second = run_ablations(cfg(work))  # resume: nothing re-measured
    results2 = json.loads((work / "abl" / "results.json").read_text())
    run_ablations(dataclasses.replace(cfg(work), output_dir=str(work / "abl_nomemo"), only=["flap", "ffn"],
                                      teacher_memo_gb=0.0))
    nomemo = json.loads((work / "abl_nomemo" / "results.json").read_text())
    def hist(root, key):
        d = json.loads((root / "kd" / key.replace("/", "-") / "distilled" / "summary.json").read_text())
        return [d["teacher_val_loss"], d["student_val_after"], [(h["loss"], h["grad_norm"]) for h in d["history"]]]

    histories = {key: [hist(work / "abl", key), hist(work / "abl_nomemo", key)] for key in nomemo["kd"]}
    # the in-memory pruned model (zero-shot) == the checkpoint `prune` wrote for the KD
    par = D.init(ParallelConfig())
    pruned = {}
    for key_seed, rec in results1["kd"].items():
        key = key_seed.split("/")[0]
        ck = work / "abl" / "kd" / f"{key}-s1" / "pruned"
        pruned[key] = {"zero_shot": results1["zero_shot"][key]["loss"],
                       "from_checkpoint": eval_checkpoint(ck, data_cfg(work), par, 2, 2)["loss"]}
    D.shutdown()
    # the report stage over real checkpoints: two KD runs of the ablations labelled as two
    # methods of one seed (the report only reads checkpoints and their summary.json)
    from megatron_minitron.report.stage import ReportConfig, run_report

    kd_dirs = sorted((work / "abl" / "kd").iterdir())
    report = run_report(ReportConfig(
        run_dir=str(work), models=["teacher=teacher", f"pruned={kd_dirs[0] / 'pruned'}",
                                   f"KD/s1={kd_dirs[0] / 'distilled'}", f"CE/s1={kd_dirs[1] / 'distilled'}"],
        output_dir=str(work / "report"), data=data_cfg(work), eval_iters=2, micro_batch_size=2,
        throughput_iters=1))
    report["files"] = sorted(p.name for p in (work / "report").iterdir())
    (work / "result.json").write_text(json.dumps({"report": report,
        "first": first, "second": second, "results1": results1, "results2": results2, "pruned": pruned,
        "nomemo": nomemo, "histories": histories,
        "claims": json.loads((work / "abl" / "claims.json").read_text())}))


if __name__ == "__main__":
    main()
