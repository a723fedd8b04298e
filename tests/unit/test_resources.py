"""Resource check: the estimator's parameter split equals the built model (MoE: per EP / TP /
PP rank), its MoE layer terms equal the saved tensors, its totals match measured CPU peaks
of real training steps (several shapes, dense and MoE) and of the stats loop, --dry-run
prints the itemised table, a layout over parallel.memory_limit_gb is refused before any
work with the keys that make it fit (parallel.ep for MoE), a layout that cannot run is
refused naming the fix, and the 8B and Nemotron 3 Nano 30B-A3B recipes fit 8 x 80 GB
nodes."""

import dataclasses
import json
import re
import subprocess
import sys

import pytest

from megatron_minitron.config import ConfigError, ModelConfig, ParallelConfig, PretrainConfig, TrainConfig
from megatron_minitron.resources import estimate as E
from tests.conftest import REPO, child_env, launch

WORKER = REPO / "tests" / "dist" / "resources_worker.py"

SHAPES = [  # (model, micro-batch, micro-batches): Mamba-heavy, attention + large vocab, wide MLP
    ({"pattern": "MM-MM-", "hidden_size": 384, "ffn_hidden_size": 1536, "mamba_num_heads": 12,
      "mamba_head_dim": 64, "mamba_num_groups": 4, "mamba_state_dim": 64, "mamba_chunk_size": 128,
      "vocab_size": 4096, "seq_length": 1024}, 2, 1),
    ({"pattern": "M*-M*-", "hidden_size": 128, "ffn_hidden_size": 512, "mamba_num_heads": 4,
      "mamba_head_dim": 32, "mamba_num_groups": 1, "mamba_state_dim": 16, "mamba_chunk_size": 32,
      "num_attention_heads": 8, "num_query_groups": 2, "kv_channels": 16, "vocab_size": 32768,
      "seq_length": 512}, 2, 2),
    ({"pattern": "M-M-M-M-", "hidden_size": 512, "ffn_hidden_size": 2048, "mamba_num_heads": 16,
      "mamba_head_dim": 32, "mamba_num_groups": 2, "mamba_state_dim": 16, "mamba_chunk_size": 64,
      "vocab_size": 16384, "seq_length": 256}, 4, 1),
]


SMALL = ModelConfig(pattern="M-*-M-", hidden_size=64, ffn_hidden_size=128, mamba_num_heads=4,
                    mamba_head_dim=16, mamba_num_groups=2, mamba_state_dim=8,
                    num_attention_heads=4, num_query_groups=2, kv_channels=16, vocab_size=512)
SMALL_MOE = dataclasses.replace(SMALL, pattern="ME*E-E", num_moe_experts=8, moe_ffn_hidden_size=32,
                                moe_router_topk=2, moe_shared_expert_intermediate_size=48,
                                moe_latent_size=24, seq_length=32, mamba_chunk_size=16)


@pytest.mark.parametrize("cfg", [SMALL, SMALL_MOE], ids=["dense", "moe"])
def test_local_params_equal_the_built_model(cfg):
    from megatron_minitron import dist as D
    from megatron_minitron.model import build_model, local_parameter_count

    par = D.init(ParallelConfig(), seed=1)
    model = build_model(cfg, par, initialize=False)
    assert E.local_params(cfg, cfg.pattern, 1, True, True) == local_parameter_count(model)
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert E.local_param_split(cfg, cfg.pattern, 1, True, True)[1] == routed


def test_moe_local_params_per_rank_equal_the_built_model(tmp_path):
    """Routed experts / (EP x TP), shared expert / TP, router and latent replicated, each PP
    stage its own layers: every rank's built (dense, expert) counts at ep=2, tp=2 (SP),
    pp=2 on two processes."""
    out = tmp_path / "p.json"
    layouts = [{"ep": 2}, {"tp": 2, "sequence_parallel": True}, {"pp": 2}]
    launch(WORKER, [out, json.dumps(dataclasses.asdict(SMALL_MOE)), 1, 1, "params",
                    json.dumps(layouts)], nproc=2)
    for lay, ranks in json.loads(out.read_text()):
        for built_dense, built_expert, est_dense, est_expert in ranks:
            assert (built_dense, built_expert) == (est_dense, est_expert), (lay, ranks)


