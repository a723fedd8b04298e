"""Resource check under context parallelism (issue 21): the sequence-proportional items are
counted per CP rank (seq / cp tokens), checked against hand computations; a layout that
does not fit because of its sequence is refused naming the smallest parallel.cp that fits
(a layout the CP stages run); the 128k long-context recipe fits 8 x 80 GB nodes in its dry
run and in the resources table."""

import dataclasses
import json

import pytest

from megatron_minitron.config import ConfigError, ModelConfig, ParallelConfig, PretrainConfig, TrainConfig
from megatron_minitron.resources import check as C
from megatron_minitron.resources import estimate as E
from tests.conftest import REPO

# no attention: every activation byte per token is a hand-countable sum (GPU formulas)
M = ModelConfig(pattern="M-", hidden_size=64, ffn_hidden_size=128, mamba_num_heads=4, mamba_head_dim=16,
                mamba_num_groups=2, mamba_state_dim=8, mamba_chunk_size=16, vocab_size=512,
                seq_length=1024, params_dtype="bf16")


def hand_activation_per_token(m: ModelConfig) -> int:
    """bf16 (a = 2), tp = 1, no recompute, GPU (mamba_ssm's fused path, estimate.py):
    Mamba: 3h (norm in/out, in_proj input) + in_proj output (2 d_inner + 2 groups x state +
    heads) + 2 d_inner (scan output, gated-norm output) elements, + groups fp32 rstd;
    MLP (squared ReLU): 3h + 2 ffn elements + 4 B of norm stats; one more layer (the larger,
    Mamba) for the backward's gradients; the embedding output (h)."""
    a, h, di, f = 2, m.hidden_size, m.mamba_d_inner, m.ffn_hidden_size
    mamba = (3 * h + 2 * di + 2 * m.mamba_num_groups * m.mamba_state_dim + m.mamba_num_heads + 2 * di) * a \
        + m.mamba_num_groups * 4
    mlp = (3 * h + 2 * f) * a + 4
    assert (mamba, mlp) == (976, 900)
    return mamba + mlp + max(mamba, mlp) + h * a


