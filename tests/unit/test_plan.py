"""plan: targets validation, group-aware keep sets, plan.json, parameter counts, rules."""

import dataclasses
import json

import pytest
import torch

from megatron_minitron.config import ConfigError, ModelConfig, ParallelConfig
from megatron_minitron.importance.io import ImportanceFile
from megatron_minitron.plan.stage import PlanConfig, run_plan
from megatron_minitron.plan.targets import (Plan, TargetConfig, assemble_plan, identity_plan,
                                            make_plan, summary_lines, validate_targets)
from megatron_minitron.rewrite import rules

SRC = ModelConfig(pattern="M-*-M-", hidden_size=64, ffn_hidden_size=128, mamba_num_heads=8,
                  mamba_head_dim=16, mamba_num_groups=2, mamba_state_dim=8, mamba_chunk_size=16,
                  num_attention_heads=4, num_query_groups=2, kv_channels=16, vocab_size=512,
                  seq_length=32)
HALF = TargetConfig(hidden_size=48, ffn_hidden_size=64, mamba_num_heads=4, mamba_head_dim=8,
                    num_attention_heads=2, num_layers=4, depth_layer_type="-")


def importance(cfg=SRC, seed=0) -> ImportanceFile:
    return ImportanceFile.random(cfg, torch.Generator().manual_seed(seed))


