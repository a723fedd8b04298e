"""Pure report pieces: METHOD/SEED grouping with paired differences to the baseline, and the
ablation claims judged from given numbers (hand-computed expectations)."""

import pytest

from megatron_minitron.ablations import claims as CL
from megatron_minitron.report import compare as C


def _rows():
    return [{"model": "teacher", "val_loss": 4.0}, {"model": "pruned", "val_loss": 7.0},
            {"model": "KD/s1", "val_loss": 5.0, "tokens_seen": 100},
            {"model": "KD/s2", "val_loss": 5.2, "tokens_seen": 100},
            {"model": "CE/s1", "val_loss": 5.3, "tokens_seen": 100},
            {"model": "CE/s2", "val_loss": 5.1, "tokens_seen": 100},
            {"model": "KD+CE/s1", "val_loss": 5.1, "tokens_seen": 100}]


def test_method_summary_pairs_seeds_against_the_baseline():
    ms = {m["method"]: m for m in C.method_summary(_rows(), "CE")}
    assert list(ms) == ["KD", "CE", "KD+CE"]  # unseeded rows are not methods
    kd = ms["KD"]
    assert kd["seeds"] == ["s1", "s2"] and kd["tokens"] == 100
    assert kd["val_loss"]["mean"] == pytest.approx(5.1) and kd["val_loss"]["min"] == 5.0
    vb = kd["vs_baseline"]  # s1: 5.0 - 5.3 = -0.3, s2: 5.2 - 5.1 = +0.1
    assert vb["diffs"] == pytest.approx({"s1": -0.3, "s2": 0.1})
    assert vb["mean"] == pytest.approx(-0.1) and vb["wins"] == 1 and vb["n"] == 2
    assert "vs_baseline" not in ms["CE"]
    assert ms["KD+CE"]["vs_baseline"]["seeds"] == ["s1"]  # only the seeds both have
    assert C.parse_label("KD+CE/s2") == ("KD+CE", "s2") and C.parse_label("teacher") == ("teacher", None)
    assert C.fmt_spread(kd["val_loss"]) == "5.1000 (5.0000..5.2000)"


def test_claims_verdicts():
    g = CL.group_aware({"zero_shot": {"4 heads": {"aware": 5.0, "unaware": 6.0, "same_sets": False},
                                      "6 heads": {"aware": 4.5, "unaware": 4.5, "same_sets": True}},
                        "kd": {"aware": 4.2, "unaware": 4.3, "steps": "40"}})
    assert g["holds"] == "yes" and "identical keep sets" in g["ours"]
    g = CL.group_aware({"zero_shot": {"4 heads": {"aware": 5.0, "unaware": 6.0, "same_sets": False}},
                        "kd": {"aware": 4.4, "unaware": 4.3, "steps": "40"}})
    assert g["holds"] == "mixed"
    s = CL.mamba_source({"a": {"x": 1.0, "z": 2.0, "y": 3.0}, "b": {"x": 2.0, "z": 1.0, "y": 3.0},
                         "c": {"x": 1.0, "z": 1.5, "y": 3.0}})
    assert s["holds"] == "yes" and "x best in 2 of 3" in s["ours"]
    f = CL.flap({"zero_shot": {"a": {"l2": 5.0, "flap": 5.3}}, "kd": {"l2": 4.0, "flap": 4.01, "steps": "40"}})
    assert f["holds"] == "yes"
    f = CL.flap({"zero_shot": {"a": {"l2": 5.0, "flap": 5.01}}, "kd": {"l2": 4.0, "flap": 4.3, "steps": "40"}})
    assert f["holds"] == "no"
    h = CL.heads_vs_channels({"steps": "40", "heads": {"label": "4x32", "params": 10, "zero_shot": 5.0,
                                                       "kd": 4.0, "tokens_per_s": 200.0},
                              "channels": {"label": "8x16", "params": 11, "zero_shot": 5.5, "kd": 4.1,
                                           "tokens_per_s": 150.0}})
    assert h["holds"] == "yes"
    w = CL.width_vs_depth({"steps": "40", "rows": {
        "width-only": {"label": "w", "params": 1, "zero_shot": 5, "kd": 4.5},
        "depth-only": {"label": "d", "params": 1, "zero_shot": 6, "kd": 4.4}}})
    assert w["holds"] == "no"
    d = CL.depth_metric({1: {"kl": {"layers": [3], "loss": 5.0}, "cosine": {"layers": [3], "loss": 5.0}},
                         2: {"kl": {"layers": [3, 4], "loss": 5.5}, "cosine": {"layers": [1, 3], "loss": 6.0}}})
    assert d["holds"] == "yes" and "both drop [3]" in d["ours"]
    ff = CL.ffn_source({"zero_shot": {"pre": 5.0, "post": 4.9}, "kd": {"pre": 4.2, "post": 4.3, "steps": "40"},
                        "default": "pre"})
    assert ff["holds"] == "yes"  # judged after KD when there is a KD figure
    md = CL.markdown([g, s])
    assert md.count("\n") == 4 and md.startswith("| claim |")


