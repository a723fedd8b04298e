"""Importance hooks on a real megatron-core hybrid model (world of one, gloo): accumulator
arithmetic against a direct computation, hooks leave outputs unchanged and are removed,
depth KL / cosine are zero exactly for identity layers, bad input fails before any work."""

import dataclasses
import json

import pytest
import torch

from megatron_minitron import dist as D
from megatron_minitron.config import ConfigError, DataConfig, ModelConfig, ParallelConfig
from megatron_minitron.importance.depth import (accumulate_kl, hidden_out, pipeline_forward,
                                                 skip_layer)
from megatron_minitron.importance.hooks import StatsCollector, rms_norm
from megatron_minitron.importance.stage import StatsConfig, validate
from megatron_minitron.model import build_model, causal_mask

pytestmark = pytest.mark.smoke  # cheap (~20 s), runs on megatron-core 0.16 and 0.19

SMALL = ModelConfig(pattern="M-*-M-", hidden_size=64, ffn_hidden_size=96, mamba_num_heads=4,
                    mamba_head_dim=16, mamba_num_groups=2, mamba_state_dim=8,
                    mamba_chunk_size=16, num_attention_heads=4, num_query_groups=2,
                    kv_channels=16, vocab_size=4096, seq_length=32)
B, SEQ = 3, 32


@pytest.fixture(scope="module")
def par():
    return D.init(ParallelConfig(), seed=11)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, SMALL.vocab_size, (B, SEQ), generator=g)
    return {"tokens": tok, "position_ids": torch.arange(SEQ)[None].expand(B, -1)}


def logits(model, batch):
    with torch.no_grad():
        return model(batch["tokens"], batch["position_ids"], causal_mask(SEQ))


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._forward_hooks_with_kwargs)
               for m in model.modules())


def direct(a: torch.Tensor) -> torch.Tensor:
    """sum over samples of (mean over the sequence of |a|)^2, one sample at a time, fp64."""
    a = a.double()
    return sum(a[:, i].abs().mean(0) ** 2 for i in range(a.shape[1])).float()


