"""Two "nodes" on 127.0.0.1: two torchrun launches with --nnodes 2 (one process each, a
static rendezvous on node 0) produce the same importance file as one launch of two
processes. Both run the CLI exactly as users and the Slurm launcher do."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, child_env, free_port, launch, write_data_json
from tests.dist.test_stats_dist import _flat

STATS_WORKER = Path(__file__).with_name("stats_worker.py")
pytestmark = pytest.mark.slow  # CI time (50 s): two launches of the CLI stats stage


def _cli(wd: Path, out: str) -> list[str]:
    info = json.loads((wd / "data.json").read_text())
    return ["-m", "megatron_minitron", "stats", "checkpoint=" + str(wd / "ckpt"),
            "output_dir=" + str(wd / out), "parallel.tp=2", "data.prefix=" + info["prefix"],
            "data.tokenizer=" + info["tokenizer"], "data.split=90,10,0", "samples=8",
            "micro_batch_size=2", "depth_samples=4"]


def test_two_node_rendezvous_equals_one_launch(tmp_path, real_data):
    wd = tmp_path
    write_data_json(wd, real_data)
    # a briefly trained tiny checkpoint (+ a TP=1 reference file we do not need here)
    launch(STATS_WORKER, ["ckpt_only", wd])
    run = [sys.executable, "-m", "torch.distributed.run"]
    one = subprocess.run(run + ["--nproc_per_node", "2", "--master_port", str(free_port())]
                         + _cli(wd, "one"), cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-4000:]
    port = str(free_port())
    # logs go to files: a node blocked on a full pipe would stall the other's collectives
    logs = [open(wd / f"node{r}.log", "w") for r in (0, 1)]
    nodes = [subprocess.Popen(run + ["--nnodes", "2", "--node_rank", str(r), "--nproc_per_node", "1",
                                     "--master_addr", "127.0.0.1", "--master_port", port]
                              + _cli(wd, "two"), cwd=REPO, env=child_env(),
                              stdout=logs[r], stderr=subprocess.STDOUT)
             for r in (0, 1)]
    for r, p in enumerate(nodes):
        p.wait(timeout=600)
        logs[r].close()
        assert p.returncode == 0, (wd / f"node{r}.log").read_text()[-4000:]
    from megatron_minitron.importance.io import ImportanceFile

    a = _flat(ImportanceFile.load(wd / "one" / "importance.pt"))
    b = _flat(ImportanceFile.load(wd / "two" / "importance.pt"))
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        # same layout (TP=2 over 2 ranks), same samples: identical arithmetic
        assert torch.equal(a[k], b[k]), k
    sa = json.loads((wd / "one" / "summary.json").read_text())
    sb = json.loads((wd / "two" / "summary.json").read_text())
    assert sa["samples"] == sb["samples"] == 8
