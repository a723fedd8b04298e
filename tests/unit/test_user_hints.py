"""What a new user meets (issue 20, items 5-7): the data check compares the tokenizer's
identity (the content hash prepare-data records), not only its size; prepare-data takes
a tokenizer with the default recipe; and the hints of four refusals work as written
(the quoting hint pasted into a real bash, the warmup fix, a JSON given as importance=,
a data.prefix ending in .bin / .idx)."""

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_minitron import __main__ as cli
from megatron_minitron import data as D
from megatron_minitron.config import ConfigError, ModelConfig, TrainConfig, load_yaml
from megatron_minitron.data.blend import require_files
from megatron_minitron.importance.io import ImportanceFile
from megatron_minitron.plan import targets
from megatron_minitron.plan.targets import TargetConfig, make_plan
from tests.conftest import REPO, child_env
from tests.real_tokenizer import english_paragraphs, make_tokenizer_folder
from tests.unit.test_malformed_files import run

VOCAB = 300


def _prepare(out: Path, corpus: Path, **kw) -> dict:
    return D.prepare_data(D.DataPrepConfig(output_dir=str(out), corpus=str(corpus), progress=False,
                                           workers=1, **kw), log=lambda m: None)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Two datasets, each with its own BPE trained on other text: the same size, the same
    EOD id (0), other merges - the case the size check let through."""
    wd = tmp_path_factory.mktemp("hints")
    paras = english_paragraphs()
    out = {}
    for name, part in (("a", paras[0::2]), ("b", paras[1::2])):
        corpus = wd / f"{name}.txt"
        corpus.write_text("\n\n".join(part * 3) + "\n")
        s = _prepare(wd / name, corpus, vocab_size=VOCAB)
        out[name] = {"summary": s, "prefix": s["prefix"], "tokenizer": s["tokenizer"], "corpus": corpus}
    a, b = out["a"]["summary"], out["b"]["summary"]
    assert a["vocab_size"] == b["vocab_size"] == VOCAB and a["eod"] == b["eod"] == 0
    assert a["sha256"]["tokenizer"] != b["sha256"]["tokenizer"]
    out["wd"] = wd
    return out


class Data:
    def __init__(self, prefix, tokenizer, eod_token=""):
        self.prefix, self.tokenizer, self.eod_token = prefix, tokenizer, eod_token


# ----------------------------------------------------------------------------- 5. tokenizer identity


def test_other_tokenizer_of_the_same_size_is_refused_naming_both(two):
    a, b = two["a"], two["b"]
    assert D.check_data(Data(a["prefix"], a["tokenizer"]), 4096)["tokens"] == a["summary"]["tokens"]
    with pytest.raises(D.DataError) as e:
        D.check_data(Data(a["prefix"], b["tokenizer"]), 4096)
    msg = str(e.value)
    print(msg)
    assert "\n" not in msg
    for needle in (a["prefix"], a["tokenizer"], b["tokenizer"], a["summary"]["sha256"]["tokenizer"][:12],
                   b["summary"]["sha256"]["tokenizer"][:12], "not with data.tokenizer",
                   f"point data.tokenizer at {a['tokenizer']}", f"re-run prepare-data with tokenizer={b['tokenizer']}"):
        assert needle in msg, (needle, msg)


def test_every_prefix_of_a_blend_is_checked(two):
    a, b = two["a"], two["b"]
    for spec in ([a["prefix"], b["prefix"]], [0.5, a["prefix"], 0.5, b["prefix"]],
                 {"train": a["prefix"], "valid": b["prefix"]}):
        with pytest.raises(D.DataError, match=f"dataset {b['prefix']} was tokenized with {b['tokenizer']}"):
            D.check_data(Data(spec, a["tokenizer"]), 4096)
    assert "blend" in D.check_data(Data([0.3, a["prefix"], 0.7, a["prefix"]], a["tokenizer"]), 4096)


def test_the_fix_named_in_the_refusal_works(two, tmp_path):
    """Both fixes the message names: point data.tokenizer at the data's own tokenizer
    (checked above), or re-run prepare-data with the stage's tokenizer."""
    a, b = two["a"], two["b"]
    s = _prepare(tmp_path / "a_with_b", a["corpus"], tokenizer=b["tokenizer"])
    assert D.check_data(Data(s["prefix"], b["tokenizer"]), 4096)["tokens"] > 0
    with pytest.raises(D.DataError, match="not with data.tokenizer"):
        D.check_data(Data(s["prefix"], a["tokenizer"]), 4096)


