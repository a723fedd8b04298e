"""Pure HF <-> ours mapping (no megatron): layouts are exact inverses, config fields map or
are refused by name, and bad folders fail with clear errors before any model is built."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from megatron_minitron.config import ConfigError, ModelConfig, ParallelConfig
from megatron_minitron.hf import mapping as M

CFG = ModelConfig(pattern="M*-M", hidden_size=32, ffn_hidden_size=40, mamba_num_heads=6,
                  mamba_head_dim=4, mamba_num_groups=3, mamba_state_dim=5, mamba_chunk_size=8,
                  num_attention_heads=6, num_query_groups=2, kv_channels=8, vocab_size=50,
                  seq_length=16, position_embedding="none")


def rand_hf(cfg, unit, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in M.expected_hf_shapes(cfg, unit).items()}


@pytest.mark.smoke
def test_qkv_interleave_per_query_group():
    c = CFG
    q = torch.arange(6 * 8).float()[:, None].expand(-1, 3)  # row r of q carries value r
    k = 1000 + torch.arange(2 * 8).float()[:, None].expand(-1, 3)
    v = 2000 + torch.arange(2 * 8).float()[:, None].expand(-1, 3)
    w = M.qkv_merge(q, k, v, c)
    # group 0: q heads 0..2 (rows 0..23), k head 0, v head 0; then group 1
    assert w[:24, 0].tolist() == list(range(24))
    assert w[24:32, 0].tolist() == [1000 + i for i in range(8)]
    assert w[32:40, 0].tolist() == [2000 + i for i in range(8)]
    assert w[40, 0].item() == 24
    q2, k2, v2 = M.qkv_split(w, c)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)


@pytest.mark.smoke
@pytest.mark.parametrize("untie", [True, False])
def test_tensor_mapping_roundtrip_is_exact(untie):
    cfg = ModelConfig(**{**CFG.to_dict(), "untie_embeddings": untie})
    for unit in M.layer_units(cfg):
        hf = rand_hf(cfg, unit, seed=hash(unit) % 1000)
        ours = M.hf_to_ours(cfg, unit, hf.get)
        assert sorted(ours) == sorted(M.our_keys(cfg, unit))
        back = M.ours_to_hf(cfg, unit, ours)
        assert sorted(back) == sorted(hf)
        for n in hf:
            assert torch.equal(back[n], hf[n]), n


def test_mamba_in_proj_parts_in_order():
    unit = ("layer", 0)
    hf = rand_hf(CFG, unit)
    ours = M.hf_to_ours(CFG, unit, hf.get)
    w = hf["backbone.layers.0.mixer.in_proj.weight"]
    s = M.mamba_part_sizes(CFG)  # z 24, x 24, B 15, C 15, dt 6
    assert torch.equal(ours["decoder.layers.0.mixer.in_proj.weight.dt"], w[-6:])
    assert torch.equal(ours["decoder.layers.0.mixer.in_proj.weight.x"], w[s["z"]: 2 * s["z"]])
    assert torch.equal(ours["decoder.layers.0.mixer.conv1d.bias.C"],
                       hf["backbone.layers.0.mixer.conv1d.bias"][-15:])
    assert "decoder.layers.0.mixer.in_proj.layer_norm_weight" in ours  # TE name of the Mamba norm


def test_missing_conv_bias_means_zeros_and_missing_weight_fails():
    unit = ("layer", 0)
    hf = rand_hf(CFG, unit)
    del hf["backbone.layers.0.mixer.conv1d.bias"]  # use_conv_bias=false folders
    ours = M.hf_to_ours(CFG, unit, hf.get)
    assert ours["decoder.layers.0.mixer.conv1d.bias.x"].abs().sum() == 0
    del hf["backbone.layers.0.mixer.A_log"]
    with pytest.raises(M.HFMappingError, match="backbone.layers.0.mixer.A_log is missing"):
        M.hf_to_ours(CFG, unit, hf.get)


def test_shape_mismatch_names_the_tensor():
    unit = ("layer", 2)
    hf = rand_hf(CFG, unit)
    hf["backbone.layers.2.mixer.up_proj.weight"] = torch.zeros(41, 32)
    with pytest.raises(M.HFMappingError, match=r"up_proj.weight has shape \[41, 32\].*\[40, 32\]"):
        M.hf_to_ours(CFG, unit, hf.get)


@pytest.mark.smoke
def test_config_roundtrip():
    hf = M.hf_config_from_model(CFG, "float32", {"eos_token_id": 0, "pad_token_id": 1})
    assert hf["hybrid_override_pattern"] == "M*-M" and hf["time_step_min"] == M.EXPORT_TIME_STEP_MIN
    assert hf["time_step_limit"] == [0.0, math.inf]  # no dt clamp
    back = M.model_config_from_hf(json.loads(json.dumps(hf)))
    assert back.to_dict() == CFG.to_dict()


@pytest.mark.parametrize("field,value,match", [
    ("layers_block_type", ["linear_attention", "conv"], "layers_block_type"),
    ("layers_block_type", ["linear_attention", "moe"], "n_routed_experts"),  # moe needs its fields
    ("mlp_hidden_act", "silu", "mlp_hidden_act"),
    ("use_bias", True, "use_bias"),
    ("layer_norm_epsilon", 1e-6, "layer_norm_epsilon"),
    ("sliding_window", 128, "sliding_window"),
    ("model_type", "mamba2", "model_type"),
])
def test_unsupported_hf_fields_are_refused_by_name(field, value, match):
    hf = M.hf_config_from_model(CFG)
    hf[field] = value
    with pytest.raises(ConfigError, match=match):
        M.model_config_from_hf(hf)


@pytest.mark.parametrize("limit,clamp", [
    ([0.02, math.inf], (0.02, 0.0)),
    ([0.0, 0.05], (0.0, 0.05)),
    ([0.001, 0.1], (0.001, 0.1)),
    ([0.02, {"__float__": "Infinity"}], (0.02, 0.0)),  # transformers' save_pretrained spelling
    ([0.0, math.inf], (0.0, 0.0)),
    ([-1.0, math.inf], (0.0, 0.0)),  # softplus >= 0: a negative lower bound clamps nothing
    ([0.0, 1e30], (0.0, 0.0)),  # a numeric 'none' some configs write: no dt reaches it
])
def test_time_step_limit_is_the_dt_clamp(limit, clamp):
    hf = M.hf_config_from_model(CFG)
    hf["time_step_min"] = 0.001  # an init bound only (transformers >= 5.25): no clamp from it
    hf["time_step_limit"] = limit
    cfg = M.model_config_from_hf(json.loads(json.dumps(hf)))
    assert (cfg.mamba_dt_clamp_min, cfg.mamba_dt_clamp_max) == clamp
    back = M.hf_config_from_model(cfg)  # export writes the clamp used
    assert back["time_step_limit"] == [clamp[0], clamp[1] or math.inf]
    assert back["time_step_min"] == (clamp[0] or M.EXPORT_TIME_STEP_MIN)  # what <= 5.24 clamps at
    assert M.model_config_from_hf(back).to_dict() == cfg.to_dict()
    dropped = M.model_config_from_hf(hf, ignore_time_step_limit=True)
    assert (dropped.mamba_dt_clamp_min, dropped.mamba_dt_clamp_max) == (0.0, 0.0)


def test_time_step_min_and_absent_limit_are_no_clamp_and_legacy_name_is_read():
    hf = M.hf_config_from_model(CFG)
    del hf["time_step_limit"]
    hf["time_step_min"] = 0.02
    cfg = M.model_config_from_hf(hf)
    assert (cfg.mamba_dt_clamp_min, cfg.mamba_dt_clamp_max) == (0.0, 0.0)
    hf["mamba_dt_limit"] = [0.02, 0.5]  # the name transformers also reads (and prefers)
    hf["time_step_limit"] = [0.0, math.inf]
    cfg = M.model_config_from_hf(hf)
    assert (cfg.mamba_dt_clamp_min, cfg.mamba_dt_clamp_max) == (0.02, 0.5)


@pytest.mark.parametrize("limit", [[0.05, 0.02], [0.0, 0.0], [0.0], "inf", [math.nan, 1.0], [0.0, None]])
def test_bad_time_step_limit_is_refused_by_name(limit):
    hf = M.hf_config_from_model(CFG)
    hf["time_step_limit"] = limit
    with pytest.raises(M.HFMappingError, match="time_step_limit"):
        M.model_config_from_hf(hf)


def test_dt_clamp_range_is_validated():
    with pytest.raises(ConfigError, match="0 <= min < max"):
        ModelConfig(**{**CFG.to_dict(), "mamba_dt_clamp_min": 0.001, "mamba_dt_clamp_max": 0.0005}).validate()


def test_old_ignore_time_step_min_key_is_refused_naming_the_new_one():
    from megatron_minitron.config import load_stage_config

    with pytest.raises(ConfigError, match=r"ignore_time_step_min was removed: use ignore_time_step_limit\. "
                                          r"The Mamba dt clamp is now config.json time_step_limit"):
        load_stage_config("import-hf", None, ["ignore_time_step_min=true"])
    assert load_stage_config("import-hf", None, ["ignore_time_step_limit=true"]).ignore_time_step_limit
    recipe = Path(__file__).resolve().parents[2] / "configs" / "import_hf_example.yaml"
    assert load_stage_config("import-hf", str(recipe), []).ignore_time_step_limit is False


@pytest.mark.parametrize("field,value", [("position_embedding", "rope"), ("activation", "swiglu"),
                                         ("norm_epsilon", 1e-6)])
def test_unexportable_model_fields_are_refused_by_name(field, value):
    cfg = ModelConfig(**{**CFG.to_dict(), field: value})
    with pytest.raises(ConfigError, match=f"model.{field}"):
        M.hf_config_from_model(cfg)


def test_global_keys_and_tp_slices():
    assert M.global_key_of_param("decoder.layers.1.norm.weight", 4) == \
        "decoder.layers.5.mixer.in_proj.layer_norm_weight"
    assert M.global_key_of_param("decoder.layers.0.pre_mlp_layernorm.weight", 0) == \
        "decoder.layers.0.mlp.linear_fc1.layer_norm_weight"
    assert M.global_key_of_param("decoder.layers.2.mixer.norm.weight", 0) == "decoder.layers.2.mixer.norm.weight"
    unit = ("layer", 0)
    ours = M.hf_to_ours(CFG, unit, rand_hf(CFG, unit).get)
    key = "decoder.layers.0.mixer.in_proj.weight"
    r1 = M.local_from_global(key, ours, 3, 1, 0)  # tp=3: each rank 2 heads, 1 group
    s = M.mamba_part_sizes(CFG)
    assert r1.shape[0] == sum(s.values()) // 3
    assert torch.equal(r1[:8], ours[key + ".z"][8:16])  # its z slice comes first


def test_shard_plan_and_sizes():
    plan = M.shard_plan([(("a", 0), 6), (("b", 0), 5), (("c", 0), 20), (("d", 0), 1)], 10)
    assert plan == [[("a", 0)], [("b", 0)], [("c", 0)], [("d", 0)]]
    assert M.shard_plan([(("a", 0), 3), (("b", 0), 3)], 10) == [[("a", 0), ("b", 0)]]
    assert M.parse_size("5GB") == 5 * 10**9 and M.parse_size("2MiB") == 2 * 2**20
    with pytest.raises(ConfigError, match="max_shard_size"):
        M.parse_size("lots")


# ---------------------------------------------------------------- folders (transformers)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    tr = pytest.importorskip("transformers")
    cfg = tr.NemotronHConfig(**{k: v for k, v in M.hf_config_from_model(CFG).items()
                                if k not in ("architectures", "hybrid_override_pattern", "num_hidden_layers")})
    model = tr.NemotronHForCausalLM(cfg)
    d = tmp_path_factory.mktemp("hfunit") / "hf"
    model.save_pretrained(d, max_shard_size="20KB")
    return d


def _copy(src, tmp_path):
    dst = tmp_path / "hf"
    shutil.copytree(src, dst)
    return dst


def test_folder_checks_pass_on_a_good_folder(hf_folder):
    from megatron_minitron.hf.stage import ImportHFConfig, _check_import

    folder, mcfg = _check_import(ImportHFConfig(hf_dir=str(hf_folder)))
    assert mcfg.to_dict() == CFG.to_dict()
    assert folder.get("backbone.layers.0.mixer.A_log").shape == (6,)


def test_time_step_limit_round_trips_through_transformers_config(tmp_path):
    tr = pytest.importorskip("transformers")
    cfg = ModelConfig(**{**CFG.to_dict(), "mamba_dt_clamp_min": 0.02})
    text = json.dumps(M.hf_config_from_model(cfg), indent=2)
    assert '"time_step_limit": [\n    0.02,\n    Infinity\n  ]' in text  # NVIDIA's spelling
    (tmp_path / "config.json").write_text(text)
    loaded = tr.NemotronHConfig.from_pretrained(tmp_path)
    assert list(loaded.time_step_limit) == [0.02, math.inf]
    loaded.save_pretrained(tmp_path / "re")  # transformers' own spelling of inf
    raw = json.loads((tmp_path / "re" / "config.json").read_text())
    assert raw["time_step_limit"][1] in ({"__float__": "Infinity"}, math.inf)
    assert M.model_config_from_hf(raw).to_dict() == cfg.to_dict()


def test_missing_shard_is_reported(hf_folder, tmp_path):
    from megatron_minitron.hf.stage import ImportHFConfig, _check_import

    d = _copy(hf_folder, tmp_path)
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ConfigError, match=victim.name):
        _check_import(ImportHFConfig(hf_dir=str(d)))


def test_mismatched_tensor_shape_is_reported_before_building(hf_folder, tmp_path):
    from megatron_minitron.hf.stage import ImportHFConfig, _check_import

    d = _copy(hf_folder, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"up_proj.weight .* has shape \[40, 32\] but config.json implies \[48, 32\]"):
        _check_import(ImportHFConfig(hf_dir=str(d)))


def test_unsupported_field_in_folder(hf_folder, tmp_path):
    from megatron_minitron.hf.stage import ImportHFConfig, _check_import

    d = _copy(hf_folder, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["mlp_hidden_act"] = "silu"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="mlp_hidden_act='silu'"):
        _check_import(ImportHFConfig(hf_dir=str(d)))


def test_dense_export_config_has_no_moe_fields():
    hf = M.hf_config_from_model(CFG)
    assert "E" not in hf["hybrid_override_pattern"] and hf["num_nextn_predict_layers"] == 0
    assert not [k for k in hf if "expert" in k or k in ("n_group", "topk_group", "norm_topk_prob",
                                                         "routed_scaling_factor", "moe_latent_size")]


# ----------------------------------------------------------------------------- MoE (E layers)

MOE = ModelConfig(**{**CFG.to_dict(), "pattern": "ME*E-", "num_moe_experts": 4, "moe_ffn_hidden_size": 12,
                     "moe_router_topk": 2, "moe_shared_expert_intermediate_size": 20,
                     "moe_router_topk_scaling_factor": 2.5})
MOE_VARIANTS = {
    "shared": {},
    "no_shared": {"moe_shared_expert_intermediate_size": 0},
    "latent": {"moe_latent_size": 8},
    "grouped": {"moe_router_num_groups": 2, "moe_router_group_topk": 1},
    "top1": {"moe_router_topk": 1},
}


def moe(**change):
    return ModelConfig(**{**MOE.to_dict(), **change})


@pytest.mark.smoke
@pytest.mark.parametrize("variant", sorted(MOE_VARIANTS))
def test_moe_tensor_mapping_roundtrip_is_exact(variant):
    cfg = moe(**MOE_VARIANTS[variant])
    for unit in [("layer", 1), ("layer", 3)]:
        hf = rand_hf(cfg, unit, seed=unit[1])
        ours = M.hf_to_ours(cfg, unit, hf.get)
        assert sorted(ours) == sorted(M.our_keys(cfg, unit))
        back = M.ours_to_hf(cfg, unit, ours)
        zero = M.hf_zero_tensors(cfg, unit)  # no shared expert: export writes a zero shared MLP
        assert sorted(back) == sorted(list(hf) + zero)
        for n in hf:
            assert torch.equal(back[n], hf[n]), n
        for n in zero:
            assert back[n].abs().sum() == 0 and n in M.exported_hf_shapes(cfg, unit)


def test_moe_experts_are_stacked_in_expert_order():
    unit = ("layer", 1)
    hf = rand_hf(MOE, unit)
    ours = M.hf_to_ours(MOE, unit, hf.get)
    p, o = "backbone.layers.1.mixer.", "decoder.layers.1."
    fc1, fc2 = ours[o + "mlp.experts.experts.linear_fc1.weight"], ours[o + "mlp.experts.experts.linear_fc2.weight"]
    assert fc1.shape == (4, 12, 32) and fc2.shape == (4, 32, 12)
    for e in range(4):
        assert torch.equal(fc1[e], hf[p + f"experts.{e}.up_proj.weight"])
        assert torch.equal(fc2[e], hf[p + f"experts.{e}.down_proj.weight"])
    assert torch.equal(ours[o + "mlp.router.weight"], hf[p + "gate.weight"])
    assert torch.equal(ours[o + "mlp.router.expert_bias"], hf[p + "gate.e_score_correction_bias"])
    assert ours[o + "mlp.router.expert_bias"].dtype == torch.float32
    assert torch.equal(ours[o + "pre_mlp_layernorm.weight"], hf["backbone.layers.1.norm.weight"])
    assert torch.equal(ours[o + "mlp.shared_experts.linear_fc2.weight"], hf[p + "shared_experts.down_proj.weight"])
    hf[p + "experts.3.up_proj.weight"] = torch.zeros(12, 31)
    with pytest.raises(M.HFMappingError, match=r"experts.3.up_proj.weight has shape \[12, 31\].*\[12, 32\]"):
        M.hf_to_ours(MOE, unit, hf.get)
    hf = rand_hf(MOE, unit)
    del hf[p + "experts.2.down_proj.weight"]
    with pytest.raises(M.HFMappingError, match="experts.2.down_proj.weight is missing"):
        M.hf_to_ours(MOE, unit, hf.get)


def test_moe_export_without_expert_bias_writes_zeros():
    cfg = moe(moe_router_expert_bias=False)
    unit = ("layer", 1)
    ours = M.hf_to_ours(cfg, unit, rand_hf(cfg, unit).get)
    assert "decoder.layers.1.mlp.router.expert_bias" not in ours
    back = M.ours_to_hf(cfg, unit, ours)
    b = back["backbone.layers.1.mixer.gate.e_score_correction_bias"]
    assert b.dtype == torch.float32 and b.shape == (4,) and b.abs().sum() == 0
    assert M.hf_config_from_model(cfg)["n_routed_experts"] == 4


@pytest.mark.smoke
@pytest.mark.parametrize("variant", sorted(MOE_VARIANTS))
def test_moe_config_roundtrip(variant):
    cfg = moe(**MOE_VARIANTS[variant])
    hf = json.loads(json.dumps(M.hf_config_from_model(cfg)))
    assert hf["layers_block_type"][1] == "moe" and hf["num_nextn_predict_layers"] == 0
    assert hf["norm_topk_prob"] == (cfg.moe_router_topk > 1)
    assert hf["n_shared_experts"] == (1 if cfg.moe_shared_expert_intermediate_size else 0)
    assert M.model_config_from_hf(hf).to_dict() == cfg.to_dict()


def test_moe_config_from_transformers_fields():
    hf = M.hf_config_from_model(MOE)
    hf.update(n_group=4, topk_group=4, num_experts_per_tok=3)  # every group chosen: no grouping
    cfg = M.model_config_from_hf(hf)
    assert (cfg.moe_router_num_groups, cfg.moe_router_group_topk, cfg.moe_router_topk) == (1, 1, 3)
    hf = M.hf_config_from_model(MOE)
    hf.update(moe_shared_expert_intermediate_size=None, moe_latent_size=None)  # transformers' fallback
    cfg = M.model_config_from_hf(hf)
    assert cfg.moe_shared_expert_intermediate_size == CFG.ffn_hidden_size and cfg.moe_latent_size == 0
    assert (cfg.moe_router_score_function, cfg.moe_router_expert_bias) == ("sigmoid", True)


@pytest.mark.parametrize("change,match", [
    ({"norm_topk_prob": False}, r"norm_topk_prob=False .*always divides"),
    ({"num_experts_per_tok": 1, "norm_topk_prob": True}, r"norm_topk_prob=True .*num_experts_per_tok=1"),
    ({"n_shared_experts": 2}, "n_shared_experts=2"),
    ({"n_group": 2, "topk_group": 1, "num_experts_per_tok": 1, "norm_topk_prob": False}, r"topk_group=1 .*top 2"),
    ({"n_group": 3}, r"n_group=3 .*not divisible"),
    ({"mlp_hidden_act": "silu"}, "mlp_hidden_act"),
    ({"n_routed_experts": 0}, "n_routed_experts=0"),
])
def test_moe_hf_fields_megatron_computes_differently_are_refused(change, match):
    hf = {**M.hf_config_from_model(MOE), **change}
    with pytest.raises(ConfigError, match=match):
        M.model_config_from_hf(hf)


@pytest.mark.parametrize("change,match", [
    ({"moe_router_score_function": "softmax", "moe_router_expert_bias": False},
     "moe_router_score_function='softmax'"),
    ({"moe_router_num_groups": 2, "moe_router_group_topk": 1, "moe_router_topk": 1}, "moe_router_group_topk=1"),
    ({"activation": "swiglu"}, "model.activation"),
    ({"num_moe_experts": 2, "moe_router_num_groups": 2, "moe_router_group_topk": 1, "moe_router_topk": 2},
     "model.num_moe_experts=2"),
])
def test_moe_unexportable_models_are_refused(change, match):
    with pytest.raises(ConfigError, match=match):
        M.hf_config_from_model(moe(**change))


def test_moe_local_parameter_names_to_global_keys():
    pat = MOE.pattern  # ME*E-
    # an E layer's norm is stored as is; the dense MLP's under its TE name
    assert M.global_key_of_param("decoder.layers.0.pre_mlp_layernorm.weight", 1, pat) == \
        "decoder.layers.1.pre_mlp_layernorm.weight"
    assert M.global_key_of_param("decoder.layers.4.pre_mlp_layernorm.weight", 0, pat) == \
        "decoder.layers.4.mlp.linear_fc1.layer_norm_weight"
    k = M.global_key_of_param("decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.weight", 3, pat)
    assert M.expert_of_key(k, 4, 2, 1) == ("decoder.layers.3.mlp.experts.experts.linear_fc2.weight", 3)
    assert M.expert_of_key("decoder.layers.3.mlp.experts.linear_fc1.weight0", 4, 2, 1) == \
        ("decoder.layers.3.mlp.experts.experts.linear_fc1.weight", 2)  # TE grouped GEMM names
    assert M.expert_of_key("decoder.layers.3.mlp.router.expert_bias", 4, 2, 1) == \
        ("decoder.layers.3.mlp.router.expert_bias", None)
    with pytest.raises(M.HFMappingError, match="local expert 2"):
        M.expert_of_key("decoder.layers.3.mlp.experts.local_experts.2.linear_fc1.weight", 4, 2, 0)


def test_moe_local_slices_tile_the_global_tensors_at_tp2_ep2():
    # what every (tp_rank, ep_rank) of a TP=2 x EP=2 layout copies in: together, each global
    # stacked tensor exactly once (fc1 column-parallel: rows of each expert; fc2: columns)
    unit = ("layer", 1)
    ours = M.hf_to_ours(MOE, unit, rand_hf(MOE, unit).get)
    for proj, dim in (("linear_fc1", 0), ("linear_fc2", 1)):
        full = ours[f"decoder.layers.1.mlp.experts.experts.{proj}.weight"]
        got = torch.full_like(full, float("nan"))
        for ep_rank in range(2):
            for le in range(2):
                key, e = M.expert_of_key(f"decoder.layers.1.mlp.experts.local_experts.{le}.{proj}.weight",
                                         4, 2, ep_rank)
                for tp_rank in range(2):
                    x = M.local_from_global(key, ours, 2, tp_rank, dim, e)
                    assert x.shape[dim] == full.shape[1 + dim] // 2
                    got[e].narrow(dim, tp_rank * x.shape[dim], x.shape[dim]).copy_(x)
        assert torch.equal(got, full)


def test_mtp_tensors_are_counted():
    names = ["backbone.embeddings.weight", "mtp.layers.0.mixer.q_proj.weight", "mtp.layers.1.norm.weight",
             "model.mtp.layers.1.mixer.gate.weight"]
    assert M.mtp_layers({}, names) == (1, 3)
    assert M.mtp_layers({"num_nextn_predict_layers": 2}, names) == (2, 3)
    assert M.mtp_layers({"num_nextn_predict_layers": 3}, names[:1]) == (3, 0)
    assert M.mtp_layers({"num_nextn_predict_layers": 0}, names[:1]) == (0, 0)
    assert not M.is_mtp("backbone.layers.0.mixer.mtp.weight")


@pytest.fixture(scope="module")
def hf_moe_folder(tmp_path_factory):
    tr = pytest.importorskip("transformers")
    cfg = tr.NemotronHConfig(**{k: v for k, v in M.hf_config_from_model(MOE).items()
                                if k not in ("architectures", "hybrid_override_pattern", "num_hidden_layers")})
    model = tr.NemotronHForCausalLM(cfg)
    d = tmp_path_factory.mktemp("hfmoe") / "hf"
    model.save_pretrained(d)
    return d


def _edit(d, **change):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(change)
    (d / "config.json").write_text(json.dumps(cfg))


def _add_tensors(d, extra):
    from safetensors.torch import load_file, save_file

    t = load_file(d / "model.safetensors")
    save_file({**t, **extra}, d / "model.safetensors", metadata={"format": "pt"})


def test_moe_folder_imports_config(hf_moe_folder, hf_folder):
    from megatron_minitron.hf.stage import ImportHFConfig, _check_import

    folder, mcfg = _check_import(ImportHFConfig(hf_dir=str(hf_moe_folder)))
    assert mcfg.to_dict() == MOE.to_dict()
    assert folder.shape("backbone.layers.3.mixer.experts.2.up_proj.weight") == (12, 32)  # per expert on disk
    with pytest.raises(ConfigError, match=r"choose parallel.ep in \[1, 2, 4\]"):
        _check_import(ImportHFConfig(hf_dir=str(hf_moe_folder), parallel=ParallelConfig(ep=3)))
    with pytest.raises(ConfigError, match="parallel.ep=2 splits mixture-of-experts layers"):
        _check_import(ImportHFConfig(hf_dir=str(hf_folder), parallel=ParallelConfig(ep=2)))


def test_mtp_folder_is_refused_unless_drop_mtp(hf_moe_folder, tmp_path):
    from megatron_minitron.hf.stage import ImportHFConfig, _check_import

    d = _copy(hf_moe_folder, tmp_path)
    _edit(d, num_nextn_predict_layers=1)
    _add_tensors(d, {"mtp.layers.0.norm.weight": torch.ones(32), "mtp.layers.0.mixer.gate.weight": torch.ones(4, 32)})
    with pytest.raises(ConfigError, match=r"1 multi-token-prediction layer.*2 mtp\.\* tensors.*drop_mtp=true"):
        _check_import(ImportHFConfig(hf_dir=str(d)))
    _check_import(ImportHFConfig(hf_dir=str(d), drop_mtp=True))
    _edit(d, num_nextn_predict_layers=0)  # tensors without the config field: still refused
    with pytest.raises(ConfigError, match="drop_mtp"):
        _check_import(ImportHFConfig(hf_dir=str(d)))


def test_unplaced_tensor_is_refused_not_dropped(hf_moe_folder, tmp_path):
    from megatron_minitron.hf.stage import ImportHFConfig, _check_import

    d = _copy(hf_moe_folder, tmp_path)
    _add_tensors(d, {"backbone.layers.1.mixer.experts.4.up_proj.weight": torch.ones(12, 32)})
    with pytest.raises(ConfigError, match=r"1 tensor\(s\) that config.json gives no place.*experts.4.up_proj"):
        _check_import(ImportHFConfig(hf_dir=str(d)))


def test_no_shared_expert_needs_zero_shared_tensors(hf_moe_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    from megatron_minitron.hf.stage import ImportHFConfig, _check_import

    d = _copy(hf_moe_folder, tmp_path)
    _edit(d, n_shared_experts=0)
    with pytest.raises(ConfigError, match=r"n_shared_experts=0 but tensor backbone.layers.1.mixer.shared_experts"):
        _check_import(ImportHFConfig(hf_dir=str(d)))
    t = load_file(d / "model.safetensors")
    for k in t:
        if "shared_experts" in k:
            t[k] = torch.zeros_like(t[k])
    save_file(t, d / "model.safetensors", metadata={"format": "pt"})
    _, mcfg = _check_import(ImportHFConfig(hf_dir=str(d)))
    assert mcfg.moe_shared_expert_intermediate_size == 0
