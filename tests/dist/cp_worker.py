"""Context parallelism (CP=2) against CP=1, one launch of 2 processes (gloo, CPU); checked
by tests/dist/test_cp_dist.py. The CP=1 runs are the oracle: the same world at dp=2 (the
same global batches, split over DP instead of the sequence).

  * split: train/cp.py's split_batch == megatron's get_batch_on_this_cp_rank on the real
    CP group, and merge_seq over the ranks gives the batch back;
  * attention: compat/cp_attention.py's CPDotProductAttention at CP=2 (K/V all-gathered,
    the causal mask of the rank's chunks) vs megatron's DotProductAttention at CP=1 on the
    whole sequence: output, dQ, dK, dV of each rank's tokens (float32 and float64);
  * model: one forward-backward of a hybrid M*-M*- (and a RoPE twin) from the same weights on
    padded documents (real loss masks): the reported loss, the token count (each token
    counted once) and every parameter's reduced gradient (main_grad);
  * stages: pretrain 4 steps at CP=2 and at CP=1 (losses, grad norms, val losses); the CP=2
    run's step-2 checkpoint resumed at CP=1 (steps 3-4 and the final weights vs the CP=2
    run); eval of the CP=2 checkpoint at CP=2 and CP=1;
  * distill (issue 21 part 2): a student M*- against the teacher M*-M*- (both with peaked
    random weights), loss.alpha_kd=0.5 (KL and CE both weigh), 3 steps at CP=2 and at CP=1
    online (the teacher at the same CP layout) and from a top-8 teacher-logits cache
    written at CP=1 (dp=2) and read at both: per-step loss / KL / CE / grad norm, the
    validation losses (teacher, student before, after each evaluation) and final weights;
  * long context: the 128k recipe (configs/distill_nemotron_h_4b_128k.yaml: its loss,
    recompute, optimizer and schedule settings) on the same tiny pair at 4096 tokens, CP=2,
    2 steps end to end (its CP=1 oracle is the distill check above, at 48 tokens: a CP=1
    run at 4096 tokens would add about 20 s to this launch).
"""

import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_minitron import dist as D  # noqa: E402
from megatron_minitron.config import (DataConfig, EvalConfig, ModelConfig, ParallelConfig,  # noqa: E402
                                      PretrainConfig, TrainConfig)
from tests.dist.mask_worker import make, padded_corpus  # noqa: E402

MODEL = ModelConfig(pattern="M*-M*-", hidden_size=48, ffn_hidden_size=64, mamba_num_heads=4,
                    mamba_head_dim=12, mamba_num_groups=2, mamba_state_dim=8, mamba_chunk_size=16,
                    num_attention_heads=4, num_query_groups=2, kv_channels=12, vocab_size=4096,
                    seq_length=48)
ROPE = replace(MODEL, position_embedding="rope")
TRAIN = TrainConfig(steps=4, global_batch_size=4, micro_batch_size=2, lr=1e-3, min_lr=1e-4,
                    warmup_steps=1, eval_interval=2, eval_iters=2, save_interval=2, log_interval=1)
# CP=1 at dp=2 evaluates eval_iters x mbs x dp samples: 1 iteration = CP=2's 2 (the same 4)
TRAIN_CP1 = replace(TRAIN, eval_iters=1)
CP1, CP2 = ParallelConfig(), ParallelConfig(cp=2)


