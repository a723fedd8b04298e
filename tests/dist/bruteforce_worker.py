"""Depth KL and FLAP scores against brute force (tests/dist/test_bruteforce_dist.py).

  par   (2 processes): a tiny hybrid checkpoint written at TP=2 (every 1-D weight
                       perturbed); the `stats` stage at TP=2 (the code under test: hooks,
                       TP gathers, vocab-parallel KL with a layer skipped); rank 0 runs `plan`
                       with mamba_metric=flap (every axis pruned, one layer dropped by depth
                       KL); `prune` at TP=2.
  brute (1 process):   export-hf of the checkpoint; the SAME calibration samples (megatron's
                       GPTDataset, as stats reads them) through transformers' NemotronH:
                       - depth: for each layer l a separately built model WITHOUT layer l
                         (its state dict renumbered), KL(p_full || p_without_l) per token in
                         fp64, mean over the depth samples' tokens;
                       - FLAP: out_proj inputs captured with a hook, then a plain python loop
                         per column j: ||W_out[:, j]||^2 * unbiased Var(y_j) over all tokens;
                       - the plan's FLAP choice: channel set and per-group head sets found by
                         enumerating every subset (itertools.combinations) and maximizing the
                         summed column scores (the definition, not a top-k);
                       - the pruned checkpoint's export vs oracle_worker.slice_hf of the
                         source export (stats -> plan -> prune end to end).
"""

import itertools
import json
import math
import sys
from pathlib import Path

import torch

from megatron_minitron.config import DataConfig, ModelConfig, ParallelConfig

MODEL = ModelConfig(
    pattern="M-*M-", hidden_size=48, ffn_hidden_size=64, mamba_num_heads=8, mamba_head_dim=8,
    mamba_num_groups=2, mamba_state_dim=8, mamba_chunk_size=16, num_attention_heads=4,
    num_query_groups=2, kv_channels=12, vocab_size=4096, seq_length=32,
)
SAMPLES, DEPTH, MBS = 6, 4, 2
KEEP_HEADS, KEEP_CH = 4, 5  # plan target: 2 of 4 heads per group, 5 of 8 channels


def data_cfg(wd: Path) -> DataConfig:
    info = json.loads((wd / "data.json").read_text())
    return DataConfig(prefix=info["prefix"], tokenizer=info["tokenizer"])


def par(wd: Path):
    import torch.distributed as dist

    from megatron_minitron import dist as D
    from megatron_minitron.importance.stage import StatsConfig, run_stats
    from megatron_minitron.model import build_model
    from megatron_minitron.plan.stage import PlanConfig, run_plan
    from megatron_minitron.plan.targets import TargetConfig
    from megatron_minitron.rewrite.stage import PruneConfig, run_prune
    from megatron_minitron.train import checkpoint as ckpt

    p = D.init(ParallelConfig(tp=2), seed=5)
    model = build_model(MODEL, p)
    g = torch.Generator().manual_seed(7)  # same stream on both ranks: replicated params agree
    with torch.no_grad():
        for n, prm in model.named_parameters():
            if prm.dim() == 1:
                prm.add_(0.3 * torch.randn(prm.shape, generator=g))
            else:  # larger weights: dropping a layer changes the output visibly
                prm.mul_(3.0)
    ckpt.save(wd / "src", 0, MODEL, {"model": model.sharded_state_dict()}, {"kind": "bruteforce"})
    run_stats(StatsConfig(checkpoint=str(wd / "src"), output_dir=str(wd / "stats"), parallel=ParallelConfig(tp=2),
                          data=data_cfg(wd), samples=SAMPLES, depth_samples=DEPTH, micro_batch_size=MBS))
    if dist.get_rank() == 0:
        run_plan(PlanConfig(importance=str(wd / "stats" / "importance.pt"), output_dir=str(wd / "plan"),
                            mamba_metric="flap", parallel=ParallelConfig(tp=2),
                            target=TargetConfig(mamba_num_heads=KEEP_HEADS, mamba_head_dim=KEEP_CH,
                                                hidden_size=40, ffn_hidden_size=48, num_layers=4)))
    dist.barrier()
    # ... -> prune at TP=2: the stats -> plan -> prune pipeline end to end
    run_prune(PruneConfig(checkpoint=str(wd / "src"), plan=str(wd / "plan" / "plan.json"),
                          output=str(wd / "pruned"), parallel=ParallelConfig(tp=2)))
    D.shutdown()


def calibration_tokens(wd: Path) -> torch.Tensor:
    from megatron_minitron.data.stage_data import datasets

    train, _, _ = datasets(data_cfg(wd), MODEL.seq_length, None, 1)
    return torch.stack([torch.as_tensor(train[i]["tokens"]).long() for i in range(SAMPLES)])


def without_layer(sd: dict, cfg, l: int):
    from transformers import NemotronHForCausalLM

    blocks = list(cfg.layers_block_type)
    out = {}
    for k, v in sd.items():
        if ".layers." not in k:
            out[k] = v
            continue
        pre, rest = k.split(".layers.", 1)
        i, tail = rest.split(".", 1)
        if int(i) != l:
            out[f"{pre}.layers.{int(i) - (int(i) > l)}.{tail}"] = v
    c = type(cfg).from_dict({**cfg.to_dict(), "layers_block_type": blocks[:l] + blocks[l + 1:]})
    m = NemotronHForCausalLM(c).float()
    m.load_state_dict(out, strict=True)
    return m.eval()