@pytest.mark.smoke
@pytest.mark.parametrize("order", ["sorted", "ranked"])
@pytest.mark.parametrize("metric,source", [("l2", "x"), ("l2", "z"), ("l2", "y"), ("flap", "x")])
def test_keep_sets_respect_group_rule(order, metric, source):
    imp = importance()
    p = make_plan(imp, HALF, mamba_source=source, mamba_metric=metric, order=order)
    per = SRC.mamba_num_heads // SRC.mamba_num_groups
    for i in p.kept_layers:
        if SRC.pattern[i] == "M":
            heads = p.layers[i]["mamba_heads"]
            k = len(heads) // SRC.mamba_num_groups
            assert len(heads) == 4 and len(set(heads)) == 4
            for gi in range(SRC.mamba_num_groups):  # slot block g holds group g only
                assert all(h // per == gi for h in heads[gi * k:(gi + 1) * k])
            if order == "sorted":
                assert heads == sorted(heads)
            if metric == "l2":  # kept heads are the top-2 of each group on the kept channels
                a = imp.layers[i]["mamba"][source][:, p.layers[i]["mamba_channels"]].norm(dim=1)
                for gi in range(SRC.mamba_num_groups):
                    grp = a[gi * per:(gi + 1) * per]
                    assert sorted(heads[gi * k:(gi + 1) * k]) == sorted(
                        (gi * per + grp.topk(k).indices).tolist())
    assert p.target.pattern.count("-") == 1 and len(p.target.pattern) == 4
    assert p.target.mamba_num_heads == 4 and p.target.mamba_num_groups == 2


def test_plan_json_roundtrip_and_identity(tmp_path):
    p = make_plan(importance(), HALF)
    p.save(tmp_path / "plan.json")
    q = Plan.load(tmp_path / "plan.json")
    assert q.to_dict() == p.to_dict()
    ident = identity_plan(SRC)
    assert ident.target == SRC and ident.params_after == ident.params_before


def test_cross_group_heads_refused():
    layers = identity_plan(SRC).layers
    layers[0]["mamba_heads"] = [0, 1, 2, 4, 3, 5, 6, 7]  # head 4 (group 1) in group 0's slots
    with pytest.raises(ConfigError, match="only within their group"):
        assemble_plan(SRC, list(range(64)), layers)
    layers[0]["mamba_heads"] = [3, 2, 1, 0, 7, 6, 5, 4]  # within-group permutation: fine
    assemble_plan(SRC, list(range(64)), layers)


def test_plan_param_count_equals_built_model():
    from megatron_minitron import dist as D
    from megatron_minitron.compat import mcore
    from megatron_minitron.model import build_model
    from megatron_minitron.rewrite.stage import global_param_count

    p = make_plan(importance(), HALF)
    par = D.init(ParallelConfig())
    try:
        for cfg, want in ((p.target, p.params_after["total"]), (p.source, p.params_before["total"])):
            model = build_model(cfg, par)
            assert global_param_count(mcore.sharded_tensors(model), model) == want
    finally:
        D.shutdown()
    assert p.params_after["total"] < p.params_before["total"]


@pytest.mark.smoke
@pytest.mark.parametrize("target,tp,pp,match", [
    (TargetConfig(hidden_size=96), 1, 1, r"hidden_size=96 is larger than the source \(64\).*<= 64"),
    (TargetConfig(ffn_hidden_size=200), 1, 1, r"ffn_hidden_size=200 is larger"),
    (TargetConfig(mamba_num_heads=16), 1, 1, r"mamba_num_heads=16 is larger"),
    (TargetConfig(mamba_head_dim=17), 1, 1, r"mamba_head_dim=17 is larger"),
    (TargetConfig(num_attention_heads=8), 1, 1, r"num_attention_heads=8 is larger"),
    (TargetConfig(mamba_num_heads=5), 1, 1, r"mamba_num_heads=5 is not divisible by model.mamba_num_groups=2; use e.g. 4 or 6"),
    (TargetConfig(num_attention_heads=3), 1, 1, r"num_attention_heads=3 is not divisible by model.num_query_groups=2"),
    (TargetConfig(mamba_num_heads=6), 4, 1, r"mamba_num_heads=6 is not divisible by parallel.tp=4; use e.g. 4 or 8"),
    (TargetConfig(ffn_hidden_size=90), 4, 1, r"ffn_hidden_size=90 is not divisible by parallel.tp=4; use e.g. 88 or 92"),
    (TargetConfig(num_layers=5), 1, 2, r"num_layers=5 .* not divisible by parallel.pp=2; use one of \[2, 4, 6\]"),
    (TargetConfig(drop_layers=[1, 2, 3, 4, 5, 0]), 1, 1, r"drop_layers.*cannot drop all"),
    (TargetConfig(drop_layers=[9]), 1, 1, r"drop_layers=\[9\].*out of range"),
    (TargetConfig(drop_layers=[0], depth_layer_type="-"), 1, 1, r"not of type '-'"),
    (TargetConfig(num_layers=1, depth_layer_type="-"), 1, 1, r"only 3 are of type '-'; use num_layers >= 3"),
    (TargetConfig(num_layers=4, drop_layers=[1, 3]), 1, 1, r"not both"),
    (TargetConfig(depth_metric="l1"), 1, 1, r"depth_metric='l1'"),
])
def test_validation_errors(target, tp, pp, match):
    with pytest.raises(ConfigError, match=match):
        validate_targets(SRC, target, tp, pp)


def test_pruned_config_validated_at_layout():
    # hidden 48 is fine; the pruned model at tp=4 needs mamba heads % 4 and groups % 4
    with pytest.raises(ConfigError, match="mamba_num_groups=2 is not divisible by parallel.tp=4"):
        make_plan(importance(), TargetConfig(mamba_num_heads=8, ffn_hidden_size=64), tp=4)


def test_missing_scores_named():
    imp = importance()
    del imp.layers[0]["flap"]
    with pytest.raises(ConfigError, match="layer 0 has no 'flap'"):
        make_plan(imp, HALF, mamba_metric="flap")
    imp = importance()
    imp.depth["kl"] = torch.full((6,), float("nan"))
    with pytest.raises(ConfigError, match="depth scores"):
        make_plan(imp, HALF)


def test_rules_cover_every_checkpoint_key_and_shapes():
    """Every key of the built pruned model has a rule; rule dims = pruned global shape."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from megatron_minitron import dist as D
    from megatron_minitron.model import build_model

    p = make_plan(importance(), HALF, order="ranked")
    par = D.init(ParallelConfig())
    try:
        sd = build_model(p.target, par).sharded_state_dict()
        apply_factories(sd)
        src_sd = build_model(p.source, par).sharded_state_dict()
        apply_factories(src_sd)
    finally:
        D.shutdown()
    src_shapes = {st.key: st.global_shape for st in nested_values(src_sd) if isinstance(st, ShardedTensor)}
    n = 0
    for st in nested_values(sd):
        if not isinstance(st, ShardedTensor):
            continue
        key, idxs = rules.rule(st.key, p)
        out = rules.take(torch.empty(src_shapes[key]), idxs)
        assert tuple(out.shape) == tuple(st.global_shape), st.key
        n += 1
    assert n > 30
    with pytest.raises(rules.RuleError):
        rules.rule("decoder.layers.0.mixer.mystery", p)


def test_run_plan_writes_files(tmp_path):
    imp = importance()
    imp.save(tmp_path / "importance.pt")
    cfg = PlanConfig(importance=str(tmp_path / "importance.pt"), output_dir=str(tmp_path / "plan"),
                     target=HALF)
    s = run_plan(cfg)
    assert (tmp_path / "plan" / "plan.json").is_file()
    txt = (tmp_path / "plan" / "plan_summary.txt").read_text()
    assert "mamba_num_heads" in txt and "heads per group" in txt
    j = json.loads((tmp_path / "plan" / "summary.json").read_text())
    assert j["params_after"]["total"] == s["params_after"]["total"] < j["params_before"]["total"]


def test_take_into_out_and_shard_box():
    t = torch.arange(20.0).reshape(4, 5)
    out = torch.empty(2, 5, dtype=torch.bfloat16)  # another dtype: converted on the way
    rules.take(t, [torch.tensor([3, 1]), None], out=out)
    assert torch.equal(out, t[[3, 1]].bfloat16())
    out = torch.empty(2, 2)
    rules.take(t, [torch.tensor([3, 1]), torch.tensor([4, 0])], out=out)
    assert torch.equal(out, t[[3, 1]][:, [4, 0]])
    # shard rows [1, 3) of keep [4, 0, 2] and cols [2, 5) of an unpruned dim
    lo, box, local = rules.shard_box([torch.tensor([4, 0, 2]), None], (1, 2), (2, 3), (6, 8))
    assert lo == (0, 2) and box == (3, 3) and local[0].tolist() == [0, 2] and local[1] is None
    with pytest.raises(ValueError, match="does not fit"):
        rules.shard_box([torch.tensor([9])], (0,), (1,), (6,))
    with pytest.raises(ValueError, match="does not fit"):
        rules.shard_box([None], (4,), (3,), (6,))


def test_group_unaware_ablation_ranks_over_the_layer_and_forces_groups(tmp_path):
    """mamba_grouping=unaware (ablation baseline): the global top-k by head score, ascending,
    cut into equal group slots; with every top head in group 0 it breaks eq. 17 (the aware
    plan keeps 2 per group), and the plan.json still round-trips through Plan.load."""
    imp = importance()
    t = TargetConfig(mamba_num_heads=4)
    for i, e in imp.layers.items():
        if "mamba" in e:  # group 0 (heads 0-3) dominates every source
            for a in e["mamba"].values():
                a[:4] += 10.0
    p = make_plan(imp, t, mamba_grouping="unaware")
    aware = make_plan(imp, t)
    for i in p.kept_layers:
        if SRC.pattern[i] == "M":
            a = imp.layers[i]["mamba"]["x"][:, p.layers[i]["mamba_channels"]].norm(dim=1)
            brute = sorted(sorted(range(8), key=lambda h: -float(a[h]))[:4])  # top-4 of all heads
            assert p.layers[i]["mamba_heads"] == brute == [0, 1, 2, 3]
            assert aware.layers[i]["mamba_heads"] != brute  # 2 per group there
            assert p.layers[i]["mamba_channels"] == aware.layers[i]["mamba_channels"]
    assert p.settings["mamba_grouping"] == "unaware"
    with pytest.raises(ConfigError, match="only within their group"):  # the rule it breaks
        assemble_plan(SRC, p.hidden, p.layers)
    p.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json").to_dict() == p.to_dict()
    # balanced scores: the global top-k is 2 per group, so unaware == aware (sorted)
    for i, e in imp.layers.items():
        if "mamba" in e:
            for a in e["mamba"].values():
                a[:4] -= 10.0
                a[[0, 1, 4, 5]] += 10.0
    assert make_plan(imp, t, mamba_grouping="unaware").layers == make_plan(imp, t).layers
    with pytest.raises(ConfigError, match="mamba_grouping='any'"):
        make_plan(imp, t, mamba_grouping="any")


def test_ffn_source_selects_pre_or_post_activation_scores():
    imp = importance()
    for e in imp.layers.values():
        if "ffn" in e:
            e["ffn_pre"] = -e["ffn"]  # opposite ranking: the two settings must keep disjoint sets
    t = TargetConfig(ffn_hidden_size=64)
    post, pre = make_plan(imp, t), make_plan(imp, t, ffn_source="pre")
    for i, e in imp.layers.items():
        if "ffn" in e:
            assert post.layers[i]["ffn"] == sorted(e["ffn"].topk(64).indices.tolist())
            assert pre.layers[i]["ffn"] == sorted(e["ffn_pre"].topk(64).indices.tolist())
            assert not set(post.layers[i]["ffn"]) & set(pre.layers[i]["ffn"])
    assert (post.settings["ffn_source"], pre.settings["ffn_source"]) == ("post", "pre")
    with pytest.raises(ConfigError, match="ffn_source='mid'"):
        make_plan(imp, t, ffn_source="mid")
    for e in imp.layers.values():
        e.pop("ffn_pre", None)
    with pytest.raises(ConfigError, match="no 'ffn_pre' scores"):
        make_plan(imp, t, ffn_source="pre")


# ----------------------------------------------------------------------------- MoE axes (issue 19)

MOE = ModelConfig(pattern="ME-E", hidden_size=32, ffn_hidden_size=64, mamba_num_heads=4, mamba_head_dim=8,
                  mamba_num_groups=2, mamba_state_dim=8, mamba_chunk_size=16, num_attention_heads=4,
                  num_query_groups=2, kv_channels=8, vocab_size=256, seq_length=16, num_moe_experts=8,
                  moe_ffn_hidden_size=16, moe_router_topk=2, moe_shared_expert_intermediate_size=24)
MOE_T = TargetConfig(hidden_size=24, num_moe_experts=6, moe_ffn_hidden_size=12,
                     moe_shared_expert_intermediate_size=16)
GROUPED = dataclasses.replace(MOE, moe_router_num_groups=4, moe_router_group_topk=2, moe_router_topk=2)


@pytest.mark.parametrize("score", ["out", "mass", "freq"])
def test_moe_keep_sets_are_each_layers_and_each_experts_top(score):
    imp = importance(MOE)
    p = make_plan(imp, MOE_T, expert_score=score, order="ranked")
    t = p.target
    assert (t.num_moe_experts, t.moe_ffn_hidden_size, t.moe_shared_expert_intermediate_size) == (6, 12, 16)
    for i in (1, 3):
        e, sc = p.layers[i], imp.layers[i]
        assert e["experts"] == sc["experts"][score].topk(6).indices.tolist()  # this layer's own top 6
        for j, x in enumerate(e["experts"]):  # pruned expert j: ITS OWN top neurons
            assert e["expert_ffn"][j] == sc["expert_ffn"][x].topk(12).indices.tolist()
        assert e["shared_ffn"] == sc["shared_ffn"].topk(16).indices.tolist()
    assert p.layers[1]["experts"] != p.layers[3]["experts"]
    assert p.settings["expert_score"] == score
    s = make_plan(imp, MOE_T, expert_score=score)  # sorted: the same sets, ascending
    assert s.layers[1]["experts"] == sorted(p.layers[1]["experts"])
    assert s.layers[1]["expert_ffn"][0] == sorted(p.layers[1]["expert_ffn"][p.layers[1]["experts"].index(
        s.layers[1]["experts"][0])])


def test_moe_plan_json_roundtrip_counts_and_refusals(tmp_path):
    from megatron_minitron import dist as D
    from megatron_minitron.compat import mcore
    from megatron_minitron.model import build_model
    from megatron_minitron.rewrite.stage import global_param_count

    p = make_plan(importance(MOE), MOE_T, ep=2)
    p.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json").to_dict() == p.to_dict()
    par = D.init(ParallelConfig())
    try:  # the plan's parameter counts are the built models'
        for cfg, want in ((p.target, p.params_after["total"]), (p.source, p.params_before["total"])):
            model = build_model(cfg, par)
            assert global_param_count(mcore.sharded_tensors(model), model) == want
    finally:
        D.shutdown()
    assert p.params_after["active"] < p.params_before["active"]
    # hand-edited plans
    d = json.loads(json.dumps(p.to_dict()))
    d["layers"]["1"]["expert_ffn"][2] = d["layers"]["1"]["expert_ffn"][2][:-1]
    with pytest.raises(ConfigError, match=r"expert_ffn\[2\] keeps 11 neurons"):
        Plan.from_dict(d)
    d = json.loads(json.dumps(p.to_dict()))
    d["layers"]["3"]["experts"] = d["layers"]["3"]["experts"][:4]
    with pytest.raises(ConfigError, match="keeps 4 experts; target.num_moe_experts=6"):
        Plan.from_dict(d)


def test_moe_grouped_routing_keeps_the_same_count_per_group():
    imp = importance(GROUPED)
    p = make_plan(imp, TargetConfig(num_moe_experts=4), order="ranked")
    for i in (1, 3):
        ex, sc = p.layers[i]["experts"], imp.layers[i]["experts"]["out"]
        assert [x // 2 for x in ex] == [0, 1, 2, 3]  # one per group of 2, in group order
        assert ex == [2 * g + int(sc[2 * g:2 * g + 2].argmax()) for g in range(4)]
    layers = identity_plan(GROUPED).layers
    layers[1] = {"experts": [1, 2, 3, 4, 5, 6, 7, 0]}  # expert 2 (group 1) in group 0's slots
    with pytest.raises(ConfigError, match="experts may be reordered only within their group"):
        assemble_plan(GROUPED, list(range(32)), layers)
    layers[1] = {"experts": [1, 0, 3, 2, 5, 4, 7, 6]}  # within groups: fine
    assemble_plan(GROUPED, list(range(32)), layers)


@pytest.mark.parametrize("src,target,tp,ep,match", [
    (MOE, TargetConfig(num_moe_experts=1), 1, 1,
     r"num_moe_experts=1 keeps fewer experts than a token routes to: model.moe_router_topk=2 > 1; valid: 2"),
    (MOE, TargetConfig(num_moe_experts=5), 1, 2,
     r"num_moe_experts=5 is not divisible by parallel.ep=2 .*valid target.num_moe_experts at ep=2: 2, 4, 6, 8"),
    (dataclasses.replace(MOE, num_moe_experts=6), TargetConfig(), 1, 4,
     r"kept expert count 6 \(target.num_moe_experts=0\) is not divisible by parallel.ep=4.*: 4"),
    (MOE, TargetConfig(num_moe_experts=9), 1, 1, r"num_moe_experts=9 is larger than the source \(8\)"),
    (MOE, TargetConfig(moe_ffn_hidden_size=10), 4, 1,
     r"moe_ffn_hidden_size=10 is not divisible by parallel.tp=4; use e.g. 8 or 12"),
    (MOE, TargetConfig(moe_shared_expert_intermediate_size=30), 1, 1, r"larger than the source \(24\)"),
    (dataclasses.replace(MOE, moe_shared_expert_intermediate_size=0),
     TargetConfig(moe_shared_expert_intermediate_size=8), 1, 1, "the model has no shared expert"),
    (GROUPED, TargetConfig(num_moe_experts=6), 1, 1,
     r"num_moe_experts=6 is not divisible by model.moe_router_num_groups=4 .*same number of its own experts.*valid: 4, 8"),
    (dataclasses.replace(GROUPED, moe_router_topk=4), TargetConfig(num_moe_experts=4), 1, 1,
     r"moe_router_topk=4 > 2 of 4 groups x 1 experts = 2; valid: 8"),
    (SRC, TargetConfig(num_moe_experts=4), 1, 1, "has no E layers; leave it 0"),
])
def test_moe_validation_errors(src, target, tp, ep, match):
    with pytest.raises(ConfigError, match=match):
        validate_targets(src, target, tp, 1, ep=ep)


def test_moe_plan_needs_moe_scores_only_for_the_axes_it_prunes():
    imp = importance(MOE)
    for e in imp.layers.values():  # an importance file from before the MoE scores
        for k in ("experts", "expert_ffn", "shared_ffn"):
            e.pop(k, None)
    p = make_plan(imp, TargetConfig(hidden_size=24, num_layers=3, depth_layer_type="E"))
    assert all(p.layers.get(i, {}) == {} for i in p.kept_layers if MOE.pattern[i] == "E")
    for t, what in ((TargetConfig(num_moe_experts=4), r"experts\['out'\]"),
                    (TargetConfig(moe_ffn_hidden_size=8), "'expert_ffn'"),
                    (TargetConfig(moe_shared_expert_intermediate_size=8), "'shared_ffn'")):
        with pytest.raises(ConfigError, match=f"layer 1 \\(MoE\\) has no {what} scores.*re-run stats"):
            make_plan(imp, t)
    imp = importance(MOE)
    imp.layers[1]["expert_ffn"] = imp.layers[1]["expert_ffn"][:4]
    with pytest.raises(ConfigError, match=r"expert_ffn' scores have shape \(4, 16\), expected \(8, 16\)"):
        make_plan(imp, TargetConfig(moe_ffn_hidden_size=8))
    with pytest.raises(ConfigError, match="expert_score='load'"):
        make_plan(importance(MOE), TargetConfig(num_moe_experts=4), expert_score="load")


@pytest.mark.parametrize("change", [{}, {"moe_latent_size": 12}, {"activation": "swiglu"}])
def test_moe_rules_cover_every_key_and_slice_each_expert(change):
    """Every key of the built pruned MoE model has a rule with the pruned global shape; the
    reference `take` of the stacked expert tensors equals slicing expert by expert."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from megatron_minitron import dist as D
    from megatron_minitron.model import build_model

    src = dataclasses.replace(MOE, **change)
    p = make_plan(importance(src), MOE_T, order="ranked")
    par = D.init(ParallelConfig())
    try:
        sds = []
        for m in (p.target, p.source):
            sd = build_model(m, par).sharded_state_dict()
            apply_factories(sd)
            sds.append({st.key: st for st in nested_values(sd) if isinstance(st, ShardedTensor)})
    finally:
        D.shutdown()
    for key, st in sds[0].items():
        skey, idxs = rules.rule(key, p)
        full = torch.randn(sds[1][skey].global_shape)
        out = rules.take(full, idxs)
        assert tuple(out.shape) == tuple(st.global_shape), key
        if key == "decoder.layers.2.mlp.experts.experts.linear_fc1.weight":  # pruned layer 2 <- source 3
            e, glu = p.layers[3], change.get("activation") == "swiglu"
            d = None if src.moe_latent_size else p.hidden
            for j, x in enumerate(e["experts"]):
                rows = e["expert_ffn"][j] + ([16 + r for r in e["expert_ffn"][j]] if glu else [])
                want = full[x][rows]
                assert torch.equal(out[j], want if d is None else want[:, d])
        if key == "decoder.layers.2.mlp.experts.experts.linear_fc2.weight":
            e = p.layers[3]
            for j, x in enumerate(e["experts"]):
                want = full[x][:, e["expert_ffn"][j]]
                assert torch.equal(out[j], want if src.moe_latent_size else want[p.hidden])


def test_take_and_shard_box_with_per_expert_indices():
    t = torch.arange(4 * 5 * 3.0).reshape(4, 5, 3)
    ex, ffn = torch.tensor([3, 0]), torch.tensor([[4, 1], [0, 2]])  # expert 3 keeps 4, 1; expert 0 keeps 0, 2
    out = torch.empty(2, 2, 2, dtype=torch.bfloat16)
    rules.take(t, [ex, ffn, torch.tensor([2, 0])], out=out)
    assert torch.equal(out, torch.stack([t[3][[4, 1]][:, [2, 0]], t[0][[0, 2]][:, [2, 0]]]).bfloat16())
    # the shard of pruned expert 1 (one [1, 2, 3] chunk, megatron's SequentialMLP layout)
    lo, box, local = rules.shard_box([ex, ffn, None], (1, 0, 0), (1, 2, 3), (4, 5, 3))
    assert lo == (0, 0, 0) and box == (1, 3, 3) and local[1].tolist() == [[0, 2]]
    region = t[lo[0]:lo[0] + box[0], lo[1]:lo[1] + box[1]]
    assert torch.equal(rules.take(region, local), t[0][[0, 2]][None])
    with pytest.raises(ValueError, match="does not fit the per-row keep set"):
        rules.shard_box([ex, ffn, None], (1, 0, 0), (1, 3, 3), (4, 5, 3))
    with pytest.raises(ValueError, match="only allowed on dimensions > 0"):
        rules.take(t, [ffn, None, None])


def test_export_notes_expert_widths_transformers_default_kernel_refuses():
    from megatron_minitron.hf.stage import grouped_mm_note

    assert grouped_mm_note(MOE, 4) is None and grouped_mm_note(SRC, 2) is None
    odd = dataclasses.replace(MOE, moe_ffn_hidden_size=18)  # 72 bytes a row in fp32
    assert "moe_ffn_hidden_size=18 is not a multiple of 4" in grouped_mm_note(odd, 4)
    assert "experts_implementation='eager'" in grouped_mm_note(dataclasses.replace(MOE, hidden_size=36), 2)


ATTN = dataclasses.replace(SRC, pattern="*-*-")  # no Mamba layer (issue 23)


def test_attention_mlp_model_prunes_hidden_ffn_heads_and_depth():
    """A pattern without Mamba layers: hidden, FFN, attention heads and depth are its axes;
    a Mamba target is refused naming the key, and the summary shows no Mamba rows."""
    t = TargetConfig(hidden_size=48, ffn_hidden_size=64, num_attention_heads=2, num_layers=3)
    imp = importance(ATTN)
    p = make_plan(imp, t)
    dropped = int(imp.depth["kl"].argmin())  # depth: the lowest-KL layer goes
    assert p.dropped_layers == [dropped] and p.target.pattern == "*-*-"[:dropped] + "*-*-"[dropped + 1:]
    assert (p.target.hidden_size, p.target.ffn_hidden_size, p.target.num_attention_heads) == (48, 64, 2)
    assert [len(v) for e in p.layers.values() for v in e.values()] == [
        2 if ATTN.pattern[i] == "*" else 64 for i in p.kept_layers]
    assert p.params_after["total"] < p.params_before["total"]
    lines = "\n".join(summary_lines(p))
    assert "mamba" not in lines and "num_attention_heads" in lines
    for key in ("mamba_num_heads", "mamba_head_dim"):
        with pytest.raises(ConfigError, match=rf"^target\.{key}=4 is set but the source pattern '\*-\*-' "
                                              rf"has no Mamba \(M\) layer; set target\.{key}=0$"):
            make_plan(importance(ATTN), dataclasses.replace(t, **{key: 4}))
