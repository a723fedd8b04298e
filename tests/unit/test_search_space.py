"""Candidate enumeration: analytic counts equal built models; constraints always hold."""

import dataclasses

import pytest

from megatron_minitron.config import ConfigError, ModelConfig
from megatron_minitron.model import count_parameters
from megatron_minitron.search.space import (SearchSpace, drop_pattern,
                                            enumerate_candidates, parse_axis)

TEACHER = ModelConfig(pattern="M-M*-M-", hidden_size=64, ffn_hidden_size=192,
                      mamba_num_heads=8, mamba_head_dim=16, mamba_num_groups=2,
                      mamba_state_dim=8, mamba_chunk_size=16, num_attention_heads=4,
                      num_query_groups=2, kv_channels=16, vocab_size=512, seq_length=32)
DROP = [1, 3, 6, 5, 0, 2, 4]  # a depth ranking: layer 1 least important
SPACE = SearchSpace(num_layers=[5, 6, 7], hidden_size="32:64:16", ffn_hidden_size=[96, 128, 192],
                    mamba_num_heads={"start": 2, "stop": 8, "step": 1}, mamba_head_dim=[8, 16])


def test_parse_axis_forms():
    assert parse_axis([3, 1, 3], "k") == [1, 3]
    assert parse_axis("32:64:16", "k") == [32, 48, 64]
    assert parse_axis({"start": 2, "stop": 6, "step": 2}, "k") == [2, 4, 6]
    assert parse_axis([], "k") == []
    for bad in ("1:2", {"start": 1}, [1.5], "a:b:c", [0], {"start": 5, "stop": 1}):
        with pytest.raises(ConfigError):
            parse_axis(bad, "search.space.hidden_size")


def test_drop_pattern_follows_depth_ranking():
    assert drop_pattern("M-M*-M-", DROP, 7) == "M-M*-M-"
    assert drop_pattern("M-M*-M-", DROP, 5) == "MM-M-"  # layers 1 (-) and 3 (*) dropped
    assert drop_pattern("M-M|*-M-", DROP, 6) == "MM*-M-"


def test_candidates_meet_budget_and_divisibility():
    budget = 60_000
    cands, info = enumerate_candidates(TEACHER, SPACE, budget, 0.15, DROP, tp=2)
    assert cands, info
    assert info["combinations"] == 3 * 3 * 3 * 7 * 2
    for c in cands:
        cfg = c.model_config(TEACHER)
        assert abs(c.params - budget) <= 0.15 * budget
        assert c.mamba_num_heads % TEACHER.mamba_num_groups == 0 and c.mamba_num_heads % 2 == 0
        assert c.ffn_hidden_size % 2 == 0
        assert c.params == count_parameters(cfg)["total"]
        assert len(cfg.pattern) == c.num_layers
    # sorted by distance to the budget
    d = [abs(c.params - budget) for c in cands]
    assert d == sorted(d)
    # every rejected combination is counted once
    assert sum(info["rejected"].values()) + len(cands) == info["combinations"]
    assert info["rejected"]["divisibility"] > 0  # odd Mamba head counts vs 2 groups


def test_analytic_count_equals_built_model_for_every_candidate():
    from megatron_minitron import dist as D
    from megatron_minitron.config import ParallelConfig
    from megatron_minitron.model import build_model, local_parameter_count

    par = D.init(ParallelConfig(), seed=1)
    cands, _ = enumerate_candidates(TEACHER, SPACE, 60_000, 0.15, DROP)
    assert len(cands) >= 5
    for c in cands:
        model = build_model(c.model_config(TEACHER), par)
        assert local_parameter_count(model) == c.params, c.name


def test_empty_space_and_unreachable_budget():
    none, info = enumerate_candidates(TEACHER, SPACE, 10, 0.01, DROP)
    assert none == [] and info["rejected"]["budget"] > 0
    bigger = dataclasses.replace(SPACE, hidden_size=[128])
    cands, info = enumerate_candidates(TEACHER, bigger, 60_000, 0.5, DROP)
    assert cands == [] and info["rejected"]["larger_than_teacher"] == info["combinations"]
    with pytest.raises(ConfigError):
        enumerate_candidates(TEACHER, SPACE, -5, 0.1, DROP)


# ----------------------------------------------------------------------------- MoE axes, budgets

MOE_TEACHER = ModelConfig(pattern="ME*EM-", hidden_size=64, ffn_hidden_size=128, mamba_num_heads=4,
                          mamba_head_dim=16, mamba_num_groups=2, mamba_state_dim=8, mamba_chunk_size=16,
                          num_attention_heads=4, num_query_groups=2, kv_channels=16, vocab_size=512,
                          seq_length=32, num_moe_experts=8, moe_ffn_hidden_size=32, moe_router_topk=2,
                          moe_shared_expert_intermediate_size=48)
