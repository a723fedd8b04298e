"""Independent oracle for the MoE importance scores (issue 19 item 1): a transformers NemotronH
MoE model and a brute-force recomputation of every expert score from what its modules see,
one token assignment at a time in float64. Imports torch and transformers only (no project
code: tests/dist/test_moe_dist.py checks that), so it shares nothing with the stats hooks.

The quantities (the importance file's definitions, io.py):
  out[e]        sum over tokens routed to e of ||fc2_latent_proj(w * expert_e(x))||_2 (identity
                projection without latent MoE); w = the router's top-k weight (normalised,
                times routed_scaling_factor: what multiplies the expert's output)
  mass[e]       sum of those w;  freq[e]  number of assignments
  expert_ffn    [E, I]: sqrt(mean over e's routed tokens of (w * relu2(x W_up[e]^T))^2)
  shared_ffn    [S]: sqrt(sum over samples of (mean over the sequence of |shared act|)^2)
"""

from __future__ import annotations

import torch

# vocab 4096: the real-data tokenizer the MoE dist test calibrates on
BASE = dict(
    vocab_size=4096, hidden_size=64,
    layers_block_type=["linear_attention", "moe", "full_attention", "moe", "mlp"],
    intermediate_size=96, mlp_hidden_act="relu2", num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=8, conv_kernel=4,
    chunk_size=16, max_position_embeddings=64, layer_norm_epsilon=1e-5, tie_word_embeddings=False,
    n_routed_experts=8, moe_intermediate_size=32, moe_shared_expert_intermediate_size=48,
    n_shared_experts=1, num_experts_per_tok=2, norm_topk_prob=True, routed_scaling_factor=2.5,
    n_group=1, topk_group=1, moe_latent_size=None,
)
VARIANTS = {"plain": {}, "latent": {"moe_latent_size": 24}}


def build(variant: str, time_step_min: float):
    """A random-weight fp32 NemotronHForCausalLM with a random score-correction bias (so the
    bias changes some choices). Weights: 0.15 N for matrices, 1 + 0.3 N for vectors."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    cfg = NemotronHConfig(**{**BASE, **VARIANTS[variant]}, time_step_min=time_step_min)
    torch.manual_seed(0)
    model = NemotronHForCausalLM(cfg).float().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=g) * 4 + 0.5))
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape, generator=g) - 2.0)
            elif p.dim() == 1:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
        for name, mod in model.named_modules():
            if name.endswith("mixer.gate"):
                mod.e_score_correction_bias.copy_(0.1 * torch.randn(mod.e_score_correction_bias.shape,
                                                                    generator=g))
    return model


def _relu2(x):
    return torch.relu(x) ** 2


def expert_scores(model, tokens: torch.Tensor, batch: int = 2) -> dict:
    """{layer id: {"out", "mass", "freq", "expert_ffn", "shared_ffn"}} over `tokens` [N, S]
    (forwards of `batch` samples), plus "_check": the largest difference between the brute
    force's summed expert outputs and the experts module's own output (the recomputation
    is the module's function), and "_bias_changed": assignments the correction bias moved."""
    cfg = model.config
    moe = {i: layer.mixer for i, layer in enumerate(model.model.layers)
           if type(layer.mixer).__name__ == "NemotronHMoE"}
    E, I = cfg.n_routed_experts, cfg.moe_intermediate_size
    res = {i: {"out": torch.zeros(E, dtype=torch.float64), "mass": torch.zeros(E, dtype=torch.float64),
               "freq": torch.zeros(E, dtype=torch.float64), "sumsq": torch.zeros(E, I, dtype=torch.float64),
               "shared_sumsq": torch.zeros(cfg.moe_shared_expert_intermediate_size, dtype=torch.float64)}
           for i in moe}
    seen: dict = {}
    handles = []
    for i, m in moe.items():
        handles.append(m.gate.register_forward_hook(
            lambda mod, a, o, i=i: seen.setdefault(i, {}).update(logits=o[0].detach().double(),
                                                                 w=o[1].detach().double(), idx=o[2].detach())))
        handles.append(m.experts.register_forward_pre_hook(
            lambda mod, a, i=i: seen[i].update(x=a[0].detach().double())))
        handles.append(m.experts.register_forward_hook(
            lambda mod, a, o, i=i: seen[i].update(y=o.detach().double())))
        handles.append(m.shared_experts.down_proj.register_forward_pre_hook(
            lambda mod, a, i=i: seen[i].update(shared=a[0].detach().double())))  # [B, S, shared]
    check, changed = 0.0, 0
    try:
        with torch.no_grad():
            for b0 in range(0, tokens.shape[0], batch):
                seen.clear()
                model(input_ids=tokens[b0:b0 + batch])
                for i, m in moe.items():
                    s, r = seen[i], res[i]
                    up, down = m.experts.up_proj.double(), m.experts.down_proj.double()  # [E,I,d], [E,d,I]
                    lat = m.fc2_latent_proj.weight.double() if cfg.moe_latent_size else None
                    recon = torch.zeros_like(s["y"])
                    for t in range(s["x"].shape[0]):
                        for k in range(s["idx"].shape[1]):
                            e, w = int(s["idx"][t, k]), float(s["w"][t, k])
                            a = _relu2(up[e] @ s["x"][t]) * w  # the down projection's input
                            y = down[e] @ a
                            recon[t] += y
                            yh = lat @ y if lat is not None else y
                            r["out"][e] += yh.norm()
                            r["mass"][e] += w
                            r["freq"][e] += 1
                            r["sumsq"][e] += a * a
                    check = max(check, (recon - s["y"]).abs().max().item())
                    # the correction bias decides some choices (else out/mass ranks are trivial)
                    plain = s["logits"].sigmoid().topk(s["idx"].shape[1], dim=-1).indices.sort(-1).values
                    changed += int((plain != s["idx"].sort(-1).values).any(-1).sum())
                    r["shared_sumsq"] += s["shared"].abs().mean(dim=1).pow(2).sum(dim=0)
    finally:
        for h in handles:
            h.remove()
    out: dict = {"_check": check, "_bias_changed": changed}
    for i, r in res.items():
        n = r["freq"].clamp_min(1).unsqueeze(1)
        out[i] = {"out": r["out"], "mass": r["mass"], "freq": r["freq"],
                  "expert_ffn": (r["sumsq"] / n).sqrt(), "shared_ffn": r["shared_sumsq"].sqrt()}
    return out
