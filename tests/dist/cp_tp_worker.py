"""Context parallelism combined with tensor and pipeline parallelism, one launch of 4
processes (gloo, CPU); checked by tests/dist/test_cp_dist.py. The oracle of each CP=2 run
is the same world with cp=1 (dp=2): the same global batches, split over DP instead of the
sequence, at the same TP / PP layout.

  * pretrain 3 steps, padded documents: CP=2 x TP=2 vs TP=2 x DP=2, and CP=2 x PP=2 vs
    PP=2 x DP=2: per-step losses, grad norms, validation losses, final weights;
  * distill 3 steps, loss.alpha_kd=0.5 (KL and CE both weigh), online KD with the teacher
    at the same layout: CP=2 x TP=2 vs TP=2 x DP=2 and CP=2 x PP=2 vs PP=2 x DP=2 (a 4-layer
    student): loss / KL / CE / grad norm, the validation losses (teacher, student before,
    after) and final weights;
  * MoE (cp_worker.MOE) pretrain 3 steps, CP=2 x EP=2 vs EP=2 x DP=4: losses, grad norms,
    val losses, final weights, expert biases.
Shapes from tests/dist/cp_worker.py (MODEL: 4 Mamba heads = 2 per TP rank, split over the
2 CP ranks; 6 layers = 3 per pipeline stage).
"""

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_minitron import dist as D  # noqa: E402
from megatron_minitron.config import DataConfig, ParallelConfig, PretrainConfig  # noqa: E402
from tests.dist.cp_worker import KD_TRAIN, MODEL, MOE, MOE_TRAIN, STUDENT, TRAIN, metrics, worst  # noqa: E402
from tests.dist.mask_worker import make, padded_corpus  # noqa: E402

TRAIN3 = replace(TRAIN, steps=3, eval_interval=3, save_interval=3)
LAYOUTS = {"tp": (ParallelConfig(tp=2, cp=2), ParallelConfig(tp=2)),
           "pp": (ParallelConfig(pp=2, cp=2), ParallelConfig(pp=2))}


def _iters(train, pc):
    # dp=2 evaluates eval_iters x mbs x dp samples: 1 iteration = the CP=2 run's 2
    return train if pc.cp == 2 else replace(train, eval_iters=1)


def final_weights(cfg, runs: dict, buffers: bool = False) -> dict:
    from megatron_minitron.model import build_model
    from megatron_minitron.train import checkpoint as ckpt

    par = D.init(ParallelConfig(), seed=1)  # every run's checkpoint loaded at tp = pp = cp = 1
    w = {}
    for name, path in runs.items():
        m = build_model(cfg, par, initialize=False)
        ckpt.load_model_weights(path, m)
        w[name] = dict(m.named_parameters()) | ({k: v for k, v in m.named_buffers() if k.endswith("expert_bias")}
                                                if buffers else {})
    return w


def _pretrain(out_dir: Path, model, pc, data: DataConfig, train, init: Path) -> dict:
    """One pretrain run from `init`: its losses, grad norms, val losses and layout."""
    from megatron_minitron.train.pretrain import run_pretrain

    s = run_pretrain(PretrainConfig(output_dir=str(out_dir), model=model, parallel=pc, data=data,
                                    train=train, init_from=str(init)))
    m = metrics(out_dir)
    return {"loss": s["losses"], "grad_norm": [r["grad_norm"] for r in m],
            "val": [r["val_loss"] for r in m if "val_loss" in r], "layout": s["layout"]}


def check_pretrain(wd: Path, data: DataConfig, res):
    out = {}
    for lay, pcs in LAYOUTS.items():
        runs = {}
        for pc in pcs:
            name = f"{lay}_cp{pc.cp}"
            out[name] = _pretrain(wd / name, MODEL, pc, data, _iters(TRAIN3, pc), wd / "w0")
            runs[name] = wd / name
        w = final_weights(MODEL, runs | {"w0": wd / "w0"})
        a, b = w[f"{lay}_cp2"], w[f"{lay}_cp1"]
        out[f"{lay}_weights_worst"] = worst([(a[k], b[k]) for k in b])
        out[f"{lay}_moved"] = worst([(a[k], w["w0"][k]) for k in b])
    res["pretrain"] = out