def test_moe_claims_verdicts():
    kd = lambda a, b: {"s1": a, "s2": b}  # noqa: E731
    e = CL.expert_score({"default": "out", "steps": "20 x 2", "zero_shot": {"out": 5.0, "mass": 5.2, "freq": 5.0},
                         "same_sets": {"mass": False, "freq": True},
                         "kd": {"out": kd(4.0, 4.15), "mass": kd(4.1, 4.1)}})
    assert e["holds"] == "yes"  # zero-shot 5.0 < 5.2, KD mean 4.075 < 4.1 (freq: same sets, not judged)
    assert "freq: the same experts as out" in e["ours"] and "lower on 1 of 2 seeds" in e["ours"]
    e = CL.expert_score({"default": "out", "steps": "20", "zero_shot": {"out": 5.0, "mass": 5.2},
                         "kd": {"out": kd(4.3, 4.3), "mass": kd(4.1, 4.2)}})
    assert e["holds"] == "mixed"  # better zero-shot, worse after KD
    e = CL.expert_score({"default": "out", "steps": "20", "zero_shot": {"out": 5.3, "mass": 5.2}, "kd": {}})
    assert e["holds"] == "no"
    r = CL.expert_random({"score": "out", "steps": "20", "zero_shot": {"scored": 5.0, "random": {"r1": 5.5, "r2": 5.1}},
                          "kd": {"scored": kd(4.0, 4.1), "random": kd(4.2, 4.0)}})
    assert r["holds"] == "yes" and "random 5.3000" in r["ours"]  # means: 4.05 < 4.10
    r = CL.expert_random({"score": "out", "steps": "20", "zero_shot": {"scored": 5.4, "random": {"r1": 5.5, "r2": 5.1}},
                          "kd": {"scored": kd(4.3, 4.3), "random": kd(4.2, 4.0)}})
    assert r["holds"] == "no"
    side = lambda z, k, a: {"label": "x", "params": 10, "active": a, "zero_shot": z, "kd": k}  # noqa: E731
    t = CL.experts_vs_ffn({"steps": "20", "experts": side(5.0, kd(4.0, 4.0), 9),
                           "ffn": side(5.5, kd(4.1, 4.2), 7)}, "total")
    assert t["holds"] == "yes" and "equal total" in t["claim"] and "128 -> 104" in t["paper"]
    a = CL.experts_vs_ffn({"steps": "20", "experts": side(5.0, kd(4.0, 4.0), 9),
                           "ffn": side(4.5, kd(3.9, 3.9), 9)}, "active")
    assert a["holds"] == "no" and "equal active" in a["claim"]
    a = CL.experts_vs_ffn({"steps": "20", "experts": side(5.0, {}, 9), "ffn": side(5.1, {}, 9)}, "active")
    assert a["holds"] == "yes" and "KD" not in a["ours"]  # zero-shot only
    s = CL.moe_skipped("no MoE teacher at moe.teacher=runs/moe/teacher; make them with scripts/run_ablations.sh")
    assert s["holds"] == "n/a" and "run_ablations.sh" in s["ours"]


