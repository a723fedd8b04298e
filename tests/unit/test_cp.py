"""Context parallelism without processes: the load-balanced split (train/cp.py) and the CPU
CP attention's mask (compat/cp_attention.py) agree on which positions a rank holds; the
layout checks; and the stages without CP refuse parallel.cp > 1 in one line while pretrain,
eval and distill take it. The distributed parity is tests/dist/test_cp_dist.py."""

import dataclasses
import shutil

import pytest
import torch

from megatron_minitron.compat.cp_attention import causal_mask_cp, cp_positions
from megatron_minitron.config import ConfigError, ModelConfig, ParallelConfig, check_cp
from megatron_minitron.train.cp import chunk_ids, merge_seq, split_batch, split_seq
from tests.conftest import REPO, cli_refuses


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_split_is_megatrons_layout_and_merge_inverts_it(cp):
    s = 8 * cp
    x = torch.arange(3 * s).view(3, s)
    parts = [split_seq(x, cp, r) for r in range(cp)]
    for r, p in enumerate(parts):
        i, j = chunk_ids(cp, r)
        c = s // (2 * cp)
        assert torch.equal(p, torch.cat([x[:, i * c:(i + 1) * c], x[:, j * c:(j + 1) * c]], 1))
        assert torch.equal(p[0], cp_positions(s // cp, cp, r))  # the attention's positions
    assert torch.equal(merge_seq(parts), x)
    # every position once over the ranks
    assert sorted(torch.cat(parts, 1)[0].tolist()) == list(range(s))


def test_split_batch_splits_the_four_keys_and_keeps_the_rest():
    b = {k: torch.arange(16).view(1, 16) for k in ("tokens", "labels", "loss_mask", "position_ids")}
    b["index"] = torch.tensor([5])
    out = split_batch(b, 2, 1)
    assert all(out[k].tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]] for k in ("tokens", "labels", "loss_mask", "position_ids"))
    assert out["index"] is b["index"]
    with pytest.raises(ValueError, match="not divisible by 2 x cp"):
        split_seq(torch.zeros(1, 10), 2, 0)


def test_cp_mask_is_the_causal_mask_in_gather_order():
    assert torch.equal(causal_mask_cp(6, 1, 0)[0, 0], torch.triu(torch.ones(6, 6, dtype=torch.bool), 1))
    cp, s = 2, 16
    full = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)
    keys = torch.cat([cp_positions(s // cp, cp, r) for r in range(cp)])
    for r in range(cp):
        q = cp_positions(s // cp, cp, r)
        assert torch.equal(causal_mask_cp(s // cp, cp, r)[0, 0], full[q][:, keys])


M = ModelConfig(pattern="M*-", hidden_size=32, ffn_hidden_size=32, mamba_num_heads=4, mamba_head_dim=8,
                mamba_num_groups=2, mamba_state_dim=8, num_attention_heads=2, num_query_groups=2,
                kv_channels=16, vocab_size=64, seq_length=48)


def test_layout_checks_name_the_fix():
    check_cp(M, ParallelConfig(cp=2))
    check_cp(M, ParallelConfig(cp=4))  # 4 heads; 2 groups repeated over 4 CP ranks
    with pytest.raises(ConfigError, match="seq_length=50 is not divisible by 2 x parallel.cp = 4"):
        check_cp(dataclasses.replace(M, seq_length=50), ParallelConfig(cp=2))
    with pytest.raises(ConfigError, match="4 heads per TP rank, not divisible by parallel.cp=3"):
        check_cp(M, ParallelConfig(cp=3))
    with pytest.raises(ConfigError, match="mamba_num_groups=4 gives 4 groups"):
        check_cp(dataclasses.replace(M, mamba_num_heads=12, mamba_num_groups=4, seq_length=60),
                 ParallelConfig(cp=3))
    # MoE layers run under CP (tests/dist/cp_worker.py check_moe)
    check_cp(dataclasses.replace(M, pattern="M*E", num_moe_experts=4, moe_ffn_hidden_size=16), ParallelConfig(cp=2))
    # with TP the heads and groups split per TP rank first (tests/dist/cp_tp_worker.py runs these)
    check_cp(M, ParallelConfig(cp=2, tp=2))  # 2 heads per TP rank over 2 CP ranks
    check_cp(M, ParallelConfig(cp=2, pp=2))
    with pytest.raises(ConfigError, match="gives 2 heads per TP rank, not divisible by parallel.cp=4"):
        check_cp(M, ParallelConfig(cp=4, tp=2))


@pytest.fixture
def clone(tmp_path, monkeypatch):
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    for var in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


@pytest.mark.parametrize("stage", ["stats", "prune", "teacher-logits"])
def test_stages_without_cp_refuse_it(stage, clone, capsys):
    err = cli_refuses([stage, "-c", f"configs/{stage.replace('-', '_')}_default.yaml", "--print-config", "parallel.cp=2"], capsys)
    assert "parallel.cp=2: context parallelism runs in pretrain, eval, distill, search only" in err, err


@pytest.mark.parametrize("stage", ["pretrain", "eval", "distill", "search"])
def test_cp_stages_take_cp(stage, clone, capsys):
    from megatron_minitron import __main__ as cli

    capsys.readouterr()
    assert cli.main([stage, "-c", f"configs/{stage}_default.yaml", "--print-config", "parallel.cp=2"]) == 0
    assert '"cp": 2' in capsys.readouterr().out


def test_search_candidates_split_over_cp():
    """enumerate_candidates at cp drops the candidates whose Mamba heads per TP rank do not
    split over the CP ranks (as divisibility); the rest are those of cp=1."""
    from megatron_minitron.search.space import SearchSpace, enumerate_candidates

    t = dataclasses.replace(M, mamba_num_heads=8)  # 2 groups
    space = SearchSpace(mamba_num_heads=[2, 4, 6, 8])
    big = dict(budget=16_000, tolerance=0.5, drop_order=[0, 1, 2])
    a, ia = enumerate_candidates(t, space, **big)
    b, ib = enumerate_candidates(t, space, **big, cp=4)
    assert sorted(c.mamba_num_heads for c in a) == [2, 4, 6, 8]
    assert sorted(c.mamba_num_heads for c in b) == [4, 8]
    assert ib["rejected"]["divisibility"] == ia["rejected"]["divisibility"] + 2


def test_distill_checks_both_models_at_the_cp_layout(clone, capsys):
    # tiny_hybrid: 8 Mamba heads; seq_length 256 is not divisible by 2 x 3 (the first check)
    base = ["distill", "-c", "configs/distill_default.yaml", "--print-config",
            "student_model=configs/model/tiny_hybrid.yaml", "teacher_model=configs/model/tiny_hybrid.yaml"]
    err = cli_refuses(base + ["parallel.cp=3"], capsys)
    assert "student model.seq_length=256 is not divisible by 2 x parallel.cp = 6" in err, err
    err = cli_refuses(base + ["parallel.cp=3", "seq_length=258"], capsys)  # 8 heads over 3 ranks
    assert "student model.mamba_num_heads=8 gives 8 heads per TP rank, not divisible by parallel.cp=3" in err, err
