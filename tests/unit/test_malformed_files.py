"""Malformed inputs are refused with one line naming the file, never a traceback.

Each case damages one copy of a real file (a megatron torch_dist checkpoint written by
this package, a real importance file, a real plan.json, a recipe) and runs the stage that
reads it through the CLI entry point (`megatron_minitron.__main__.main`, in this process:
it returns 2 and prints `error: ...` for a user error and lets anything else propagate,
which would fail the test). The damaged-file checks run before any process group or
model exists, so no stage here starts megatron. Two cases run the real CLI in a
subprocess to check the user sees exactly one line (no traceback) end to end.
"""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_minitron.config import ConfigError, ModelConfig, ParallelConfig, TrainConfig
from megatron_minitron.importance.io import ImportanceFile
from megatron_minitron.plan.targets import TargetConfig, make_plan
from tests.conftest import REPO, cli_refuses, child_env

TINY = ModelConfig(pattern="M-*-", hidden_size=32, ffn_hidden_size=64, mamba_num_heads=4,
                   mamba_head_dim=8, mamba_num_groups=2, mamba_state_dim=8, mamba_chunk_size=16,
                   num_attention_heads=4, num_query_groups=2, kv_channels=8, vocab_size=4096,
                   seq_length=32)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A real checkpoint (megatron's save), importance file and plan.json."""
    from megatron_minitron import dist as D
    from megatron_minitron.model import build_model
    from megatron_minitron.train import checkpoint as ckpt

    wd = tmp_path_factory.mktemp("malformed")
    par = D.init(ParallelConfig(), seed=3)
    try:
        model = build_model(TINY, par)
        it = ckpt.save(wd / "run", 0, TINY, {"model": model.sharded_state_dict()}, {"kind": "test"})
    finally:
        D.shutdown()  # frees the rendezvous port; no stage below starts a process group
    imp = ImportanceFile.random(TINY, torch.Generator().manual_seed(0))
    imp.meta = {"samples": 1, "depth_samples": 1, "seq_length": 32, "layout": {"tp": 1, "pp": 1, "dp": 1}}
    imp.save(wd / "importance.pt")
    plan = make_plan(imp, TargetConfig(hidden_size=16, ffn_hidden_size=32, mamba_num_heads=2))
    plan.save(wd / "plan.json")
    return {"wd": wd, "it": it}


run = cli_refuses  # one `error:` line, exit 2


def damaged(src: Path, dst: Path, how: str) -> Path:
    """A copy of file `src` at `dst`, damaged: truncated | garbage | empty."""
    data = src.read_bytes()
    dst.parent.mkdir(parents=True, exist_ok=True)
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "garbage":
        data = bytes((b * 7 + 13) % 256 for b in data[:64]) + data[64:]
    elif how == "empty":
        data = b""
    dst.write_bytes(data)
    return dst


def ckpt_copy(good, tmp_path) -> Path:
    dst = tmp_path / "ck"
    shutil.copytree(good["it"], dst)
    return dst


def prune_args(good, tmp_path, checkpoint=None, plan=None):
    return ["prune", f"checkpoint={checkpoint or good['it']}", f"plan={plan or good['wd'] / 'plan.json'}",
            f"output={tmp_path / 'out'}"]


def stats_args(checkpoint, real_data, tmp_path):
    return ["stats", f"checkpoint={checkpoint}", f"output_dir={tmp_path / 'stats'}",
            f"data.prefix={real_data['prefix']}", f"data.tokenizer={real_data['tokenizer']}", "samples=2", "depth_samples=1"]


# ----------------------------------------------------------------------------- recipes, lr


def test_recipe_with_yaml_syntax_error(tmp_path, capsys):
    r = tmp_path / "bad.yaml"
    r.write_text("train:\n  lr: 3e-4\n  steps: [1, 2\n")
    err = run(["pretrain", "--config", str(r)], capsys)
    assert "bad.yaml is not valid YAML at line" in err


def test_recipe_that_is_not_a_mapping_and_binary_recipe(tmp_path, capsys):
    r = tmp_path / "list.yaml"
    r.write_text("- a\n- b\n")
    assert "must be a YAML mapping" in run(["plan", "--config", str(r)], capsys)
    b = tmp_path / "bin.yaml"
    b.write_bytes(b"\xff\xfe\x00garbage")
    assert "bin.yaml" in run(["plan", "--config", str(b)], capsys)


@pytest.mark.parametrize("lr", ["-1", "0", ".nan"])
def test_bad_lr_is_reported_as_lr(lr, capsys):
    err = run(["pretrain", f"train.lr={lr}", "train.min_lr=0"], capsys)
    assert "train.lr=" in err and "positive learning rate" in err and "min_lr" not in err
    with pytest.raises(ConfigError, match="min_lr=-0.1 must be >= 0"):
        TrainConfig(min_lr=-0.1).validate()
    with pytest.raises(ConfigError, match="min_lr=0.1 exceeds train.lr=0.01"):
        TrainConfig(lr=0.01, min_lr=0.1).validate()


# ----------------------------------------------------------------------------- plan.json


def test_plan_json_damaged(good, tmp_path, capsys):
    src = good["wd"] / "plan.json"
    d = json.loads(src.read_text())
    cases = {
        "truncated": damaged(src, tmp_path / "t" / "plan.json", "truncated"),
        "empty": damaged(src, tmp_path / "e" / "plan.json", "empty"),
    }
    edits = {
        "index_out_of_range": lambda d: d["layers"]["0"]["mamba_heads"].__setitem__(0, 99),
        "repeated_index": lambda d: d["hidden"].__setitem__(1, d["hidden"][0]),
        "wrong_type": lambda d: d["layers"]["1"].__setitem__("ffn", "all"),
        "missing_field": lambda d: d.pop("kept_layers"),
        "target_vocab_changed": lambda d: d["target"].__setitem__("vocab_size", 128),
        "cross_group_head": lambda d: d["layers"]["0"].__setitem__("mamba_heads", [2, 0]),
        "target_unknown_key": lambda d: d["target"].__setitem__("hiden_size", 3),
    }
    for name, edit in edits.items():
        e = json.loads(json.dumps(d))
        edit(e)
        p = tmp_path / name / "plan.json"
        p.parent.mkdir()
        p.write_text(json.dumps(e))
        cases[name] = p
    for name, body in {"foreign_list": "[1, 2, 3]", "foreign_dict": '{"model": "llama", "prune": 0.5}'}.items():
        p = tmp_path / name / "plan.json"
        p.parent.mkdir()
        p.write_text(body)
        cases[name] = p
    for name, p in cases.items():
        err = run(prune_args(good, tmp_path, plan=p), capsys)
        assert str(p) in err, (name, err)
        print(f"{name}: {err}")


# ----------------------------------------------------------------------------- importance file


def test_importance_file_damaged(good, tmp_path, capsys):
    src = good["wd"] / "importance.pt"
    blob = torch.load(src, weights_only=True)
    cases = {how: damaged(src, tmp_path / how / "importance.pt", how) for how in ("truncated", "garbage", "empty")}

    def edited(name, fn):
        b = {**blob, "layers": {k: dict(v) for k, v in blob["layers"].items()}}
        fn(b)
        p = tmp_path / name / "importance.pt"
        p.parent.mkdir()
        torch.save(b, p)
        cases[name] = p

    edited("wrong_shape", lambda b: b["layers"][1].__setitem__("ffn", torch.rand(7)))
    edited("hidden_wrong", lambda b: b.__setitem__("hidden", torch.rand(TINY.hidden_size + 1)))
    edited("not_a_tensor", lambda b: b["layers"][0]["mamba"].__setitem__("x", [1.0, 2.0]))
    edited("missing_layers", lambda b: b.pop("layers"))
    edited("model_bad", lambda b: b.__setitem__("model", {**b["model"], "hidden_size": "wide"}))
    p = tmp_path / "foreign_sd" / "importance.pt"
    p.parent.mkdir()
    torch.save({"weight": torch.zeros(3)}, p)  # someone's state dict
    cases["foreign_sd"] = p

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    p = tmp_path / "foreign_pickle" / "importance.pt"
    p.parent.mkdir()
    p.write_bytes(pickle.dumps({"format": Evil()}))
    cases["foreign_pickle"] = p
    for name, p in cases.items():
        err = run(["plan", f"importance={p}", f"output_dir={tmp_path / 'plan_out'}",
                   "target.hidden_size=16"], capsys)
        assert str(p) in err, (name, err)
        print(f"{name}: {err}")
    assert not (tmp_path / "pwned").exists()  # weights_only: a foreign pickle runs no code


# ----------------------------------------------------------------------------- model_config.json


def test_model_config_damaged(good, tmp_path, capsys, real_data):
    src = good["it"] / "model_config.json"
    body = json.loads(src.read_text())
    variants = {
        "truncated": src.read_text()[: len(src.read_text()) // 2],
        "empty": "",
        "wrong_type": json.dumps({**body, "hidden_size": "wide"}),
        "unknown_key": json.dumps({**body, "hiden_size": 32}),
        "impossible": json.dumps({**body, "mamba_num_heads": 3}),
        "foreign_hf": json.dumps({"architectures": ["NemotronHForCausalLM"], "hidden_size": 32}),
        "not_an_object": "[32, 64]",
    }
    for name, text in variants.items():
        ck = tmp_path / name
        shutil.copytree(good["it"], ck)
        (ck / "model_config.json").write_text(text)
        for argv in (prune_args(good, tmp_path, checkpoint=ck), stats_args(ck, real_data, tmp_path)):
            err = run(argv, capsys)
            assert "model_config.json" in err and str(ck) in err, (name, argv[0], err)
        print(f"{name}: {err}")


# ----------------------------------------------------------------------------- shards, .metadata


def _shard(ck: Path) -> Path:
    return sorted(ck.glob("*.distcp"))[0]


def test_checkpoint_files_damaged(good, tmp_path, capsys, real_data):
    cases = {}

    def case(name, fn):
        ck = tmp_path / name
        shutil.copytree(good["it"], ck)
        cases[name] = (ck, fn(ck))

    case("shard_missing", lambda ck: (_shard(ck).unlink(), "is missing")[1])
    case("shard_truncated", lambda ck: (damaged(_shard(ck), _shard(ck), "truncated"), "is truncated")[1])
    case("shard_empty", lambda ck: (damaged(_shard(ck), _shard(ck), "empty"), "is truncated")[1])
    case("metadata_missing", lambda ck: ((ck / ".metadata").unlink(), ".metadata is missing")[1])
    case("metadata_truncated", lambda ck: (damaged(ck / ".metadata", ck / ".metadata", "truncated"),
                                           ".metadata is truncated or corrupt")[1])
    case("metadata_garbage", lambda ck: (damaged(ck / ".metadata", ck / ".metadata", "garbage"),
                                         ".metadata is truncated or corrupt")[1])
    case("metadata_foreign", lambda ck: ((ck / ".metadata").write_bytes(pickle.dumps({"a": 1})),
                                         "does not hold")[1])
    case("common_truncated", lambda ck: (damaged(ck / "common.pt", ck / "common.pt", "truncated"),
                                         "common.pt is truncated")[1])
    case("megatron_json_missing", lambda ck: ((ck / "metadata.json").unlink(), "no readable metadata.json")[1])
    for name, (ck, what) in cases.items():
        for argv in (prune_args(good, tmp_path, checkpoint=ck), stats_args(ck, real_data, tmp_path)):
            err = run(argv, capsys)
            assert str(ck) in err and what in err, (name, argv[0], err)
        print(f"{name}: {err}")


def _cli(args):
    return subprocess.run([sys.executable, "-m", "megatron_minitron", *args], capture_output=True,
                          text=True, cwd=REPO, env=child_env(), timeout=300)


def test_cli_subprocess_prints_one_line(good, tmp_path, real_data):
    """End to end through the real CLI: a damaged shard header (size intact, so only the
    read itself can notice; prune's reader and megatron's loader in stats) and a truncated
    plan: exit 2, one line, no traceback."""
    from torch.distributed.checkpoint import FileSystemReader

    ck = tmp_path / "hdr"
    shutil.copytree(good["it"], ck)
    md = FileSystemReader(str(ck)).read_metadata()  # torch's own reader, to find a tensor item
    key, info = max(((k, v) for k, v in md.storage_data.items() if k.offset is not None),
                    key=lambda kv: kv[1].length)
    with open(ck / info.relative_path, "r+b") as f:  # overwrite its zip header, size unchanged
        f.seek(info.offset)
        f.write(b"\x00" * 64)
    plan = damaged(good["wd"] / "plan.json", tmp_path / "p" / "plan.json", "truncated")
    for args, what in ((prune_args(good, tmp_path, checkpoint=ck), "is corrupt"),
                       (stats_args(ck, real_data, tmp_path), "megatron's loader failed"),
                       (prune_args(good, tmp_path, plan=plan), "is not valid JSON")):
        r = _cli(args)
        err = r.stderr.strip()
        assert r.returncode == 2 and "Traceback" not in err, (r.returncode, err[-3000:])
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and what in lines[0], err[-3000:]
        print(lines[0])
