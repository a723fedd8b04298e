"""ModelConfig -> a real megatron-core hybrid model; analytic parameter count."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .config import ModelConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def activation_fn(name: str):
    from .compat.mcore import squared_relu

    return {
        "squared_relu": squared_relu,
        "relu": F.relu,
        "gelu": F.gelu,
        "swiglu": F.silu,  # gated: megatron applies silu(x1) * x2 with gated_linear_unit
    }[name]


@dataclass
class Runtime:
    """How a model runs (not what it is): megatron settings a stage passes through.

    sequence_parallel: activations outside the TP regions sharded along the sequence
      (needs tp > 1; ignored at tp == 1 as megatron requires).
    recompute: none | selective (attention core and MLP recomputed in backward) | full
      (every layer's activations recomputed; megatron-core < 0.19 has no full recompute
      for the hybrid stack, so compat.recompute wraps each layer).
    mamba_mem_eff_path: mamba_ssm's fused conv+scan+norm kernel. Training on GPU only: it
      needs the kernel, and it hides the in_proj x / out_proj input the stats hooks read.
    fp8: '' | e4m3 | hybrid (Transformer Engine on GPU only).
    """

    sequence_parallel: bool = False
    recompute: str = "none"
    mamba_mem_eff_path: bool = False
    fp8: str = ""
    # MoE (E layers): expert parallel size, token dispatcher, grouped-GEMM experts, and the
    # router's training behaviour (0 = no load-balancing loss / frozen expert bias)
    ep: int = 1
    moe_dispatcher: str = "allgather"
    moe_grouped_gemm: bool = False
    moe_aux_loss_coeff: float = 0.0
    moe_bias_update_rate: float = 0.0


def transformer_config(cfg: ModelConfig, tp: int = 1, pp: int = 1, sequence_parallel=False,
                       initialize: bool = True, runtime: Optional[Runtime] = None, cp: int = 1):
    """The megatron TransformerConfig for `cfg` at a (tp, pp, cp) layout. initialize=False
    leaves the weights uninitialized (they are about to be overwritten)."""
    from .compat import mcore

    rt = runtime or Runtime(sequence_parallel=sequence_parallel)
    dtype = DTYPES[cfg.params_dtype]
    cuda = torch.cuda.is_available()
    fused = cuda and mcore.te_usable()  # fusions whose kernels exist (TE / apex on GPU)
    recompute = {}
    if rt.recompute == "selective":
        recompute = dict(recompute_granularity="selective", recompute_modules=["core_attn", "mlp"])
    elif rt.recompute == "full" and mcore.STACK_HAS_FULL_RECOMPUTE:
        recompute = dict(recompute_granularity="full", recompute_method="uniform",
                         recompute_num_layers=1)
    return mcore.TransformerConfig(
        **recompute,
        **(moe_kwargs(cfg, rt) if cfg.is_moe else {}),
        **(dict(fp8=rt.fp8, fp8_recipe="delayed") if rt.fp8 else {}),
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels,
        mamba_num_heads=cfg.mamba_num_heads,
        mamba_head_dim=cfg.mamba_head_dim,
        mamba_num_groups=cfg.mamba_num_groups,
        mamba_state_dim=cfg.mamba_state_dim,
        # The memory-efficient path fuses conv+scan+norm in one mamba_ssm kernel (Runtime)
        use_mamba_mem_eff_path=rt.mamba_mem_eff_path,
        is_hybrid_model=True,
        activation_func=activation_fn(cfg.activation),
        gated_linear_unit=cfg.activation == "swiglu",
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_epsilon,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_method_std,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        sequence_parallel=rt.sequence_parallel and tp > 1,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # CPU init builds the full master weight then slices it (TP-invariant init); only
        # when the weights are initialised here: before a checkpoint load each GPU rank
        # allocates its own shard on the device, uninitialised.
        use_cpu_initialization=initialize or not cuda,
        perform_initialization=initialize,
        bias_dropout_fusion=fused,
        masked_softmax_fusion=fused,
        persist_layer_norm=False,
        apply_rope_fusion=fused,
        gradient_accumulation_fusion=False,  # needs apex's fused weight-grad kernel
        deallocate_pipeline_outputs=cuda,
    )


def moe_kwargs(cfg: ModelConfig, rt: Runtime) -> dict:
    """megatron TransformerConfig fields of the E layers."""
    return dict(
        num_moe_experts=cfg.num_moe_experts,
        moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
        moe_router_topk=cfg.moe_router_topk,
        moe_shared_expert_intermediate_size=cfg.moe_shared_expert_intermediate_size or None,
        moe_shared_expert_overlap=False,
        moe_router_score_function=cfg.moe_router_score_function,
        moe_router_enable_expert_bias=cfg.moe_router_expert_bias,
        moe_router_bias_update_rate=rt.moe_bias_update_rate,
        moe_router_topk_scaling_factor=cfg.moe_router_topk_scaling_factor,
        moe_router_num_groups=cfg.moe_router_num_groups if cfg.moe_router_num_groups > 1 else None,
        moe_router_group_topk=cfg.moe_router_group_topk if cfg.moe_router_num_groups > 1 else None,
        moe_latent_size=cfg.moe_latent_size or None,
        # routing in fp32 whatever the weights' dtype (as transformers' NemotronH router)
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss" if rt.moe_aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=rt.moe_aux_loss_coeff,
        moe_token_dispatcher_type=rt.moe_dispatcher,
        moe_grouped_gemm=rt.moe_grouped_gemm,
        expert_model_parallel_size=rt.ep,
    )


def build_model(cfg: ModelConfig, parallel, pre_process=None, post_process=None, initialize: bool = True,
                runtime: Optional[Runtime] = None):
    """Build this rank's stage of the hybrid model (embedding on the first PP stage, output
    layer on the last). `parallel` is a dist.Parallel; initialize=False: weights left
    uninitialized, for a model about to be filled from a checkpoint."""
    from .compat import mcore, setup_runtime

    setup_runtime()
    rt = runtime or Runtime(ep=parallel.ep)
    if rt.ep != parallel.ep:
        raise ValueError(f"runtime ep={rt.ep} but the process groups have ep={parallel.ep}")
    cfg.validate(tp=parallel.tp, pp=parallel.pp, ep=parallel.ep)
    pattern = cfg.pattern.replace("|", "")
    cp = getattr(parallel, "cp", 1)
    tcfg = transformer_config(cfg, parallel.tp, parallel.pp, initialize=initialize, runtime=rt, cp=cp)
    spec = mcore.hybrid_stack_spec(mcore.te_usable(), cfg.mamba_conv_kernel, cfg.mamba_chunk_size,
                                   moe=cfg.is_moe, grouped_gemm=rt.moe_grouped_gemm, cp=cp)
    model = mcore.make_hybrid_model(
        spec,
        pattern,
        config=tcfg,
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.seq_length,
        pre_process=parallel.is_first_stage if pre_process is None else pre_process,
        post_process=parallel.is_last_stage if post_process is None else post_process,
        share_embeddings_and_output_weights=not cfg.untie_embeddings,
        position_embedding_type=cfg.position_embedding,
        rotary_percent=cfg.rotary_percent,
        rotary_base=cfg.rotary_base,
        parallel_output=True,
        pg_collection=parallel.pg,
    )
    model.to(parallel.device)
    from .compat import dt_limit

    dt_limit.apply(model, cfg)  # Mamba dt clamp of an imported model (none by default)
    if rt.recompute == "full" and not mcore.STACK_HAS_FULL_RECOMPUTE:
        mcore.checkpoint_each_layer(model.decoder.layers)
    if tcfg.bf16:
        # Every parameter in bf16, as megatron's Float16Module casts them (A_log, D and the
        # torch norms are created fp32): its optimizers keep one fp32 main copy per 16-bit
        # parameter and assume no fp32 parameter shares a param group with them.
        model.bfloat16()
        # the MoE routers' score-correction bias and token counts stay fp32 (as megatron's
        # router maintains them): a bias step of 1e-3 is lost next to a bf16 sigmoid score
        for name, buf in model.named_buffers():
            if name.endswith(("router.expert_bias", "router.local_tokens_per_expert")):
                buf.data = buf.data.float()
    return model


@functools.lru_cache(maxsize=8)
def causal_mask(seq_length: int, device_str: str = "cpu") -> torch.Tensor:
    """[1, 1, s, s] boolean mask, True = masked (megatron's convention). Passed explicitly:
    megatron's default causal mask is allocated on "cuda"."""
    m = torch.triu(torch.ones(seq_length, seq_length, dtype=torch.bool, device=device_str), 1)
    return m[None, None]


def layer_param_counts(cfg: ModelConfig) -> dict:
    """Parameters of one layer of each kind (analytic; equals the built model)."""
    h = cfg.hidden_size
    d_in = cfg.mamba_num_heads * cfg.mamba_head_dim
    gn = cfg.mamba_num_groups * cfg.mamba_state_dim
    nh = cfg.mamba_num_heads
    conv_ch = d_in + 2 * gn
    mamba = (
        h  # input norm
        + h * (2 * d_in + 2 * gn + nh)  # in_proj [z|x|B|C|dt]
        + conv_ch * cfg.mamba_conv_kernel + conv_ch  # conv1d weight + bias
        + 3 * nh  # A_log, D, dt_bias
        + d_in  # gated norm
        + d_in * h  # out_proj
    )
    q = cfg.num_attention_heads * cfg.kv_channels
    kv = 2 * cfg.num_query_groups * cfg.kv_channels
    attn = h + h * (q + kv) + q * h
    gate = 2 if cfg.activation == "swiglu" else 1
    mlp = h + h * cfg.ffn_hidden_size * gate + cfg.ffn_hidden_size * h
    out = {"M": mamba, "*": attn, "-": mlp}
    if cfg.is_moe:
        out["E"] = sum(moe_param_counts(cfg).values())
    return out


def moe_param_counts(cfg: ModelConfig) -> dict:
    """Parameters of one E layer by part: norm, router (weight; the expert bias is a buffer,
    not a parameter), routed experts (all of them), shared expert, latent projections."""
    h, gate = cfg.hidden_size, 2 if cfg.activation == "swiglu" else 1
    d = cfg.moe_latent_size or h  # the experts' input / output width
    f, s = cfg.moe_ffn_hidden_size, cfg.moe_shared_expert_intermediate_size
    return {
        "norm": h,
        "router": cfg.num_moe_experts * h,
        "experts": cfg.num_moe_experts * (d * f * gate + f * d),
        "shared_expert": h * s * gate + s * h,
        "latent": 2 * h * cfg.moe_latent_size,
    }


def count_parameters(cfg: ModelConfig) -> dict:
    """Analytic parameter count of the whole model (all stages, all TP / EP shards).
    `active`: the parameters one token's forward pass uses (each E layer's top-k experts of
    its routed experts, all else), with and without the embedding and output layer."""
    per = layer_param_counts(cfg)
    pattern = cfg.pattern.replace("|", "")
    layers = sum(per[c] for c in pattern)
    emb = cfg.vocab_size * cfg.hidden_size
    out = emb if cfg.untie_embeddings else 0
    total = layers + emb + out + cfg.hidden_size  # + final norm
    inactive = 0
    if cfg.is_moe:
        per_expert = moe_param_counts(cfg)["experts"] // cfg.num_moe_experts
        inactive = pattern.count("E") * (cfg.num_moe_experts - cfg.moe_router_topk) * per_expert
    return {
        "total": total,
        "embedding": emb,
        "output_layer": out,
        "layers": layers,
        "non_embedding": total - emb - out,
        "active": total - inactive,
        # the output layer is a full GEMM per token; the input embedding is a row lookup
        "active_non_embedding": total - inactive - emb - out,
        "per_layer_kind": per,
    }


def local_parameter_count(model: torch.nn.Module) -> int:
    """Parameters held by this rank (a TP shard of one PP stage); shared weights once."""
    seen = set()
    n = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n