def test_a_copy_a_folder_and_its_tokenizer_json_are_the_same_tokenizer(two, tmp_path):
    a = two["a"]
    copy = tmp_path / "copy" / "tokenizer.json"
    copy.parent.mkdir()
    shutil.copy(a["tokenizer"], copy)
    assert D.check_data(Data(a["prefix"], str(copy)), 4096)
    folder = make_tokenizer_folder(tmp_path / "tok")  # a Hugging Face folder, eos </s>
    s = _prepare(tmp_path / "f", a["corpus"], tokenizer=str(folder))
    assert s["sha256"]["tokenizer_model"] == D.sha256_file(folder / "tokenizer.json")
    assert s["sha256"]["tokenizer"] != s["sha256"]["tokenizer_model"]  # the folder's files
    eod = "</s>"  # the folder's eos (the file reads the tokenizer_config.json beside it too)
    assert D.check_data(Data(s["prefix"], str(folder)), 4096)
    assert D.check_data(Data(s["prefix"], str(folder / "tokenizer.json"), eod), 4096)
    # prepared with the file, read with a folder holding that same tokenizer.json
    s2 = _prepare(tmp_path / "g", a["corpus"], tokenizer=str(folder / "tokenizer.json"), eod_token=eod)
    assert D.check_data(Data(s2["prefix"], str(folder)), 4096)
    # same tokenizer, another end-of-document token: the fix names data.eod_token
    with pytest.raises(D.DataError, match=r"set data.eod_token='</s>'"):
        D.check_data(Data(s["prefix"], str(folder), "<s>"), 4096)


def test_a_tokenizer_changed_in_place_is_refused(two, tmp_path):
    a = two["a"]
    tok = tmp_path / "t" / "tokenizer.json"
    tok.parent.mkdir()
    shutil.copy(a["tokenizer"], tok)
    s = _prepare(tmp_path / "d", a["corpus"], tokenizer=str(tok))
    shutil.copy(two["b"]["tokenizer"], tok)  # retrained at the same path, same size
    with pytest.raises(D.DataError, match=r"the tokenizer changed since prepare-data; re-run prepare-data "
                                          rf"with tokenizer={tok} \(output_dir={tmp_path / 'd'}\)"):
        D.check_data(Data(s["prefix"], str(tok)), 4096)


def test_a_summary_without_a_tokenizer_hash_is_accepted_with_a_warning(two, tmp_path):
    """Every prepare-data release records sha256.tokenizer; a summary.json without it was
    written by something else: size and EOD are still checked, the rest is a warning."""
    a, b = two["a"], two["b"]
    d = tmp_path / "old"
    shutil.copytree(Path(a["prefix"]).parent, d)
    s = json.loads((d / "summary.json").read_text())
    s.pop("sha256")
    s["prefix"] = str(d / "corpus_text_document")
    (d / "summary.json").write_text(json.dumps(s))
    lines = []
    D.check_data(Data(s["prefix"], b["tokenizer"]), 4096, log=lines.append)
    assert len(lines) == 1 and "records no tokenizer hash" in lines[0] and "warning" in lines[0], lines
    s["vocab_size"] = VOCAB + 1  # the size check still refuses
    (d / "summary.json").write_text(json.dumps(s))
    with pytest.raises(D.DataError, match="not with data.tokenizer"):
        D.check_data(Data(s["prefix"], b["tokenizer"]), 4096, log=lines.append)


# ----------------------------------------------------------------------------- 6. own tokenizer, default recipe


