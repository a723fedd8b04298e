"""Hugging Face Nemotron-H <-> our checkpoints: config fields and tensor names/layouts.

Pure functions (no megatron, no transformers, no I/O). Tensors are exchanged in the
*global* layout of our distributed checkpoints (the keys megatron's dist_checkpointing
stores, TE names, whatever spec built the model), one layer at a time:

  HF (transformers NemotronHForCausalLM)        ours (global checkpoint key)
  backbone.embeddings.weight                        embedding.word_embeddings.weight
  backbone.layers.i.norm.weight          M          decoder.layers.i.mixer.in_proj.layer_norm_weight
                                      *          decoder.layers.i.self_attention.linear_qkv.layer_norm_weight
                                      -          decoder.layers.i.mlp.linear_fc1.layer_norm_weight
  backbone.layers.i.mixer.in_proj.weight [z|xBC|dt] decoder.layers.i.mixer.in_proj.weight.{z,x,B,C,dt}
  backbone.layers.i.mixer.conv1d.{weight,bias}      decoder.layers.i.mixer.conv1d.{weight,bias}.{x,B,C}
  backbone.layers.i.mixer.{A_log,D,dt_bias}         decoder.layers.i.mixer.{A_log,D,dt_bias}
  backbone.layers.i.mixer.norm.weight               decoder.layers.i.mixer.norm.weight (gated, per group)
  backbone.layers.i.mixer.out_proj.weight           decoder.layers.i.mixer.out_proj.weight
  backbone.layers.i.mixer.{q,k,v}_proj.weight       decoder.layers.i.self_attention.linear_qkv.weight
                                                 (rows per query group g: [q heads of g | k_g | v_g])
  backbone.layers.i.mixer.o_proj.weight             decoder.layers.i.self_attention.linear_proj.weight
  backbone.layers.i.mixer.up_proj.weight            decoder.layers.i.mlp.linear_fc1.weight
  backbone.layers.i.mixer.down_proj.weight          decoder.layers.i.mlp.linear_fc2.weight
                                      E          decoder.layers.i.pre_mlp_layernorm.weight
  backbone.layers.i.mixer.gate.weight [E, h]        decoder.layers.i.mlp.router.weight
  backbone.layers.i.mixer.gate.e_score_correction_bias  decoder.layers.i.mlp.router.expert_bias (fp32 buffer)
  backbone.layers.i.mixer.experts.{e}.up_proj.weight    decoder.layers.i.mlp.experts.experts.linear_fc1.weight [E, f, d]
  backbone.layers.i.mixer.experts.{e}.down_proj.weight  decoder.layers.i.mlp.experts.experts.linear_fc2.weight [E, d, f]
                                                 (one tensor per expert <-> one stacked tensor, row e)
  backbone.layers.i.mixer.shared_experts.{up,down}_proj.weight  decoder.layers.i.mlp.shared_experts.linear_fc{1,2}.weight
  backbone.layers.i.mixer.fc{1,2}_latent_proj.weight            decoder.layers.i.mlp.fc{1,2}_latent_proj.weight
  backbone.norm_f.weight                            decoder.final_norm.weight
  lm_head.weight                                 output_layer.weight (absent when tied)

Both sides order in_proj rows [z | x | B | C | dt] and conv channels [x | B | C]; heads are
head-major (row h*head_dim + p) on both sides, so only the fused attention projection is
re-ordered. On disk transformers (and NVIDIA's released checkpoints) name the base model
`backbone.`; in memory it is `model.` (transformers renames on load): we write `backbone.`
and read either. Multi-token-prediction tensors (`mtp.*`) have no counterpart (megatron-core
0.16's hybrid model has no MTP): import refuses them unless told to drop them.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Iterator, Optional

import torch

from ..config import ConfigError, ModelConfig

# megatron-core's MambaMixer builds its gated RMSNorm with eps=1e-5 whatever the config
# says; transformers uses layer_norm_epsilon for it. Only this value agrees in both.
MAMBA_GATED_NORM_EPS = 1e-5

# The Mamba dt clamp: dt = softplus(dt + dt_bias) is clamped to config.json `time_step_limit`
# [lo, hi] (legacy name mamba_dt_limit; default [0, inf] = none), as mamba_ssm's kernels and
# transformers >= 5.25's torch path do; time_step_min / time_step_max only set dt_bias's init.
# megatron-core never clamps: import keeps a clamp as model.mamba_dt_clamp_min / max
# (compat/dt_limit.py applies it), export writes time_step_limit back.
# time_step_min is written as the model's lower clamp, or for a model without one as the
# smallest normal fp32 number: transformers <= 5.24's CPU path clamped at time_step_min (not
# time_step_limit), and softplus never returns a positive value below it in fp32 except by
# underflowing to 0; at dt <= 1.2e-38 both exp(dt*A) and dt*x*B are exactly 1 and 0 in fp32,
# so that clamp is a no-op there while the value stays a usable (finite-log) init bound.
EXPORT_TIME_STEP_MIN = float(torch.finfo(torch.float32).tiny)

ACT_TO_HF = {"squared_relu": "relu2", "relu": "relu", "gelu": "gelu"}
ACT_FROM_HF = {v: k for k, v in ACT_TO_HF.items()}
PATTERN_FROM_HF = {"mamba": "M", "linear_attention": "M", "attention": "*",
                   "full_attention": "*", "mlp": "-", "moe": "E"}
LAYER_TYPE_TO_HF = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}

MAMBA_PARTS = ("z", "x", "B", "C", "dt")  # in_proj rows, in order
CONV_PARTS = ("x", "B", "C")  # conv1d channels, in order


class HFMappingError(ConfigError):
    """An HF folder or one of our checkpoints cannot be represented on the other side."""


# ----------------------------------------------------------------------------- config


def hf_pattern(hf: dict) -> str:
    """The layer pattern of an HF config dict (layers_block_type list or legacy string)."""
    types = hf.get("layers_block_type") or hf.get("layer_types")
    if types:
        bad = [t for t in types if t not in PATTERN_FROM_HF]
        if bad:
            raise HFMappingError(f"config.json layers_block_type has unknown layer types {sorted(set(bad))}")
        return "".join(PATTERN_FROM_HF[t] for t in types)
    pat = hf.get("hybrid_override_pattern")
    if not pat:
        raise HFMappingError("config.json has neither layers_block_type nor hybrid_override_pattern")
    return pat


def _json_float(x) -> float:
    """A config.json number: plain (Python's json reads Infinity) or transformers' encoding of
    non-finite floats, {"__float__": "Infinity"}."""
    if isinstance(x, dict) and set(x) == {"__float__"}:
        x = x["__float__"]
    if isinstance(x, bool) or not isinstance(x, (int, float, str)):
        raise ValueError(x)
    return float(x)


# an upper dt bound this large is the 'none' some configs spell as a number: softplus(x)
# reaches it only for x >= 1e30, and exp(A * dt) underflows to 0 long before
UNBOUNDED_DT = 1e30


def hf_dt_limit(hf: dict) -> tuple[float, float]:
    """The Mamba dt clamp (lo, hi) config.json asks for: time_step_limit (transformers reads
    a legacy mamba_dt_limit in its place), default (0, inf) = none. Refused, naming the
    field, when it is not a range transformers and the kernels clamp to meaningfully."""
    key = "mamba_dt_limit" if "mamba_dt_limit" in hf else "time_step_limit"
    lim = hf.get(key)
    if lim is None:
        return (0.0, math.inf)
    try:
        lo, hi = (_json_float(x) for x in lim)
    except (TypeError, ValueError):
        raise HFMappingError(f"config.json {key}={lim!r} is not supported: give [min, max], "
                             "e.g. [0.0, Infinity] (no clamp)") from None
    if math.isnan(lo) or math.isnan(hi) or hi <= max(lo, 0.0):
        raise HFMappingError(f"config.json {key}={lim!r} is not supported: the Mamba dt clamp "
                             "must be a range min < max with max > 0, e.g. [0.0, Infinity] (no clamp)")
    if hi >= UNBOUNDED_DT:
        hi = math.inf  # e.g. [0.0, 1e30]: no dt reaches it, so no clamp (and no clamp hooks)
    return (max(lo, 0.0), hi)  # softplus >= 0: a negative lower bound clamps nothing


def model_config_from_hf(hf: dict, params_dtype: str = "fp32",
                         ignore_time_step_limit: bool = False) -> ModelConfig:
    """HF NemotronH config.json dict -> ModelConfig. Refuses, naming the field, whatever our
    megatron model would compute differently."""
    g = lambda k, d=None: hf.get(k, d)  # noqa: E731

    def refuse(field: str, value, why: str) -> None:
        raise HFMappingError(f"config.json {field}={value!r} is not supported: {why}")

    mt = g("model_type", "nemotron_h")
    if mt != "nemotron_h":
        refuse("model_type", mt, "only Nemotron-H (model_type nemotron_h) folders can be imported")
    pattern = hf_pattern(hf)
    bad = set(pattern) - set("M*-E")
    if bad:
        refuse("hybrid_override_pattern", pattern, f"unknown layer symbols {sorted(bad)}")
    act = g("mlp_hidden_act", "relu2")
    if ("-" in pattern or "E" in pattern) and act not in ACT_FROM_HF:
        refuse("mlp_hidden_act", act, f"supported: {sorted(ACT_FROM_HF)} (MLPs and experts are ungated)")
    if g("mamba_hidden_act", "silu") not in ("silu", "swish"):
        refuse("mamba_hidden_act", g("mamba_hidden_act"), "megatron's Mamba mixer uses silu")
    for key in ("use_bias", "mlp_bias", "attention_bias"):
        if g(key, False):
            refuse(key, True, "our model has no linear biases (add_bias_linear=False)")
    if g("sliding_window") is not None:
        refuse("sliding_window", g("sliding_window"), "attention is full causal in our model")
    eps = float(g("layer_norm_epsilon", 1e-5))
    if "M" in pattern and eps != MAMBA_GATED_NORM_EPS:
        refuse("layer_norm_epsilon", eps, f"transformers uses it inside the Mamba gated norm, "
               f"megatron-core hard-codes {MAMBA_GATED_NORM_EPS} there")
    # the dt clamp transformers and the kernels apply (time_step_min is an init bound only)
    lo, hi = hf_dt_limit(hf) if "M" in pattern else (0.0, math.inf)
    if ignore_time_step_limit:
        lo, hi = 0.0, math.inf
    hd = g("head_dim") or (g("hidden_size") // g("num_attention_heads"))
    nh = int(g("mamba_num_heads"))
    cfg = ModelConfig(
        pattern=pattern,
        hidden_size=int(g("hidden_size")),
        ffn_hidden_size=int(g("intermediate_size")),
        activation=ACT_FROM_HF.get(act, "squared_relu"),
        mamba_num_heads=nh,
        mamba_head_dim=int(g("mamba_head_dim")),
        mamba_num_groups=int(g("n_groups", g("mamba_n_groups", 8))),
        mamba_state_dim=int(g("ssm_state_size")),
        mamba_conv_kernel=int(g("conv_kernel", g("mamba_d_conv", 4))),
        mamba_chunk_size=int(g("chunk_size", g("mamba_chunk_size", 128))),
        mamba_dt_clamp_min=lo,
        mamba_dt_clamp_max=0.0 if math.isinf(hi) else hi,
        num_attention_heads=int(g("num_attention_heads")),
        num_query_groups=int(g("num_key_value_heads") or g("num_attention_heads")),
        kv_channels=int(hd),
        vocab_size=int(g("vocab_size")),
        seq_length=int(g("max_position_embeddings", 4096)),
        norm_epsilon=eps,
        # transformers' NemotronHAttention applies no positional embedding (NoPE)
        position_embedding="none",
        untie_embeddings=not bool(g("tie_word_embeddings", False)),
        init_method_std=float(g("initializer_range", 0.02)),
        params_dtype=params_dtype,
        **(moe_config_from_hf(hf) if "E" in pattern else {}),
    )
    cfg.validate()
    return cfg


def moe_config_from_hf(hf: dict) -> dict:
    """The ModelConfig MoE fields of an HF config with "moe" layers. transformers' router
    (NemotronHTopkRouter) is always sigmoid + e_score_correction_bias; refused, naming the
    field: whatever megatron's router / MoELayer would compute differently."""
    g = lambda k, d=None: hf.get(k, d)  # noqa: E731

    def refuse(field: str, value, why: str) -> None:
        raise HFMappingError(f"config.json {field}={value!r} is not supported: {why}")

    n = int(g("n_routed_experts") or g("num_local_experts") or 0)
    k = int(g("num_experts_per_tok", 2))
    if n <= 0:
        refuse("n_routed_experts", n, "layers_block_type has moe layers; give the routed experts per layer")
    ns = int(g("n_shared_experts", 1) or 0)
    if ns not in (0, 1):
        refuse("n_shared_experts", ns, "one shared expert or none (transformers' NemotronHMoE builds "
               "a single shared MLP of width moe_shared_expert_intermediate_size)")
    norm = bool(g("norm_topk_prob", True))
    if k > 1 and not norm:
        refuse("norm_topk_prob", False, f"megatron's sigmoid router always divides the top-k weights "
               f"by their sum when num_experts_per_tok > 1 (here {k})")
    if k == 1 and norm:
        refuse("norm_topk_prob", True, "with num_experts_per_tok=1 transformers' weight is score/score "
               "= 1 (x routed_scaling_factor); megatron's sigmoid router keeps the sigmoid score "
               "itself for top-1 (a folder with norm_topk_prob=false imports)")
    ng, tg = int(g("n_group", 1) or 1), int(g("topk_group", 1) or 1)
    if ng > 1 and n % ng:
        refuse("n_group", ng, f"n_routed_experts={n} is not divisible by it")
    if ng > 1 and tg >= ng:
        ng = tg = 1  # every group is selected: grouped routing is the identity on both sides
    if ng > 1 and (k % tg or k // tg != 2):
        refuse("topk_group", tg, f"grouped routing (n_group={ng}): transformers scores each group by "
               f"the sum of its top 2 experts, megatron by its top num_experts_per_tok / topk_group = "
               f"{k}/{tg} experts; only num_experts_per_tok = 2 x topk_group agrees")
    # transformers' shared MLP: NemotronHMLP(intermediate_size=moe_shared_expert_intermediate_size
    # or intermediate_size), built whatever n_shared_experts says (0: stage checks it is zero)
    s = int(g("moe_shared_expert_intermediate_size") or g("intermediate_size")) if ns else 0
    return dict(
        num_moe_experts=n,
        moe_ffn_hidden_size=int(g("moe_intermediate_size")),
        moe_router_topk=k,
        moe_shared_expert_intermediate_size=s,
        moe_router_score_function="sigmoid",
        moe_router_expert_bias=True,
        moe_router_topk_scaling_factor=float(g("routed_scaling_factor", 1.0) or 1.0),
        moe_router_num_groups=ng,
        moe_router_group_topk=tg,
        moe_latent_size=int(g("moe_latent_size") or 0),
    )


def hf_config_from_model(cfg: ModelConfig, torch_dtype: str = "float32",
                         special_tokens: Optional[dict] = None) -> dict:
    """ModelConfig -> HF config.json dict (transformers NemotronHConfig field names).
    Refuses, naming the field, anything transformers' NemotronH would compute differently."""

    def refuse(field: str, value, why: str) -> None:
        raise HFMappingError(f"model.{field}={value!r} cannot be exported to Nemotron-H: {why}")

    pattern = cfg.pattern.replace("|", "")
    if "*" in pattern and cfg.position_embedding != "none":
        refuse("position_embedding", cfg.position_embedding,
               "transformers' NemotronHAttention applies no positional embedding; only models "
               "built with model.position_embedding=none (as Nemotron-H is) can be exported")
    if ("-" in pattern or "E" in pattern) and cfg.activation not in ACT_TO_HF:
        refuse("activation", cfg.activation, f"NemotronH MLPs and experts are not gated; exportable: "
               f"{sorted(ACT_TO_HF)}")
    if "M" in pattern and cfg.norm_epsilon != MAMBA_GATED_NORM_EPS:
        refuse("norm_epsilon", cfg.norm_epsilon, "transformers uses layer_norm_epsilon in the "
               f"Mamba gated norm where megatron-core uses {MAMBA_GATED_NORM_EPS}")
    st = special_tokens or {}
    hf = {
        "architectures": ["NemotronHForCausalLM"],
        "model_type": "nemotron_h",
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "layers_block_type": [LAYER_TYPE_TO_HF[c] for c in pattern],
        "hybrid_override_pattern": pattern,  # legacy readers (remote-code NemotronH)
        "num_hidden_layers": len(pattern),
        "intermediate_size": cfg.ffn_hidden_size,
        "mlp_hidden_act": ACT_TO_HF.get(cfg.activation, "relu2"),
        "mlp_bias": False,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.kv_channels,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "max_position_embeddings": cfg.seq_length,
        "mamba_num_heads": cfg.mamba_num_heads,
        "mamba_head_dim": cfg.mamba_head_dim,
        "n_groups": cfg.mamba_num_groups,
        "ssm_state_size": cfg.mamba_state_dim,
        "conv_kernel": cfg.mamba_conv_kernel,
        "chunk_size": cfg.mamba_chunk_size,
        "expand": max(1, round(cfg.mamba_d_inner / cfg.hidden_size)),  # unused by the math
        "mamba_hidden_act": "silu",
        "use_conv_bias": True,
        "use_bias": False,
        "mamba_proj_bias": False,
        # the dt clamp our model applies ([0.0, Infinity] = none; json writes Infinity, as
        # NVIDIA's released configs spell it, and transformers reads it back as inf)
        "time_step_limit": [cfg.mamba_dt_clamp_min, cfg.mamba_dt_clamp_max or math.inf],
        # init bounds only for transformers >= 5.25; <= 5.24 clamped at time_step_min (see
        # EXPORT_TIME_STEP_MIN), so it is the lower clamp or the no-op value
        "time_step_min": cfg.mamba_dt_clamp_min or EXPORT_TIME_STEP_MIN,
        "time_step_max": 0.1,
        "time_step_floor": 1e-4,
        "layer_norm_epsilon": cfg.norm_epsilon,
        "residual_in_fp32": False,
        "rescale_prenorm_residual": True,
        "hidden_dropout": 0.0,
        "initializer_range": cfg.init_method_std,
        "tie_word_embeddings": not cfg.untie_embeddings,
        "use_cache": True,
        "num_logits_to_keep": 1,
        # our hybrid model has no multi-token-prediction layers (import drops them, drop_mtp)
        "num_nextn_predict_layers": 0,
    }
    if "E" in pattern:
        hf.update(moe_hf_config(cfg, refuse))
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        hf[k] = st.get(k)
    return hf


# the shared-MLP width written for a model without a shared expert: transformers always builds
# one (width moe_shared_expert_intermediate_size, or intermediate_size when 0); export writes
# zero weights of this width, whose output is exactly 0 (every exportable activation has f(0) = 0)
NO_SHARED_EXPERT_WIDTH = 1


def moe_hf_config(cfg: ModelConfig, refuse) -> dict:
    """HF config fields of our E layers; refuses what transformers' router computes otherwise."""
    n, k = cfg.num_moe_experts, cfg.moe_router_topk
    if cfg.moe_router_score_function != "sigmoid":
        refuse("moe_router_score_function", cfg.moe_router_score_function, "transformers' "
               "NemotronHTopkRouter always scores experts with a sigmoid")
    g, gk = cfg.moe_router_num_groups, cfg.moe_router_group_topk
    if g > 1 and gk < g and k // gk != 2:
        refuse("moe_router_group_topk", gk, f"grouped routing: megatron scores each of the "
               f"{g} groups by the sum of its top moe_router_topk / group_topk = {k}/{gk} experts, "
               "transformers by its top 2; only moe_router_topk = 2 x group_topk agrees")
    if n // g < 2:
        refuse("num_moe_experts", n, f"transformers' router takes the top 2 scores of each group of "
               f"experts; {g} group(s) of {n // g} expert(s) cannot run there")
    s = cfg.moe_shared_expert_intermediate_size
    return {
        "n_routed_experts": n,
        "num_experts_per_tok": k,
        "moe_intermediate_size": cfg.moe_ffn_hidden_size,
        "n_shared_experts": 1 if s else 0,
        "moe_shared_expert_intermediate_size": s or NO_SHARED_EXPERT_WIDTH,
        "moe_shared_expert_overlap": False,
        "moe_latent_size": cfg.moe_latent_size or None,
        "routed_scaling_factor": cfg.moe_router_topk_scaling_factor,
        "n_group": g,
        "topk_group": gk,
        # megatron normalises the top-k sigmoid weights exactly when k > 1
        "norm_topk_prob": k > 1,
    }


# ----------------------------------------------------------------------------- layout


def mamba_part_sizes(cfg: ModelConfig) -> dict:
    gn = cfg.mamba_num_groups * cfg.mamba_state_dim
    d = cfg.mamba_d_inner
    return {"z": d, "x": d, "B": gn, "C": gn, "dt": cfg.mamba_num_heads}


def qkv_merge(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """HF q/k/v_proj [heads*kv, h], [groups*kv, h] x2 -> megatron linear_qkv rows, interleaved
    per query group: [q heads of group g (heads/groups * kv rows) | k_g (kv) | v_g (kv)]."""
    ng, kvc = cfg.num_query_groups, cfg.kv_channels
    r = cfg.num_attention_heads // ng
    h = q.shape[-1]
    qg = q.reshape(ng, r * kvc, h)
    kg = k.reshape(ng, kvc, h)
    vg = v.reshape(ng, kvc, h)
    return torch.cat([qg, kg, vg], dim=1).reshape(ng * (r + 2) * kvc, h)


def qkv_split(w: torch.Tensor, cfg: ModelConfig):
    """Inverse of qkv_merge."""
    ng, kvc = cfg.num_query_groups, cfg.kv_channels
    r = cfg.num_attention_heads // ng
    h = w.shape[-1]
    wg = w.reshape(ng, (r + 2) * kvc, h)
    q = wg[:, : r * kvc].reshape(ng * r * kvc, h)
    k = wg[:, r * kvc: (r + 1) * kvc].reshape(ng * kvc, h)
    v = wg[:, (r + 1) * kvc:].reshape(ng * kvc, h)
    return q.contiguous(), k.contiguous(), v.contiguous()


def _norm_key(kind: str, i: int) -> str:
    return {
        "M": f"decoder.layers.{i}.mixer.in_proj.layer_norm_weight",
        "*": f"decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight",
        "-": f"decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight",
        "E": f"decoder.layers.{i}.pre_mlp_layernorm.weight",  # a separate norm before the MoELayer
    }[kind]


# routed experts: one HF tensor per expert <-> one stacked global tensor [E, ...] (row e)
EXPERT_PROJ = (("up_proj", "linear_fc1"), ("down_proj", "linear_fc2"))


def moe_shapes(cfg: ModelConfig) -> dict:
    """HF name suffix (after backbone.layers.i.mixer.) -> shape, for one E layer. No shared
    expert: no shared tensors here (export writes zeros, see ours_to_hf; import checks any in
    the folder are zero, see hf_zero_tensors)."""
    h, n, f = cfg.hidden_size, cfg.num_moe_experts, cfg.moe_ffn_hidden_size
    d = cfg.moe_latent_size or h  # the experts' input / output width
    out = {"gate.weight": (n, h), "gate.e_score_correction_bias": (n,)}
    for e in range(n):
        out[f"experts.{e}.up_proj.weight"] = (f, d)
        out[f"experts.{e}.down_proj.weight"] = (d, f)
    s = cfg.moe_shared_expert_intermediate_size
    if s:
        out.update({"shared_experts.up_proj.weight": (s, h), "shared_experts.down_proj.weight": (h, s)})
    if cfg.moe_latent_size:
        out.update({"fc1_latent_proj.weight": (cfg.moe_latent_size, h),
                    "fc2_latent_proj.weight": (h, cfg.moe_latent_size)})
    return out


def hf_zero_tensors(cfg: ModelConfig, unit: tuple[str, int]) -> list[str]:
    """HF tensors of a unit that our model does not have and that must therefore be absent or
    all zero: the shared MLP of an E layer imported as having none (config.json
    n_shared_experts=0; transformers ignores that field and applies the shared MLP anyway)."""
    if unit[0] != "layer" or cfg.pattern.replace("|", "")[unit[1]] != "E" or \
            cfg.moe_shared_expert_intermediate_size:
        return []
    p = f"backbone.layers.{unit[1]}.mixer.shared_experts."
    return [p + "up_proj.weight", p + "down_proj.weight"]


def layer_units(cfg: ModelConfig) -> list[tuple[str, int]]:
    """The units that are converted one at a time: ('embedding', -1), ('layer', i) for each
    layer, ('final', -1) (final norm + output layer)."""
    n = cfg.num_layers
    return [("embedding", -1)] + [("layer", i) for i in range(n)] + [("final", -1)]


def expected_hf_shapes(cfg: ModelConfig, unit: tuple[str, int]) -> dict:
    """HF tensor name -> shape for one unit."""
    h, kind_i = cfg.hidden_size, unit[1]
    if unit[0] == "embedding":
        return {"backbone.embeddings.weight": (cfg.vocab_size, h)}
    if unit[0] == "final":
        out = {"backbone.norm_f.weight": (h,)}
        if cfg.untie_embeddings:
            out["lm_head.weight"] = (cfg.vocab_size, h)
        return out
    kind = cfg.pattern.replace("|", "")[kind_i]
    p = f"backbone.layers.{kind_i}."
    out = {p + "norm.weight": (h,)}
    if kind == "M":
        s = mamba_part_sizes(cfg)
        conv = s["x"] + s["B"] + s["C"]
        nh = cfg.mamba_num_heads
        out.update({
            p + "mixer.in_proj.weight": (sum(s.values()), h),
            p + "mixer.conv1d.weight": (conv, 1, cfg.mamba_conv_kernel),
            p + "mixer.conv1d.bias": (conv,),
            p + "mixer.A_log": (nh,), p + "mixer.D": (nh,), p + "mixer.dt_bias": (nh,),
            p + "mixer.norm.weight": (cfg.mamba_d_inner,),
            p + "mixer.out_proj.weight": (h, cfg.mamba_d_inner),
        })
    elif kind == "*":
        q = cfg.num_attention_heads * cfg.kv_channels
        kv = cfg.num_query_groups * cfg.kv_channels
        out.update({p + "mixer.q_proj.weight": (q, h), p + "mixer.k_proj.weight": (kv, h),
                    p + "mixer.v_proj.weight": (kv, h), p + "mixer.o_proj.weight": (h, q)})
    elif kind == "E":
        out.update({p + "mixer." + k: v for k, v in moe_shapes(cfg).items()})
    else:
        out.update({p + "mixer.up_proj.weight": (cfg.ffn_hidden_size, h),
                    p + "mixer.down_proj.weight": (h, cfg.ffn_hidden_size)})
    return out


def exported_hf_shapes(cfg: ModelConfig, unit: tuple[str, int]) -> dict:
    """HF tensor name -> shape of what export writes for one unit: expected_hf_shapes plus
    the zero shared MLP of an E layer without a shared expert."""
    out = expected_hf_shapes(cfg, unit)
    w, h = NO_SHARED_EXPERT_WIDTH, cfg.hidden_size
    for name in hf_zero_tensors(cfg, unit):
        out[name] = (w, h) if name.endswith("up_proj.weight") else (h, w)
    return out


# tensors transformers keeps in fp32 whatever the model's dtype (its
# _keep_in_fp32_modules_strict): export writes them in fp32
HF_FP32_SUFFIXES = ("mixer.gate.e_score_correction_bias",)

# multi-token-prediction tensors (NVIDIA's Nemotron 3 releases): `mtp.layers.k....`
_MTP_RE = re.compile(r"^(?:(?:backbone|model)\.)?mtp\.")


def is_mtp(name: str) -> bool:
    return bool(_MTP_RE.match(name))


def mtp_layers(hf: dict, names) -> tuple[int, int]:
    """(MTP layers, mtp.* tensors) of an HF folder. Layers: config.json
    num_nextn_predict_layers (the `mtp.layers.k` indices count sub-layers of its
    mtp_layers_block_type, not MTP depths), at least 1 when there are mtp.* tensors."""
    n = sum(1 for x in names if is_mtp(x))
    return max(int(hf.get("num_nextn_predict_layers") or 0), 1 if n else 0), n


def hf_optional(name: str) -> bool:
    """HF tensors a folder may omit: conv bias (use_conv_bias=false -> zeros)."""
    return name.endswith("mixer.conv1d.bias")


def hf_to_ours(cfg: ModelConfig, unit: tuple[str, int], get: Callable[[str], Optional[torch.Tensor]]) -> dict:
    """One unit: HF tensors (fetched by name with `get`, None if absent) -> {global key: tensor}.
    Shapes are checked against `cfg`; a mismatch names the tensor, both shapes and the field."""
    t = {}
    for name, shape in expected_hf_shapes(cfg, unit).items():
        x = get(name)
        if x is None:
            if hf_optional(name):
                x = torch.zeros(shape)
            else:
                raise HFMappingError(f"tensor {name} is missing from the HF folder (expected shape {list(shape)})")
        if tuple(x.shape) != tuple(shape):
            raise HFMappingError(
                f"tensor {name} has shape {list(x.shape)} but config.json implies {list(shape)}; "
                "the folder's config.json and weights disagree")
        t[name] = x
    if unit[0] == "embedding":
        return {"embedding.word_embeddings.weight": t["backbone.embeddings.weight"]}
    if unit[0] == "final":
        out = {"decoder.final_norm.weight": t["backbone.norm_f.weight"]}
        if cfg.untie_embeddings:
            out["output_layer.weight"] = t["lm_head.weight"]
        return out
    i = unit[1]
    kind = cfg.pattern.replace("|", "")[i]
    p, o = f"backbone.layers.{i}.mixer.", f"decoder.layers.{i}."
    out = {_norm_key(kind, i): t[f"backbone.layers.{i}.norm.weight"]}
    if kind == "M":
        s = mamba_part_sizes(cfg)
        for part, x in zip(MAMBA_PARTS, torch.split(t[p + "in_proj.weight"], [s[k] for k in MAMBA_PARTS])):
            out[o + f"mixer.in_proj.weight.{part}"] = x
        cs = [s[k] for k in CONV_PARTS]
        for what in ("weight", "bias"):
            for part, x in zip(CONV_PARTS, torch.split(t[p + f"conv1d.{what}"], cs)):
                out[o + f"mixer.conv1d.{what}.{part}"] = x
        for n in ("A_log", "D", "dt_bias", "norm.weight", "out_proj.weight"):
            out[o + "mixer." + n] = t[p + n]
    elif kind == "*":
        out[o + "self_attention.linear_qkv.weight"] = qkv_merge(
            t[p + "q_proj.weight"], t[p + "k_proj.weight"], t[p + "v_proj.weight"], cfg)
        out[o + "self_attention.linear_proj.weight"] = t[p + "o_proj.weight"]
    elif kind == "E":
        out[o + "mlp.router.weight"] = t[p + "gate.weight"]
        if cfg.moe_router_expert_bias:
            out[o + "mlp.router.expert_bias"] = t[p + "gate.e_score_correction_bias"].float()
        for hf_n, ours_n in EXPERT_PROJ:
            out[o + f"mlp.experts.experts.{ours_n}.weight"] = torch.stack(
                [t[p + f"experts.{e}.{hf_n}.weight"] for e in range(cfg.num_moe_experts)])
        if cfg.moe_shared_expert_intermediate_size:
            out[o + "mlp.shared_experts.linear_fc1.weight"] = t[p + "shared_experts.up_proj.weight"]
            out[o + "mlp.shared_experts.linear_fc2.weight"] = t[p + "shared_experts.down_proj.weight"]
        if cfg.moe_latent_size:
            for n in ("fc1_latent_proj.weight", "fc2_latent_proj.weight"):
                out[o + "mlp." + n] = t[p + n]
    else:
        out[o + "mlp.linear_fc1.weight"] = t[p + "up_proj.weight"]
        out[o + "mlp.linear_fc2.weight"] = t[p + "down_proj.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def our_keys(cfg: ModelConfig, unit: tuple[str, int]) -> list[str]:
    """Global checkpoint keys of one unit (what ours_to_hf reads)."""
    if unit[0] == "embedding":
        return ["embedding.word_embeddings.weight"]
    if unit[0] == "final":
        return ["decoder.final_norm.weight"] + (["output_layer.weight"] if cfg.untie_embeddings else [])
    i = unit[1]
    kind = cfg.pattern.replace("|", "")[i]
    o = f"decoder.layers.{i}."
    keys = [_norm_key(kind, i)]
    if kind == "M":
        keys += [o + f"mixer.in_proj.weight.{p}" for p in MAMBA_PARTS]
        keys += [o + f"mixer.conv1d.{w}.{p}" for w in ("weight", "bias") for p in CONV_PARTS]
        keys += [o + "mixer." + n for n in ("A_log", "D", "dt_bias", "norm.weight", "out_proj.weight")]
    elif kind == "*":
        keys += [o + "self_attention.linear_qkv.weight", o + "self_attention.linear_proj.weight"]
    elif kind == "E":
        keys += [o + "mlp.router.weight"]
        keys += [o + "mlp.router.expert_bias"] if cfg.moe_router_expert_bias else []
        keys += [o + f"mlp.experts.experts.{n}.weight" for _, n in EXPERT_PROJ]
        if cfg.moe_shared_expert_intermediate_size:
            keys += [o + "mlp.shared_experts.linear_fc1.weight", o + "mlp.shared_experts.linear_fc2.weight"]
        if cfg.moe_latent_size:
            keys += [o + "mlp.fc1_latent_proj.weight", o + "mlp.fc2_latent_proj.weight"]
    else:
        keys += [o + "mlp.linear_fc1.weight", o + "mlp.linear_fc2.weight"]
    return keys


def ours_to_hf(cfg: ModelConfig, unit: tuple[str, int], t: dict) -> dict:
    """One unit: {global key: tensor} -> {HF name: tensor} (inverse of hf_to_ours)."""
    if unit[0] == "embedding":
        return {"backbone.embeddings.weight": t["embedding.word_embeddings.weight"]}
    if unit[0] == "final":
        out = {"backbone.norm_f.weight": t["decoder.final_norm.weight"]}
        if cfg.untie_embeddings:
            out["lm_head.weight"] = t["output_layer.weight"]
        return out
    i = unit[1]
    kind = cfg.pattern.replace("|", "")[i]
    p, o = f"backbone.layers.{i}.mixer.", f"decoder.layers.{i}."
    out = {f"backbone.layers.{i}.norm.weight": t[_norm_key(kind, i)]}
    if kind == "M":
        out[p + "in_proj.weight"] = torch.cat([t[o + f"mixer.in_proj.weight.{q}"] for q in MAMBA_PARTS])
        for w in ("weight", "bias"):
            out[p + f"conv1d.{w}"] = torch.cat([t[o + f"mixer.conv1d.{w}.{q}"] for q in CONV_PARTS])
        for n in ("A_log", "D", "dt_bias", "norm.weight", "out_proj.weight"):
            out[p + n] = t[o + "mixer." + n]
    elif kind == "*":
        q, k, v = qkv_split(t[o + "self_attention.linear_qkv.weight"], cfg)
        out.update({p + "q_proj.weight": q, p + "k_proj.weight": k, p + "v_proj.weight": v,
                    p + "o_proj.weight": t[o + "self_attention.linear_proj.weight"]})
    elif kind == "E":
        n, h = cfg.num_moe_experts, cfg.hidden_size
        out[p + "gate.weight"] = t[o + "mlp.router.weight"]
        # transformers always adds the correction bias: a model without one adds zeros
        out[p + "gate.e_score_correction_bias"] = (t[o + "mlp.router.expert_bias"].float()
                                                   if cfg.moe_router_expert_bias else torch.zeros(n))
        for hf_n, ours_n in EXPERT_PROJ:
            w = t[o + f"mlp.experts.experts.{ours_n}.weight"]
            if w.shape[0] != n:
                raise HFMappingError(f"checkpoint tensor {o}mlp.experts.experts.{ours_n}.weight has "
                                     f"{w.shape[0]} experts but model_config.json num_moe_experts={n}")
            for e in range(n):
                out[p + f"experts.{e}.{hf_n}.weight"] = w[e]
        if cfg.moe_shared_expert_intermediate_size:
            out[p + "shared_experts.up_proj.weight"] = t[o + "mlp.shared_experts.linear_fc1.weight"]
            out[p + "shared_experts.down_proj.weight"] = t[o + "mlp.shared_experts.linear_fc2.weight"]
        else:  # transformers builds a shared MLP regardless: zero weights, zero output
            w = NO_SHARED_EXPERT_WIDTH
            out[p + "shared_experts.up_proj.weight"] = torch.zeros(w, h, dtype=t[o + "mlp.router.weight"].dtype)
            out[p + "shared_experts.down_proj.weight"] = torch.zeros(h, w, dtype=t[o + "mlp.router.weight"].dtype)
        if cfg.moe_latent_size:
            for m in ("fc1_latent_proj.weight", "fc2_latent_proj.weight"):
                out[p + m] = t[o + "mlp." + m]
    else:
        out[p + "up_proj.weight"] = t[o + "mlp.linear_fc1.weight"]
        out[p + "down_proj.weight"] = t[o + "mlp.linear_fc2.weight"]
    exp = exported_hf_shapes(cfg, unit)
    for name, x in out.items():
        if tuple(x.shape) != tuple(exp[name]):
            raise HFMappingError(f"checkpoint tensor for {name} has shape {list(x.shape)} but "
                                 f"model_config.json implies {list(exp[name])}")
    return {k: v.contiguous() for k, v in out.items()}


# ----------------------------------------------------------------------------- TP slicing


# Megatron fuses several global tensors into one local parameter: its local slice is the
# concatenation of each part's TP slice (megatron's own sharded_state_dict splits them so).
FUSED_PARTS = {
    "mixer.in_proj.weight": MAMBA_PARTS,
    "mixer.conv1d.weight": CONV_PARTS,
    "mixer.conv1d.bias": CONV_PARTS,
}

# local module norm names (local spec) -> the TE names the checkpoint stores
_LOCAL_NORM_KEYS = {
    ".norm.weight": ".mixer.in_proj.layer_norm_weight",
    ".input_layernorm.weight": ".self_attention.linear_qkv.layer_norm_weight",
    ".pre_mlp_layernorm.weight": ".mlp.linear_fc1.layer_norm_weight",
}


def global_key_of_param(name: str, layer_offset: int, pattern: str = "") -> str:
    """Local parameter (or buffer) name of this rank's model -> its global checkpoint key
    (without the fused-part suffix): local layer j -> global layer j + layer_offset, norm
    names -> TE names (not an E layer's pre_mlp_layernorm, which the MoE layer stores as is).
    Routed-expert names stay local here: expert_of_key maps them. `pattern`: the full layer
    pattern ('|' ignored), needed to tell an E layer's norm from an MLP's."""
    if name.startswith("decoder.layers."):
        rest = name[len("decoder.layers."):]
        j, tail = rest.split(".", 1)
        i = int(j) + layer_offset
        tail = "." + tail
        moe = i < len(pattern.replace("|", "")) and pattern.replace("|", "")[i] == "E"
        for a, b in _LOCAL_NORM_KEYS.items():
            if tail == a and not (moe and a == ".pre_mlp_layernorm.weight"):
                tail = b
        name = f"decoder.layers.{i}{tail}"
    return name


# a routed expert's local parameter: SequentialMLP `local_experts.{le}.linear_fc1.weight`, or
# TE's grouped GEMM `linear_fc1.weight{le}`; both are row ep_rank * E/ep + le of the global
# stacked tensor `mlp.experts.experts.linear_fc1.weight` [E, ...]
_LOCAL_EXPERT_RE = (re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts)\.local_experts\.(\d+)\.(linear_fc[12])\.weight$"),
                    re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts)\.(linear_fc[12])\.weight(\d+)$"))


def expert_of_key(key: str, num_experts: int, ep: int, ep_rank: int) -> tuple[str, Optional[int]]:
    """(global key, expert row) of a key from global_key_of_param: a local expert ->
    (`...mlp.experts.experts.linear_fc{1,2}.weight`, its global expert index); else (key, None)."""
    m = _LOCAL_EXPERT_RE[0].match(key)
    if m:
        base, le, proj = m.group(1), int(m.group(2)), m.group(3)
    else:
        m = _LOCAL_EXPERT_RE[1].match(key)
        if not m:
            return key, None
        base, proj, le = m.group(1), m.group(2), int(m.group(3))
    per_rank = num_experts // ep
    if le >= per_rank:
        raise HFMappingError(f"internal: {key} is local expert {le} but each of the ep={ep} ranks "
                             f"holds {per_rank} of num_moe_experts={num_experts}")
    return f"{base}.experts.{proj}.weight", ep_rank * per_rank + le


def fused_parts(key: str) -> Optional[tuple]:
    for suffix, parts in FUSED_PARTS.items():
        if key.endswith(suffix) and key.startswith("decoder.layers."):
            return parts
    return None


def tp_slice(x: torch.Tensor, dim: int, tp: int, rank: int) -> torch.Tensor:
    if x.shape[dim] % tp:
        raise HFMappingError(f"dimension {dim} of size {x.shape[dim]} is not divisible by tp={tp}")
    n = x.shape[dim] // tp
    return x.narrow(dim, rank * n, n)


def local_from_global(key: str, tensors: dict, tp: int, rank: int, tp_dim: Optional[int],
                      expert: Optional[int] = None) -> torch.Tensor:
    """This rank's value of the parameter whose global key is `key` (tp_dim None: replicated;
    expert: the row of a stacked [E, ...] expert tensor, tp_dim then counts within the row)."""
    parts = fused_parts(key)
    if parts is not None:
        return torch.cat([tp_slice(tensors[f"{key}.{p}"], 0, tp, rank) for p in parts])
    x = tensors[key] if expert is None else tensors[key][expert]
    return x if tp_dim is None or tp == 1 else tp_slice(x, tp_dim, tp, rank)


def unit_of_key(key: str) -> tuple[str, int]:
    if key.startswith("decoder.layers."):
        return ("layer", int(key.split(".")[2]))
    if key.startswith("embedding."):
        return ("embedding", -1)
    return ("final", -1)


def shard_plan(sizes: list[tuple[tuple[str, int], int]], max_bytes: int) -> list[list[tuple[str, int]]]:
    """Greedy grouping of consecutive units into safetensors shards of at most max_bytes
    (a unit larger than max_bytes gets its own shard)."""
    shards: list[list] = []
    cur, cur_b = [], 0
    for unit, b in sizes:
        if cur and cur_b + b > max_bytes:
            shards.append(cur)
            cur, cur_b = [], 0
        cur.append(unit)
        cur_b += b
    if cur:
        shards.append(cur)
    return shards


def parse_size(s: str | int) -> int:
    """'5GB' / '500MB' / '2GiB' / 123 -> bytes."""
    if isinstance(s, int):
        return s
    txt = str(s).strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    for u, m in units.items():
        if txt.endswith(u):
            try:
                return int(float(txt[: -len(u)]) * m)
            except ValueError:
                break
    try:
        return int(txt)
    except ValueError:
        raise ConfigError(f"max_shard_size={s!r}: use bytes or a size like '5GB', '500MB'") from None


def numel(shape) -> int:
    return math.prod(shape)


def iter_units(cfg: ModelConfig) -> Iterator[tuple[str, int]]:
    yield from layer_units(cfg)
