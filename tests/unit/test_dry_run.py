"""--dry-run and --print-config on a fresh clone (no checkpoint, plan, importance file or
data): every 8B and Nemotron 3 Nano 30B-A3B recipe's dry run, the README's and the recipes'
documented dry-run lines exactly as printed, the target device and its memory (--device,
--gpu-memory-gib, parallel.backend=nccl), --json, and bad settings refused in every mode
(--print-config, --dry-run, the run) with one line and exit 2."""

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from megatron_minitron import __main__ as cli
from megatron_minitron.resources import estimate as E
from megatron_minitron.resources import table as T
from megatron_minitron.stages import available
from tests.conftest import REPO, cli_refuses

BIG = sorted(p.name for p in (REPO / "configs").glob("*.yaml")
             if "nemotron_h_8b" in p.name or "nemotron_3_nano" in p.name or "nemotron_h_4b" in p.name)
ESTIMATED = ("pretrain", "distill", "stats", "eval", "prune", "search", "teacher-logits")


@pytest.fixture
def clone(tmp_path, monkeypatch):
    """A fresh clone's working directory: the recipes, nothing a stage makes."""
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    for var in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def stage_of(recipe: str) -> str:
    """The stage a recipe's file name starts with (import_hf_* -> import-hf)."""
    name = Path(recipe).stem.replace("_", "-")
    return max((s for s in available() if name == s or name.startswith(s + "-")), key=len)


def documented_dry_runs(text: str) -> list[list[str]]:
    """The `python -m megatron_minitron ... --dry-run ...` lines of a README or a recipe header."""
    lines = re.findall(r"python -m megatron_minitron (\S+ [^\n`]*--dry-run[^\n`]*)", text)
    return [shlex.split(x) for x in lines]


def ok(argv, capsys) -> str:
    capsys.readouterr()
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, (argv, err)
    assert "Traceback" not in err
    return out


refused = cli_refuses  # one `error:` line, exit 2


# ----------------------------------------------------------------------------- fresh clone


def test_big_recipes_are_found():
    assert {"distill_nemotron_h_8b_to_4b.yaml", "stats_nemotron_h_8b.yaml",
            "prune_nemotron_h_8b_to_4b.yaml", "search_nemotron_h_8b_to_4b.yaml",
            "stats_nemotron_3_nano_30b_a3b.yaml", "distill_nemotron_3_nano_30b_a3b.yaml"} <= set(BIG)


@pytest.mark.parametrize("recipe", BIG)
def test_every_big_recipe_dry_runs_on_a_fresh_clone(recipe, clone, capsys):
    """The recipe's documented dry-run line(s) exactly, else `STAGE -c RECIPE --dry-run`."""
    stage = stage_of(recipe)
    assert stage in available(), recipe
    text = (clone / "configs" / recipe).read_text()
    lines = documented_dry_runs(text)
    required = []
    if re.search(r'^hf_dir: ""', text, flags=re.M):  # an input only the user can name
        argv = [stage, "-c", f"configs/{recipe}", "--dry-run"]
        assert "hf_dir is empty" in refused(argv, capsys)  # as the run refuses it
        required = ["hf_dir=/models/not-downloaded-yet"]
    for argv in lines or [[stage, "-c", f"configs/{recipe}", "--dry-run", *required]]:
        assert argv[0] == stage and f"configs/{recipe}" in argv, argv
        out = ok(argv, capsys)
        if stage in ESTIMATED:
            assert "limit" in out and "fits" in out and "DOES NOT FIT" not in out, out
            per = "per host" if stage == "prune" else "per GPU"  # the recipes are GPU jobs
            assert per in out, out
        else:
            assert "settings checked" in out, out


def test_readme_dry_run_lines_work_as_printed(clone, capsys):
    lines = documented_dry_runs((REPO / "README.md").read_text())
    assert lines, "README shows a dry run"
    for argv in lines:
        out = ok(argv, capsys)
        assert "fits" in out and "DOES NOT FIT" not in out, (argv, out)


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_recipe_prints_its_config_on_a_fresh_clone(recipe, clone, capsys):
    """--print-config checks the settings and needs no input a stage makes (an input only
    the user can name, import-hf's hf_dir, is required as the run requires it)."""
    argv = [stage_of(recipe), "-c", f"configs/{recipe}", "--print-config"]
    if re.search(r'^hf_dir: ""', (clone / "configs" / recipe).read_text(), flags=re.M):
        assert "hf_dir is empty" in refused(argv, capsys)
        argv.append("hf_dir=/models/not-downloaded-yet")
    out = ok(argv, capsys)
    assert isinstance(json.loads(out), dict)


