"""Mixture-of-experts (E layers) through the stages, in two launches (tests/dist/test_moe_dist.py
compares what they write):

  ref (1 process):  pretrain a tiny MoE hybrid teacher (aux loss and expert-bias updates on);
                    a random MoE student and a random dense student; stats at TP=EP=1; the
                    plans (keep-all with every axis permuted and one E layer dropped; a real
                    dense-axes plan from the stats); reference logits of the teacher, whole
                    and with that E layer skipped (the depth oracle: dropping a layer ==
                    the original model without it); distill MoE->MoE and MoE->dense.
  par (2 processes): the same work at EP=2 and at EP=1 (DP=2 both) and at TP=2: pretrain
                    steps from the teacher's weights, stats, eval, distill, search (EP=2); the teacher
                    (saved at EP=1) and the EP=2-trained checkpoint loaded at other layouts
                    (logits); prune written at EP=2 (the depth plan), then loaded at EP=1.
  par4 (4 processes): TP=2 x EP=2: pretrain steps, a KD, the teacher's logits, stats.
Stats run at TP=EP=1 (ref), EP=2, EP=1 (DP=2), TP=2 with and without sequence parallelism,
PP=2 (par) and TP=2 x EP=2 (par4). The MoE importance oracle (moe_stats_oracle.py: transformers
only): two transformers NemotronH MoE models (plain, latent) are built and imported in ref,
their stats run at TP1 (ref) and EP2 (par), and the oracle recomputes every expert score by
brute force from the transformers modules on the same calibration tokens (ref).
Results go to WORKDIR/*.json and *.pt; runs write their own summary.json.
"""

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_minitron import dist as D  # noqa: E402
from megatron_minitron.config import (DataConfig, EvalConfig, ModelConfig, ParallelConfig,  # noqa: E402
                                      PretrainConfig, TrainConfig)
from tests.dist import moe_stats_oracle as O  # noqa: E402  (torch and transformers only)

TEACHER = ModelConfig(
    pattern="ME*EM-", hidden_size=64, ffn_hidden_size=128, mamba_num_heads=4,
    mamba_head_dim=16, mamba_num_groups=2, mamba_state_dim=8, mamba_chunk_size=16,
    num_attention_heads=4, num_query_groups=2, kv_channels=16, vocab_size=4096, seq_length=64,
    num_moe_experts=8, moe_ffn_hidden_size=32, moe_router_topk=2,
    moe_shared_expert_intermediate_size=48, moe_router_topk_scaling_factor=2.5,
)
MOE_STUDENT = replace(TEACHER, pattern="ME*M-", hidden_size=48)
DENSE_STUDENT = replace(TEACHER, pattern="M*M-", hidden_size=32, num_moe_experts=0,
                        moe_ffn_hidden_size=0, moe_shared_expert_intermediate_size=0)
DROP = 1  # the E layer the depth plan removes
TRAIN = TrainConfig(steps=3, global_batch_size=4, micro_batch_size=2, lr=3e-3, min_lr=3e-4,
                    warmup_steps=1, eval_interval=3, eval_iters=2, save_interval=100, log_interval=1)


def data_cfg(work: Path) -> DataConfig:
    info = json.loads((work / "data.json").read_text())
    return DataConfig(prefix=info["prefix"], tokenizer=info["tokenizer"], split="90,10,0")


def tokens(work: Path) -> torch.Tensor:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(json.loads((work / "data.json").read_text())["prefix"])
    flat = torch.cat([torch.as_tensor(ds[i].astype("int64")) for i in range(8)])
    return flat[:64].reshape(2, 32)


def logits_of(work: Path, path: Path, pc: ParallelConfig, skip: int | None = None):
    """Full-vocab logits of a checkpoint loaded at layout `pc` (None off the last stage);
    skip: that layer's forward replaced by the identity."""
    from megatron_minitron.model import build_model
    from megatron_minitron.rewrite.stage import forward_logits
    from megatron_minitron.train import checkpoint as ckpt
    from megatron_minitron.train.engine import runtime_for

    par = D.init(pc, seed=0)
    cfg = ckpt.read_model_config(ckpt.require(path))
    model = build_model(cfg, par, initialize=False, runtime=runtime_for(pc, training=False))
    ckpt.load_model_weights(ckpt.require(path), model)
    if skip is not None:
        layer = model.decoder.layers[skip]
        layer.register_forward_hook(
            lambda m, args, kwargs, out: (kwargs["hidden_states"],) + tuple(out[1:]), with_kwargs=True)
    return forward_logits(model, par, tokens(work))


