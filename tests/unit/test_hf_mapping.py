"""Pure HF <-> ours mapping (no megatron): layouts are exact inverses, config fields map or
are refused by name, and bad folders fail with clear errors before any model is built."""

import json
import shutil

import pytest
import torch

from megatron_minitron.config import ConfigError, ModelConfig
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
    back = M.model_config_from_hf(json.loads(json.dumps(hf)))
    assert back.to_dict() == CFG.to_dict()


@pytest.mark.parametrize("field,value,match", [
    ("layers_block_type", ["linear_attention", "moe"], "layers_block_type"),
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


def test_time_step_min_is_kept_as_the_dt_clamp():
    hf = M.hf_config_from_model(CFG)
    hf["time_step_min"] = 0.001
    cfg = M.model_config_from_hf(hf)
    assert (cfg.mamba_dt_clamp_min, cfg.mamba_dt_clamp_max) == (0.001, 0.0)
    assert M.hf_config_from_model(cfg)["time_step_min"] == 0.001  # export writes the clamp used
    assert M.model_config_from_hf(hf, ignore_time_step_min=True).mamba_dt_clamp_min == 0.0
    upper = ModelConfig(**{**cfg.to_dict(), "mamba_dt_clamp_max": 0.5})
    with pytest.raises(ConfigError, match="mamba_dt_clamp_max.*no upper dt clamp"):
        M.hf_config_from_model(upper)
    with pytest.raises(ConfigError, match="0 <= min < max"):
        ModelConfig(**{**cfg.to_dict(), "mamba_dt_clamp_max": 0.0005}).validate()


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
    cfg["layers_block_type"][1] = "moe"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="moe"):
        _check_import(ImportHFConfig(hf_dir=str(d)))