def dry_json(argv, capsys) -> dict:
    return json.loads(ok(argv + ["--json"], capsys))


def test_dry_run_figures_are_the_resource_tables(clone, capsys):
    """The dry runs (shapes from configs/model/, GPU estimate) give the README table's totals."""
    rows = {name: est for name, _, est in T.rows(64)}
    nano = T.rows_nemotron_3_nano(64)
    cases = [
        (["distill", "-c", "configs/distill_nemotron_h_8b_to_4b.yaml", "--dry-run", "--world-size", "64"],
         rows["distill 8B -> 4B (KD)"]),
        (["stats", "-c", "configs/stats_nemotron_h_8b.yaml", "--dry-run", "--world-size", "8"],
         rows["stats (1024 x 8192, depth KL)"]),
        (["stats", "-c", "configs/stats_nemotron_3_nano_30b_a3b.yaml", "--dry-run", "--world-size", "8"],
         nano[0][2]),
        (["distill", "-c", "configs/distill_nemotron_3_nano_30b_a3b.yaml", "--dry-run", "--world-size", "64"],
         nano[3][2]),
    ]
    for argv, est in cases:
        j = dry_json(argv + ["--gpu-memory-gib", "80"], capsys)
        assert j["device"] == "gpu" and j["fits"] and j["limit_gib"] == 80.0, j
        assert j["total_gib"] == pytest.approx(est.total / E.GiB, abs=1e-3), (argv, j)
        assert set(j["items_gib"]) == set(est.items), j
    assert 23 < dry_json(cases[0][0], capsys)["total_gib"] < 25  # README: 23.7 GiB


def test_shapes_come_from_the_recipes_model_files(clone, capsys):
    j = dry_json(["distill", "-c", "configs/distill_nemotron_h_8b_to_4b.yaml", "--dry-run"], capsys)
    assert j["models"]["student"]["source"] == "student_model=configs/model/nemotron_h_4b.yaml"
    assert j["models"]["student"]["hidden_size"] == 3072 and j["models"]["teacher"]["hidden_size"] == 4096
    assert j["world_size"] == 4  # the fewest processes tp=4 runs on, said in a note
    assert any("--world-size" in n for n in j["notes"])
    assert any("no checkpoint there yet" in n for n in j["notes"])
    j = dry_json(["search", "-c", "configs/search_nemotron_h_8b_to_4b.yaml", "--dry-run"], capsys)
    assert any("289" in n for n in j["notes"]), j["notes"]  # the recipe's candidate count


def test_checkpoint_wins_over_the_shape_key(clone, capsys):
    """Once the checkpoint exists, its model_config.json is the shape; a different shape key
    is said in a note."""
    stub = clone / "runs" / "teacher4b"
    stub.mkdir(parents=True)
    (stub / "model_config.json").write_text(json.dumps(T.nemotron_h_4b().to_dict()))
    (stub / "meta.json").write_text("{}")
    j = dry_json(["distill", "-c", "configs/distill_nemotron_h_8b_to_4b.yaml", "--dry-run",
                  f"teacher={stub}"], capsys)
    assert j["models"]["teacher"]["hidden_size"] == 3072
    assert j["models"]["teacher"]["source"] == f"checkpoint {stub}"
    assert any("holds another model than teacher_model" in n for n in j["notes"])


# ----------------------------------------------------------------------------- device


@pytest.fixture
def pretrain_8b(clone) -> str:
    """An 8B pretraining recipe (the default recipe's settings, the 8B's shape) at tp=4."""
    (clone / "configs" / "pretrain_8b.yaml").write_text(
        "include: [pretrain_default.yaml, model/nemotron_h_8b.yaml]\n"
        "parallel: {tp: 4, sequence_parallel: true}\n"
        "train: {micro_batch_size: 1, global_batch_size: 16, recompute: selective}\n")
    return "configs/pretrain_8b.yaml"