def test_cp2_halves_the_activation_and_logits_terms():
    per = hand_activation_per_token(M)  # 2980 B
    for cp, dp in ((1, 4), (2, 2)):  # the same 4 GPUs
        lay = E.Layout(dp=dp, cp=cp, micro_batch_size=2, seq_length=1024, distributed_optimizer=True)
        est = E.training(M, lay, "gpu")
        local = 2 * 1024 // cp  # tokens on one rank
        assert est.items["activations"] == local * per
        # logits: bf16 logits + their gradient + the fp32 softmax, per local token
        assert est.items["logits"] == local * 512 * (2 * 2 + 4)
    one, two = (E.training(M, E.Layout(dp=4 // cp, cp=cp, micro_batch_size=2, seq_length=1024), "gpu")
                for cp in (1, 2))
    assert two.items["activations"] * 2 == one.items["activations"] == 2048 * 2980
    assert two.items["logits"] * 2 == one.items["logits"]
    # weights and gradients whole on every CP rank; the distributed optimizer over dp x cp = 4
    for k in ("weights", "grads", "optimizer"):
        assert two.items[k] == one.items[k], k


def test_cp_splits_the_kd_buffers_and_the_teacher_layer():
    lay1 = E.Layout(dp=2, micro_batch_size=1, seq_length=4096)
    lay2 = dataclasses.replace(lay1, dp=1, cp=2)
    t = dataclasses.replace(M, hidden_size=96)
    one, two = (E.training(M, lay, "gpu", "distill", kd_chunk=1024, teacher=t) for lay in (lay1, lay2))
    # KD logits: student logits + gradient + teacher logits (bf16) over the local tokens,
    # + three fp32 chunk buffers of 1024 tokens (the chunk is not split)
    for est, local in ((one, 4096), (two, 2048)):
        assert est.items["logits"] == local * 512 * 3 * 2 + 3 * 1024 * 512 * 4
    # the teacher's one layer of activations is per local token too
    w = one.items["teacher"] - two.items["teacher"]
    assert w == 2048 * E.layer_activation_bytes("M", t, 1, 4096, False, "none", "gpu")
    cached = [E.training(M, lay, "gpu", "distill", kd_chunk=1024, cache_k=32) for lay in (lay1, lay2)]
    assert cached[0].items["teacher cache"] == 4096 * (32 * 12 + 4) == 2 * cached[1].items["teacher cache"]


def test_cpu_cp_attention_keeps_the_gathered_keys_and_values():
    """compat/cp_attention.py all-gathers K and V: per local token (cp - 1) x the local K, V
    widths (2 x query groups x kv_channels) more; the [s/cp x s] scores span all s keys."""
    a = dataclasses.replace(M, pattern="*", num_attention_heads=4, num_query_groups=2, kv_channels=16)
    one, two = (E.layer_activation_bytes("*", a, 1, 1024, False, "none", "cpu", cp=cp) for cp in (1, 2))
    assert two - one == 2 * 2 * 16 * 2
    assert E.layer_activation_bytes("*", a, 1, 1024, False, "none", "gpu", cp=2) == \
        E.layer_activation_bytes("*", a, 1, 1024, False, "none", "gpu")  # TE ring: local q, k, v


LONG = dataclasses.replace(M, seq_length=65536)


def _pretrain(cp: int = 1, limit: float = 0.0, recompute: str = "none") -> PretrainConfig:
    return PretrainConfig(model=LONG, parallel=ParallelConfig(cp=cp, memory_limit_gb=limit),
                          train=TrainConfig(global_batch_size=8, micro_batch_size=1, recompute=recompute))


def test_a_long_sequence_that_does_not_fit_is_told_the_smallest_cp_that_fits():
    models = {"model": LONG}
    fn, lay, _ = C.plan_for("pretrain", _pretrain(), 8, models, "gpu")
    est = {cp: fn(dataclasses.replace(lay, cp=cp, dp=8 // cp)).total / E.GiB for cp in (1, 2, 4, 8)}
    assert est[1] > est[2] > est[4] > est[8]
    with pytest.raises(ConfigError, match="4 heads per TP rank, not divisible by parallel.cp=8"):
        C.report("pretrain", _pretrain(8), 8, models, "gpu", 1e6, whole_world=True)
    limit = (est[2] + est[4]) / 2  # cp = 4 is the smallest that fits
    got, _, fixes = C.report("pretrain", _pretrain(), 8, models, "gpu", limit, whole_world=True)
    assert got.total / E.GiB > limit
    print(fixes)
    assert fixes[0].startswith("parallel.cp=4 ("), fixes  # first: activations + logits dominate
    assert not any(f.startswith(("parallel.cp=2 ", "parallel.cp=8 ")) for f in fixes)
    fit = C.report("pretrain", _pretrain(4), 8, models, "gpu", limit, whole_world=True)[0]
    assert E.fits(fit, limit) and f"({fit.total / E.GiB:.1f} GiB" in fixes[0]
    # the heads decide which cp can run: 4 Mamba heads cannot split over 8 ranks
    limit8 = (est[4] + est[8]) / 2
    fixes8 = C.report("pretrain", _pretrain(), 8, models, "gpu", limit8, whole_world=True)[2]
    assert not any(f.startswith("parallel.cp=") for f in fixes8), fixes8


def test_cp_with_recompute_when_cp_alone_does_not_fit():
    models = {"model": LONG}
    full4 = C.report("pretrain", _pretrain(4, recompute="full"), 8, models, "gpu", 1e6, whole_world=True)[0]
    none4 = C.report("pretrain", _pretrain(4), 8, models, "gpu", 1e6, whole_world=True)[0]
    limit = (full4.total + none4.total) / 2 / E.GiB
    fixes = C.report("pretrain", _pretrain(), 8, models, "gpu", limit, whole_world=True)[2]
    assert any(f.startswith("parallel.cp=") and "train.recompute=" in f for f in fixes), fixes


def test_the_runs_refusal_names_the_cp(monkeypatch):
    """The real run's check (this host: CPU) refuses before any work, naming parallel.cp."""
    monkeypatch.setenv("WORLD_SIZE", "8")
    models = {"model": LONG}
    est = {cp: C.report("pretrain", _pretrain(cp), 8, models, "cpu", 1e6)[0].total / E.GiB for cp in (2, 4)}
    limit = (est[2] + est[4]) / 2
    with pytest.raises(ConfigError, match=r"it fits with: parallel\.cp=4 \("):
        C.check("pretrain", _pretrain(limit=limit), 8)


# ----------------------------------------------------------------------------- the 128k recipe


def test_128k_recipe_dry_run_fits_64_gpus(tmp_path, monkeypatch, capsys):
    import shutil

    from megatron_minitron import __main__ as cli
    from megatron_minitron.resources.table import rows

    shutil.copytree(REPO / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    for var in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    capsys.readouterr()
    rc = cli.main(["distill", "-c", "configs/distill_nemotron_h_4b_128k.yaml", "--dry-run", "--world-size", "64",
                   "--gpu-memory-gib", "80", "--json"])
    j = json.loads(capsys.readouterr().out)
    assert rc == 0 and j["fits"] and j["device"] == "gpu", j
    assert j["layout"]["cp"] == 16 and j["layout"]["tp"] == 1 and j["layout"]["pp"] == 1
    print(j["items_gib"], j["total_gib"])
    assert 50 < j["total_gib"] < 65  # the recipe's comment: 58.2 GiB
    row = {name: est for name, _, est in rows(64)}["distill 4B at 128k (KD, long context)"]
    assert j["total_gib"] == pytest.approx(row.total / E.GiB, abs=1e-3)
    # the same phase without CP does not fit, and is told the cp that does
    capsys.readouterr()
    rc = cli.main(["distill", "-c", "configs/distill_nemotron_h_4b_128k.yaml", "--dry-run", "--world-size", "64",
                   "--gpu-memory-gib", "80", "--json", "parallel.cp=2"])
    j = json.loads(capsys.readouterr().out)
    assert rc == 2 and not j["fits"]
    assert j["would_fit_with"][0].startswith("parallel.cp=8 ("), j["would_fit_with"]