def worst(pairs) -> float:
    """max over (got, want) of max|got - want| / max|want|, the max over all ranks."""
    r = max(float((g - w).abs().max()) / max(float(w.abs().max()), 1e-30) for g, w in pairs)
    t = torch.tensor([r], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def check_split(res):
    from megatron.core.utils import get_batch_on_this_cp_rank

    from megatron_minitron.train.cp import merge_seq, split_batch

    par = D.init(CP2, seed=1)
    g = torch.Generator().manual_seed(0)
    batch = {k: torch.randint(0, 100, (2, 48), generator=g) for k in ("tokens", "labels", "position_ids")}
    batch["loss_mask"] = (torch.rand(2, 48, generator=g) > 0.3).float()
    ours = split_batch(batch, 2, par.cp_rank)
    theirs = get_batch_on_this_cp_rank(dict(batch), cp_group=par.pg.cp)
    same = all(torch.equal(ours[k], theirs[k]) for k in batch)
    parts = [torch.empty_like(ours["tokens"]) for _ in range(2)]
    dist.all_gather(parts, ours["tokens"], group=par.pg.cp)
    back = torch.equal(merge_seq(parts), batch["tokens"])
    t = torch.tensor([int(same and back)])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    res["split_equals_megatron"] = bool(t)


def check_attention(res):
    from megatron_minitron.compat import mcore
    from megatron_minitron.compat.cp_attention import CPDotProductAttention
    from megatron_minitron.model import causal_mask, transformer_config
    from megatron_minitron.train.cp import split_seq

    s, b, nq, ng, hn = MODEL.seq_length, 2, MODEL.num_attention_heads, MODEL.num_query_groups, MODEL.kv_channels
    res["attention"] = {}
    for dtype in (torch.float32, torch.float64):
        g = torch.Generator().manual_seed(5)
        q, k, v = (torch.randn(s, b, n, hn, generator=g, dtype=dtype) for n in (nq, ng, ng))
        w = torch.randn(s, b, nq * hn, generator=g, dtype=dtype)
        par = D.init(CP1, seed=1)
        ref = mcore.DotProductAttention(transformer_config(MODEL, initialize=False), 1,
                                        mcore.AttnMaskType.causal, "self", pg_collection=par.pg)
        qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
        out = ref(qr, kr, vr, causal_mask(s))
        (out * w).sum().backward()

        par = D.init(CP2, seed=1)
        attn = CPDotProductAttention(transformer_config(MODEL, initialize=False, cp=2), 1,
                                     mcore.AttnMaskType.causal, "self", pg_collection=par.pg)

        def mine(x):
            return split_seq(x, 2, par.cp_rank, seq_dim=0)

        ql, kl, vl = (mine(x).clone().requires_grad_() for x in (q, k, v))
        ol = attn(ql, kl, vl, None)
        (ol * mine(w)).sum().backward()
        name = str(dtype).replace("torch.", "")
        res["attention"][name] = {
            "out": worst([(ol, mine(out))]),
            "dq": worst([(ql.grad, mine(qr.grad))]),
            "dk": worst([(kl.grad, mine(kr.grad))]),
            "dv": worst([(vl.grad, mine(vr.grad))]),
        }


def forward_backward(cfg: ModelConfig, pc: ParallelConfig, w0: Path, data: DataConfig) -> dict:
    """One forward-backward of the first global batch from the weights at w0: the reported
    loss, tokens counted over all ranks, and every parameter's reduced gradient."""
    from megatron_minitron.compat import mcore
    from megatron_minitron.data.stage_data import datasets
    from megatron_minitron.train.engine import (MicroBatches, build_trainable, forward_step_for,
                                                load_weights, reduce_reports)

    par = D.init(pc, seed=1)
    t = build_trainable(cfg, par, TRAIN, pc, initialize=False)
    load_weights(t, w0)
    ds, _, _ = datasets(data, cfg.seq_length, 8, 4)
    mbs, gbs = TRAIN.micro_batch_size, TRAIN.global_batch_size
    num_micro = gbs // (mbs * par.dp)
    t.model.train()
    t.model.zero_grad_buffer()
    reports = mcore.get_forward_backward_func()(
        forward_step_func=forward_step_for(par), data_iterator=MicroBatches(ds, mbs, gbs, par.dp, par.dp_rank),
        model=[t.model], num_microbatches=num_micro, seq_length=cfg.seq_length, micro_batch_size=mbs,
        forward_only=False)
    n = torch.zeros(1, dtype=torch.float64)
    if par.tp_rank == 0:
        for r in reports:
            n += float(r["lm loss"][1])
    dist.all_reduce(n)
    grads = {name: p.main_grad.detach().clone() for name, p in t.model.module.named_parameters()}
    return {"loss": reduce_reports(reports, par), "tokens": float(n), "grads": grads}


def check_model(wd: Path, data: DataConfig, res):
    for name, cfg in (("model", MODEL), ("rope", ROPE)):
        w0 = wd / f"w0_{name}"
        make(cfg, D.init(CP1, seed=1), 7, w0)
        a = forward_backward(cfg, CP1, w0, data)
        b = forward_backward(cfg, CP2, w0, data)
        assert a["grads"].keys() == b["grads"].keys()
        per = {k: worst([(b["grads"][k], a["grads"][k])]) for k in sorted(a["grads"])}
        res[name] = {"loss_cp1": a["loss"], "loss_cp2": b["loss"], "tokens_cp1": a["tokens"],
                     "tokens_cp2": b["tokens"], "grad_worst": max(per.values()),
                     "grad_worst_param": max(per, key=per.get),
                     "grad_norm_cp1": float(torch.cat([g.flatten() for g in a["grads"].values()]).norm()),
                     "nonzero_grads": sum(int(g.abs().max() > 0) for g in b["grads"].values()),
                     "params": len(per)}


def metrics(run: Path) -> list:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def check_stages(wd: Path, data: DataConfig, res):
    from megatron_minitron.model import build_model
    from megatron_minitron.train import checkpoint as ckpt
    from megatron_minitron.train.pretrain import run_eval, run_pretrain

    w0 = wd / "w0_model"

    def pretrain(name, pc, train, **kw):
        return run_pretrain(PretrainConfig(output_dir=str(wd / name), model=MODEL, parallel=pc,
                                           data=data, train=train, init_from=str(w0), **kw))

    s2 = pretrain("cp2", CP2, TRAIN)
    s1 = pretrain("cp1", CP1, TRAIN_CP1)
    if dist.get_rank() == 0:  # the CP=2 run's step-2 checkpoint, to resume at CP=1
        shutil.copytree(wd / "cp2", wd / "resume")
        shutil.rmtree(wd / "resume" / "checkpoints" / "iter_0000004")
        (wd / "resume" / "checkpoints" / "latest").write_text("iter_0000002")
        (wd / "resume" / "metrics.jsonl").write_text("")
    dist.barrier()
    sr = pretrain("resume", CP1, TRAIN_CP1)
    m2, m1, mr = metrics(wd / "cp2"), metrics(wd / "cp1"), metrics(wd / "resume")
    res["pretrain"] = {
        "cp2": {"loss": s2["losses"], "grad_norm": [r["grad_norm"] for r in m2],
                "val": [r["val_loss"] for r in m2 if "val_loss" in r], "layout": s2["layout"]},
        "cp1": {"loss": s1["losses"], "grad_norm": [r["grad_norm"] for r in m1],
                "val": [r["val_loss"] for r in m1 if "val_loss" in r], "layout": s1["layout"]},
        "resumed_cp1": {"resumed_from": sr["resumed_from"], "loss": sr["losses"],
                        "grad_norm": [r["grad_norm"] for r in mr],
                        "val": [r["val_loss"] for r in mr if "val_loss" in r]},
    }
    # final weights: CP=2 run vs its checkpoint resumed at CP=1 (both loaded at CP=1)
    par = D.init(CP1, seed=1)
    models = {}
    for name in ("cp2", "resume"):
        models[name] = build_model(MODEL, par, initialize=False)
        ckpt.load_model_weights(wd / name, models[name])
    w2, wr = (dict(m.named_parameters()) for m in (models["cp2"], models["resume"]))
    res["pretrain"]["resume_weights_worst"] = worst([(wr[k], w2[k]) for k in w2])
    for name, path in (("cp1", wd / "cp1"), ("w0", w0)):
        models[name] = build_model(MODEL, par, initialize=False)
        ckpt.load_model_weights(path, models[name])
    w1, w0_ = (dict(models[n].named_parameters()) for n in ("cp1", "w0"))
    res["pretrain"]["cp1_vs_cp2_weights_worst"] = worst([(w1[k], w2[k]) for k in w2])
    res["pretrain"]["trained_vs_init"] = worst([(w2[k], w0_[k]) for k in w2])  # the steps moved them

    ev = {}
    for name, pc, iters in (("cp2", CP2, 2), ("cp1", CP1, 1)):
        e = run_eval(EvalConfig(checkpoint=str(wd / "cp2"), output_dir=str(wd / f"eval_{name}"), data=data,
                                parallel=pc, eval_iters=iters, micro_batch_size=2))
        ev[name] = {"loss": e["loss"], "tokens": e["tokens"], "layout": e["layout"]}
    res["eval"] = ev


STUDENT = replace(MODEL, pattern="M*-", hidden_size=32, ffn_hidden_size=48, mamba_head_dim=8,
                  num_attention_heads=2, num_query_groups=2, kv_channels=16)
KD_TRAIN = replace(TRAIN, steps=3, eval_interval=2, save_interval=100, clip_grad=1.0)


# MoE under CP: 4 experts, top-2, a shared expert; the load-balancing loss (weighted up so
# that it moves the gradients) and the expert bias both on
MOE = replace(MODEL, pattern="ME*-", num_moe_experts=4, moe_ffn_hidden_size=32, moe_router_topk=2,
              moe_shared_expert_intermediate_size=32)
MOE_TRAIN = replace(TRAIN, steps=3, eval_interval=3, save_interval=3, moe_aux_loss_coeff=1.0,
                    moe_router_bias_update_rate=1e-2)


def check_moe(wd: Path, data: DataConfig, res):
    """MoE pretrain 3 steps at CP=2 vs CP=1 (dp=2): losses, grad norms, val losses, final
    weights and expert biases; and CP=1 without the load-balancing loss (it must move the
    weights far more than the tolerance, or the parity would not test its CP reduction)."""
    from megatron_minitron.model import build_model
    from megatron_minitron.train import checkpoint as ckpt
    from megatron_minitron.train.pretrain import run_pretrain

    make(MOE, D.init(CP1, seed=1), 5, wd / "moe_w0")
    out = {}
    cp1 = replace(MOE_TRAIN, eval_iters=1)
    for name, pc, train in (("cp2", CP2, MOE_TRAIN), ("cp1", CP1, cp1),
                            ("cp1_noaux", CP1, replace(cp1, moe_aux_loss_coeff=0.0))):
        s = run_pretrain(PretrainConfig(output_dir=str(wd / f"moe_{name}"), model=MOE, parallel=pc, data=data,
                                        train=train, init_from=str(wd / "moe_w0")))
        m = metrics(wd / f"moe_{name}")
        out[name] = {"loss": s["losses"], "grad_norm": [r["grad_norm"] for r in m],
                     "val": [r["val_loss"] for r in m if "val_loss" in r], "layout": s["layout"]}
    par = D.init(CP1, seed=1)
    w = {}
    for name in ("cp2", "cp1", "cp1_noaux", "w0"):
        mdl = build_model(MOE, par, initialize=False)
        ckpt.load_model_weights(wd / f"moe_{name}", mdl)
        w[name] = dict(mdl.named_parameters()) | {k: v for k, v in mdl.named_buffers() if k.endswith("expert_bias")}
    bias = [k for k in w["cp1"] if k.endswith("expert_bias")]
    out["weights_worst"] = worst([(w["cp2"][k], w["cp1"][k]) for k in w["cp1"] if k not in bias])
    out["bias_worst"] = worst([(w["cp2"][k], w["cp1"][k]) for k in bias])
    out["bias_moved"] = max(float((w["cp2"][k] - w["w0"][k]).abs().max()) for k in bias)
    out["bias_keys"] = bias
    out["aux_effect"] = worst([(w["cp1_noaux"][k], w["cp1"][k]) for k in w["cp1"] if k not in bias])
    out["moved"] = worst([(w["cp2"][k], w["w0"][k]) for k in w["cp1"] if k not in bias])
    res["moe"] = out


def check_distill(wd: Path, data: DataConfig, res):
    from megatron_minitron.distill.logits_stage import TeacherLogitsConfig, run_teacher_logits
    from megatron_minitron.distill.stage import DistillConfig, LossConfig, run_distill
    from megatron_minitron.model import build_model
    from megatron_minitron.train import checkpoint as ckpt

    teacher, student = wd / "w0_model", wd / "kd_student"  # the teacher: check_model's weights
    make(STUDENT, D.init(CP1, seed=1), 11, student)
    loss = LossConfig(alpha_kd=0.5, chunk_size=16)  # 2 x 24 tokens a rank at CP=2: 3 chunks

    def distill(name, pc, **kw):
        # CP=1 at dp=2 evaluates eval_iters x mbs x dp samples: 1 iteration = CP=2's 2
        train = KD_TRAIN if pc.cp == 2 else replace(KD_TRAIN, eval_iters=1)
        s = run_distill(DistillConfig(student=str(student), teacher=str(teacher), output_dir=str(wd / name),
                                      data=data, train=train, loss=loss, parallel=pc, **kw))
        m = metrics(wd / name)
        return {k: [r[k] for r in m if k in r] for k in ("loss", "kd", "ce", "grad_norm", "val_loss")} | {
            "teacher_val": s["teacher_val_loss"], "student_before": s["student_val_before"],
            "after": s["student_val_after"], "layout": s["layout"]}

    out = {"online_cp2": distill("kd_cp2", CP2), "online_cp1": distill("kd_cp1", CP1)}
    run_teacher_logits(TeacherLogitsConfig(teacher=str(teacher), output_dir=str(wd / "kd_cache"), data=data,
                                           samples=KD_TRAIN.steps * KD_TRAIN.global_batch_size, top_k=8,
                                           micro_batch_size=2, shard_samples=4, eval_iters=1, parallel=CP1))
    out["cached_cp2"] = distill("kdc_cp2", CP2, teacher_cache=str(wd / "kd_cache"))
    out["cached_cp1"] = distill("kdc_cp1", CP1, teacher_cache=str(wd / "kd_cache"))
    par = D.init(CP1, seed=1)  # final weights, all loaded at CP=1
    w = {}
    for name in ("kd_cp2", "kd_cp1", "kdc_cp2", "kdc_cp1", "kd_student"):
        m = build_model(STUDENT, par, initialize=False)
        ckpt.load_model_weights(wd / name, m)
        w[name] = dict(m.named_parameters())
    out["weights_online"] = worst([(w["kd_cp2"][k], w["kd_cp1"][k]) for k in w["kd_cp1"]])
    out["weights_cached"] = worst([(w["kdc_cp2"][k], w["kdc_cp1"][k]) for k in w["kdc_cp1"]])
    out["moved_from_init"] = worst([(w["kd_cp2"][k], w["kd_student"][k]) for k in w["kd_student"]])
    res["distill"] = out


def check_long(wd: Path, data: DataConfig, res):
    from megatron_minitron.config import load_stage_config
    from megatron_minitron.distill.stage import run_distill

    info = json.loads((wd / "data.json").read_text())  # the unpadded corpus: 4096-token sequences
    out = {}
    for name, cp in (("cp2", 2),):
        cfg = load_stage_config("distill", str(Path(__file__).resolve().parents[2] / "configs"
                                                / "distill_nemotron_h_4b_128k.yaml"), [
            f"student={wd / 'kd_student'}", f"teacher={wd / 'w0_model'}", "student_model=", "teacher_model=",
            f"output_dir={wd / ('long_' + name)}", "seq_length=4096", f"parallel.cp={cp}", "parallel.backend=auto",
            f"data.prefix={info['prefix']}", f"data.tokenizer={info['tokenizer']}", "data.split=90,10,0",
            "train.steps=2", "train.global_batch_size=1", "train.warmup_steps=1", "train.lr=1e-3",
            "train.eval_interval=2", "train.eval_iters=1", "train.save_interval=2"])
        s = run_distill(cfg)
        m = metrics(wd / f"long_{name}")
        out[name] = {"seq_length": s["seq_length"], "layout": s["layout"], "loss": [r["loss"] for r in m],
                     "grad_norm": [r["grad_norm"] for r in m], "val": [r["val_loss"] for r in m if "val_loss" in r],
                     "recompute": cfg.train.recompute, "tokens_seen": s["tokens_seen"],
                     "before": s["student_val_before"], "after": s["student_val_after"],
                     "checkpoint": Path(s["checkpoint"]).name}
    res["long"] = out


def masked_fraction(data: DataConfig) -> dict:
    from megatron_minitron.data.stage_data import datasets
    from megatron_minitron.train.engine import collate

    train, valid, _ = datasets(data, MODEL.seq_length, 16, 4)
    return {k: float(1 - collate([ds[i] for i in range(n)])["loss_mask"].mean())
            for k, ds, n in (("train", train, 16), ("valid", valid, 4))}


def run(wd: Path):
    D.init(CP1, seed=1)
    if dist.get_rank() == 0:
        padded_corpus(wd)
    dist.barrier()
    data = DataConfig(prefix=str(wd / "padded"), tokenizer=json.loads((wd / "data.json").read_text())["tokenizer"],
                      split="90,10,0")
    res = {"masked_fraction": masked_fraction(data), "seconds": {}}
    checks = (check_split, check_attention, check_model, check_stages, check_moe, check_distill, check_long)
    only = sys.argv[3:]  # (a subset by name, for a quick rerun by hand)
    for check in (c for c in checks if not only or c.__name__ in only):
        t0 = time.time()
        check(res) if check in (check_split, check_attention) else check(wd, data, res)
        res["seconds"][check.__name__] = round(time.time() - t0, 1)
    if dist.get_rank() == 0:
        (wd / "result_cp.json").write_text(json.dumps(res, indent=2))
    D.shutdown()


if __name__ == "__main__":
    run(Path(sys.argv[2]))