def test_accumulators_match_direct_computation(par, batch):
    model = build_model(SMALL, par).eval()
    raw = {}  # plain capture of the raw tensors (no arithmetic) to compute the reference

    def keep(name, pre=False):
        def f(mod, args, out=None):
            raw[name] = (args[0] if pre else (out[0] if isinstance(out, tuple) else out)).detach().clone()
        return f

    layers = model.decoder.layers
    hs = [layers[0].mixer.in_proj.register_forward_hook(keep("in_proj")),
          layers[0].mixer.out_proj.register_forward_pre_hook(keep("y", pre=True)),
          layers[1].mlp.linear_fc2.register_forward_pre_hook(keep("ffn", pre=True)),
          layers[1].mlp.linear_fc1.register_forward_hook(keep("fc1")),
          layers[2].self_attention.linear_proj.register_forward_pre_hook(keep("attn", pre=True)),
          layers[2].input_layernorm.register_forward_hook(keep("norm2")),
          layers[3].register_forward_pre_hook(
              lambda m, a, kw: raw.update(in3=kw["hidden_states"].detach().clone()),
              with_kwargs=True),  # the block calls layers with keyword arguments
          layers[3].register_forward_hook(keep("out3")),
          model.decoder.final_norm.register_forward_hook(keep("final"))]
    col = StatsCollector(model, SMALL, tp=1, layer_offset=0)
    with col:
        logits(model, batch)
    for h in hs:
        h.remove()
    di = SMALL.mamba_d_inner
    acc = col.acc
    close = dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(acc["L0.z"], direct(raw["in_proj"][..., :di]), **close)
    torch.testing.assert_close(acc["L0.x"], direct(raw["in_proj"][..., di:2 * di]), **close)
    torch.testing.assert_close(acc["L0.y"], direct(raw["y"]), **close)
    torch.testing.assert_close(acc["L1.ffn"], direct(raw["ffn"]), **close)
    # ffn_pre = first projection's output (eq. 26), ffn = after the activation (fc2 input)
    torch.testing.assert_close(acc["L1.ffn_pre"], direct(raw["fc1"]), **close)
    torch.testing.assert_close(torch.relu(raw["fc1"]) ** 2, raw["ffn"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(acc["L1.ffn_pre"], acc["L1.ffn"])
    torch.testing.assert_close(acc["L2.attn"], direct(raw["attn"]), **close)
    torch.testing.assert_close(acc["L2.hidden"], direct(raw["norm2"]), **close)
    torch.testing.assert_close(acc["final_norm"], direct(raw["final"]), **close)
    y = raw["y"].double().reshape(-1, di)
    assert acc["L0.flap_n"].item() == B * SEQ
    torch.testing.assert_close(acc["L0.flap_s1"], y.sum(0))
    torch.testing.assert_close(acc["L0.flap_s2"], (y * y).sum(0))
    cos = torch.nn.functional.cosine_similarity(raw["in3"].double(), raw["out3"].double(), dim=-1)
    torch.testing.assert_close(acc["L3.cos_sum"], (1 - cos).sum(), rtol=1e-5, atol=1e-9)
    assert acc["L3.cos_n"].item() == B * SEQ
    # every accumulator received something, the counters count
    assert all(v.abs().sum() > 0 for k, v in acc.items() if k != "samples")


def test_hooks_leave_outputs_unchanged_and_are_removed(par, batch):
    model = build_model(SMALL, par).eval()
    before = _hook_count(model)
    ref = logits(model, batch)
    col = StatsCollector(model, SMALL, tp=1, layer_offset=0)
    with col:
        assert _hook_count(model) > before
        got = logits(model, batch)
        with col.paused():
            snap = {k: v.clone() for k, v in col.acc.items()}
            logits(model, batch)
            assert all(torch.equal(snap[k], v) for k, v in col.acc.items())  # paused = no-op
    assert torch.equal(got, ref)
    assert _hook_count(model) == before
    snap = {k: v.clone() for k, v in col.acc.items()}
    logits(model, batch)
    assert all(torch.equal(snap[k], v) for k, v in col.acc.items())  # nothing left attached


MOE = dataclasses.replace(
    SMALL, pattern="ME*E-", num_moe_experts=8, moe_ffn_hidden_size=32, moe_router_topk=2,
    moe_shared_expert_intermediate_size=48, moe_router_topk_scaling_factor=2.5)


@pytest.mark.parametrize("latent", [0, 24])
def test_moe_accumulators_match_direct_computation(par, batch, latent):
    """E layers: the router's mass / freq, each expert's routing-weighted output norm (in the
    hidden width: through fc2_latent_proj in latent MoE), the expert-FFN sums of squares and
    the shared expert's FFN aggregate, against a recomputation from the captured router
    output, the layer's normed input and the expert weights (one token at a time, fp64)."""
    cfg = dataclasses.replace(MOE, moe_latent_size=latent)
    torch.manual_seed(3)
    model = build_model(cfg, par).eval()
    raw = {}
    layer = model.decoder.layers[1]
    with torch.no_grad():  # spread routing, and a correction bias that changes some choices
        layer.mlp.router.weight.normal_(0.0, 0.3)
        layer.mlp.router.expert_bias.copy_(0.05 * torch.randn(cfg.num_moe_experts))
    hs = [layer.pre_mlp_layernorm.register_forward_hook(lambda m, a, o: raw.update(x=o.detach().clone())),
          layer.mlp.router.register_forward_hook(lambda m, a, o: raw.update(probs=o[0].detach().clone(),
                                                                             map=o[1].detach().clone())),
          layer.mlp.shared_experts.linear_fc2.register_forward_pre_hook(
              lambda m, a: raw.update(shared=a[0].detach().clone()))]
    col = StatsCollector(model, cfg, tp=1, layer_offset=0)
    with col:
        ref_logits = logits(model, batch)
    for h in hs:
        h.remove()
    acc = col.acc
    probs, chosen = raw["probs"].double(), raw["map"]
    assert chosen.sum(1).eq(2).all() and probs[~chosen].eq(0).all()
    x = raw["x"].double().reshape(-1, cfg.hidden_size)  # [tokens, hidden], tokens s-major
    mlp = layer.mlp
    if latent:
        x = x @ mlp.fc1_latent_proj.weight.double().T
    n = cfg.num_moe_experts
    out, seen = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    ffn = torch.zeros(n, cfg.moe_ffn_hidden_size, dtype=torch.float64)
    for e, ex in enumerate(mlp.experts.local_experts):
        w1, w2 = ex.linear_fc1.weight.double(), ex.linear_fc2.weight.double()
        for t in chosen[:, e].nonzero().flatten().tolist():
            a = torch.relu(x[t] @ w1.T) ** 2 * probs[t, e]  # squared ReLU, times the routing weight
            y = a @ w2.T
            if latent:
                y = y @ mlp.fc2_latent_proj.weight.double().T
            out[e] += y.norm()
            ffn[e] += a * a
            seen[e] += 1
    torch.testing.assert_close(acc["L1.moe_mass"], (probs * chosen).sum(0))
    torch.testing.assert_close(acc["L1.moe_freq"], chosen.sum(0).double())
    assert torch.equal(acc["L1.moe_seen"], seen) and seen.gt(0).sum() >= 6
    torch.testing.assert_close(acc["L1.moe_out"], out, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(acc["L1.moe_ffn"], ffn, rtol=1e-5, atol=1e-10)
    torch.testing.assert_close(acc["L1.shared_ffn"], direct(raw["shared"]), rtol=1e-5, atol=1e-7)
    # the score-correction bias decides: some token's choice is not its top-2 routing scores
    scores = torch.sigmoid(raw["x"].double().reshape(-1, cfg.hidden_size) @ mlp.router.weight.double().T)
    assert (scores.topk(2, dim=1).indices.sort(1).values
            != chosen.double().topk(2, dim=1).indices.sort(1).values).any()
    # both E layers collected, hooks left the function alone
    assert acc["L3.moe_freq"].sum() == 2 * B * SEQ
    torch.testing.assert_close(logits(model, batch), ref_logits, rtol=0, atol=0)


def test_fused_norm_recomputation_matches_the_norm_module(par, batch):
    """The TE-spec path (norm fused into in_proj / linear_qkv / linear_fc1) recomputes the
    RMSNorm from the fused linear's input: it must equal the local spec's norm module."""
    model = build_model(SMALL, par).eval()
    norm = model.decoder.layers[0].norm
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        x = torch.randn(SEQ, B, SMALL.hidden_size)
        torch.testing.assert_close(rms_norm(x, norm.weight, SMALL.norm_epsilon), norm(x),
                                   rtol=1e-5, atol=1e-6)


def test_depth_kl_and_cosine_are_zero_exactly_for_identity_layers(par, batch):
    model = build_model(SMALL, par).eval()
    with torch.no_grad():  # layer 0 (Mamba) and layer 3 (MLP) now add 0 to the residual
        model.decoder.layers[0].mixer.out_proj.weight.zero_()
        model.decoder.layers[3].mlp.linear_fc2.weight.zero_()
    b = dict(batch)
    full = []
    col = StatsCollector(model, SMALL, tp=1, layer_offset=0, sources=["cosine"])
    with torch.no_grad(), col:
        with hidden_out(model):  # the depth pass keeps hidden states, not logits
            pipeline_forward(model, b, full.append)
        kl = torch.zeros(SMALL.num_layers, dtype=torch.float64)
        with col.paused():
            accumulate_kl(model, b, full[0], SMALL.num_layers, 0, SMALL.num_layers, True, None, kl)
    full = [logits(model, batch)]
    # per-token means; 1 - cos is computed in fp32: an identity layer gives ~1e-8 rounding
    cos = torch.stack([col.acc[f"L{i}.cos_sum"] / col.acc[f"L{i}.cos_n"]
                       for i in range(SMALL.num_layers)])
    kl = kl / (B * SEQ)
    for i in (0, 3):
        assert kl[i].item() < 1e-9 and cos[i].item() < 1e-6, (i, kl, cos)
    for i in (1, 2, 4, 5):
        assert kl[i].item() > 1e-6 and cos[i].item() > 1e-4, (i, kl, cos)
    # skipping = identity on the residual stream: skipping the zeroed layer changes nothing
    with skip_layer(model.decoder.layers[3]):
        torch.testing.assert_close(logits(model, batch), full[0], rtol=0, atol=1e-6)
    assert "forward" not in vars(model.decoder.layers[3])  # patch removed


@pytest.mark.parametrize("chunk", [0, 7, 32])
def test_chunked_depth_kl_equals_full_vocab_reference(par, batch, chunk):
    """Depth KL made chunk by chunk of tokens from the hidden states equals the KL of whole
    logits computed with torch's log_softmax (fp64), for chunks that do / do not divide
    the B x SEQ tokens (0 = one chunk)."""
    import torch.nn.functional as F

    model = build_model(SMALL, par).eval()
    ref = torch.zeros(SMALL.num_layers, dtype=torch.float64)
    full = logits(model, batch).double()
    for i, layer in enumerate(model.decoder.layers):
        with skip_layer(layer):
            skip = logits(model, batch).double()
        lp, lq = F.log_softmax(full, -1), F.log_softmax(skip, -1)
        ref[i] = (lp.exp() * (lp - lq)).sum()
    got = torch.zeros(SMALL.num_layers, dtype=torch.float64)
    hid = []
    with torch.no_grad():
        with hidden_out(model):
            pipeline_forward(model, batch, hid.append)
        accumulate_kl(model, batch, hid[0], SMALL.num_layers, 0, SMALL.num_layers, True, None, got,
                      chunk_tokens=chunk)
    assert "forward" not in vars(model.output_layer)  # patch removed
    # fp32 logits (chunked GEMMs) vs fp64 softmax of the model's logits: sums over the 96
    # tokens of per-token fp32 rounding ~1e-7 x |log p|; observed <= 4e-6 absolute
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=2e-5)
    assert (ref > 1e-6).all()


# ----------------------------------------------------------------------------- bad input


def _fake_ckpt(tmp_path, cfg: ModelConfig):
    it = tmp_path / "ck" / "checkpoints" / "iter_0000001"
    it.mkdir(parents=True)
    (it / "model_config.json").write_text(json.dumps(cfg.to_dict()))
    (it / "meta.json").write_text("{}")
    (it.parent / "latest").write_text(it.name)
    return str(tmp_path / "ck")


def test_bad_input_fails_before_any_work(tmp_path, real_data):
    data = DataConfig(prefix=real_data["prefix"], tokenizer=real_data["tokenizer"])
    good = _fake_ckpt(tmp_path, SMALL)
    # the reference case passes every config check and reaches the file check, which refuses
    # the fake checkpoint's missing shards by name
    with pytest.raises(ConfigError, match="metadata.json"):
        validate(StatsConfig(checkpoint=good, data=data))
    with pytest.raises(ConfigError, match=r"unknown source\(s\) \['w'\]"):
        validate(StatsConfig(checkpoint=good, data=data, sources=["x", "w"]))
    with pytest.raises(ConfigError, match="depth_samples=9 exceeds samples=8"):
        validate(StatsConfig(checkpoint=good, data=data, samples=8, depth_samples=9))
    with pytest.raises(ConfigError, match="not a megatron-minitron hybrid checkpoint"):
        validate(StatsConfig(checkpoint=str(tmp_path / "nothing"), data=data))
    (tmp_path / "gpt").mkdir()
    gpt = _fake_ckpt(tmp_path / "gpt", dataclasses.replace(SMALL, pattern="*-*-"))
    # no Mamba layer (issue 23): the default sources pass every config check (the Mamba ones
    # are skipped at run time); a list of one's own naming a Mamba source is refused
    with pytest.raises(ConfigError, match="metadata.json"):
        validate(StatsConfig(checkpoint=gpt, data=data))
    with pytest.raises(ConfigError, match=r"names the Mamba source\(s\) \['x', 'flap'\], but the "
                       r"checkpoint's pattern '\*-\*-' has no Mamba \(M\) layer; remove them: "
                       r"sources=\[ffn,attn\]"):
        validate(StatsConfig(checkpoint=gpt, data=data, sources=["x", "ffn", "flap", "attn"]))
    with pytest.raises(ConfigError, match="parallel.tp"):
        validate(StatsConfig(checkpoint=good, data=data, parallel=ParallelConfig(tp=3)))


def test_importance_file_checks_moe_entries(tmp_path):
    """An E layer's expert scores load with the shapes of the interface; a wrong shape, or
    shared-expert scores for a model without one, is refused when the file is read."""
    from megatron_minitron.importance.io import ImportanceFile

    n, f, sh = MOE.num_moe_experts, MOE.moe_ffn_hidden_size, MOE.moe_shared_expert_intermediate_size

    def entry(**over):
        e = {"experts": {k: torch.rand(n) for k in ("out", "mass", "freq")},
             "expert_ffn": torch.rand(n, f), "shared_ffn": torch.rand(sh)}
        e.update(over)
        return e

    def save(model, e):
        base = ImportanceFile.random(dataclasses.replace(model, pattern="M-*-"), torch.Generator().manual_seed(0))
        layers = {0: base.layers[0], 1: e, 2: base.layers[2], 3: e, 4: base.layers[3]}
        ImportanceFile(model=model, layers=layers, hidden=torch.rand(model.hidden_size),
                       depth={"kl": torch.rand(5), "cosine": torch.rand(5)}).save(tmp_path / "i.pt")
        return tmp_path / "i.pt"

    model = dataclasses.replace(MOE, pattern="ME*E-")
    got = ImportanceFile.load(save(model, entry()))
    assert got.layers[1]["expert_ffn"].shape == (n, f)
    with pytest.raises(ConfigError, match=r"layer 1 expert_ffn should be a float tensor of shape \(8, 32\)"):
        ImportanceFile.load(save(model, entry(expert_ffn=torch.rand(f, n))))
    with pytest.raises(ConfigError, match="experts.mass"):
        ImportanceFile.load(save(model, entry(experts={"out": torch.rand(n), "mass": torch.rand(n + 1)})))
    no_shared = dataclasses.replace(model, moe_shared_expert_intermediate_size=0)
    with pytest.raises(ConfigError, match="no shared expert"):
        ImportanceFile.load(save(no_shared, entry()))