def save_random(path: Path, cfg: ModelConfig, seed: int) -> None:
    from megatron_minitron.model import build_model
    from megatron_minitron.train import checkpoint as ckpt

    par = D.init(ParallelConfig(), seed=seed)
    model = build_model(cfg, par)
    ckpt.save(path, 0, cfg, {"model": model.sharded_state_dict()}, {"stage": "test-student"})


def stats_cfg(work: Path, name: str, pc: ParallelConfig):
    from megatron_minitron.importance.stage import StatsConfig

    return StatsConfig(checkpoint=str(work / "teacher"), output_dir=str(work / name), parallel=pc,
                       data=data_cfg(work), samples=8, micro_batch_size=2, depth_samples=4,
                       save_interval=0)


HF_SEQ = 32  # the HF oracle models' calibration length


def hf_stats_cfg(work: Path, variant: str, layout: str, pc: ParallelConfig):
    from megatron_minitron.importance.stage import StatsConfig

    return StatsConfig(checkpoint=str(work / f"hfmoe_{variant}" / "imp"),
                       output_dir=str(work / f"hfmoe_{variant}" / f"stats_{layout}"), parallel=pc,
                       data=data_cfg(work), samples=8, micro_batch_size=2, seq_length=HF_SEQ,
                       depth_samples=0, sources=["hidden", "moe"], save_interval=0)


def hf_oracle_ref(work: Path) -> None:
    """Build and import the transformers MoE models, stats at TP1, the oracle's scores on the
    calibration samples the stats stage reads (its first `samples` train samples)."""
    from megatron_minitron.data.stage_data import datasets
    from megatron_minitron.hf.mapping import EXPORT_TIME_STEP_MIN
    from megatron_minitron.hf.stage import ImportHFConfig, run_import_hf
    from megatron_minitron.importance.stage import run_stats

    for variant in O.VARIANTS:
        wd = work / f"hfmoe_{variant}"
        model = O.build(variant, EXPORT_TIME_STEP_MIN)
        model.save_pretrained(wd / "hf")
        run_import_hf(ImportHFConfig(hf_dir=str(wd / "hf"), output_dir=str(wd / "imp")))
        cfg = hf_stats_cfg(work, variant, "tp1", ParallelConfig())
        run_stats(cfg)
        train_ds = datasets(cfg.data, HF_SEQ, None, 1)[0]
        toks = torch.stack([torch.as_tensor(train_ds[i]["tokens"]).long() for i in range(cfg.samples)])
        torch.save(O.expert_scores(model, toks), wd / "oracle.pt")


def distill_cfg(work: Path, name: str, student: str, pc: ParallelConfig):
    from megatron_minitron.distill.stage import DistillConfig, LossConfig

    return DistillConfig(student=str(work / student), teacher=str(work / "teacher"),
                         output_dir=str(work / name), data=data_cfg(work), parallel=pc,
                         train=replace(TRAIN, steps=2, eval_interval=2),
                         loss=LossConfig(temperature=1.0, alpha_kd=0.5, chunk_size=48))


def search_cfg(work: Path, pc: ParallelConfig):
    """The MoE axes under an active-parameter and a memory bound: 6 layers, hidden 64; experts
    4 / 6 / 8 x expert FFN 16 / 32 x shared expert 24 / 48. Active within 1% of 6 experts of
    FFN 32 with the full shared expert leaves 4, 6 and 8 experts (they differ in active
    parameters only by router rows); the memory ceiling of the 6-expert model drops the
    teacher (8): two candidates, the closer (6) gets a 2-step KD."""
    from megatron_minitron.distill.stage import LossConfig
    from megatron_minitron.model import count_parameters
    from megatron_minitron.resources.estimate import GiB, serving
    from megatron_minitron.search.space import SearchSpace
    from megatron_minitron.search.stage import SearchConfig

    six = replace(TEACHER, num_moe_experts=6)
    return SearchConfig(teacher=str(work / "teacher"), importance=str(work / "stats_ref" / "importance.pt"),
                        output_dir=str(work / "search_ep2"), parallel=pc,
                        space=SearchSpace(num_moe_experts=[4, 6, 8], moe_ffn_hidden_size=[16, 32],
                                          moe_shared_expert_intermediate_size=[24, 48]),
                        budget=0, active_budget=count_parameters(six)["active"], tolerance=0.01,
                        memory_budget_gib=serving(six, 64, 2)["total"] / GiB, memory_seq_length=64,
                        memory_batch_size=2, top_k=1, short_kd_steps=2,
                        tie_tolerance=0.0, data=data_cfg(work), eval_iters=2, micro_batch_size=2,
                        throughput_iters=1, kd=replace(TRAIN, steps=2), kd_loss=LossConfig(chunk_size=48))


