"""Recipes, overrides and validation: errors name the key and the fix, before any model."""


import pytest

from megatron_minitron.config import (ConfigError, ModelConfig, PretrainConfig, build,
                                      load_stage_config, parse_overrides)

pytestmark = pytest.mark.smoke


def test_shipped_recipes_load_and_validate():
    cfg = load_stage_config("pretrain", "configs/pretrain_default.yaml", [])
    assert isinstance(cfg, PretrainConfig)
    assert cfg.model.pattern == "M-M*-M-" and cfg.train.steps > 0
    cfg.model.validate(tp=2, pp=1)
    big = load_stage_config("pretrain", None, ["model.pattern=M-*-"])
    assert big.model.pattern == "M-*-"


def test_include_composes_and_includer_wins(tmp_path):
    (tmp_path / "m.yaml").write_text("model:\n  hidden_size: 128\n  ffn_hidden_size: 256\n")
    (tmp_path / "s.yaml").write_text("include: [m.yaml]\nmodel:\n  hidden_size: 64\n")
    cfg = load_stage_config("pretrain", str(tmp_path / "s.yaml"), ["train.lr=1e-3"])
    assert cfg.model.hidden_size == 64 and cfg.model.ffn_hidden_size == 256
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)


def test_overrides_are_typed():
    assert parse_overrides(["a.b=3", "c=x", "d=true"]) == {"a": {"b": 3}, "c": "x", "d": True}
    cfg = load_stage_config("pretrain", None, ["train.steps=7", "model.untie_embeddings=false"])
    assert cfg.train.steps == 7 and cfg.model.untie_embeddings is False


@pytest.mark.parametrize("override,needle", [
    ("train.stpes=3", "did you mean train.steps"),
    ("model.hidden=3", "unknown key model.hidden"),
    ("train.steps=abc", "train.steps='abc' must be an integer"),
    ("train.steps=1.5", "must be an integer"),
    ("model.untie_embeddings=3", "must be true or false"),
    ("train.lr=fast", "train.lr='fast' must be a number"),
    ("model=3", "model must be a mapping"),
    ("nonsense", "dotted.key=value"),
])
def test_bad_keys_and_types_are_refused(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        load_stage_config("pretrain", None, [override])


@pytest.mark.parametrize("kw,tp,pp,needle", [
    (dict(mamba_num_heads=6, mamba_num_groups=4), 1, 1, "model.mamba_num_heads=6 is not divisible by model.mamba_num_groups=4; use e.g. 4 or 8"),
    (dict(mamba_num_heads=8, mamba_num_groups=1), 2, 1, "model.mamba_num_groups=1 is not divisible by parallel.tp=2"),
    (dict(num_attention_heads=6, num_query_groups=4), 1, 1, "num_attention_heads=6 is not divisible by model.num_query_groups=4"),
    (dict(num_query_groups=1, num_attention_heads=4), 2, 1, "num_query_groups=1 is not divisible by parallel.tp=2"),
    (dict(ffn_hidden_size=767), 2, 1, "ffn_hidden_size=767 is not divisible by parallel.tp=2; use e.g. 766 or 768"),
    (dict(pattern="M-X"), 1, 1, "unknown layer symbols ['X']"),
    (dict(pattern="M-*"), 1, 2, "3 layers, not divisible by parallel.pp=2"),
    (dict(activation="tanh"), 1, 1, "activation='tanh' is unknown"),
    (dict(hidden_size=0), 1, 1, "hidden_size=0 must be positive"),
    (dict(vocab_size=4097), 2, 1, "vocab_size=4097 is not divisible by parallel.tp=2"),
])
def test_impossible_sizes_are_refused(kw, tp, pp, needle):
    with pytest.raises(ConfigError) as e:
        ModelConfig(**kw).validate(tp=tp, pp=pp)
    assert needle in str(e.value)


def test_train_batch_divisibility():
    cfg = load_stage_config("pretrain", None, ["train.global_batch_size=6", "train.micro_batch_size=4"])
    with pytest.raises(ConfigError, match="global_batch_size=6 is not divisible"):
        cfg.train.validate(dp=1)


def test_cli_reports_config_errors_before_building(tmp_path, capsys):
    from megatron_minitron.__main__ import main

    rc = main(["pretrain", "model.mamba_num_heads=7"])
    # validation happens before torch.distributed or any model is touched
    assert rc == 2
    assert "model.mamba_num_heads=7 is not divisible by model.mamba_num_groups=2" in capsys.readouterr().err
    rc = main(["pretrain", "data.prefix=" + str(tmp_path / "nope")])
    assert rc == 2
    assert "not found; run `python -m megatron_minitron prepare-data`" in capsys.readouterr().err


def test_print_config_roundtrip(capsys):
    from megatron_minitron.__main__ import main

    assert main(["pretrain", "-c", "configs/pretrain_default.yaml", "--print-config", "train.steps=50"]) == 0
    import json

    d = json.loads(capsys.readouterr().out)
    assert d["train"]["steps"] == 50
    assert build(PretrainConfig, d) == load_stage_config("pretrain", "configs/pretrain_default.yaml", ["train.steps=50"])
    # --print-config checks the settings as the run does: 5 steps < the recipe's 30 warmup steps
    assert main(["pretrain", "-c", "configs/pretrain_default.yaml", "--print-config", "train.steps=5"]) == 2
    assert "train.warmup_steps=30 must be < train.steps=5" in capsys.readouterr().err