MOE_COUNTED = [  # (model change, aux loss): E-layer saved tensors vs moe_activation_bytes
    ({}, True),
    ({"params_dtype": "bf16", "activation": "swiglu", "moe_latent_size": 32}, False),
    ({"moe_router_score_function": "softmax", "moe_router_expert_bias": False,
      "moe_shared_expert_intermediate_size": 0, "moe_router_topk": 3}, True),
]


@pytest.mark.parametrize("change,aux", MOE_COUNTED)
def test_moe_layer_terms_equal_its_saved_tensors(change, aux):
    """What autograd keeps of each E layer in a training forward (unique storages, counted
    with saved-tensor hooks; parameters excluded) equals moe_activation_bytes x tokens, up to
    the aux loss's few scalars."""
    import torch

    from megatron_minitron import dist as D
    from megatron_minitron.model import Runtime, build_model, causal_mask

    cfg = dataclasses.replace(ModelConfig(**MOE_SHAPE), pattern="ME", seq_length=128, **change)
    par = D.init(ParallelConfig(), seed=1)
    model = build_model(cfg, par, runtime=Runtime(moe_aux_loss_coeff=1e-4 if aux else 0.0)).train()
    layer = ["other"]
    for i, m in enumerate(model.decoder.layers):
        m.register_forward_pre_hook(lambda m, a, i=i: layer.__setitem__(0, i))
    model.decoder.final_norm.register_forward_pre_hook(lambda m, a: layer.__setitem__(0, "other"))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, saved, alive = set(), {}, []

    def pack(t):
        st = t.untyped_storage()
        key = (st.data_ptr(), st.nbytes())
        if st.data_ptr() not in params and key not in seen:
            seen.add(key)
            saved[layer[0]] = saved.get(layer[0], 0) + st.nbytes()
            # held to the end: a storage autograd drops early (a node nothing needs) would
            # otherwise free its address for a later tensor of the same size, which the
            # (address, size) key would then miss (it did: an int64 routing index, 8 KiB)
            alive.append(t)
        return t

    b, s = 2, cfg.seq_length
    tok = torch.randint(0, cfg.vocab_size, (b, s), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tok, torch.arange(s)[None].expand(b, -1), causal_mask(s), labels=tok)
    assert saved[1] == pytest.approx(E.moe_activation_bytes(cfg, 1, False, "cpu", aux_loss=aux) * b * s,
                                     abs=256)


@pytest.mark.parametrize("shape,mbs,nm", [SHAPES[0]] + [pytest.param(*x, marks=pytest.mark.sweep)
                                                       for x in SHAPES[1:]])
def test_estimate_matches_measured_cpu_peak(tmp_path, shape, mbs, nm, request):
    out = tmp_path / "r.json"
    launch(WORKER, [out, json.dumps(shape), mbs, nm])
    r = json.loads(out.read_text())
    print(f"{shape['pattern']} h={shape['hidden_size']} s={shape['seq_length']} "
          f"V={shape['vocab_size']} mbs={mbs}: measured {r['measured'] / 2**20:.0f} MiB, "
          f"estimated {r['estimate'] / 2**20:.0f} MiB ({100 * r['error']:+.1f}%)")
    # observed -6.7%, -5.1%, -9.1% (aim: 15%) on a quiet machine. The peak depends on glibc's
    # allocator state: shape 0 measured 868-1147 MiB under different MALLOC_* settings of one
    # process (ru_maxrss, which CI late in a long session measured at 404 MiB; the worker now
    # samples anonymous memory: 995-1019 MiB, also with 21 of 24 GiB held by another process),
    # so CI only catches gross errors;
    # `-m sweep` (all shapes, on a quiet machine) holds the estimate to 20%. pytest.ini's
    # default "not sweep" must not count as asking for the sweep.
    markexpr = request.config.getoption("markexpr") or ""
    strict = re.search(r"(?<!not )\bsweep\b", markexpr) is not None
    if strict:
        assert abs(r["error"]) <= 0.2, r
        return
    if not 0.5 <= r["estimate"] / r["measured"] <= 2.0:
        # once more, for a machine so loaded that one run is not representative
        launch(WORKER, [out, json.dumps(shape), mbs, nm])
        r2 = json.loads(out.read_text())
        print(f"  again: measured {r2['measured'] / 2**20:.0f} MiB ({100 * r2['error']:+.1f}%)")
        assert 0.5 <= r2["estimate"] / r2["measured"] <= 2.0, (r, r2)


