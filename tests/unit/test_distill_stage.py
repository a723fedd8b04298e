"""DistillConfig validation, recipes and the refusals that happen before any model is built."""

import json
from dataclasses import replace

import pytest

from megatron_minitron.config import ConfigError, ModelConfig, load_stage_config
from megatron_minitron.distill.stage import DistillConfig, LossConfig, check_pair, run_distill
from megatron_minitron.distill.teacher import pair_shapes_fn
from megatron_minitron.train import checkpoint as ckpt
from tests.conftest import REPO

pytestmark = pytest.mark.smoke


def test_default_recipe_loads():
    cfg = load_stage_config("distill", str(REPO / "configs" / "distill_default.yaml"), [])
    assert isinstance(cfg, DistillConfig)
    assert cfg.loss.alpha_kd == 1.0 and cfg.loss.temperature == 1.0
    cfg.validate(dp=1)


def test_paper_recipe_matches_paper():
    cfg = load_stage_config("distill", str(REPO / "configs" / "distill_nemotron_h_8b_to_4b.yaml"), [])
    assert cfg.seq_length == 8192
    assert cfg.train.global_batch_size == 768
    assert cfg.train.lr == pytest.approx(1.6e-4)
    assert cfg.train.warmup_steps == 60
    assert cfg.train.lr_decay_style == "cosine"
    assert cfg.loss.alpha_kd == 1.0


def test_overrides_are_type_checked():
    with pytest.raises(ConfigError, match="loss.alpha_kd"):
        load_stage_config("distill", None, ["loss.alpha_kd=high"])
    with pytest.raises(ConfigError, match="did you mean loss.temperature"):
        load_stage_config("distill", None, ["loss.temprature=2"])


@pytest.mark.parametrize("override,match", [
    ("loss.alpha_kd=1.5", "alpha_kd"),
    ("loss.temperature=0", "temperature"),
    ("loss.chunk_size=-1", "chunk_size"),
    ("seq_length=-4", "seq_length"),
    ("teacher=", "teacher is empty"),
    ("output_dir=runs/default/teacher", "output_dir"),
    ("train.global_batch_size=6", "global_batch_size"),
])
def test_bad_values_refused(override, match):
    cfg = load_stage_config("distill", None, [override])
    with pytest.raises(ConfigError, match=match):
        cfg.validate(dp=1)


def test_vocab_mismatch_refused():
    t = ModelConfig()
    with pytest.raises(ConfigError, match="vocabulary mismatch.*4096.*8192"):
        check_pair(replace(t, vocab_size=4096), replace(t, vocab_size=8192), 1, 1)
    # every other dimension may differ
    check_pair(replace(t, pattern="M-M-", hidden_size=128, ffn_hidden_size=256,
                       mamba_num_heads=4, mamba_head_dim=16), t, 1, 1)
    with pytest.raises(ConfigError, match="student model.pattern"):
        check_pair(replace(t, pattern="M-M"), t, 1, 2)


def test_vocab_mismatch_refused_from_checkpoints(tmp_path):
    """run_distill reads both model_config.json files and refuses before building anything
    (no process group is started: this test has none)."""
    for name, vocab in (("s", 4096), ("t", 8192)):
        it = tmp_path / name / "checkpoints" / "iter_0000001"
        it.mkdir(parents=True)
        (it / ckpt.CONFIG_FILE).write_text(json.dumps(replace(ModelConfig(), vocab_size=vocab).to_dict()))
        (it / ckpt.META_FILE).write_text("{}")
        (it.parent / "latest").write_text(it.name)
    cfg = DistillConfig(student=str(tmp_path / "s"), teacher=str(tmp_path / "t"),
                        output_dir=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="vocabulary mismatch"):
        run_distill(cfg)
    cfg.teacher = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="no checkpoint at"):
        run_distill(cfg)


def test_pipeline_shapes_widen_by_teacher_hidden():
    adjust = pair_shapes_fn(96)
    recv, send = adjust([(64, 2, 32)], [(64, 2, 32)])
    assert recv == [(64, 2, 128)] and send == [(64, 2, 128)]


def test_loss_config_defaults_are_paper():
    lc = LossConfig()
    assert lc.alpha_kd == 1.0 and lc.temperature == 1.0
