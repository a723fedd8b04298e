"""The `search` stage end to end (tests/dist/search_worker.py): a tiny teacher trained a
few steps, its real importance file, 3 candidates, top_k 2, 2 KD steps each; in one process,
then at TP=2 and at DP=2 (one torchrun launch, gloo).

Invariants checked:
  * every candidate meets the budget window and its analytic count equals the count of the
    model `prune` builds from its plan (params_built);
  * the short KD runs on the top_k by zero-shot loss; the table is sorted by distilled loss
    (tie_tolerance 0 here); chosen_plan.json prunes the teacher successfully;
  * resume: results finished before the stop keep their ids and timestamps (not
    recomputed); the final table equals the uninterrupted run's (same layout, same
    arithmetic: losses bit-identical on CPU; throughput is a fresh measurement, not compared).
  * parity: the search at TP=2 and at DP=2 picks the same candidate, runs the short KD on
    the same top_k, and every zero-shot / distilled loss equals the one-process search's
    within PARITY_ATOL (fp32 on CPU: TP re-associates the row-parallel GEMM sums and the
    vocab-parallel softmax; DP changes the order of the gradient and loss sums).
  * CP: the search at CP=2 (dp=1, each sequence split over the two ranks: zero-shot evals,
    short KDs and their evaluations) against the same world at DP=2 (cp=1, the same global
    batches): the same candidates, table and choice; every zero-shot / distilled loss and
    the teacher's within CP_RTOL relative.
"""

import json

import pytest

from tests.conftest import REPO, launch, write_data_json

WORKER = REPO / "tests" / "dist" / "search_worker.py"
BUDGET, TOL = 440_000, 0.03


PARITY_ATOL = 1e-4
CP_RTOL = 1e-5


