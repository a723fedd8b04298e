"""Stopping on a signal or a time limit (preempt.py) with real torchrun launches (gloo, DP=2):

  * a `pretrain` run whose train.exit_duration_minutes has passed at the first check;

  * a `distill` run gets SIGUSR1 on every process of the launch, as Slurm's
    `--signal=USR1@T` delivers it (the agent runs under slurm/agent.sh, which ignores it);
  * a `stats` run gets SIGTERM on both workers (what torchrun's agent forwards on scancel
    or at the time limit);
  * a `search` gets SIGUSR1 on every process after its first zero-shot results.
Both must save (checkpoint / partial state) within seconds and return normally (the launch
exits 0); resumed to the end they must reproduce the uninterrupted runs EXACTLY (same
layout, same arithmetic: bit-identical weights, losses and importance scores).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_minitron.importance.io import ImportanceFile
from tests.conftest import REPO, child_env, free_port, launch, write_data_json

WORKER = Path(__file__).with_name("preempt_worker.py")
SAVE_WITHIN_S = 20.0  # generous: 2 shared cores; observed figures are printed


def _wait(pred, timeout: float, what: str, proc=None) -> None:
    t0 = time.time()
    while not pred():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the launch ended ({proc.returncode}) before {what}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def _tree(pid: int) -> list[int]:
    """`pid` and all its descendants (torchrun starts its workers in new sessions, so a
    process-group signal would miss them; Slurm signals every process of the step)."""
    kids: dict[int, list[int]] = {}
    for st in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = st.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kids.setdefault(int(fields[1]), []).append(int(st.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _lines(p: Path) -> int:
    return len(p.read_text().splitlines()) if p.is_file() else 0


@pytest.fixture(scope="module")
def runs(real_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("preempt")
    write_data_json(work, real_data)
    launch(WORKER, ["setup", work], nproc=1)

    log = open(work / "interrupt.log", "w")
    cmd = ["bash", str(REPO / "slurm" / "agent.sh"), sys.executable, "-m", "torch.distributed.run",
           "--nproc_per_node", "2", "--master_port", str(free_port()), str(WORKER), "interrupt", str(work)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    lat = {}
    try:
        # distill: a few steps in, USR1 to every process of the launch (agent included)
        _wait(lambda: _lines(work / "kd_resumed" / "metrics.jsonl") >= 3, 300, "distill step 3", proc)
        t0 = time.time()
        for pid in _tree(proc.pid):
            os.kill(pid, signal.SIGUSR1)
        _wait(lambda: (work / "kd_resumed" / "interrupted.json").is_file(), 60, "distill's save", proc)
        lat["distill"] = time.time() - t0
        # stats: once its first partial state is confirmed, SIGTERM to both workers
        _wait(lambda: (work / "stats_resumed" / "partial" / "latest").is_file(), 300,
              "stats' first partial save", proc)
        t0 = time.time()
        for r in (0, 1):
            os.kill(int((work / f"pid_{r}").read_text()), signal.SIGTERM)
        _wait(lambda: (work / "stats_resumed" / "interrupted.json").is_file(), 60, "stats' save", proc)
        lat["stats"] = time.time() - t0
        # search: once the teacher row and one candidate are scored, USR1 to the whole launch
        state = work / "search_resumed" / "search_state.json"
        _wait(lambda: state.is_file() and len(json.loads(state.read_text())["zero_shot"]) >= 2, 300,
              "search's first zero-shot result", proc)
        t0 = time.time()
        for pid in _tree(proc.pid):
            os.kill(pid, signal.SIGUSR1)
        _wait(lambda: (work / "search_resumed" / "interrupted.json").is_file(), 60, "search's stop", proc)
        lat["search"] = time.time() - t0
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    assert rc == 0, (work / "interrupt.log").read_text()[-6000:]
    interrupted = json.loads((work / "result_interrupt.json").read_text())
    launch(WORKER, ["finish", work], nproc=2)
    finished = json.loads((work / "result_finish.json").read_text())
    print(f"\n[preempt] signal -> save seen by the test: distill {lat['distill']:.2f}s, "
          f"stats {lat['stats']:.2f}s, search {lat['search']:.2f}s; the stages' own figures: "
          f"distill {interrupted['distill']['interrupted']['signal_to_save_seconds']:.2f}s, "
          f"stats {interrupted['stats']['interrupted']['signal_to_save_seconds']:.2f}s")
    return {"work": work, "lat": lat, "int": interrupted, "fin": finished}


def test_signals_leave_a_save_within_seconds(runs):
    d, s = runs["int"]["distill"], runs["int"]["stats"]
    assert d["interrupted"]["reason"] == "signal SIGUSR1" and 3 <= d["iteration"] < 60
    assert s["interrupted"]["reason"] == "signal SIGTERM" and s["complete"] is False
    assert 0 < s["steps_done"] < s["steps"]
    for k in ("distill", "stats"):
        assert runs["lat"][k] < SAVE_WITHIN_S, runs["lat"]
    # the checkpoint is the stop step's (`latest` pointed at it when the run returned)
    assert d["checkpoint"].endswith(f"iter_{d['iteration']:07d}") and d["interrupted"]["step"] == d["iteration"]
    assert s["interrupted"]["step"] == s["steps_done"]
    # the resumed runs completed and removed the stop record and the partial state
    assert not (runs["work"] / "stats_resumed" / "partial").exists()
    assert not (runs["work"] / "stats_resumed" / "interrupted.json").exists()


def test_pretrain_stops_at_its_time_limit_and_resumes_exactly(runs):
    """train.exit_duration_minutes (no signal): the limit has passed at the first check, so
    pretrain saves after step 1 and returns; resumed, it equals the uninterrupted run."""
    p, fin, work = runs["int"]["pretrain"], runs["fin"], runs["work"]
    assert p["interrupted"]["reason"].startswith("exit_duration_minutes=") and p["iteration"] == 1
    assert p["interrupted"]["signal_to_save_seconds"] is None
    assert fin["pretrain_resumed"]["resumed_from"] == 1 and fin["pt_max_weight_diff"] == 0.0
    ref = [json.loads(x)["loss"] for x in (work / "pt_ref" / "metrics.jsonl").read_text().splitlines()]
    res = [json.loads(x)["loss"] for x in (work / "pt_resumed" / "metrics.jsonl").read_text().splitlines()]
    assert len(ref) == 6 and res == ref
    assert fin["pretrain_resumed"]["val_loss"] == fin["pretrain_ref"]["val_loss"]


def test_resumed_distill_equals_uninterrupted(runs):
    fin, work = runs["fin"], runs["work"]
    assert fin["distill_resumed"]["resumed_from"] == runs["int"]["distill"]["iteration"]
    assert fin["max_weight_diff"] == 0.0
    ref = [json.loads(x)["loss"] for x in (work / "kd_ref" / "metrics.jsonl").read_text().splitlines()]
    res = [json.loads(x)["loss"] for x in (work / "kd_resumed" / "metrics.jsonl").read_text().splitlines()]
    assert len(ref) == 60 and res == ref  # both halves together, step by step, exactly
    assert fin["distill_resumed"]["student_val_after"] == fin["distill_ref"]["student_val_after"]
    assert not (work / "kd_resumed" / "interrupted.json").exists()


def test_resumed_search_equals_uninterrupted(runs):
    s, fin, work = runs["int"]["search"], runs["fin"], runs["work"]
    assert s["stopped"] and s["interrupted"]["reason"] == "signal SIGUSR1"
    assert s["zero_shot_done"] + s["kd_done"] < 5  # stopped before the end (3 zero-shot + 2 KD)
    assert fin["search_resumed"]["resumed"]["zero_shot"] >= 2  # finished results were kept
    keys = ("rank", "name", "params", "zero_shot_loss", "distilled_loss")  # not timings, ids, paths
    strip = lambda rows: [{k: r[k] for k in keys} for r in rows]  # noqa: E731
    assert strip(fin["search_resumed"]["table"]) == strip(fin["search_ref"]["table"])  # bit-identical
    assert fin["search_resumed"]["chosen"]["name"] == fin["search_ref"]["chosen"]["name"]
    assert not (work / "search_resumed" / "interrupted.json").exists()


def test_resumed_stats_equal_uninterrupted(runs):
    work = runs["work"]
    a = ImportanceFile.load(work / "stats_ref" / "importance.pt")
    b = ImportanceFile.load(work / "stats_resumed" / "importance.pt")
    assert torch.equal(a.hidden, b.hidden)
    for k in ("kl", "cosine"):
        assert torch.equal(a.depth[k], b.depth[k]), k
    n = 0
    for lid, entry in a.layers.items():
        for key, v in entry.items():
            items = v.items() if isinstance(v, dict) else [("", v)]
            other = b.layers[lid][key]
            for sub, t in items:
                u = other[sub] if sub else other
                assert torch.equal(torch.as_tensor(t), torch.as_tensor(u)), (lid, key, sub)
                n += 1
    assert n > 5 and a.meta["samples"] == b.meta["samples"] == 480