def make_plans(work: Path) -> None:
    from megatron_minitron.importance.io import ImportanceFile
    from megatron_minitron.plan.targets import TargetConfig, assemble_plan, make_plan

    g = torch.Generator().manual_seed(5)

    def perm(n):
        return torch.randperm(n, generator=g).tolist()

    def grouped(n, groups):
        per = n // groups
        return [gi * per + j for gi in range(groups) for j in perm(per)]

    c = TEACHER
    layers = {}
    for i, t in enumerate(c.pattern):
        if t == "M":
            layers[i] = {"mamba_heads": grouped(c.mamba_num_heads, c.mamba_num_groups),
                         "mamba_channels": perm(c.mamba_head_dim)}
        elif t == "-":
            layers[i] = {"ffn": perm(c.ffn_hidden_size)}
        elif t == "*":
            layers[i] = {"attention_heads": grouped(c.num_attention_heads, c.num_query_groups)}
    assemble_plan(c, perm(c.hidden_size), layers, dropped=[DROP]).save(work / "plan_depth.json")
    imp = ImportanceFile.load(work / "stats_ref" / "importance.pt")
    make_plan(imp, TargetConfig(hidden_size=48, num_layers=5, depth_layer_type="E")).save(
        work / "plan_real.json")


def ref(work: Path) -> None:
    from megatron_minitron.distill.stage import run_distill
    from megatron_minitron.importance.stage import run_stats
    from megatron_minitron.train.pretrain import run_eval, run_pretrain

    D.init(ParallelConfig(), seed=1)  # kept up: every stage below leaves it up
    run_pretrain(PretrainConfig(output_dir=str(work / "teacher"), model=TEACHER, data=data_cfg(work),
                                train=replace(TRAIN, steps=12, eval_interval=12, save_interval=12)))
    # the same training continued with the router's training behaviour off
    run_pretrain(PretrainConfig(output_dir=str(work / "frozen_router"), model=TEACHER, data=data_cfg(work),
                                train=replace(TRAIN, steps=2, moe_router_bias_update_rate=0.0,
                                              moe_aux_loss_coeff=0.0),
                                init_from=str(work / "teacher"), resume=False))
    bias = {name: {k: v.tolist() for k, v in global_tensors(work / name).items() if k.endswith("expert_bias")}
            for name in ("teacher", "frozen_router")}
    (work / "expert_bias.json").write_text(json.dumps(bias))
    save_random(work / "moe_student", MOE_STUDENT, seed=7)
    save_random(work / "dense_student", DENSE_STUDENT, seed=8)
    D.shutdown()
    run_stats(stats_cfg(work, "stats_ref", ParallelConfig()))
    make_plans(work)
    torch.save({"full": logits_of(work, work / "teacher", ParallelConfig()),
                "skip": logits_of(work, work / "teacher", ParallelConfig(), skip=DROP)},
               work / "logits_ref.pt")
    for student in ("moe_student", "dense_student"):
        run_distill(distill_cfg(work, f"kd_{student}_ref", student, ParallelConfig()))
    ev = run_eval(EvalConfig(checkpoint=str(work / "teacher"), data=data_cfg(work),
                             output_dir=str(work / "eval_ref"), eval_iters=2, micro_batch_size=2))
    (work / "ref.json").write_text(json.dumps({"eval": ev["loss"]}))
    D.shutdown()
    hf_oracle_ref(work)


def global_tensors(path: Path) -> dict:
    """Every tensor of a checkpoint, whole (collective: all ranks load the same)."""
    from megatron_minitron.compat import mcore
    from megatron_minitron.compat.mcore import ShardedTensor
    from megatron_minitron.train import checkpoint as ckpt

    it = str(ckpt.require(path))
    meta = mcore.dist_checkpointing.load_tensors_metadata(it)
    rank = torch.distributed.get_rank()  # every rank reads all of it: rank 0's copy is the main one
    sd = {k: ShardedTensor.from_rank_offsets(k, torch.empty(m.global_shape, dtype=m.dtype), replica_id=rank)
          for k, m in meta.items()}
    got = mcore.dist_checkpointing.load(sd, it)
    return {k: v for k, v in got.items() if k.startswith(("embedding.", "decoder.", "output_layer."))}


