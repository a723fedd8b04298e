"""An independent pruning oracle, in transformers' terms only (tests/dist/test_oracle_dist.py).

  make (1 process):  a random transformers NemotronHForCausalLM (M, * and - layers, 2 Mamba
                     groups, 2 KV groups), every tensor moved off its init; save_pretrained.
  par  (2 processes): import-hf (TP=1) -> our checkpoint; rank 0 draws random plans that
                     prune EVERY axis (hidden, FFN, Mamba heads + channels, attention heads,
                     dropped layers; random orders within groups) and a zeroing plan (FFN
                     neurons + attention heads only); `prune` (the code under test) at TP=2
                     and TP=1.
  exp  (1 process):  export-hf of each pruned checkpoint -> transformers logits; the oracle:
                     slice the ORIGINAL transformers state dict with `slice_hf` below (plan.json
                     alone; no import from megatron_minitron.rewrite / plan / hf.mapping) ->
                     a fresh NemotronHForCausalLM -> logits; and, for the zeroing plan, the
                     source model with the dropped FFN neurons' down_proj columns and the
                     dropped heads' o_proj columns set to zero (exact for squared ReLU without
                     biases, and for heads, whose outputs only meet in o_proj).
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


def hf_config(**over):
    from transformers import NemotronHConfig

    kw = dict(vocab_size=VOCAB, hidden_size=64, layers_block_type=list(BLOCKS), intermediate_size=96,
              mlp_hidden_act="relu2", num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=8, conv_kernel=4,
              chunk_size=16, max_position_embeddings=64, layer_norm_epsilon=1e-5,
              time_step_min=1.1754943508222875e-38,  # init only; no dt clamp (time_step_limit (0, inf))
              tie_word_embeddings=False, pad_token_id=1, eos_token_id=0, bos_token_id=None)
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
        e = plan["layers"][str(old)]
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
        else:
            f = torch.tensor(e["ffn"])
            out[q + "mixer.up_proj.weight"] = sd[p + "mixer.up_proj.weight"][f][:, hid]
            out[q + "mixer.down_proj.weight"] = sd[p + "mixer.down_proj.weight"][hid][:, f]
    first = {k: next(plan["layers"][str(i)] for i in kept if src["layers_block_type"][i] == k)
             for k in set(src["layers_block_type"][i] for i in kept)}
    cfg = dict(hidden_size=len(plan["hidden"]), layers_block_type=[src["layers_block_type"][i] for i in kept])
    if "linear_attention" in first:
        cfg.update(mamba_num_heads=len(first["linear_attention"]["mamba_heads"]),
                   mamba_head_dim=len(first["linear_attention"]["mamba_channels"]))
    if "full_attention" in first:
        cfg["num_attention_heads"] = len(first["full_attention"]["attention_heads"])
    if "mlp" in first:
        cfg["intermediate_size"] = len(first["mlp"]["ffn"])
    return out, cfg


def oracle_logits(sd: dict, src_cfg: dict, plan: dict):
    from transformers import NemotronHForCausalLM

    sliced, over = slice_hf(sd, src_cfg, plan)
    m = NemotronHForCausalLM(hf_config(**over)).float()
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


# ----------------------------------------------------------------------------- phases


def make(wd: Path):
    from transformers import NemotronHForCausalLM

    torch.manual_seed(0)
    model = NemotronHForCausalLM(hf_config()).float()
    randomize(model, dt_bias_mean=-1.0, dt_bias_std=0.5)
    model.save_pretrained(wd / "hf_src")
    torch.save(logits(model), wd / "logits_hf_src.pt")


def _subset(n: int, k: int, g) -> list[int]:
    return torch.randperm(n, generator=g)[:k].tolist()  # random members, random order


def _grouped(n: int, groups: int, k_per: int, g) -> list[int]:
    per = n // groups
    return [gi * per + j for gi in range(groups) for j in _subset(per, k_per, g)]


def random_plan(cfg, g, hidden, mamba_per_group, channels, ffn, attn_per_group, drop):
    """Random keep sets for every axis (no scores: the rewrite must not care where they
    came from); `drop` = source layer ids dropped."""
    from megatron_minitron.plan.targets import assemble_plan

    layers = {}
    for i, t in enumerate(cfg.pattern):
        if t == "M":
            layers[i] = {"mamba_heads": _grouped(cfg.mamba_num_heads, cfg.mamba_num_groups, mamba_per_group, g),
                         "mamba_channels": _subset(cfg.mamba_head_dim, channels, g)}
        elif t == "-":
            layers[i] = {"ffn": _subset(cfg.ffn_hidden_size, ffn, g)}
        else:
            layers[i] = {"attention_heads": _grouped(cfg.num_attention_heads, cfg.num_query_groups,
                                                     attn_per_group, g)}
    return assemble_plan(cfg, _subset(cfg.hidden_size, hidden, g), layers, dropped=drop)


PLANS = {  # name: (prune at tp, random_plan arguments)
    "every_axis_tp2": (2, dict(hidden=48, mamba_per_group=2, channels=12, ffn=62, attn_per_group=1, drop=[2, 7])),
    "every_axis_tp1": (1, dict(hidden=40, mamba_per_group=3, channels=10, ffn=50, attn_per_group=2, drop=[5, 0])),
    "every_axis_b_tp2": (2, dict(hidden=56, mamba_per_group=1, channels=7, ffn=30, attn_per_group=1, drop=[1, 3, 4])),
}


def par(wd: Path):
    import torch.distributed as dist

    from megatron_minitron import dist as D
    from megatron_minitron.config import ParallelConfig
    from megatron_minitron.hf.stage import ImportHFConfig, run_import_hf
    from megatron_minitron.rewrite.stage import PruneConfig, run_prune
    from megatron_minitron.train import checkpoint as ckpt

    run_import_hf(ImportHFConfig(hf_dir=str(wd / "hf_src"), output_dir=str(wd / "src")), shutdown=False)
    if dist.get_rank() == 0:
        cfg = ckpt.read_model_config(wd / "src")
        g = torch.Generator().manual_seed(2024)
        for name, (_, kw) in PLANS.items():
            random_plan(cfg, g, **kw).save(wd / f"plan_{name}.json")
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
    for name, tp in [(n, tp) for n, (tp, _) in PLANS.items()] + [("zero", 2)]:
        run_prune(PruneConfig(checkpoint=str(wd / "src"), plan=str(wd / f"plan_{name}.json"),
                              output=str(wd / f"pruned_{name}"), parallel=ParallelConfig(tp=tp)))
    D.shutdown()


def exp(wd: Path):
    from transformers import AutoModelForCausalLM

    from megatron_minitron.hf.stage import ExportHFConfig, run_export_hf

    src_cfg = json.loads((wd / "hf_src" / "config.json").read_text())
    # the in-memory names (the saved file may use the checkpoint's 'backbone.' names)
    sd = {k: v.detach().clone() for k, v in
          AutoModelForCausalLM.from_pretrained(wd / "hf_src").float().state_dict().items()}
    res = {}
    for name in list(PLANS) + ["zero"]:
        plan = json.loads((wd / f"plan_{name}.json").read_text())
        run_export_hf(ExportHFConfig(checkpoint=str(wd / f"pruned_{name}"), output_dir=str(wd / f"exp_{name}"),
                                     dtype="fp32", tokenizer="none"), shutdown=False)
        got = logits(AutoModelForCausalLM.from_pretrained(wd / f"exp_{name}").float())
        ref = oracle_logits(sd, src_cfg, plan)
        src = torch.load(wd / "logits_hf_src.pt")
        r = {"max_abs_vs_oracle": (got - ref).abs().max().item(),
             "oracle_vs_source": (ref - src).abs().max().item(),
             "logit_scale": ref.abs().max().item(), "target": plan["target"]}
        if name == "zero":
            r["max_abs_vs_zeroed_source"] = (got - zeroed_logits(sd, plan)).abs().max().item()
        # a deliberately wrong slicer (first k of everything, the bug the issue names) must
        # be far from the pruned model: the comparison can fail
        wrong = json.loads(json.dumps(plan))
        for e in wrong["layers"].values():
            for a, v in e.items():
                e[a] = sorted(v) if a in ("mamba_heads", "attention_heads") else list(range(len(v)))
        wrong["hidden"] = list(range(len(plan["hidden"])))
        r["max_abs_vs_first_k_slicer"] = (got - oracle_logits(sd, src_cfg, wrong)).abs().max().item()
        res[name] = r
    from megatron_minitron import dist as D

    D.shutdown()
    (wd / "result_oracle.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    phase, workdir = sys.argv[1], Path(sys.argv[2])
    {"make": make, "par": par, "exp": exp}[phase](workdir)