def brute(wd: Path):
    from transformers import AutoModelForCausalLM

    from megatron_minitron import dist as D
    from megatron_minitron.hf.stage import ExportHFConfig, run_export_hf

    run_export_hf(ExportHFConfig(checkpoint=str(wd / "src"), output_dir=str(wd / "hf"), dtype="fp32",
                                 tokenizer="none"), shutdown=False)
    run_export_hf(ExportHFConfig(checkpoint=str(wd / "pruned"), output_dir=str(wd / "hf_pruned"), dtype="fp32",
                                 tokenizer="none"), shutdown=False)
    toks = calibration_tokens(wd)
    D.shutdown()
    full = AutoModelForCausalLM.from_pretrained(wd / "hf").float().eval()
    sd = {k: v.detach().clone() for k, v in full.state_dict().items()}
    res = {}

    # ---- the pruned checkpoint vs the independent slicer of oracle_worker.py
    sys.path.insert(0, str(Path(__file__).parent))
    from oracle_worker import slice_hf
    from transformers import NemotronHForCausalLM

    plan = json.loads((wd / "plan" / "plan.json").read_text())
    src_cfg = json.loads((wd / "hf" / "config.json").read_text())
    sliced, over = slice_hf(sd, src_cfg, plan)
    ref = NemotronHForCausalLM(type(full.config).from_dict({**full.config.to_dict(), **over})).float().eval()
    ref.load_state_dict(sliced, strict=True)
    got = AutoModelForCausalLM.from_pretrained(wd / "hf_pruned").float().eval()
    with torch.no_grad():
        a, b = got(input_ids=toks, use_cache=False).logits, ref(input_ids=toks, use_cache=False).logits
        res["pruned_vs_oracle"] = (a - b).abs().max().item()
        res["pruned_vs_source"] = (a - full(input_ids=toks, use_cache=False).logits).abs().max().item()
    res["pruned_target"] = plan["target"]

    # ---- depth: KL(full || without l), fp64, mean over the depth samples' tokens
    with torch.no_grad():
        lp_full = torch.log_softmax(full(input_ids=toks[:DEPTH], use_cache=False).logits.double(), -1)
        kl = []
        for l in range(MODEL.num_layers):
            lp = torch.log_softmax(without_layer(sd, full.config, l)(input_ids=toks[:DEPTH], use_cache=False).logits.double(), -1)
            kl.append(float((lp_full.exp() * (lp_full - lp)).sum(-1).mean()))
    res["kl_brute"] = kl

    # ---- FLAP: capture out_proj inputs on all samples, then one column at a time
    caps = {}
    hooks = []
    for i, t in enumerate(MODEL.pattern):
        if t == "M":
            mod = full.model.layers[i].mixer.out_proj
            hooks.append(mod.register_forward_pre_hook(
                lambda m, a, i=i: caps.setdefault(i, []).append(a[0].detach().double())))
    with torch.no_grad():
        full(input_ids=toks, use_cache=False)
    for h in hooks:
        h.remove()
    flap = {}
    for i, ys in caps.items():
        y = torch.cat(ys).reshape(-1, ys[0].shape[-1])  # [tokens, d_inner]
        w = full.model.layers[i].mixer.out_proj.weight.double()
        n = y.shape[0]
        col = []
        for j in range(y.shape[1]):
            vals = y[:, j].tolist()
            mean = sum(vals) / n
            var = sum((v - mean) ** 2 for v in vals) / (n - 1)
            col.append(sum(float(x) ** 2 for x in w[:, j]) * var)
        flap[i] = col
    res["flap_brute"] = {str(k): v for k, v in flap.items()}

    # ---- the plan's FLAP head / channel choice by exhaustive search over subsets
    nh, hd, ng = MODEL.mamba_num_heads, MODEL.mamba_head_dim, MODEL.mamba_num_groups
    choice = {}
    for i, col in flap.items():
        S = [[col[h * hd + c] for c in range(hd)] for h in range(nh)]
        ch = max(itertools.combinations(range(hd), KEEP_CH), key=lambda cs: sum(S[h][c] for h in range(nh) for c in cs))
        per = nh // ng
        heads = []
        for gi in range(ng):
            members = range(gi * per, (gi + 1) * per)
            best = max(itertools.combinations(members, KEEP_HEADS // ng),
                       key=lambda hs: sum(S[h][c] for h in hs for c in ch))
            heads.append(sorted(best))
        choice[str(i)] = {"channels": sorted(ch), "heads": heads}
    res["flap_choice_brute"] = choice
    res["tokens"] = list(toks.shape)
    assert all(math.isfinite(x) for x in kl)
    (wd / "result_brute.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    phase, workdir = sys.argv[1], Path(sys.argv[2])
    {"par": par, "brute": brute}[phase](workdir)