# A small MoE hybrid (Mamba, attention, MoE; 16 experts, top-4, shared expert) at widths
# where the model's own memory dominates the process's fixed first-step overhead (about
# 45-60 MiB: at hidden 128 / seq 256 the estimate is 0.5-0.7 of the measured peak for it)
MOE_SHAPE = {"pattern": "ME*EME", "hidden_size": 512, "ffn_hidden_size": 2048, "mamba_num_heads": 16,
             "mamba_head_dim": 32, "mamba_num_groups": 2, "mamba_state_dim": 16, "mamba_chunk_size": 64,
             "num_attention_heads": 8, "num_query_groups": 2, "kv_channels": 16, "vocab_size": 8192,
             "seq_length": 1024, "num_moe_experts": 16, "moe_ffn_hidden_size": 512, "moe_router_topk": 4,
             "moe_shared_expert_intermediate_size": 1024, "moe_router_topk_scaling_factor": 2.5}
# glibc's default heap keeps freed blocks resident, counted in the peak, the more so the more
# the sizes of transient tensors vary: the stats loop (full, skip-one-layer and logits-chunk
# forwards) measured -29% with it, -3.8% with tensors over 128 KiB mmapped (returned to the
# OS on free); the ep=2 step (gathered tokens, reduce-scatter buffers) -17% / -20% (two
# runs) vs +8.0%; the ep=1 step -13.4% / -13.9% vs +5.7% (dense shape 0: -5.8% vs +14.8%).
# Those two run with tensors mmapped; the ep=1 step with the default, as the dense shapes.
MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}
MOE_MEASURED = [  # (mode, layout, processes, allocator environment); all -m sweep (CI time)
    pytest.param("train", {}, 1, {}, marks=pytest.mark.sweep),
    pytest.param("stats", {}, 1, MMAP, marks=pytest.mark.sweep),
    pytest.param("train", {"ep": 2}, 2, MMAP, marks=pytest.mark.sweep),
]


@pytest.mark.parametrize("mode,layout,nproc,env", MOE_MEASURED)
def test_moe_estimate_matches_measured_cpu_peak(tmp_path, monkeypatch, mode, layout, nproc, env, request):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "r.json"
    launch(WORKER, [out, json.dumps(MOE_SHAPE), 2, 1, mode, json.dumps(layout)], nproc=nproc)
    r = json.loads(out.read_text())
    worst = max(r["measured_per_rank"])
    print(f"MoE {mode} {layout}: measured {[round(m / 2**20) for m in r['measured_per_rank']]} MiB, "
          f"estimated {r['estimate'] / 2**20:.0f} MiB ({100 * (r['estimate'] - worst) / worst:+.1f}%)")
    markexpr = request.config.getoption("markexpr") or ""
    if re.search(r"(?<!not )\bsweep\b", markexpr):  # as the dense shapes: 20% on a quiet machine
        assert abs(r["estimate"] - worst) <= 0.2 * worst, r
    else:
        assert 0.5 <= r["estimate"] / worst <= 2.0, r


def _pretrain(**parallel) -> PretrainConfig:
    model = ModelConfig(pattern="M-*-M-", hidden_size=256, ffn_hidden_size=1024, vocab_size=4096,
                        seq_length=1024)
    return PretrainConfig(model=model, parallel=ParallelConfig(**parallel),
                          train=TrainConfig(global_batch_size=8, micro_batch_size=8))


def test_over_the_limit_is_refused_naming_the_keys_that_fit():
    from megatron_minitron.resources.check import check

    cfg = _pretrain()
    full = check("pretrain", cfg, world=2).total / E.GiB
    cfg.parallel.memory_limit_gb = 0.6 * full
    with pytest.raises(ConfigError) as e:
        check("pretrain", cfg, world=2)
    msg = str(e.value)
    assert "parallel.memory_limit_gb" in msg and "activations" in msg
    assert "train.micro_batch_size=" in msg or "train.recompute=" in msg, msg