def par(work: Path) -> None:
    from megatron_minitron.distill.stage import run_distill
    from megatron_minitron.importance.stage import run_stats
    from megatron_minitron.rewrite.stage import PruneConfig, run_prune
    from megatron_minitron.search.stage import run_search
    from megatron_minitron.train.pretrain import run_eval, run_pretrain

    layouts = {"ep1": ParallelConfig(), "ep2": ParallelConfig(ep=2), "tp2": ParallelConfig(tp=2, sequence_parallel=True)}
    D.init(ParallelConfig(), seed=1)
    out = {}
    for name, pc in layouts.items():
        run_pretrain(PretrainConfig(output_dir=str(work / f"ft_{name}"), model=TEACHER, data=data_cfg(work),
                                    parallel=pc, train=TRAIN, init_from=str(work / "teacher"), resume=False))
        out[f"eval_{name}"] = run_eval(EvalConfig(checkpoint=str(work / "teacher"), data=data_cfg(work),
                                                  output_dir=str(work / f"eval_{name}"), parallel=pc,
                                                  eval_iters=2, micro_batch_size=2))["loss"]
        run_stats(stats_cfg(work, f"stats_{name}", pc))
        for student in ("moe_student", "dense_student"):
            run_distill(distill_cfg(work, f"kd_{student}_{name}", student, pc))
    # TP=2 without sequence parallelism: every TP rank holds the whole sequence, the experts
    # see each token once per TP rank (the stats divide that out)
    run_stats(stats_cfg(work, "stats_tp2nosp", ParallelConfig(tp=2)))
    run_stats(stats_cfg(work, "stats_pp2", ParallelConfig(pp=2)))  # E layers 1 and 3 on two stages
    for variant in O.VARIANTS:
        run_stats(hf_stats_cfg(work, variant, "ep2", layouts["ep2"]))
    # the weights after 3 Adam steps: equal gradients at every layout give equal weights
    a = global_tensors(work / "ft_ep1")
    diffs = {}
    b = global_tensors(work / "ft_ep2")
    diffs["ep2"] = {k: (a[k].float() - b[k].float()).abs().max().item() for k in a}
    out["weights_vs_ep1"] = diffs
    logits = {
        "teacher_ep2": logits_of(work, work / "teacher", layouts["ep2"]),
        "teacher_tp2": logits_of(work, work / "teacher", layouts["tp2"]),
        "ft_ep2_at_ep2": logits_of(work, work / "ft_ep2", layouts["ep2"]),
        "ft_ep2_at_tp2": logits_of(work, work / "ft_ep2", layouts["tp2"]),
        "ft_ep2_at_ep1": logits_of(work, work / "ft_ep2", layouts["ep1"]),
    }
    run_prune(PruneConfig(checkpoint=str(work / "teacher"), plan=str(work / "plan_depth.json"),
                          output=str(work / "pruned_depth_ep2"), parallel=layouts["ep2"]))
    run_prune(PruneConfig(checkpoint=str(work / "teacher"), plan=str(work / "plan_real.json"),
                          output=str(work / "pruned_real_ep2"), parallel=layouts["ep2"]))
    logits["pruned_depth_at_ep1"] = logits_of(work, work / "pruned_depth_ep2", layouts["ep1"])
    logits["pruned_real_at_ep2"] = logits_of(work, work / "pruned_real_ep2", layouts["ep2"])
    logits["pruned_real_at_tp2"] = logits_of(work, work / "pruned_real_ep2", layouts["tp2"])
    out["search_ep2"] = run_search(search_cfg(work, layouts["ep2"]))
    if D.is_rank0():
        torch.save(logits, work / "logits_par.pt")
        (work / "par.json").write_text(json.dumps(out, indent=2))
    D.shutdown()


def par4(work: Path) -> None:
    """4 processes: TP=2 x EP=2 (sequence parallel; DP=2): pretrain steps, a KD, the teacher's
    logits; compared with EP=1 at DP=2 and with one process."""
    from megatron_minitron.distill.stage import run_distill
    from megatron_minitron.importance.stage import run_stats
    from megatron_minitron.train.pretrain import run_pretrain

    pc = ParallelConfig(tp=2, ep=2, sequence_parallel=True)
    D.init(pc, seed=1)
    run_pretrain(PretrainConfig(output_dir=str(work / "ft_tp2ep2"), model=TEACHER, data=data_cfg(work),
                                parallel=pc, train=TRAIN, init_from=str(work / "teacher"), resume=False))
    # again: already trained, so reused (every rank reads the summary rank 0 then rewrites)
    run_pretrain(PretrainConfig(output_dir=str(work / "ft_tp2ep2"), model=TEACHER, data=data_cfg(work),
                                parallel=pc, train=TRAIN))
    run_distill(distill_cfg(work, "kd_moe_student_tp2ep2", "moe_student", pc))
    logits = logits_of(work, work / "teacher", pc)
    if D.is_rank0():
        torch.save(logits, work / "logits_tp2ep2.pt")
    run_stats(stats_cfg(work, "stats_tp2ep2", pc))
    D.shutdown()


if __name__ == "__main__":  # guard: the checkpoint writer's helper process re-imports __main__
    mode, workdir = sys.argv[1], Path(sys.argv[2])
    {"ref": ref, "par": par, "par4": par4}[mode](workdir)
