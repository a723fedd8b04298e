"""The hybrid model built from a ModelConfig on real megatron-core (world of one, gloo)."""

import dataclasses

import pytest
import torch

from megatron_minitron import dist as D
from megatron_minitron.config import ModelConfig, ParallelConfig
from megatron_minitron.model import build_model, causal_mask, count_parameters, local_parameter_count
from tests.conftest import one_token_used_parameters

pytestmark = pytest.mark.smoke

SMALL = ModelConfig(pattern="M-*-M-", hidden_size=64, ffn_hidden_size=96, mamba_num_heads=4,
                    mamba_head_dim=16, mamba_num_groups=2, mamba_state_dim=8,
                    mamba_chunk_size=16, num_attention_heads=4, num_query_groups=2,
                    kv_channels=16, vocab_size=512, seq_length=32)


@pytest.fixture(scope="module")
def par():
    return D.init(ParallelConfig(), seed=7)


@pytest.mark.parametrize("change", [
    {},
    {"activation": "swiglu"},
    {"untie_embeddings": False},
    {"pattern": "MMM-", "mamba_num_groups": 4},
    {"pattern": "*-*-", "position_embedding": "none"},
    {"mamba_conv_kernel": 3, "mamba_state_dim": 12, "mamba_num_heads": 6, "mamba_num_groups": 3},
])
def test_analytic_parameter_count_equals_built_model(par, change):
    cfg = dataclasses.replace(SMALL, **change)
    model = build_model(cfg, par)
    assert local_parameter_count(model) == count_parameters(cfg)["total"]


def test_forward_is_causal_and_finite(par):
    model = build_model(SMALL, par).eval()
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, SMALL.vocab_size, (2, 32), generator=g)
    pos = torch.arange(32)[None].expand(2, -1)
    with torch.no_grad():
        a = model(tok, pos, causal_mask(32))
        tok2 = tok.clone()
        tok2[:, 20:] = (tok2[:, 20:] + 1) % SMALL.vocab_size
        b = model(tok2, pos, causal_mask(32))
    assert a.shape == (2, 32, SMALL.vocab_size) and torch.isfinite(a).all()
    # positions before the change see the same prefix: identical logits (causality,
    # through Mamba's conv + scan and through attention)
    assert torch.equal(a[:, :20], b[:, :20])
    assert (a[:, 20:] - b[:, 20:]).abs().max() > 1e-4


def test_cpu_fallbacks_are_installed_only_without_kernels(par):
    from megatron_minitron.compat import FALLBACKS, mcore

    if not torch.cuda.is_available():
        assert any("ssd-scan" in f for f in FALLBACKS) != mcore.HAVE_MAMBA_SSM
        assert "cpu-device-patches" in FALLBACKS
        # global torch is untouched: only megatron's module-level name is proxied
        assert torch.cuda.current_device is not None
        with pytest.raises(Exception):
            torch.zeros(1, device="cuda")


def test_checkpoint_keys_use_transformer_engine_names(par):
    """Local-spec norms are saved under TE's fused-module names, so a CPU-trained checkpoint
    loads in the TE spec on GPU (and the reverse)."""
    model = build_model(SMALL, par)
    # the global key each tensor is stored under (dict keys stay module-local)
    keys = {getattr(v, "key", k) for k, v in model.sharded_state_dict().items()}
    assert "decoder.layers.0.mixer.in_proj.layer_norm_weight" in keys
    assert "decoder.layers.2.self_attention.linear_qkv.layer_norm_weight" in keys
    assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in keys
    assert "decoder.layers.0.mixer.norm.weight" in keys and "decoder.final_norm.weight" in keys
    assert not any(k.endswith(".norm.weight") and ".mixer." not in k and "final" not in k for k in keys)


# ----------------------------------------------------------------------------- MoE (E layers)

SMALL_MOE = dataclasses.replace(
    SMALL, pattern="ME*E-", num_moe_experts=8, moe_ffn_hidden_size=32, moe_router_topk=2,
    moe_shared_expert_intermediate_size=48, moe_router_topk_scaling_factor=2.5)

MOE_VARIANTS = [
    {},
    {"moe_latent_size": 24},
    {"moe_router_num_groups": 4, "moe_router_group_topk": 2, "moe_router_topk": 4},
    {"moe_shared_expert_intermediate_size": 0, "moe_router_topk": 1},
    {"moe_router_score_function": "softmax", "moe_router_expert_bias": False, "pattern": "EE"},
]