def test_a_login_node_plans_a_gpu_job(pretrain_8b, capsys):
    argv = ["pretrain", "-c", pretrain_8b, "--dry-run", "--world-size", "16"]
    j = dry_json(argv + ["--device", "gpu", "--gpu-memory-gib", "80"], capsys)
    assert j["device"] == "gpu" and j["limit_gib"] == 80.0 and j["fits"], j
    # the same job on CPU ranks with a 23.5 GiB share each does not fit: refused, fixes named
    capsys.readouterr()
    assert cli.main(argv + ["--device", "cpu", "--gpu-memory-gib", "23.5"]) == 2
    out, err = capsys.readouterr()
    assert err.strip().startswith("error: ") and "exceeds the limit 23.5 GiB" in err and "\n" not in err.strip()
    assert "per rank (CPU)" in out and "DOES NOT FIT" in out and "would fit with:" in out
    # parallel.memory_limit_gb is the limit the run enforces: it wins, and above the device's
    # memory it is said
    j = dry_json(argv + ["--device", "gpu", "--gpu-memory-gib", "40", "parallel.memory_limit_gb=60"], capsys)
    assert j["limit_gib"] == 60.0 and any("above the device's" in n for n in j["notes"])


def test_the_gpu_estimate_differs_from_the_cpu_one(pretrain_8b, capsys):
    argv = ["pretrain", "-c", pretrain_8b, "--dry-run", "--world-size", "16", "--gpu-memory-gib", "4096"]
    gpu, cpu = (dry_json(argv + ["--device", d], capsys) for d in ("gpu", "cpu"))
    assert "runtime" in gpu["items_gib"] and gpu["items_gib"]["runtime"] > 0
    assert cpu["items_gib"].get("runtime", 0) == 0  # no CUDA context on CPU
    # auto = megatron's distributed optimizer on GPU only: Adam state / dp there
    assert gpu["items_gib"]["optimizer"] < cpu["items_gib"]["optimizer"] / 2


@pytest.mark.parametrize("flags", [["--device", "gpu"], ["--gpu-memory-gib", "80"], ["--json"],
                                   ["--dry-run", "--gpu-memory-gib", "0"],
                                   ["--dry-run", "--device", "tpu"]])
def test_planning_flags_need_a_dry_run(flags, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["pretrain", "-c", str(REPO / "configs/pretrain_default.yaml"), *flags])
    assert e.value.code == 2


# ----------------------------------------------------------------------------- bad settings


BAD = [  # (stage, recipe, overrides, what the error names)
    ("pretrain", "pretrain_default.yaml", ["model.mamba_num_heads=6", "model.mamba_num_groups=4"],
     "model.mamba_num_heads=6 is not divisible by model.mamba_num_groups=4"),
    ("pretrain", "pretrain_default.yaml", ["parallel.tp=3"], "not divisible by parallel.tp=3"),
    ("pretrain", "pretrain_default.yaml", ["train.steps=-3"], "train.steps=-3 must be positive"),
    ("pretrain", "pretrain_default.yaml", ["model.pattern=MX*"], "unknown layer symbols ['X']"),
    ("pretrain", "pretrain_default.yaml", ["model.pattern=MX*", "parallel.pp=2"], "unknown layer symbols"),
    ("pretrain", "pretrain_moe_default.yaml", ["model.pattern=MEX"], "unknown layer symbols ['X']"),
    ("distill", "distill_nemotron_h_8b_to_4b.yaml", ["train.steps=-1"], "train.steps=-1 must be positive"),
    ("distill", "distill_nemotron_h_8b_to_4b.yaml", ["parallel.tp=3"], "not divisible by parallel.tp=3"),
    ("distill", "distill_nemotron_3_nano_30b_a3b.yaml", ["parallel.ep=3"], "parallel.ep=3"),
    ("stats", "stats_nemotron_h_8b.yaml", ["samples=-1"], "samples=-1 must be positive"),
    ("stats", "stats_nemotron_h_8b.yaml", ["parallel.tp=3"], "not divisible by parallel.tp=3"),
    ("stats", "stats_nemotron_3_nano_30b_a3b.yaml", ["samples=1001"], "samples=1001 at parallel.ep=8"),
    ("prune", "prune_nemotron_h_8b_to_4b.yaml", ["parallel.tp=3"], "plan target"),
    ("prune", "prune_nemotron_h_8b_to_4b.yaml", ["verify_tokens=0"], "verify_tokens=0"),
    ("search", "search_nemotron_h_8b_to_4b.yaml", ["budget=-5"], "budget=-5"),
    ("search", "search_nemotron_h_8b_to_4b.yaml", ["budget=100"], "no candidate architecture"),
    ("eval", "eval_default.yaml", ["micro_batch_size=-2"], "micro_batch_size=-2 must be positive"),
    ("distill", "distill_nemotron_h_8b_to_4b.yaml", ["student_model=configs/model/nope.yaml"],
     "student_model='configs/model/nope.yaml' does not exist"),
]