@pytest.fixture(scope="module")
def run(real_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("search")
    write_data_json(work, real_data)
    launch(WORKER, ["ref", work], nproc=1)
    return work, json.loads((work / "result.json").read_text())


@pytest.fixture(scope="module")
def par_run(run):
    work, _ = run
    launch(WORKER, ["par", work], nproc=2)
    return json.loads((work / "result_par.json").read_text())


def test_parallel_search_stops_at_its_time_limit(run, par_run):
    """exit_duration_minutes: both ranks agree to stop after the first finished result; the
    state keeps it and the summary says why (re-running resumes, as stop_after shows)."""
    work, _ = run
    got = par_run["dp2_limit"]
    assert got["stopped"] and got["zero_shot_done"] == 1 and got["kd_done"] == 0
    assert got["interrupted"]["reason"].startswith("exit_duration_minutes=")
    state = json.loads((work / "dp2_limit" / "search_state.json").read_text())
    assert len(state["zero_shot"]) == 2  # the teacher row + one candidate
    assert (work / "dp2_limit" / "interrupted.json").is_file()


def _losses(work, name):
    zs = {c["name"]: c["zero_shot_loss"]
          for c in json.loads((work / name / "candidates.json").read_text())["candidates"]}
    kd = {r["name"]: r["distilled_loss"] for r in json.loads((work / name / "table.json").read_text())["rows"]}
    return zs, kd


@pytest.mark.parametrize("layout", ["tp2", "dp2"])
def test_parallel_search_picks_the_same_candidate(run, par_run, layout):
    work, res = run
    got = par_run[layout]
    assert not got["stopped"] and got["chosen"]["name"] == res["full"]["chosen"]["name"]
    assert [r["name"] for r in got["table"]] == [r["name"] for r in res["full"]["table"]]
    (zs1, kd1), (zs2, kd2) = _losses(work, "full"), _losses(work, layout)
    assert zs1.keys() == zs2.keys() and kd1.keys() == kd2.keys()
    dz = max(abs(zs1[k] - zs2[k]) for k in zs1)
    dk = max(abs(kd1[k] - kd2[k]) for k in kd1)
    dt = abs(got["teacher_row"]["zero_shot_loss"] - res["full"]["teacher_row"]["zero_shot_loss"])
    print(f"\n[search parity] {layout}: max |zero-shot loss diff| {dz:.2e}, max |distilled loss "
          f"diff| {dk:.2e}, teacher {dt:.2e} (over {len(zs1)} / {len(kd1)} candidates)")
    assert dz < PARITY_ATOL and dk < PARITY_ATOL and dt < PARITY_ATOL
    # the short KD ran at that layout, from a checkpoint per candidate
    for r in got["table"]:
        s = json.loads((work / layout / "candidates" / r["name"] / "distilled" / "summary.json").read_text())
        assert s["layout"] == {"tp": 2 if layout == "tp2" else 1, "pp": 1, "ep": 1, "dp": 2 if layout == "dp2" else 1}


def test_search_cp2_equals_dp2(run, par_run):
    work, _ = run
    a, b = par_run["cp2"], par_run["dp2"]
    assert not a["stopped"] and a["chosen"]["name"] == b["chosen"]["name"]
    assert [r["name"] for r in a["table"]] == [r["name"] for r in b["table"]]
    (zs1, kd1), (zs2, kd2) = _losses(work, "dp2"), _losses(work, "cp2")
    assert zs1.keys() == zs2.keys() and kd1.keys() == kd2.keys() and len(kd1) == 2
    rel = lambda x, y: abs(x - y) / abs(y)  # noqa: E731
    dz = max(rel(zs2[k], zs1[k]) for k in zs1)
    dk = max(rel(kd2[k], kd1[k]) for k in kd1)
    dt = rel(a["teacher_row"]["zero_shot_loss"], b["teacher_row"]["zero_shot_loss"])
    print(f"\n[search parity] CP=2 vs DP=2: max relative zero-shot loss diff {dz:.1e}, distilled "
          f"{dk:.1e}, teacher {dt:.1e} (over {len(zs1)} / {len(kd1)} candidates)")
    assert dz < CP_RTOL and dk < CP_RTOL and dt < CP_RTOL
    for r in a["table"]:
        assert r["tokens_per_s"] > 0
        s = json.loads((work / "cp2" / "candidates" / r["name"] / "distilled" / "summary.json").read_text())
        assert s["layout"] == {"tp": 1, "pp": 1, "ep": 1, "dp": 1, "cp": 2}


def _strip(rows):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def test_end_to_end_outputs(run):
    work, res = run
    out = work / "full"
    for f in ("candidates.json", "table.md", "table.json", "summary.json", "chosen_plan.json",
              "loss_vs_throughput.png", "search_state.json"):
        assert (out / f).is_file(), f
    cands = json.loads((out / "candidates.json").read_text())["candidates"]
    assert len(cands) == 3
    for c in cands:
        assert abs(c["params"] - BUDGET) <= TOL * BUDGET
        assert c["zero_shot_loss"] > 0
    table = json.loads((out / "table.json").read_text())
    rows = table["rows"]
    assert [r["rank"] for r in rows] == [1, 2]
    # the top 2 by zero-shot loss got the short KD
    by_zs = sorted(cands, key=lambda c: c["zero_shot_loss"])[:2]
    assert {r["name"] for r in rows} == {c["name"] for c in by_zs}
    assert [r["distilled_loss"] for r in rows] == sorted(r["distilled_loss"] for r in rows)
    assert all(r["tokens_per_s"] > 0 for r in rows)
    # two KD steps from the teacher lowered every candidate's loss on the fixed valid set
    for r in rows:
        assert r["distilled_loss"] < r["zero_shot_loss"], r
    assert table["teacher"]["params"] == 616_472
    md = (out / "table.md").read_text()
    assert "| 1 | 5 | 48 |" in md and "zero-shot loss" in md


def test_chosen_plan_prunes_to_the_analytic_count(run):
    work, res = run
    chosen = res["full"]["chosen"]
    pr = res["prune_chosen"]
    assert pr["params_after"] == pr["params_built"] == chosen["params"]
    assert pr["pruned_model"]["pattern"] == chosen["pattern"]
    assert pr["verified"]["tensors_equal"]


def test_zero_shot_equals_loss_of_pruned_checkpoint(run):
    """In-memory pruning (rules + take on the teacher's full tensors) gives the same model as
    the `prune` stage's checkpoint: the distill stage's 'student before' loss, on the same
    fixed validation set, equals the zero-shot loss (1e-5 absolute)."""
    work, res = run
    zs = {c["name"]: c["zero_shot_loss"]
          for c in json.loads((work / "full" / "candidates.json").read_text())["candidates"]}
    for r in res["full"]["table"]:
        s = json.loads((work / "full" / "candidates" / r["name"] / "distilled" / "summary.json").read_text())
        assert abs(s["student_val_before"] - zs[r["name"]]) < 1e-5, (r["name"], s["student_val_before"])


def test_resume_skips_finished_candidates(run):
    work, res = run
    stopped, before, after = res["stopped"], res["state_after_stop"], res["state_after_resume"]
    assert stopped["stopped"] and stopped["zero_shot_done"] == 3 and stopped["kd_done"] == 1
    assert res["resumed"]["resumed"] == {"zero_shot": 4, "kd": 1}  # 3 candidates + teacher
    for section in ("zero_shot", "kd"):
        for name, rec in before[section].items():
            assert after[section][name]["id"] == rec["id"], (section, name)
            assert after[section][name]["finished_at"] == rec["finished_at"]
    assert len(after["kd"]) == 2
    tables = [json.loads((work / d / "table.json").read_text()) for d in ("full", "res")]
    assert _strip(tables[0]["rows"]) == _strip(tables[1]["rows"])  # losses bit-identical
    assert json.loads((work / "res" / "chosen_plan.json").read_text()) == \
        json.loads((work / "full" / "chosen_plan.json").read_text())


def test_short_kds_from_a_teacher_cache(run):
    """A cache of every token (top-4096 = the vocabulary) serves the short KD: the best
    zero-shot candidate's distilled loss within 1e-5 of the online KD's."""
    work, res = run
    full = {r["name"]: r for r in json.loads((work / "full" / "table.json").read_text())["rows"]}
    cached = {r["name"]: r for r in json.loads((work / "cached" / "table.json").read_text())["rows"]}
    assert len(cached) == 1 and set(cached) <= set(full)
    for n in cached:
        assert abs(full[n]["distilled_loss"] - cached[n]["distilled_loss"]) < 1e-5, n
    kd = json.loads((work / "cached" / "candidates" / next(iter(cached)) / "distilled" / "summary.json").read_text())
    assert kd["teacher_source"]["top_k"] == 4096
