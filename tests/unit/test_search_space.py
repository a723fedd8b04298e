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
