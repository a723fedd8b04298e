"""An independent pruning oracle, in transformers' terms only (tests/dist/test_oracle_dist.py).

  make (1 process):  random transformers NemotronHForCausalLM models, every tensor (and the
                     MoE routers' e_score_correction_bias) moved off its init; save_pretrained:
                     `dense` (M, * and - layers, 2 Mamba groups, 2 KV groups) and two MoE hybrids
                     (M, E, *, E, -, E; 8 experts, top-2, a shared expert, routed scaling 2.5):
                     `moe` (n_group 1) and `moe_grouped` (2 routing groups of 4, a token's top 2
                     from 1 group; latent projections of width 24); `attn`, no Mamba layer
                     (*, -, *, -; the real corpus's vocabulary of 4096, issue 23).
  par  (2 processes): import-hf (TP=1) -> our checkpoints; rank 0 draws random plans that
                     prune EVERY axis (hidden, FFN, Mamba heads + channels, attention heads,
                     dropped layers; random orders within groups; for MoE also the experts of
                     each layer (within routing groups), each expert's own FFN neurons and the
                     shared expert's), a zeroing plan (FFN neurons + attention heads only) and
                     expert-dropping plans (experts only); `prune` (the code under test) at
                     TP=2, TP=1 and EP=2. `attn` goes the user's way instead: stats at TP=2
                     (the real corpus) -> plan (hidden, FFN, heads, depth) -> prune at TP=2 ->
                     distill (2 steps, TP=2).
  exp  (1 process):  export-hf of each pruned checkpoint -> transformers logits; the oracle:
                     slice the ORIGINAL transformers state dict with `slice_hf` below (plan.json
                     alone; no import from megatron_minitron.rewrite / plan / hf.mapping) ->
                     a fresh NemotronHForCausalLM -> logits; for the zeroing plan, the source
                     model with the dropped FFN neurons' down_proj columns and the dropped
                     heads' o_proj columns set to zero (exact for squared ReLU without biases,
                     and for heads, whose outputs only meet in o_proj); for the expert-dropping
                     plans, the source model with the dropped experts' e_score_correction_bias
                     at -inf: transformers selects by scores + bias but gathers the top-k
                     weights from the unbiased scores and normalises over the chosen ones, so
                     an expert at -inf is simply never chosen (with grouped routing every
                     group keeps >= 2 experts: its top-2 group score is over the kept ones).
                     `attn`: stats again at TP=1 (the parity reference), eval and export-hf of
                     the distilled checkpoint.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.dist.hf_models import eval_logits, fixed_tokens, randomize  # noqa: E402

SEQ, BATCH, VOCAB = 40, 2, 256
BLOCKS = ["linear_attention", "full_attention", "linear_attention", "mlp",
          "linear_attention", "full_attention", "linear_attention", "mlp"]


# transformers' default experts kernel (grouped_mm) needs every expert width x dtype size to be
# a multiple of 16 bytes ('strides should be multiple of 16 bytes' for an expert FFN of 18 in
# fp32); the plans below prune to any width, so both sides run the per-expert loop
EXPERTS_IMPL = "eager"
MOE_BLOCKS = ["linear_attention", "moe", "full_attention", "moe", "mlp", "moe"]
SOURCES = {  # source model name -> NemotronHConfig fields over the dense defaults
    "dense": {},
    "moe": dict(layers_block_type=MOE_BLOCKS, n_routed_experts=8, moe_intermediate_size=32,
                moe_shared_expert_intermediate_size=48, n_shared_experts=1, num_experts_per_tok=2,
                norm_topk_prob=True, routed_scaling_factor=2.5, n_group=1, topk_group=1,
                moe_latent_size=None),
}
SOURCES["moe_grouped"] = dict(SOURCES["moe"], n_group=2, topk_group=1, moe_latent_size=24)
# no Mamba layer (issue 23); the vocabulary of the real corpus its stats / distill read
SOURCES["attn"] = dict(layers_block_type=["full_attention", "mlp", "full_attention", "mlp"], vocab_size=4096)
ATTN_TARGET = dict(hidden_size=48, ffn_hidden_size=64, num_attention_heads=2, num_layers=3)
ATTN_STATS = dict(samples=8, seq_length=32, micro_batch_size=4, depth_samples=4, save_interval=0)


def hf_config(**over):
    from transformers import NemotronHConfig

    kw = dict(vocab_size=VOCAB, hidden_size=64, layers_block_type=list(BLOCKS), intermediate_size=96,
              mlp_hidden_act="relu2", num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=8, conv_kernel=4,
              chunk_size=16, max_position_embeddings=64, layer_norm_epsilon=1e-5,
              time_step_min=1.1754943508222875e-38,  # init only; no dt clamp (time_step_limit (0, inf))
              tie_word_embeddings=False, pad_token_id=1, eos_token_id=0, bos_token_id=None,
              experts_implementation=EXPERTS_IMPL)
    kw.update(over)
    return NemotronHConfig(**kw)


def tokens():
    return fixed_tokens(VOCAB, BATCH, SEQ, seed=11)


def logits(model):
    return eval_logits(model, tokens())


# ----------------------------------------------------------------------------- the oracle


def slice_hf(sd: dict, src: dict, plan: dict) -> tuple[dict, dict]:
    """transformers NemotronH state dict + its config (dict) + plan.json (dict) -> the pruned
    state dict and config. Written from the plan's definition (DESIGN.md sec. 3):
    hidden channels index every hidden dimension; Mamba heads H (group order) and channels
    P give the flat d_inner indices h*head_dim + p for z, x, norm, out_proj and the x conv
    channels, H alone for dt, A_log, D, dt_bias; B / C untouched; attention heads index the
    q rows / o columns in blocks of head_dim (K / V kept); FFN neurons index up rows / down
    columns; dropped layers vanish and the rest are renumbered."""
    hid = torch.tensor(plan["hidden"])
    nh, hd, ng, ds = src["mamba_num_heads"], src["mamba_head_dim"], src["n_groups"], src["ssm_state_size"]
    d_in = nh * hd
    qd = src["head_dim"]
    out, kept = {}, plan["kept_layers"]
    out["model.embeddings.weight"] = sd["model.embeddings.weight"][:, hid]
    out["model.norm_f.weight"] = sd["model.norm_f.weight"][hid]
    out["lm_head.weight"] = sd["lm_head.weight"][:, hid]
    for new, old in enumerate(kept):
        p, q = f"model.layers.{old}.", f"model.layers.{new}."
        out[q + "norm.weight"] = sd[p + "norm.weight"][hid]
        kind = src["layers_block_type"][old]
        e = plan["layers"].get(str(old), {})  # an MoE layer's axes are optional: absent = all
        if kind == "linear_attention":
            H, P = e["mamba_heads"], e["mamba_channels"]
            flat = torch.tensor([h * hd + c for h in H for c in P])
            bc = torch.arange(2 * ng * ds)
            rows = torch.cat([flat, d_in + flat, 2 * d_in + bc, 2 * d_in + 2 * ng * ds + torch.tensor(H)])
            w = sd[p + "mixer.in_proj.weight"]
            out[q + "mixer.in_proj.weight"] = w[rows][:, hid]
            conv = torch.cat([flat, d_in + bc])
            out[q + "mixer.conv1d.weight"] = sd[p + "mixer.conv1d.weight"][conv]
            out[q + "mixer.conv1d.bias"] = sd[p + "mixer.conv1d.bias"][conv]
            for n in ("dt_bias", "A_log", "D"):
                out[q + "mixer." + n] = sd[p + "mixer." + n][torch.tensor(H)]
            out[q + "mixer.norm.weight"] = sd[p + "mixer.norm.weight"][flat]
            out[q + "mixer.out_proj.weight"] = sd[p + "mixer.out_proj.weight"][hid][:, flat]
        elif kind == "full_attention":
            qrows = torch.tensor([h * qd + c for h in e["attention_heads"] for c in range(qd)])
            out[q + "mixer.q_proj.weight"] = sd[p + "mixer.q_proj.weight"][qrows][:, hid]
            out[q + "mixer.k_proj.weight"] = sd[p + "mixer.k_proj.weight"][:, hid]
            out[q + "mixer.v_proj.weight"] = sd[p + "mixer.v_proj.weight"][:, hid]
            out[q + "mixer.o_proj.weight"] = sd[p + "mixer.o_proj.weight"][hid][:, qrows]
        elif kind == "moe":
            out.update(slice_moe_layer(sd, src, e, hid, p, q))
        else:
            f = torch.tensor(e["ffn"])
            out[q + "mixer.up_proj.weight"] = sd[p + "mixer.up_proj.weight"][f][:, hid]
            out[q + "mixer.down_proj.weight"] = sd[p + "mixer.down_proj.weight"][hid][:, f]
    first = {k: next(plan["layers"].get(str(i), {}) for i in kept if src["layers_block_type"][i] == k)
             for k in set(src["layers_block_type"][i] for i in kept)}
    cfg = dict(hidden_size=len(plan["hidden"]), layers_block_type=[src["layers_block_type"][i] for i in kept])
    if "linear_attention" in first:
        cfg.update(mamba_num_heads=len(first["linear_attention"]["mamba_heads"]),
                   mamba_head_dim=len(first["linear_attention"]["mamba_channels"]))
    if "full_attention" in first:
        cfg["num_attention_heads"] = len(first["full_attention"]["attention_heads"])
    if "mlp" in first:
        cfg["intermediate_size"] = len(first["mlp"]["ffn"])
    if "moe" in first:
        e = first["moe"]
        n = len(e.get("experts", range(src["n_routed_experts"])))
        cfg.update(n_routed_experts=n, moe_intermediate_size=len(e["expert_ffn"][0]) if "expert_ffn" in e
                   else src["moe_intermediate_size"],
                   moe_shared_expert_intermediate_size=len(e.get("shared_ffn", range(
                       src["moe_shared_expert_intermediate_size"]))))
    return out, cfg


def slice_moe_layer(sd: dict, src: dict, e: dict, hid, p: str, q: str) -> dict:
    """One transformers MoE mixer (in-memory layout: experts.up_proj [E, I, d], down_proj
    [E, d, I], d = hidden or the latent width) sliced by the plan: the kept experts (gate
    rows, correction bias, expert tensors), pruned expert j = source expert experts[j] with
    ITS OWN neurons expert_ffn[j] (up rows / down columns), the shared MLP's neurons, the
    hidden channels wherever the residual stream enters or leaves (gate columns, shared MLP,
    latent projections, else the experts)."""
    n, f, s = src["n_routed_experts"], src["moe_intermediate_size"], src["moe_shared_expert_intermediate_size"]
    ex = list(e.get("experts", range(n)))
    ffn = e.get("expert_ffn", [list(range(f))] * len(ex))
    sh = torch.tensor(e.get("shared_ffn", range(s)))
    latent = bool(src.get("moe_latent_size"))
    m, w = p + "mixer.", {}
    w["gate.weight"] = sd[m + "gate.weight"][ex][:, hid]
    w["gate.e_score_correction_bias"] = sd[m + "gate.e_score_correction_bias"][ex]
    up = [sd[m + "experts.up_proj"][x][ffn[j]] for j, x in enumerate(ex)]
    down = [sd[m + "experts.down_proj"][x][:, ffn[j]] for j, x in enumerate(ex)]
    w["experts.up_proj"] = torch.stack(up if latent else [u[:, hid] for u in up])
    w["experts.down_proj"] = torch.stack(down if latent else [d[hid] for d in down])
    w["shared_experts.up_proj.weight"] = sd[m + "shared_experts.up_proj.weight"][sh][:, hid]
    w["shared_experts.down_proj.weight"] = sd[m + "shared_experts.down_proj.weight"][hid][:, sh]
    if latent:
        w["fc1_latent_proj.weight"] = sd[m + "fc1_latent_proj.weight"][:, hid]
        w["fc2_latent_proj.weight"] = sd[m + "fc2_latent_proj.weight"][hid]
    return {q + "mixer." + k: v for k, v in w.items()}


def oracle_logits(sd: dict, src_cfg: dict, plan: dict, source: str = "dense"):
    from transformers import NemotronHForCausalLM

    sliced, over = slice_hf(sd, src_cfg, plan)
    m = NemotronHForCausalLM(hf_config(**{**SOURCES[source], **over})).float()
    missing, unexpected = m.load_state_dict(sliced, strict=True)
    assert not missing and not unexpected
    return logits(m)


def zeroed_logits(model_sd: dict, plan: dict):
    """The SOURCE model with dropped FFN neurons / attention heads zeroed at their output
    projections (plan prunes only those two axes)."""
    from transformers import NemotronHForCausalLM

    sd = {k: v.clone() for k, v in model_sd.items()}
    for i, kind in enumerate(BLOCKS):
        e = plan["layers"][str(i)]
        if kind == "mlp":
            drop = sorted(set(range(96)) - set(e["ffn"]))
            sd[f"model.layers.{i}.mixer.down_proj.weight"][:, drop] = 0
        elif kind == "full_attention":
            for h in set(range(4)) - set(e["attention_heads"]):
                sd[f"model.layers.{i}.mixer.o_proj.weight"][:, h * 16:(h + 1) * 16] = 0
    m = NemotronHForCausalLM(hf_config()).float()
    m.load_state_dict(sd, strict=True)
    return logits(m)


def masked_logits(model_sd: dict, plan: dict, source: str):
    """The SOURCE MoE model with the experts a plan drops removed from every router's choice:
    their e_score_correction_bias at -inf (plan prunes only the experts)."""
    from transformers import NemotronHForCausalLM

    sd = {k: v.clone() for k, v in model_sd.items()}
    for i, kind in enumerate(MOE_BLOCKS):
        if kind == "moe":
            drop = sorted(set(range(8)) - set(plan["layers"][str(i)]["experts"]))
            sd[f"model.layers.{i}.mixer.gate.e_score_correction_bias"][drop] = float("-inf")
    m = NemotronHForCausalLM(hf_config(**SOURCES[source])).float()
    m.load_state_dict(sd, strict=True)
    return logits(m)


# ----------------------------------------------------------------------------- phases


def make(wd: Path):
    from transformers import NemotronHForCausalLM

    for source, over in SOURCES.items():
        torch.manual_seed(0)
        model = NemotronHForCausalLM(hf_config(**over)).float()
        randomize(model, dt_bias_mean=-1.0, dt_bias_std=0.5)
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for name, mod in model.named_modules():
                if name.endswith("mixer.gate"):  # a buffer (randomize sees parameters): routing
                    b = mod.e_score_correction_bias  # decided by it for a share of the tokens
                    b.copy_(0.1 * torch.randn(b.shape, generator=g))
        model.save_pretrained(wd / _hf_dir(source))
        torch.save(logits(model), wd / f"logits_{_hf_dir(source)}.pt")


def _hf_dir(source: str) -> str:
    return "hf_src" if source == "dense" else f"hf_{source}"


def _subset(n: int, k: int, g) -> list[int]:
    return torch.randperm(n, generator=g)[:k].tolist()  # random members, random order


def _grouped(n: int, groups: int, k_per: int, g) -> list[int]:
    per = n // groups
    return [gi * per + j for gi in range(groups) for j in _subset(per, k_per, g)]


def random_plan(cfg, g, hidden=None, mamba_per_group=None, channels=None, ffn=None, attn_per_group=None,
                drop=(), experts_per_group=None, expert_ffn=None, shared=None):
    """Random keep sets for every axis given (None: that axis kept whole in source order; no
    scores: the rewrite must not care where they came from); `drop` = source layer ids
    dropped. MoE: experts_per_group per routing group, each kept expert its own random
    expert_ffn neurons, shared-expert neurons."""
    from megatron_minitron.plan.targets import assemble_plan

    def pick(n, k):
        return list(range(n)) if k is None else _subset(n, k, g)

    layers = {}
    for i, t in enumerate(cfg.pattern):
        if t == "M":
            layers[i] = {"mamba_heads": _grouped(cfg.mamba_num_heads, cfg.mamba_num_groups, mamba_per_group, g)
                         if mamba_per_group else list(range(cfg.mamba_num_heads)),
                         "mamba_channels": pick(cfg.mamba_head_dim, channels)}
        elif t == "-":
            layers[i] = {"ffn": pick(cfg.ffn_hidden_size, ffn)}
        elif t == "*":
            layers[i] = {"attention_heads": _grouped(cfg.num_attention_heads, cfg.num_query_groups,
                                                     attn_per_group, g) if attn_per_group else
                         list(range(cfg.num_attention_heads))}
        else:
            e = layers[i] = {}
            if experts_per_group:
                e["experts"] = _grouped(cfg.num_moe_experts, cfg.moe_router_num_groups, experts_per_group, g)
            if expert_ffn:
                e["expert_ffn"] = [_subset(cfg.moe_ffn_hidden_size, expert_ffn, g)
                                   for _ in e.get("experts", range(cfg.num_moe_experts))]
            if shared:
                e["shared_ffn"] = _subset(cfg.moe_shared_expert_intermediate_size, shared, g)
    return assemble_plan(cfg, pick(cfg.hidden_size, hidden), layers, dropped=drop)


PLANS = {  # name: (source, prune at layout, random_plan arguments)
    "every_axis_tp2": ("dense", dict(tp=2), dict(hidden=48, mamba_per_group=2, channels=12, ffn=62,
                                                 attn_per_group=1, drop=[2, 7])),
    "every_axis_tp1": ("dense", dict(tp=1), dict(hidden=40, mamba_per_group=3, channels=10, ffn=50,
                                                 attn_per_group=2, drop=[5, 0])),
    "every_axis_b_tp2": ("dense", dict(tp=2), dict(hidden=56, mamba_per_group=1, channels=7, ffn=30,
                                                   attn_per_group=1, drop=[1, 3, 4])),
    # MoE: every dense axis and every MoE axis together (the EP=2 plan comes from make_plan
    # on random scores, ranked order: see par)
    "moe_every_axis_tp2": ("moe", dict(tp=2), dict(hidden=40, mamba_per_group=2, channels=10, ffn=50,
                                                   attn_per_group=1, drop=[1], experts_per_group=5,
                                                   expert_ffn=18, shared=36)),
    "moe_every_axis_ep2": ("moe", dict(ep=2), None),
    "moe_grouped_latent_tp2": ("moe_grouped", dict(tp=2), dict(hidden=56, mamba_per_group=3, channels=12,
                                                               ffn=62, attn_per_group=1, drop=[5],
                                                               experts_per_group=3, expert_ffn=16, shared=24)),
    # experts only, for the -inf oracle
    "moe_drop_experts": ("moe", dict(tp=1), dict(experts_per_group=5)),
    "moe_drop_experts_grouped_ep2": ("moe_grouped", dict(ep=2), dict(experts_per_group=2)),
    # no Mamba layer: the plan stage's plan from stats at TP=2 (par)
    "attn_tp2": ("attn", dict(tp=2), None),
}
EP2_TARGET = dict(hidden_size=48, ffn_hidden_size=62, mamba_num_heads=4, mamba_head_dim=12, num_attention_heads=2,
                  drop_layers=[3], num_moe_experts=6, moe_ffn_hidden_size=20, moe_shared_expert_intermediate_size=30)


def par(wd: Path):
    import torch.distributed as dist

    from megatron_minitron import dist as D
    from megatron_minitron.config import ParallelConfig, TrainConfig
    from megatron_minitron.hf.stage import ImportHFConfig, run_import_hf
    from megatron_minitron.rewrite.stage import PruneConfig, run_prune
    from megatron_minitron.train import checkpoint as ckpt

    for source in SOURCES:
        run_import_hf(ImportHFConfig(hf_dir=str(wd / _hf_dir(source)), output_dir=str(wd / f"src_{source}")),
                      shutdown=False)
    attn_stats(wd, "stats_attn_tp2", ParallelConfig(tp=2))
    if dist.get_rank() == 0:
        from megatron_minitron.importance.io import ImportanceFile
        from megatron_minitron.plan.targets import Plan, TargetConfig, make_plan

        g = torch.Generator().manual_seed(2024)
        for name, (source, _, kw) in PLANS.items():
            cfg = ckpt.read_model_config(wd / f"src_{source}")
            if source == "attn":  # the plan stage on the stats file
                from megatron_minitron.plan.stage import PlanConfig, run_plan

                run_plan(PlanConfig(importance=str(wd / "stats_attn_tp2" / "importance.pt"),
                                    output_dir=str(wd / "plan_attn"), target=TargetConfig(**ATTN_TARGET),
                                    parallel=ParallelConfig(tp=2)))
                plan = Plan.load(wd / "plan_attn" / "plan.json")
            elif kw is None:  # the plan stage's path: random expert / neuron scores, ranked order
                plan = make_plan(ImportanceFile.random(cfg, g), TargetConfig(**EP2_TARGET), order="ranked", ep=2)
            else:
                plan = random_plan(cfg, g, **kw)
            plan.save(wd / f"plan_{name}.json")
        cfg = ckpt.read_model_config(wd / "src_dense")
        # zeroing plan: FFN neurons and attention heads only, everything else kept as is
        from megatron_minitron.plan.targets import assemble_plan

        layers = {}
        for i, t in enumerate(cfg.pattern):
            if t == "M":
                layers[i] = {"mamba_heads": list(range(cfg.mamba_num_heads)),
                             "mamba_channels": list(range(cfg.mamba_head_dim))}
            elif t == "-":
                layers[i] = {"ffn": _subset(cfg.ffn_hidden_size, 58, g)}
            else:
                layers[i] = {"attention_heads": _grouped(cfg.num_attention_heads, cfg.num_query_groups, 1, g)}
        assemble_plan(cfg, list(range(cfg.hidden_size)), layers).save(wd / "plan_zero.json")
    dist.barrier()
    # several prunes in one launch: run_prune leaves the live process group up (gloo cannot
    # re-create the default group in the same torchrun process); D.init re-makes the
    # model-parallel groups on it
    for name, (source, layout, _) in list(PLANS.items()) + [("zero", ("dense", dict(tp=2), None))]:
        run_prune(PruneConfig(checkpoint=str(wd / f"src_{source}"), plan=str(wd / f"plan_{name}.json"),
                              output=str(wd / f"pruned_{name}"), parallel=ParallelConfig(**layout)))
    from megatron_minitron.distill.stage import DistillConfig, run_distill

    run_distill(DistillConfig(
        student=str(wd / "pruned_attn_tp2"), teacher=str(wd / "src_attn"), output_dir=str(wd / "distilled_attn"),
        data=data_cfg(wd), seq_length=32, parallel=ParallelConfig(tp=2),
        train=TrainConfig(steps=2, global_batch_size=4, micro_batch_size=2, lr=3e-3, warmup_steps=0,
                          eval_interval=2, eval_iters=1, save_interval=2, log_interval=1)))
    D.shutdown()


def data_cfg(wd: Path):
    from megatron_minitron.config import DataConfig

    info = json.loads((wd / "data.json").read_text())
    return DataConfig(prefix=info["prefix"], tokenizer=info["tokenizer"], split="90,10,0")


def attn_stats(wd: Path, name: str, pc) -> None:
    """`stats` on the imported attention-only model (every source; the Mamba ones skipped)."""
    from megatron_minitron.importance.stage import StatsConfig, run_stats

    run_stats(StatsConfig(checkpoint=str(wd / "src_attn"), output_dir=str(wd / name), parallel=pc,
                          data=data_cfg(wd), **ATTN_STATS))


def exp(wd: Path):
    from transformers import AutoModelForCausalLM

    from megatron_minitron import dist as D
    from megatron_minitron.config import EvalConfig, ParallelConfig
    from megatron_minitron.hf.stage import ExportHFConfig, run_export_hf
    from megatron_minitron.train.pretrain import run_eval

    D.init(ParallelConfig(), seed=0)  # one process group for every stage below
    attn_stats(wd, "stats_attn_tp1", ParallelConfig())  # the TP=1 reference of the parity test
    src_cfgs, sds = {}, {}
    for source in SOURCES:
        src_cfgs[source] = json.loads((wd / _hf_dir(source) / "config.json").read_text())
        # the in-memory names (the saved file may use the checkpoint's 'backbone.' names)
        sds[source] = {k: v.detach().clone() for k, v in
                       AutoModelForCausalLM.from_pretrained(wd / _hf_dir(source)).float().state_dict().items()}
    res = {}
    for name in list(PLANS) + ["zero"]:
        source = PLANS[name][0] if name in PLANS else "dense"
        sd, src_cfg = sds[source], src_cfgs[source]
        plan = json.loads((wd / f"plan_{name}.json").read_text())
        run_export_hf(ExportHFConfig(checkpoint=str(wd / f"pruned_{name}"), output_dir=str(wd / f"exp_{name}"),
                                     dtype="fp32", tokenizer="none"), shutdown=False)
        got = logits(AutoModelForCausalLM.from_pretrained(wd / f"exp_{name}", experts_implementation=EXPERTS_IMPL).float())
        ref = oracle_logits(sd, src_cfg, plan, source)
        src = torch.load(wd / f"logits_{_hf_dir(source)}.pt")
        r = {"max_abs_vs_oracle": (got - ref).abs().max().item(),
             "oracle_vs_source": (ref - src).abs().max().item(),
             "logit_scale": ref.abs().max().item(), "target": plan["target"],
             "written_at": PLANS[name][1] if name in PLANS else dict(tp=2)}
        if name == "zero":
            r["max_abs_vs_zeroed_source"] = (got - zeroed_logits(sd, plan)).abs().max().item()
        if name.startswith("moe_drop_experts"):
            masked = masked_logits(sd, plan, source)
            r["max_abs_vs_masked_source"] = (got - masked).abs().max().item()
            r["masked_vs_source"] = (masked - src).abs().max().item()
        # a deliberately wrong slicer (first k of everything, the bug the issue names) must
        # be far from the pruned model: the comparison can fail
        wrong = json.loads(json.dumps(plan))
        for e in wrong["layers"].values():
            for a, v in e.items():
                e[a] = (sorted(v) if a in ("mamba_heads", "attention_heads") else
                        [list(range(len(r_))) for r_ in v] if a == "expert_ffn" else list(range(len(v))))
        wrong["hidden"] = list(range(len(plan["hidden"])))
        r["max_abs_vs_first_k_slicer"] = (got - oracle_logits(sd, src_cfg, wrong, source)).abs().max().item()
        res[name] = r
    # the distilled attention-only student: eval, export-hf, transformers loads it
    ev = run_eval(EvalConfig(checkpoint=str(wd / "distilled_attn"), output_dir=str(wd / "eval_attn"),
                             data=data_cfg(wd), eval_iters=1, micro_batch_size=2))
    run_export_hf(ExportHFConfig(checkpoint=str(wd / "distilled_attn"), output_dir=str(wd / "exp_distilled_attn"),
                                 dtype="fp32", tokenizer="none"), shutdown=False)
    got = logits(AutoModelForCausalLM.from_pretrained(wd / "exp_distilled_attn").float())
    pruned = logits(AutoModelForCausalLM.from_pretrained(wd / "exp_attn_tp2").float())
    res["distilled_attn"] = {
        "eval": ev, "blocks": json.loads((wd / "exp_distilled_attn" / "config.json").read_text())["layers_block_type"],
        "finite": bool(torch.isfinite(got).all()), "moved_vs_pruned": (got - pruned).abs().max().item(),
        "distill": json.loads((wd / "distilled_attn" / "summary.json").read_text())}
    D.shutdown()
    (wd / "result_oracle.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    phase, workdir = sys.argv[1], Path(sys.argv[2])
    {"make": make, "par": par, "exp": exp}[phase](workdir)