def test_refused_before_any_process_group(tmp_path, real_data):
    from megatron_minitron.config import DataConfig
    from megatron_minitron.train.pretrain import run_pretrain

    import torch.distributed as dist

    cfg = _pretrain(memory_limit_gb=0.001)
    cfg.output_dir = str(tmp_path / "run")
    cfg.data = DataConfig(prefix=real_data["prefix"], tokenizer=real_data["tokenizer"])
    was = dist.is_initialized()
    with pytest.raises(ConfigError, match="would need about"):
        run_pretrain(cfg)
    assert dist.is_initialized() == was and not (tmp_path / "run").exists()


def test_dry_run_prints_the_itemised_table():
    cmd = [sys.executable, "-m", "megatron_minitron", "pretrain", "-c", "configs/pretrain_default.yaml",
           "--dry-run", "--world-size", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=child_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    for item in ("weights", "grads", "optimizer", "activations", "logits", "total", "fits"):
        assert item in r.stdout, r.stdout
    r = subprocess.run(cmd + ["parallel.memory_limit_gb=0.0001"], capture_output=True, text=True,
                       cwd=REPO, env=child_env(), timeout=300)
    assert r.returncode == 2 and "DOES NOT FIT" in r.stdout and "Traceback" not in r.stderr


@pytest.mark.parametrize("argv", [["--world-size", "8"], ["--dry-run", "--world-size", "0"]])
def test_world_size_outside_a_dry_run_is_refused(argv, capsys):
    from megatron_minitron.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["pretrain", "-c", str(REPO / "configs/pretrain_default.yaml"), *argv])
    assert e.value.code == 2 and "--world-size" in capsys.readouterr().err


def test_recompute_sp_and_chunking_lower_the_estimate():
    from megatron_minitron.resources.table import nemotron_h_4b, nemotron_h_8b

    s4, t8 = nemotron_h_4b(), nemotron_h_8b()
    lay = E.Layout(tp=4, dp=16, micro_batch_size=1, seq_length=8192, num_micro=48)
    act = {r: E.training(s4, dataclasses.replace(lay, recompute=r), "gpu").items["activations"]
           for r in ("none", "selective", "full")}
    assert act["full"] < act["selective"] < act["none"]
    sp = E.training(s4, dataclasses.replace(lay, sequence_parallel=True), "gpu").items["activations"]
    assert sp < act["none"]
    one = E.Layout(tp=1, micro_batch_size=1, seq_length=8192)
    chunked = E.stats(t8, one, "gpu", True, 1024).items["depth_kl"]
    whole = E.stats(t8, one, "gpu", True, 0).items["depth_kl"]
    assert whole > 6 * chunked  # 8192 x 131072 logits vs 1024-token chunks


def test_8b_recipe_fits_8x80gb_nodes():
    from megatron_minitron.resources.table import markdown, rows

    for name, lay, est in rows(world=64):
        assert E.fits(est, 80.0), (name, lay, est.table())
    print(markdown())


# ----------------------------------------------------------------------------- MoE layouts


def _moe_pretrain(**parallel) -> PretrainConfig:
    model = ModelConfig(**dict(MOE_SHAPE, num_moe_experts=64, moe_router_topk=2, seq_length=512))
    return PretrainConfig(model=model, parallel=ParallelConfig(**parallel),
                          train=TrainConfig(global_batch_size=8, micro_batch_size=1))