MOE_DROP = [5, 3, 1, 0, 2, 4]
MOE_SPACE = SearchSpace(num_layers=[5, 6], hidden_size=[48, 64], num_moe_experts=[2, 4, 6, 8],
                        moe_ffn_hidden_size=[16, 24, 32], moe_shared_expert_intermediate_size=[24, 48])


def _moe_all():
    """Every combination of MOE_SPACE that is a valid model, with its exact figures."""
    from megatron_minitron.search.space import Budget

    cands, info = enumerate_candidates(MOE_TEACHER, MOE_SPACE, Budget(params=10 ** 9, tolerance=0.999999),
                                       drop_order=MOE_DROP)
    return cands, info


def test_moe_axes_counts_equal_the_built_model():
    """Every candidate of a space over experts, expert FFN and shared expert: total parameters
    = the built model's, active = what one token's backward touches (+ the embedding), both
    as the plan of the same sizes says."""
    from megatron_minitron import dist as D
    from megatron_minitron.config import ParallelConfig
    from megatron_minitron.model import build_model, local_parameter_count
    from tests.conftest import one_token_used_parameters

    cands, info = _moe_all()
    assert len(cands) == 2 * 2 * 4 * 3 * 2 and info["rejected"]["budget"] == 0
    par = D.init(ParallelConfig(), seed=1)
    for c in cands[::7]:
        cfg = c.model_config(MOE_TEACHER)
        assert (cfg.num_moe_experts, cfg.moe_ffn_hidden_size, cfg.moe_shared_expert_intermediate_size) == (
            c.num_moe_experts, c.moe_ffn_hidden_size, c.moe_shared_expert_intermediate_size)
        model = build_model(cfg, par)
        assert local_parameter_count(model) == c.params, c.name
        emb = cfg.vocab_size * cfg.hidden_size
        assert one_token_used_parameters(model, cfg) + emb == c.active_params, c.name
        assert c.name.endswith(f"-e{c.num_moe_experts}-ef{c.moe_ffn_hidden_size}"
                               f"-sh{c.moe_shared_expert_intermediate_size}")


def test_serving_memory_equals_bf16_weights_and_transformers_cache():
    """Serving memory of a candidate = its built model's bf16 weight bytes + what transformers'
    NemotronH cache holds after a forward of batch x seq tokens (K / V of each attention
    layer, conv window and SSM state of each Mamba layer; its SSM state is fp32), and half that state in bf16."""
    import torch
    from transformers.models.nemotron_h import NemotronHConfig, NemotronHForCausalLM

    from megatron_minitron import dist as D
    from megatron_minitron.config import ParallelConfig
    from megatron_minitron.hf.mapping import hf_config_from_model
    from megatron_minitron.model import build_model
    from megatron_minitron.resources.estimate import serving

    par = D.init(ParallelConfig(), seed=1)
    cfg = dataclasses.replace(MOE_TEACHER, pattern="ME*EM*-", params_dtype="bf16", mamba_num_heads=6,
                              kv_channels=8)
    batch, seq = 3, 40
    weights = sum(p.numel() * p.element_size() for p in build_model(cfg, par).parameters())
    hf = NemotronHForCausalLM(NemotronHConfig(**hf_config_from_model(cfg, torch_dtype="bfloat16")))
    hf = hf.to(torch.bfloat16).eval()
    with torch.no_grad():
        cache = hf(torch.randint(0, cfg.vocab_size, (batch, seq)), use_cache=True).past_key_values
    kv = conv = ssm = 0
    for i, kind in enumerate(cfg.pattern):
        if kind == "*":
            lay = cache.layers[i]
            kv += sum(t.numel() * t.element_size() for t in (lay.keys, lay.values))
        elif kind == "M":
            c, s = cache.get_conv_state(i), cache.get_recurrent_state(i)
            assert c.shape == (batch, 64 + 32 + 2 * 2 * 8, cfg.mamba_conv_kernel) and s.dtype == torch.float32
            conv += c.numel() * c.element_size()
            ssm += s.numel() * s.element_size()
    got = serving(cfg, seq, batch)
    assert (got["weights"], got["kv_cache"], got["mamba_conv_state"], got["mamba_ssm_state"]) == (
        weights, kv, conv, ssm)
    assert got["total"] == weights + kv + conv + ssm
    assert serving(cfg, seq, batch, "bf16")["mamba_ssm_state"] * 2 == ssm