@pytest.mark.parametrize("change", MOE_VARIANTS)
def test_moe_parameter_counts_equal_built_model(par, change):
    """Total: the built model's parameters. Active per token: measured by one token's
    backward, where exactly the parameters its forward used get a gradient (the top-k
    experts of each E layer, and one embedding row, which the count leaves out)."""
    cfg = dataclasses.replace(SMALL_MOE, **change)
    model = build_model(cfg, par)
    counts = count_parameters(cfg)
    assert local_parameter_count(model) == counts["total"]
    assert one_token_used_parameters(model, cfg) == counts["active"] - counts["embedding"]
    routed = sum(1 for n, p in model.named_parameters() if "local_experts" in n and "fc1" in n
                 and p.grad is not None and p.grad.abs().sum() > 0)
    assert routed == cfg.pattern.count("E") * cfg.moe_router_topk
    assert counts["active"] < counts["total"]


def test_moe_forward_is_causal_and_router_bias_is_fp32(par):
    cfg = dataclasses.replace(SMALL_MOE, params_dtype="bf16")
    model = build_model(cfg, par).eval()
    routers = [m for n, m in model.named_modules() if n.endswith("mlp.router")]
    assert len(routers) == 2 and all(r.expert_bias.dtype == torch.float32 for r in routers)
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, cfg.vocab_size, (2, 32), generator=g)
    pos = torch.arange(32)[None].expand(2, -1)
    with torch.no_grad():
        a = model(tok, pos, causal_mask(32))
        tok2 = tok.clone()
        tok2[:, 20:] = (tok2[:, 20:] + 1) % cfg.vocab_size
        b = model(tok2, pos, causal_mask(32))
    assert torch.isfinite(a.float()).all()
    assert torch.equal(a[:, :20], b[:, :20])


def test_moe_checkpoint_keys(par):
    """One [experts, ...] tensor per expert projection (megatron's layout for SequentialMLP and
    grouped-GEMM experts alike), the router bias stored beside the router."""
    model = build_model(dataclasses.replace(SMALL_MOE, moe_latent_size=24), par)
    from megatron_minitron.compat.mcore import sharded_tensors

    shapes = {t.key: tuple(t.global_shape) for t in sharded_tensors(model)}
    p = "decoder.layers.1."
    assert shapes[p + "pre_mlp_layernorm.weight"] == (64,)
    assert shapes[p + "mlp.router.weight"] == (8, 64)
    assert shapes[p + "mlp.router.expert_bias"] == (8,)
    assert shapes[p + "mlp.experts.experts.linear_fc1.weight"] == (8, 32, 24)
    assert shapes[p + "mlp.experts.experts.linear_fc2.weight"] == (8, 24, 32)
    assert shapes[p + "mlp.shared_experts.linear_fc1.weight"] == (48, 64)
    assert shapes[p + "mlp.fc1_latent_proj.weight"] == (24, 64)
    assert shapes[p + "mlp.fc2_latent_proj.weight"] == (64, 24)


@pytest.mark.parametrize("change,needle", [
    ({"num_moe_experts": 0}, "num_moe_experts=0"),
    ({"moe_router_topk": 9}, "moe_router_topk=9"),
    ({"moe_router_score_function": "softmax"}, "moe_router_expert_bias=true"),
    ({"moe_router_num_groups": 3}, "not divisible by model.moe_router_num_groups=3"),
    ({"moe_router_num_groups": 4, "moe_router_group_topk": 5}, "group_topk"),
    ({"moe_ffn_hidden_size": 0}, "moe_ffn_hidden_size=0"),
])
def test_moe_config_refusals_name_the_key(change, needle):
    from megatron_minitron.config import ConfigError

    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("=", "=")):
        dataclasses.replace(SMALL_MOE, **change).validate()


def test_expert_parallel_layout_refusals():
    from megatron_minitron.config import ConfigError

    with pytest.raises(ConfigError, match=r"choose parallel.ep in \[1, 2, 4, 8\]"):
        SMALL_MOE.validate(ep=3)
    from megatron_minitron.config import check_ep_used

    with pytest.raises(ConfigError, match="parallel.ep=2 splits mixture-of-experts layers"):
        check_ep_used(2, SMALL)
    check_ep_used(2, SMALL, SMALL_MOE)  # a dense student beside an MoE teacher
    with pytest.raises(ConfigError, match=r"choose parallel.ep in \[1, 2\]"):
        D.check_world(ParallelConfig(tp=2, ep=4), 4)


def test_router_training_settings_on_a_dense_model_are_refused():
    from megatron_minitron.config import ConfigError, TrainConfig, check_moe_train

    check_moe_train(TrainConfig(), SMALL)  # the defaults pass
    check_moe_train(TrainConfig(moe_aux_loss_coeff=0.0), SMALL_MOE)
    with pytest.raises(ConfigError, match="train.moe_aux_loss_coeff=0.01 acts on mixture-of-experts"):
        check_moe_train(TrainConfig(moe_aux_loss_coeff=0.01), SMALL)
    with pytest.raises(ConfigError, match="kd.moe_router_bias_update_rate=0.0"):
        check_moe_train(TrainConfig(moe_router_bias_update_rate=0.0), SMALL, "kd")