def test_expert_parallelism_splits_expert_weights_not_the_sharded_optimizer():
    """ep=8 of dp=8: the routed experts' weights and grads / 8; the distributed optimizer
    already shards every parameter over the 8 ranks (experts over DP / EP = 1 rank each, 8x
    as many), so its share stays; the dense parts do not change."""
    m = _moe_pretrain().model
    base = E.Layout(dp=8, micro_batch_size=1, seq_length=512, distributed_optimizer=True)
    one, eight = (E.training(m, dataclasses.replace(base, ep=ep)) for ep in (1, 8))
    dense, expert = E.local_param_split(m, m.pattern, 1, True, True)
    assert E.local_param_split(m, m.pattern, 1, True, True, ep=8) == (dense, expert // 8)
    assert one.items["weights"] - eight.items["weights"] == pytest.approx(expert * 7 / 8 * 4)
    assert one.items["optimizer"] == pytest.approx(eight.items["optimizer"])
    assert one.items["activations"] == pytest.approx(eight.items["activations"])
    plain = dataclasses.replace(base, distributed_optimizer=False)
    assert E.training(m, dataclasses.replace(plain, ep=8)).items["optimizer"] == pytest.approx(
        (dense + expert / 8) * 8)


def test_moe_over_the_limit_suggests_expert_parallelism():
    from megatron_minitron.resources.check import check

    cfg = _moe_pretrain()
    full = check("pretrain", cfg, world=8).total / E.GiB
    cfg.parallel.memory_limit_gb = 0.6 * full
    with pytest.raises(ConfigError, match=r"parallel\.ep=\d") as e:
        check("pretrain", cfg, world=8)
    assert "moe_dispatch" not in str(e.value)  # ep=1, tp=1: nothing gathered
    cfg.parallel.ep, cfg.parallel.memory_limit_gb = 8, 0.0
    assert "moe_dispatch" in check("pretrain", cfg, world=8).items


@pytest.mark.parametrize("parallel,world,needle", [
    ({"tp": 2}, 2, "set parallel.sequence_parallel=true"),
    ({"ep": 4}, 2, r"choose parallel.ep in \[1, 2\]"),
    ({"ep": 3}, 3, r"num_moe_experts=64 is not divisible by parallel.ep=3"),
])
def test_moe_layouts_that_cannot_run_are_refused_naming_the_fix(parallel, world, needle):
    from megatron_minitron.resources.check import check

    with pytest.raises(ConfigError, match=needle):
        check("pretrain", _moe_pretrain(**parallel), world=world, dry_run=True)
    with pytest.raises(ConfigError, match="splits mixture-of-experts layers"):
        check("pretrain", _pretrain(ep=2), world=2)


# ----------------------------------------------------------------------------- model configs


def _yaml_model(name: str) -> ModelConfig:
    from megatron_minitron.config import build, load_yaml

    cfg = build(ModelConfig, load_yaml(REPO / "configs" / "model" / name)["model"], "model.")
    cfg.validate()
    return cfg


def test_tiny_moe_hybrid_config():
    from megatron_minitron.model import count_parameters

    cfg = _yaml_model("tiny_moe_hybrid.yaml")
    n = count_parameters(cfg)
    assert cfg.pattern.count("E") == 3 and cfg.num_moe_experts == 8
    assert (n["total"], n["active"], n["active_non_embedding"]) == (6_884_872, 4_525_576, 2_428_424)
    for ep in (1, 2, 4, 8):
        cfg.validate(ep=ep)


def test_nemotron_3_nano_counts_against_the_model_card():
    """The model card: 31.6B total, 3.2B active per token without embeddings, 3.6B with.
    count_parameters: total = every parameter (all 128 experts of each E layer, embedding,
    untied output layer, norms; the routers' score-correction bias is a buffer, 2,944
    values, left out). active = the top-6 experts of each E layer and everything else,
    embedding and output layer included (3.580B ~ the card's 3.6B). The card's 3.2B keeps
    the output layer (a full GEMM per token) and drops the input embedding (a row lookup):
    active - embedding = 3.228B; active_non_embedding drops both (2.875B)."""
    from megatron_minitron.model import count_parameters

    cfg = _yaml_model("nemotron_3_nano_30b_a3b.yaml")
    assert (cfg.pattern.count("M"), cfg.pattern.count("E"), cfg.pattern.count("*")) == (23, 23, 6)
    n = count_parameters(cfg)
    assert n["total"] / 1e9 == pytest.approx(31.6, abs=0.05)
    assert n["active"] / 1e9 == pytest.approx(3.6, abs=0.05)
    assert (n["active"] - n["embedding"]) / 1e9 == pytest.approx(3.2, abs=0.05)
    assert n["active_non_embedding"] == n["active"] - n["embedding"] - n["output_layer"]
    from megatron_minitron.resources.table import nemotron_3_nano_22b_a3b

    s = count_parameters(nemotron_3_nano_22b_a3b())  # the distill recipe's student
    assert s["total"] / 1e9 == pytest.approx(22.3, abs=0.05)
    assert s["active"] / 1e9 == pytest.approx(3.0, abs=0.05)


def test_nemotron_3_nano_recipe_fits_8x80gb_nodes_with_expert_parallelism():
    from megatron_minitron.resources.table import markdown, rows_nemotron_3_nano

    # [stats at the recipe's ep=8, stats at ep=1, prune, distill at the recipe's layout, the
    # same without EP, the same at tp=1]
    rs = rows_nemotron_3_nano(world=64)
    assert "ep=8" in rs[0][1] and "ep=" not in rs[1][1] and "ep=8" in rs[3][1] and "ep=" not in rs[4][1]
    for name, lay, est in (rs[0], rs[2], rs[3]):
        assert E.fits(est, 80.0), (name, lay, est.table())
    assert rs[0][2].total < 0.3 * rs[1][2].total  # EP: 1/8 of the experts per GPU
    assert not E.fits(rs[4][2], 80.0) and not E.fits(rs[5][2], 80.0)  # KD needs EP and TP=2 here
    print(markdown(recipe="nemotron_3_nano"))


def test_nemotron_3_nano_stage_recipes_dry_run(capsys):
    """The stage recipes load with the real config classes and --dry-run prints their
    estimate before any checkpoint exists (the recipes' *_model keys give the shapes). Here
    the CPU path's estimate against a generous limit; the GPU figures are
    test_nemotron_3_nano_recipe_fits_8x80gb_nodes's (and tests/unit/test_dry_run.py's)."""
    from megatron_minitron.__main__ import main

    cpu = ["--device", "cpu", "--gpu-memory-gib", "4096"]
    assert main(["stats", "-c", str(REPO / "configs/stats_nemotron_3_nano_30b_a3b.yaml"), "--dry-run",
                 "--world-size", "8", *cpu]) == 0
    assert "ep=8" in capsys.readouterr().out
    argv = ["distill", "-c", str(REPO / "configs/distill_nemotron_3_nano_30b_a3b.yaml"), "--dry-run",
            "--world-size", "64"]
    assert main(argv + cpu) == 0
    printed = capsys.readouterr().out
    assert "teacher" in printed and "moe_dispatch" in printed and "fits" in printed
    assert main(argv + ["--world-size", "4", *cpu]) == 2  # ep=8 does not divide dp=2
    assert "choose parallel.ep in [1, 2]" in capsys.readouterr().err


def test_readme_nemotron_3_nano_search_tables_are_the_estimators_output():
    """The README's 30B-A3B per-GPU table and search-cost table print what the estimator
    gives for the recipes (each total, and the cost table line by line)."""
    from megatron_minitron.resources.table import rows_nemotron_3_nano, search_cost_markdown

    readme = (REPO / "README.md").read_text()
    for line in search_cost_markdown("nemotron_3_nano", 8).splitlines():
        assert line in readme, line
    rs = rows_nemotron_3_nano(64)
    section = readme[readme.index("**Nemotron 3 Nano 30B-A3B -> about 22B"):]
    totals = re.findall(r"^\| [^|]+ \| [^|]+ \| ([0-9.]+) \| (?:yes|NO) \|$", section[:4000], re.M)
    assert totals == [f"{e.total / E.GiB:.1f}" for _, _, e in (rs[0], rs[1], rs[2], rs[6], rs[3], rs[4], rs[5])]


def test_teacher_cache_cost_at_the_recipes_scale():
    """resources.table --teacher-cache: the search's 22 short KDs over 604 x 768 x 8192 tokens
    share one cache; sizes are tokens x (K int32 ids + K float32 log-probs + 1 float32)."""
    from megatron_minitron.resources import table as T

    c = T.teacher_cache_cost("nemotron_h_8b", nodes=8)
    s = c["search"]
    assert s["tokens"] == 604 * 768 * 8192 and s["runs"] == 22
    assert s["per_k"][32]["bytes"] == s["tokens"] * (32 * 8 + 4)
    # one teacher forward: 2 N_teacher FLOP per token at 64 GPUs x 400 TFLOP/s
    fwd_h = 2 * c["n_used_teacher"] * s["tokens"] / (64 * 400e12) * 8 / 3600
    assert abs(s["teacher_forward_node_hours"] - fwd_h) < 1e-9 and abs(s["saved_node_hours"] - 21 * fwd_h) < 1e-9
    assert c["long_kd"]["runs"] == 1 and c["long_kd"]["saved_node_hours"] == 0
    md = T.teacher_cache_markdown("nemotron_h_8b")
    assert "| search: short KDs | 3.8B | 22 |" in md and "988 GB" in md