def test_budgets_in_any_combination():
    """Total, active and memory bounds, alone and together: every candidate meets each bound
    that is on, every combination outside one is counted under that bound, and the enumeration
    is exactly the brute-force filter of all valid combinations."""
    from megatron_minitron.search.space import Budget

    every, _ = _moe_all()
    mid = every[len(every) // 2]
    gib = Budget(memory_seq_length=256).memory(mid.model_config(MOE_TEACHER))["total"] / 2 ** 30
    budgets = [Budget(params=mid.params, tolerance=0.1),
               Budget(active_params=mid.active_params, tolerance=0.05),
               Budget(memory_gib=gib, memory_seq_length=256),
               Budget(params=mid.params, active_params=mid.active_params, memory_gib=gib * 0.98,
                      tolerance=0.1, memory_seq_length=256)]
    for b in budgets:
        cands, info = enumerate_candidates(MOE_TEACHER, MOE_SPACE, b, drop_order=MOE_DROP)
        mem = {c.name: b.memory(c.model_config(MOE_TEACHER))["total"] for c in every}
        want = {c.name for c in every
                if (not b.params or abs(c.params - b.params) <= 0.1 * b.params)
                and (not b.active_params or abs(c.active_params - b.active_params) <= b.tolerance * b.active_params)
                and (not b.memory_gib or mem[c.name] <= b.memory_gib * 2 ** 30)}
        assert {c.name for c in cands} == want and 0 < len(want) < len(every), b
        assert sum(info["rejected"].values()) + len(cands) == info["combinations"]
        assert all(c.memory_bytes == mem[c.name] for c in cands)
        d = [b.distance(c.params, c.active_params, c.memory_bytes) for c in cands]
        assert d == sorted(d)
    # the expert count changes the total; of what a token uses, only the router's rows
    same = [c for c in every if (c.num_layers, c.hidden_size, c.moe_ffn_hidden_size,
                                 c.moe_shared_expert_intermediate_size) == (6, 64, 32, 48)]
    assert len({c.params for c in same}) == 4
    assert {c.active_params - c.num_moe_experts * 64 * 2 for c in same} == {same[0].active_params
                                                                           - same[0].num_moe_experts * 128}


def test_moe_axes_refused_where_they_cannot_apply():
    from megatron_minitron.search.space import Budget

    with pytest.raises(ConfigError, match=r"space.num_moe_experts.*no E"):
        enumerate_candidates(TEACHER, SearchSpace(num_moe_experts=[4]), 60_000, 0.1, DROP)
    no_shared = dataclasses.replace(MOE_TEACHER, moe_shared_expert_intermediate_size=0)
    with pytest.raises(ConfigError, match="no shared expert"):
        enumerate_candidates(no_shared, SearchSpace(moe_shared_expert_intermediate_size=[8]), 10 ** 6, 0.5,
                             MOE_DROP)
    with pytest.raises(ConfigError, match="all 0"):
        enumerate_candidates(MOE_TEACHER, MOE_SPACE, Budget(), drop_order=MOE_DROP)
    # experts below top-k, or not divisible by ep, are rejected as invalid layouts
    _, info = enumerate_candidates(MOE_TEACHER, SearchSpace(num_moe_experts=[1, 2, 3, 4]),
                                   Budget(params=10 ** 9, tolerance=0.999999), drop_order=MOE_DROP, ep=2)
    assert info["rejected"]["divisibility"] == 2  # 1 (< top-2) and 3 (odd at ep=2)


def test_attention_mlp_teacher_searches_hidden_ffn_and_depth():
    """A teacher without Mamba layers (issue 23): candidates over depth, hidden and FFN, each
    one's plan (the search's own make_plan call) giving its pattern and parameter count; a
    Mamba axis is refused naming the key."""
    import torch

    from megatron_minitron.importance.io import ImportanceFile
    from megatron_minitron.search.stage import SearchConfig, _plan_for

    teacher = dataclasses.replace(TEACHER, pattern="*-*-*-")
    space = SearchSpace(num_layers=[4, 5, 6], hidden_size=[48, 64], ffn_hidden_size=[96, 192])
    imp = ImportanceFile.random(teacher, torch.Generator().manual_seed(0))
    order = sorted(range(6), key=lambda i: float(imp.depth["kl"][i]))
    cands, info = enumerate_candidates(teacher, space, 110_000, 0.3, order)
    assert len(cands) == info["combinations"] - sum(info["rejected"].values()) > 4
    for c in cands:
        plan = _plan_for(imp, c, SearchConfig(), 6)  # raises if the plan disagrees with c
        assert "M" not in plan.target.pattern and plan.params_after["total"] == c.params
        assert c.name == f"L{c.num_layers}-h{c.hidden_size}-f{c.ffn_hidden_size}"  # no Mamba fields
        assert (c.model_config(teacher).mamba_num_heads, c.mamba_num_heads) == (teacher.mamba_num_heads, 0)
    for axis in ("mamba_num_heads", "mamba_head_dim"):
        with pytest.raises(ConfigError, match=rf"search\.space\.{axis} is set but the teacher \('\*-\*-\*-'\) "
                                              r"has no Mamba \(M\) layer; remove that axis"):
            enumerate_candidates(teacher, dataclasses.replace(space, **{axis: [8]}), 110_000, 0.3, order)