def test_default_recipe_with_own_tokenizer(two, tmp_path, capsys):
    a = two["a"]
    recipe = REPO / "configs" / "prepare_data_default.yaml"
    assert load_yaml(recipe)["vocab_size"] == 4096 and not load_yaml(recipe).get("tokenizer")  # trains as before
    rc = cli.main(["prepare-data", "-c", str(recipe), f"corpus={a['corpus']}", f"tokenizer={a['tokenizer']}",
                   f"output_dir={tmp_path / 'own'}", "workers=1", "progress=false"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "vocab_size=4096 is not used" in out, out
    s = json.loads((tmp_path / "own" / "summary.json").read_text())
    assert s["vocab_size"] == VOCAB and s["vocab_size_not_used"] == 4096 and s["vocab_size_requested"] is None
    assert s["sha256"]["tokenizer"] == a["summary"]["sha256"]["tokenizer"]
    # byte for byte the data prepared without vocab_size
    s0 = _prepare(tmp_path / "own0", a["corpus"], tokenizer=a["tokenizer"])
    assert s0["sha256"]["bin"] == s["sha256"]["bin"] and "vocab_size_not_used" not in s0


# ----------------------------------------------------------------------------- 7. hints


def _hint(err: str) -> str:
    return err.split("e.g. ", 1)[1]


@pytest.mark.parametrize("value", ["*-*-", "[1, 2", "!a*", "*it's", "*$HOME", "`x", '*"q"', "*it's $x"])
def test_quoting_hint_works_pasted_into_bash(value, capsys):
    err = run(["pretrain", f"model.pattern={value}"], capsys)
    print(err)
    hint = _hint(err)
    code = ("import json, sys; from megatron_minitron.config import parse_overrides; "
            "print(json.dumps(parse_overrides(sys.argv[1:])))")
    res = subprocess.run(["bash", "-c", f"{shlex.quote(sys.executable)} -c {shlex.quote(code)} {hint}"],
                         capture_output=True, text=True, cwd=REPO, env=child_env(), timeout=120)
    assert res.returncode == 0, (hint, res.stderr[-2000:])
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {"model": {"pattern": value}}, (hint, res.stdout)


def test_warmup_hint_names_the_keys_and_values_that_fix_it(capsys):
    err = run(["pretrain", "train.warmup_steps=6", "train.steps=3"], capsys)
    assert "train.warmup_steps=6 must be < train.steps=3; set train.warmup_steps=2 (or less) or " \
           "train.steps=7 (or more)" in err, err
    TrainConfig(warmup_steps=2, steps=3).validate()
    TrainConfig(warmup_steps=6, steps=7).validate()
    with pytest.raises(ConfigError, match="set train.warmup_steps=0 .*train.steps=2"):
        TrainConfig(warmup_steps=1, steps=1).validate()


TINY = ModelConfig(pattern="M-*-", hidden_size=32, ffn_hidden_size=64, mamba_num_heads=4,
                   mamba_head_dim=8, mamba_num_groups=2, mamba_state_dim=8, mamba_chunk_size=16,
                   num_attention_heads=4, num_query_groups=2, kv_channels=8, vocab_size=4096,
                   seq_length=32)


def test_json_given_as_importance_is_refused_saying_what_to_give(tmp_path, capsys):
    imp = ImportanceFile.random(TINY, torch.Generator().manual_seed(0))
    imp.save(tmp_path / "stats" / "importance.pt")
    plan = make_plan(imp, TargetConfig(hidden_size=16, ffn_hidden_size=32, mamba_num_heads=2))
    plan.save(tmp_path / "plan" / "plan.json")
    assert json.loads((tmp_path / "plan" / "plan.json").read_text())["format"] == targets.FORMAT
    other = tmp_path / "other.json"
    other.write_text('{"layers": [1, 2]}')
    expect = {
        tmp_path / "stats" / "importance.json": f"metadata sidecar that `stats` writes next to "
                                                f"{tmp_path / 'stats' / 'importance.pt'}; give that .pt file",
        tmp_path / "plan" / "plan.json": f"a plan from `plan`: it goes to `prune plan={tmp_path / 'plan' / 'plan.json'}`",
        other: "importance= takes the importance.pt that `stats` writes (a plan.json goes to `prune plan=`)",
    }
    for p, want in expect.items():
        err = run(["plan", f"importance={p}", f"output_dir={tmp_path / 'out'}", "target.hidden_size=16"], capsys)
        print(err)
        assert want in err and str(p) in err and "weights_only" not in err, err
    ImportanceFile.load(tmp_path / "stats" / "importance.pt")  # the .pt it names loads


def test_data_prefix_with_extension_says_drop_it(two, capsys):
    a = two["a"]
    for ext in (".bin", ".idx"):
        err = run(["pretrain", f"data.prefix={a['prefix']}{ext}", f"data.tokenizer={a['tokenizer']}"], capsys)
        assert f"names '{a['prefix']}{ext}', a file of the dataset; give its prefix, without {ext}: " \
               f"data.prefix={a['prefix']}" in err and "not found either" not in err, err
    with pytest.raises(D.DataError, match=r"without \.bin: /nowhere/x \(/nowhere/x.bin/.idx not found either\)"):
        require_files([a["prefix"], "/nowhere/x.bin"])
    with pytest.raises(D.DataError, match="not found; run"):  # no extension: the plain message
        require_files("/nowhere/x")