STUDENT4 = replace(STUDENT, pattern="M*M-")  # 2 layers per pipeline stage


def check_distill(wd: Path, data: DataConfig, res):
    from megatron_minitron.distill.stage import DistillConfig, LossConfig, run_distill

    loss = LossConfig(alpha_kd=0.5, chunk_size=16)
    out = {}
    for lay, student in (("tp", STUDENT), ("pp", STUDENT4)):
        make(student, D.init(ParallelConfig(), seed=1), 11, wd / f"student_{lay}")
        for pc in LAYOUTS[lay]:
            name = f"kd_{lay}_cp{pc.cp}"
            s = run_distill(DistillConfig(student=str(wd / f"student_{lay}"), teacher=str(wd / "w0"),
                                          output_dir=str(wd / name), data=data, train=_iters(KD_TRAIN, pc),
                                          loss=loss, parallel=pc))
            m = metrics(wd / name)
            out[name] = {k: [r[k] for r in m if k in r] for k in ("loss", "kd", "ce", "grad_norm", "val_loss")} | {
                "teacher_val": s["teacher_val_loss"], "student_before": s["student_val_before"],
                "after": s["student_val_after"], "layout": s["layout"]}
        w = final_weights(student, {"cp2": wd / f"kd_{lay}_cp2", "cp1": wd / f"kd_{lay}_cp1",
                                    "init": wd / f"student_{lay}"})
        out[f"{lay}_weights_worst"] = worst([(w["cp2"][k], w["cp1"][k]) for k in w["cp1"]])
        out[f"{lay}_moved"] = worst([(w["cp2"][k], w["init"][k]) for k in w["cp1"]])
    res["distill"] = out


def check_moe_ep(wd: Path, data: DataConfig, res):
    """MoE pretrain 3 steps at CP=2 x EP=2 (dp=2) vs EP=2 x DP=4, micro-batches of one
    sequence (the load-balancing loss's counts are per micro-batch): losses, grad norms,
    val losses, final weights and expert biases."""
    make(MOE, D.init(ParallelConfig(), seed=1), 5, wd / "moe_w0")
    train = replace(MOE_TRAIN, micro_batch_size=1)
    out = {}
    for pc in (ParallelConfig(ep=2, cp=2), ParallelConfig(ep=2)):
        name = f"moe_ep_cp{pc.cp}"
        out[name] = _pretrain(wd / name, MOE, pc, data, _iters(train, pc), wd / "moe_w0")
    w = final_weights(MOE, {"cp2": wd / "moe_ep_cp2", "cp1": wd / "moe_ep_cp1", "w0": wd / "moe_w0"}, buffers=True)
    out["weights_worst"] = worst([(w["cp2"][k], w["cp1"][k]) for k in w["cp1"] if not k.endswith("expert_bias")])
    out["bias_worst"] = worst([(w["cp2"][k], w["cp1"][k]) for k in w["cp1"] if k.endswith("expert_bias")])
    out["moved"] = worst([(w["cp2"][k], w["w0"][k]) for k in w["cp1"] if not k.endswith("expert_bias")])
    res["moe_ep"] = out


def run(wd: Path):
    D.init(ParallelConfig(), seed=1)
    if dist.get_rank() == 0:
        padded_corpus(wd)
    dist.barrier()
    make(MODEL, D.init(ParallelConfig(), seed=1), 7, wd / "w0")
    data = DataConfig(prefix=str(wd / "padded"), tokenizer=json.loads((wd / "data.json").read_text())["tokenizer"],
                      split="90,10,0")
    res = {"seconds": {}}
    only = sys.argv[3:]  # (a subset by name, for a quick rerun by hand)
    for check in (c for c in (check_pretrain, check_distill, check_moe_ep) if not only or c.__name__ in only):
        t0 = time.time()
        check(wd, data, res)
        res["seconds"][check.__name__] = round(time.time() - t0, 1)
    if dist.get_rank() == 0:
        (wd / "result_cp_tp.json").write_text(json.dumps(res, indent=2))
    D.shutdown()


if __name__ == "__main__":
    run(Path(sys.argv[2]))
