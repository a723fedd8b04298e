"""Resource check: the estimator's parameter split equals the built model, its totals match
measured CPU peaks of real training steps (several shapes), --dry-run prints the itemised
table, a layout over parallel.memory_limit_gb is refused before any work with the keys that
make it fit, and the 8B recipe fits 8 x 80 GB nodes."""

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


def test_local_params_equal_the_built_model():
    from megatron_minitron import dist as D
    from megatron_minitron.model import build_model, local_parameter_count

    cfg = ModelConfig(pattern="M-*-M-", hidden_size=64, ffn_hidden_size=128, mamba_num_heads=4,
                      mamba_head_dim=16, mamba_num_groups=2, mamba_state_dim=8,
                      num_attention_heads=4, num_query_groups=2, kv_channels=16, vocab_size=512)
    par = D.init(ParallelConfig(), seed=1)
    model = build_model(cfg, par, initialize=False)
    assert E.local_params(cfg, cfg.pattern, 1, True, True) == local_parameter_count(model)


@pytest.mark.parametrize("shape,mbs,nm", [SHAPES[0]] + [pytest.param(*x, marks=pytest.mark.sweep)
                                                       for x in SHAPES[1:]])
def test_estimate_matches_measured_cpu_peak(tmp_path, shape, mbs, nm, request):
    out = tmp_path / "r.json"
    launch(WORKER, [out, json.dumps(shape), mbs, nm])
    r = json.loads(out.read_text())
    print(f"{shape['pattern']} h={shape['hidden_size']} s={shape['seq_length']} "
          f"V={shape['vocab_size']} mbs={mbs}: measured {r['measured'] / 2**20:.0f} MiB, "
          f"estimated {r['estimate'] / 2**20:.0f} MiB ({100 * r['error']:+.1f}%)")
    # observed -6.7%, -5.1%, -9.1% (aim: 15%) on a quiet machine. ru_maxrss depends on glibc's
    # allocator state: shape 0 measured 868-1147 MiB under different MALLOC_* settings of one
    # process and 584-644 MiB late in a long test session, so CI only catches gross errors;
    # `-m sweep` (all shapes, on a quiet machine) holds the estimate to 20%. pytest.ini's
    # default "not sweep" must not count as asking for the sweep.
    markexpr = request.config.getoption("markexpr") or ""
    strict = re.search(r"(?<!not )\bsweep\b", markexpr) is not None
    if strict:
        assert abs(r["error"]) <= 0.2, r
    else:
        assert 0.5 <= r["estimate"] / r["measured"] <= 2.0, r


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