@pytest.mark.parametrize("mode", ["--print-config", "--dry-run"])
@pytest.mark.parametrize("stage,recipe,overrides,needle", BAD, ids=[f"{b[0]}:{' '.join(b[2])}" for b in BAD])
def test_bad_settings_are_refused_in_every_mode(mode, stage, recipe, overrides, needle, clone, capsys):
    err = refused([stage, "-c", f"configs/{recipe}", mode, *overrides], capsys)
    assert needle in err, err


RUN_BAD = [b for b in BAD if b[0] == "pretrain" or b[2] in (  # refused before any input is read
    ["train.steps=-1"], ["samples=-1"], ["verify_tokens=0"], ["micro_batch_size=-2"])]


@pytest.mark.parametrize("stage,recipe,overrides,needle", RUN_BAD,
                         ids=[f"{b[0]}:{' '.join(b[2])}" for b in RUN_BAD])
def test_the_run_refuses_them_the_same_way(stage, recipe, overrides, needle, clone, capsys):
    """Settings the run checks before it reads any input: the same line, exit 2."""
    out = ["output_dir=runs/refused"] if stage != "prune" else ["output=runs/refused"]
    err = refused([stage, "-c", f"configs/{recipe}", *overrides, *out], capsys)
    assert needle in err, err
    assert not (clone / "runs" / "refused").exists()


def test_a_shape_key_naming_a_bad_model_is_refused_naming_the_key(clone, capsys):
    (clone / "configs" / "model" / "bad.yaml").write_text("model: {pattern: 'MX*'}\n")
    err = refused(["stats", "-c", "configs/stats_nemotron_h_8b.yaml", "--dry-run",
                   "checkpoint_model=configs/model/bad.yaml"], capsys)
    assert "checkpoint_model='configs/model/bad.yaml'" in err and "unknown layer symbols" in err
    (clone / "configs" / "model" / "none.yaml").write_text("hidden_size: 3\n")
    err = refused(["stats", "-c", "configs/stats_nemotron_h_8b.yaml", "--dry-run",
                   "checkpoint_model=configs/model/none.yaml"], capsys)
    assert "has no model: mapping" in err


def test_a_dry_run_without_any_shape_names_the_key_to_give(clone, capsys):
    err = refused(["distill", "-c", "configs/distill_default.yaml", "--dry-run"], capsys)
    assert "give student_model=PATH" in err and "nemotron_h_4b.yaml" in err
    # --print-config needs no shape: the checks that need the model wait for it (stderr note)
    capsys.readouterr()
    assert cli.main(["distill", "-c", "configs/distill_default.yaml", "--print-config"]) == 0
    assert "no checkpoint there yet" in capsys.readouterr().err


# ----------------------------------------------------------------------------- inputs there


def test_inputs_that_exist_are_checked_as_the_run_checks_them(real_data, tmp_path, capsys):
    """Data that exists goes through the run's data check (here: more tokens than the model's
    vocabulary is refused); a checkpoint folder that exists must be whole."""
    data = [f"data.prefix={real_data['prefix']}", f"data.tokenizer={real_data['tokenizer']}"]
    base = ["pretrain", "-c", str(REPO / "configs/pretrain_default.yaml"), "--dry-run", *data]
    j = dry_json(base, capsys)
    assert not any(n.startswith("data:") for n in j["notes"]), j["notes"]
    err = refused(base + ["model.vocab_size=1024"], capsys)
    assert "vocab" in err, err
    assert "vocab" in refused([*base[:3], "--print-config", *data, "model.vocab_size=1024"], capsys)
    # a stats checkpoint with a model config but no shards: refused as the run refuses it
    stub = tmp_path / "ckpt"
    stub.mkdir()
    (stub / "model_config.json").write_text(json.dumps(T.nemotron_h_8b().to_dict()))
    (stub / "meta.json").write_text("{}")
    err = refused(["stats", "-c", str(REPO / "configs/stats_nemotron_h_8b.yaml"), "--dry-run",
                   f"checkpoint={stub}"], capsys)
    assert str(stub) in err
