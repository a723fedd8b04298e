"""Runtime settings reach megatron's TransformerConfig / DDP config, and settings that
cannot take effect here are refused with the fix (before any model is built)."""

import dataclasses

import pytest

from megatron_minitron.config import ConfigError, ModelConfig, ParallelConfig, TrainConfig
from megatron_minitron.model import Runtime, transformer_config
from megatron_minitron.train.engine import runtime_for

CFG = ModelConfig(pattern="M-*-", hidden_size=64, ffn_hidden_size=128, mamba_num_heads=4,
                  mamba_head_dim=16, mamba_num_groups=2, mamba_state_dim=8, num_attention_heads=4,
                  num_query_groups=2, kv_channels=16, vocab_size=256)


@pytest.mark.parametrize("key,value,match", [
    ("mamba_mem_eff_path", "true", "mamba_mem_eff_path=true needs CUDA"),
    ("fp8", "e4m3", "needs Transformer Engine"),
    ("overlap_grad_reduce", True, "overlap_grad_reduce=true"),
    ("overlap_param_gather", True, "overlap_param_gather=true"),
])
def test_gpu_only_settings_are_refused_on_cpu(key, value, match):
    with pytest.raises(ConfigError, match=match):
        runtime_for(dataclasses.replace(ParallelConfig(), **{key: value}), TrainConfig())


@pytest.mark.parametrize("key,value,match", [
    ("moe_dispatcher", "alltoall", "moe_dispatcher=alltoall runs on GPU only"),
    ("moe_dispatcher", "flex", "moe_dispatcher=flex runs on GPU only"),
    ("moe_grouped_gemm", "true", "moe_grouped_gemm=true needs Transformer Engine"),
])
def test_gpu_only_moe_settings_are_refused_on_cpu(key, value, match):
    with pytest.raises(ConfigError, match=match):
        runtime_for(dataclasses.replace(ParallelConfig(), **{key: value}), TrainConfig())


def test_moe_settings_reach_megatron():
    """Every MoE field of the model and the router's training settings land in megatron's
    TransformerConfig; frozen-weight stages (training=False) run the router without its
    aux loss or bias update."""
    moe = dataclasses.replace(CFG, pattern="M-*E", num_moe_experts=8, moe_ffn_hidden_size=32,
                              moe_router_topk=4, moe_shared_expert_intermediate_size=48,
                              moe_router_topk_scaling_factor=2.5, moe_router_num_groups=4,
                              moe_router_group_topk=2, moe_latent_size=24)
    train = TrainConfig(moe_aux_loss_coeff=0.01, moe_router_bias_update_rate=0.002)
    tc = transformer_config(moe, runtime=runtime_for(ParallelConfig(ep=2), train), initialize=False)
    got = {k: getattr(tc, k) for k in (
        "num_moe_experts", "moe_ffn_hidden_size", "moe_router_topk", "moe_shared_expert_intermediate_size",
        "moe_router_score_function", "moe_router_enable_expert_bias", "moe_router_topk_scaling_factor",
        "moe_router_num_groups", "moe_router_group_topk", "moe_latent_size", "moe_router_dtype",
        "moe_router_load_balancing_type", "moe_aux_loss_coeff", "moe_router_bias_update_rate",
        "moe_token_dispatcher_type", "moe_grouped_gemm", "expert_model_parallel_size")}
    assert got == dict(num_moe_experts=8, moe_ffn_hidden_size=32, moe_router_topk=4,
                       moe_shared_expert_intermediate_size=48, moe_router_score_function="sigmoid",
                       moe_router_enable_expert_bias=True, moe_router_topk_scaling_factor=2.5,
                       moe_router_num_groups=4, moe_router_group_topk=2, moe_latent_size=24,
                       moe_router_dtype="fp32", moe_router_load_balancing_type="aux_loss",
                       moe_aux_loss_coeff=0.01, moe_router_bias_update_rate=0.002,
                       moe_token_dispatcher_type="allgather", moe_grouped_gemm=False,
                       expert_model_parallel_size=2)
    frozen = transformer_config(moe, runtime=runtime_for(ParallelConfig(), train, training=False),
                                initialize=False)
    assert frozen.moe_aux_loss_coeff == 0 and frozen.moe_router_bias_update_rate == 0
    assert frozen.moe_router_load_balancing_type == "none"


def test_context_parallel_is_refused_with_the_reason():
    # stages without CP support call validate() as is (tests/unit/test_cp.py: which do)
    with pytest.raises(ConfigError, match="parallel.cp=2: context parallelism runs in pretrain, eval, distill, search only"):
        ParallelConfig(cp=2).validate()
    ParallelConfig(cp=2).validate(cp_ok=True)


def test_settings_reach_megatron():
    rt = runtime_for(ParallelConfig(tp=2, sequence_parallel=True), TrainConfig(recompute="selective"))
    assert rt == Runtime(sequence_parallel=True, recompute="selective", mamba_mem_eff_path=False,
                         moe_aux_loss_coeff=1e-4, moe_bias_update_rate=1e-3)
    tc = transformer_config(CFG, tp=2, runtime=rt, initialize=False)
    assert tc.sequence_parallel and tc.recompute_granularity == "selective"
    assert "core_attn" in tc.recompute_modules and "mlp" in tc.recompute_modules
    assert not tc.perform_initialization and not tc.use_mamba_mem_eff_path
    # stats (training=False) and frozen teachers never recompute; SP is dropped at tp=1
    assert runtime_for(ParallelConfig(sequence_parallel=True), TrainConfig(recompute="full"),
                       training=False) == Runtime()
    # auto: the fused Mamba path only where its kernel runs (a GPU with mamba_ssm)
    assert runtime_for(ParallelConfig(mamba_mem_eff_path="auto")).mamba_mem_eff_path is False


def test_bad_values_name_the_choices():
    with pytest.raises(ConfigError, match="recompute='some': use none, selective or full"):
        TrainConfig(recompute="some").validate()
    with pytest.raises(ConfigError, match="optimizer_checkpoint='x': use dp_sharded or reshardable"):
        ParallelConfig(optimizer_checkpoint="x").validate()
    with pytest.raises(ConfigError, match="memory_limit_gb=-1"):
        ParallelConfig(memory_limit_gb=-1).validate()


@pytest.mark.parametrize("samples,depth,ok", [(16, 8, True), (16, 4, False), (12, 8, False), (16, 0, True)])
def test_stats_at_ep2_refuses_steps_where_ranks_would_diverge(monkeypatch, tmp_path, samples, depth, ok):
    """At ep=2 on 4 processes (dp=4, mbs=2: 8 samples a step) a rank with no (depth) samples in
    a step would skip forwards the experts' exchange waits for: refused before the checkpoint
    is read (none exists here: an accepted setting fails on it next)."""
    from megatron_minitron.importance.stage import StatsConfig, validate

    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = StatsConfig(checkpoint=str(tmp_path / "none"), samples=samples, depth_samples=depth,
                      micro_batch_size=2, parallel=ParallelConfig(ep=2))
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    bad = "depth_samples" if samples == 16 else "samples"
    if ok:
        assert "not a megatron-minitron hybrid checkpoint" in str(e.value)
    else:
        assert f"{bad}={depth if bad == 'depth_samples' else samples} at parallel.ep=2" in str(e.value)
        assert f"use {bad}=" in str(e.value) and "8 samples per step" in str(e.value)