def test_random_expert_keep_sets_are_seeded_valid_and_prunable():
    """The `experts` ablation's random baseline: the same seed draws the same experts, another
    seed others; each E layer keeps its own sorted, distinct experts (per routing group when
    grouped); the plan survives plan.json and fills a pruned model through the prune rules."""
    import dataclasses

    import torch

    from megatron_minitron import dist as D
    from megatron_minitron.ablations import lab as S
    from megatron_minitron.ablations.moe import random_expert_plan
    from megatron_minitron.compat import mcore
    from megatron_minitron.config import ModelConfig, ParallelConfig
    from megatron_minitron.importance.io import ImportanceFile
    from megatron_minitron.model import build_model
    from megatron_minitron.plan.targets import Plan, TargetConfig, make_plan

    src = ModelConfig(pattern="ME-E", hidden_size=32, ffn_hidden_size=64, mamba_num_heads=4, mamba_head_dim=8,
                      mamba_num_groups=2, mamba_state_dim=8, mamba_chunk_size=16, num_attention_heads=4,
                      num_query_groups=2, kv_channels=8, vocab_size=256, seq_length=16, num_moe_experts=8,
                      moe_ffn_hidden_size=16, moe_router_topk=2, moe_shared_expert_intermediate_size=24)
    imp = ImportanceFile.random(src, torch.Generator().manual_seed(0))
    t = TargetConfig(num_moe_experts=4)
    p1, p1b, p2 = (random_expert_plan(imp, t, s) for s in (1, 1, 2))
    sets = lambda p: {i: e["experts"] for i, e in p.layers.items() if "experts" in e}  # noqa: E731
    assert sets(p1) == sets(p1b) and sets(p1) != sets(p2)
    assert sets(p1)[1] != sets(p1)[3]  # each layer its own draw
    assert sets(p1) != sets(make_plan(imp, t))  # not the scored sets
    for ex in sets(p1).values():
        assert len(ex) == 4 and len(set(ex)) == 4 and ex == sorted(ex) and all(0 <= x < 8 for x in ex)
    assert p1.settings["expert_score"] == "random" and p1.settings["expert_seed"] == 1
    assert Plan.from_dict(p1.to_dict()).to_dict() == p1.to_dict()  # plan.json's checks accept it
    assert p1.target.num_moe_experts == 4
    # grouped routing: the same count per group, with the expert FFN pruned too
    g = dataclasses.replace(src, moe_router_num_groups=4, moe_router_group_topk=2)
    pg = random_expert_plan(ImportanceFile.random(g, torch.Generator().manual_seed(1)), TargetConfig(
        num_moe_experts=4, moe_ffn_hidden_size=8), 3)
    for e in pg.layers.values():
        if "experts" in e:
            assert sorted(x // 2 for x in e["experts"]) == [0, 1, 2, 3]
            assert len(e["expert_ffn"]) == 4 and all(len(r) == 8 for r in e["expert_ffn"])
    # the prune rules fill every tensor of the pruned model from the source's (the
    # ablations' in-memory pruning, per-expert shards included)
    par = D.init(ParallelConfig())
    try:
        source = S._global_tensors(mcore.sharded_tensors(build_model(src, par)))
        lab = S.Lab.__new__(S.Lab)  # only its source tensors and seq are used by pruned()
        lab.source, lab.seq, lab.par = source, 16, par
        got = S._global_tensors(mcore.sharded_tensors(lab.pruned(p1)))
        drawn = sets(p1)[1]
        assert torch.equal(got["decoder.layers.1.mlp.router.weight"], source["decoder.layers.1.mlp.router.weight"][drawn])
        fc1 = "decoder.layers.1.mlp.experts.experts.linear_fc1.weight"
        assert got[fc1].shape[0] == 4 and torch.equal(got[fc1], source[fc1][drawn])  # [experts, F, h]
    finally:
        D.shutdown()
