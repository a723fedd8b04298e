"""A new user's path, every stage through the CLI as the README's real-checkpoint section
types it: a Nemotron-H folder saved by transformers with a tokenizer that has no
<|endoftext|> -> import-hf -> prepare-data (JSON Lines shards, the model's own tokenizer)
-> stats -> plan -> prune -> distill (a few steps) -> export-hf -> transformers loads it and
generate() decodes text with the exported tokenizer (userpath_worker.py).

Marked `slow` (deselected in CI; about 95 s dense, 2.5 min MoE): every stage of it is in
CI's own tests (test_hf_dist, test_data_sources, test_stats_dist, test_prune_dist,
test_distill_dist, test_oracle_dist, test_moe_dist); this file checks them chained as a user
types them. Run: .venv/bin/python -m pytest -m slow tests/dist/test_user_path_dist.py"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, child_env, free_port, launch

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("userpath_worker.py")


def cli(*args, nproc: int = 1):
    cmd = [sys.executable, "-m", "megatron_minitron", *map(str, args)]
    if nproc > 1:
        cmd[1:2] = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                    "--master_port", str(free_port()), "-m"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=child_env())
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    wd = tmp_path_factory.mktemp("userpath")
    launch(WORKER, ["make", wd])
    tok = wd / "imp" / "tokenizer"
    data = [f"data.prefix={wd / 'data' / 'corpus_text_document'}", f"data.tokenizer={tok}",
            "data.split=90,10,0"]
    cli("import-hf", f"hf_dir={wd / 'hf'}", f"output_dir={wd / 'imp'}")
    cli("prepare-data", f"corpus={wd / 'corpus'}", f"tokenizer={tok}", f"output_dir={wd / 'data'}",
        "workers=2", "progress=false")
    cli("stats", f"checkpoint={wd / 'imp'}", f"output_dir={wd / 'stats'}", *data, "samples=16",
        "seq_length=32", "micro_batch_size=8", "depth_samples=4")
    cli("plan", f"importance={wd / 'stats' / 'importance.pt'}", f"output_dir={wd / 'plan'}",
        "target.hidden_size=48", "target.ffn_hidden_size=64", "target.mamba_num_heads=6",
        "target.mamba_head_dim=12")
    cli("prune", f"checkpoint={wd / 'imp'}", f"plan={wd / 'plan' / 'plan.json'}", f"output={wd / 'pruned'}")
    cli("distill", f"student={wd / 'pruned'}", f"teacher={wd / 'imp'}", f"output_dir={wd / 'distilled'}",
        *data, "seq_length=32", "train.steps=3", "train.global_batch_size=4", "train.micro_batch_size=2",
        "train.warmup_steps=0", "train.eval_interval=3", "train.eval_iters=1", "train.save_interval=3",
        "train.log_interval=1")
    cli("export-hf", f"checkpoint={wd / 'distilled'}", f"output_dir={wd / 'hf_out'}", f"tokenizer={tok}",
        "dtype=fp32")
    out = launch(WORKER, ["generate", wd])
    return wd, json.loads((wd / "result_generate.json").read_text()), out.stdout


def test_data_was_tokenized_with_the_models_tokenizer(path):
    wd, _, _ = path
    s = json.loads((wd / "data" / "summary.json").read_text())
    assert s["vocab_size"] == 384 and s["corpus_files"] == 2 and s["documents"] == 300
    assert s["eod"] == json.loads((wd / "imp" / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"].get(
        "</s>", s["eod"]) == 2


def test_pruned_distilled_export_generates_text(path):
    wd, res, _ = path
    assert res["model_class"] == "NemotronHForCausalLM" and res["eos"] == "</s>"
    assert (res["hidden_size"], res["mamba_num_heads"], res["vocab_size"]) == (48, 6, 384)
    assert res["time_step_limit"] == [0.02, float("inf")]  # the imported dt clamp survived prune + distill
    n_new = len(res["out_ids"]) - len(res["prompt_ids"])
    assert res["out_ids"][:len(res["prompt_ids"])] == res["prompt_ids"] and 1 <= n_new <= 12
    assert res["text"].startswith("Beautiful is better than") and len(res["text"]) > len("Beautiful is better than")
    print(f"generate(): {res['text']!r}")


@pytest.fixture(scope="module")
def moe_path(tmp_path_factory):
    """The same path for a mixture-of-experts hybrid, every torchrun stage at EP=2 (2
    processes): import-hf, stats, prune (hidden and depth over an E layer), distill."""
    wd = tmp_path_factory.mktemp("userpath_moe")
    launch(WORKER, ["make_moe", wd])
    tok = wd / "imp" / "tokenizer"
    data = [f"data.prefix={wd / 'data' / 'corpus_text_document'}", f"data.tokenizer={tok}",
            "data.split=90,10,0"]
    ep = "parallel.ep=2"
    cli("import-hf", f"hf_dir={wd / 'hf'}", f"output_dir={wd / 'imp'}", ep, nproc=2)
    cli("prepare-data", f"corpus={wd / 'corpus'}", f"tokenizer={tok}", f"output_dir={wd / 'data'}",
        "workers=2", "progress=false")
    cli("stats", f"checkpoint={wd / 'imp'}", f"output_dir={wd / 'stats'}", *data, "samples=16",
        "seq_length=32", "micro_batch_size=4", "depth_samples=8", ep, nproc=2)
    cli("plan", f"importance={wd / 'stats' / 'importance.pt'}", f"output_dir={wd / 'plan'}",
        "target.hidden_size=48", "target.mamba_num_heads=6", "target.mamba_head_dim=12",
        "target.num_layers=4", "target.depth_layer_type=E")
    cli("prune", f"checkpoint={wd / 'imp'}", f"plan={wd / 'plan' / 'plan.json'}", f"output={wd / 'pruned'}",
        ep, nproc=2)
    cli("distill", f"student={wd / 'pruned'}", f"teacher={wd / 'imp'}", f"output_dir={wd / 'distilled'}",
        *data, "seq_length=32", "train.steps=3", "train.global_batch_size=4", "train.micro_batch_size=2",
        "train.warmup_steps=0", "train.eval_interval=3", "train.eval_iters=1", "train.save_interval=3",
        "train.log_interval=1", ep, nproc=2)
    cli("export-hf", f"checkpoint={wd / 'distilled'}", f"output_dir={wd / 'hf_out'}", f"tokenizer={tok}",
        "dtype=fp32")
    out = launch(WORKER, ["generate", wd])
    return wd, json.loads((wd / "result_generate.json").read_text()), out.stdout


# ~2.5 min; its stages at EP=2 are in test_moe_dist.py and test_moe_hf_dist.py (CI)
def test_moe_path_at_ep2_exports_a_model_that_generates(moe_path):
    wd, res, _ = moe_path
    for stage in ("stats", "distilled"):
        assert json.loads((wd / stage / "summary.json").read_text())["layout"]["ep"] == 2
    assert json.loads((wd / "pruned" / "summary.json").read_text())["written_at"]["ep"] == 2
    cfg = json.loads((wd / "hf_out" / "config.json").read_text())
    assert cfg["layers_block_type"].count("moe") == 1 and cfg["n_routed_experts"] == 8
    assert (res["hidden_size"], res["mamba_num_heads"]) == (48, 6)
    n_new = len(res["out_ids"]) - len(res["prompt_ids"])
    assert res["out_ids"][:len(res["prompt_ids"])] == res["prompt_ids"] and 1 <= n_new <= 12
    print(f"generate() (MoE): {res['text']!r}")
