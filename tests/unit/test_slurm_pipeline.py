"""slurm/pipeline.sh against stand-in sbatch / squeue / scancel (small bash scripts that
record their arguments and keep a job table in files): dependency chain, dry run, the resume
of a pipeline whose middle job failed or whose overrides changed, per-stage overrides, the
README's chain dry-run exactly as printed (each stage reads what the one before writes), the
check before submission (slurm/pipeline_check.py) and its one-line refusals, the help text.
Also the requeue path of minitron.sbatch."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]
STAGES = ["import_hf", "stats", "plan", "prune", "distill", "export_hf"]

FAKE_SBATCH = """#!/usr/bin/env bash
# records the call; answers a new job id (--parsable)
n=$(( $(cat "$FAKE/next" 2>/dev/null || echo 100) + 1 )); echo $n > "$FAKE/next"
echo "$n $*" >> "$FAKE/sbatch.log"
echo "$n PENDING" >> "$FAKE/jobs"
echo "$n"
"""
FAKE_SQUEUE = """#!/usr/bin/env bash
# squeue -h -j ID -o %T -> the job's state from the table (nothing once it left the queue)
while [ $# -gt 0 ]; do [ "$1" = -j ] && id=$2; shift; done
awk -v id="$id" '$1 == id {s=$2} END {if (s != "" && s != "FAILED" && s != "COMPLETED") print s}' "$FAKE/jobs"
"""
FAKE_SCANCEL = """#!/usr/bin/env bash
echo "$1" >> "$FAKE/scancel.log"
echo "$1 CANCELLED" >> "$FAKE/jobs"
"""


def _setup(tmp: Path):
    fake = tmp / "fake"
    fake.mkdir()
    for name, body in (("sbatch", FAKE_SBATCH), ("squeue", FAKE_SQUEUE), ("scancel", FAKE_SCANCEL)):
        (fake / name).write_text(body)
        (fake / name).chmod(0o755)
    recipes = []
    for st in STAGES:
        f = tmp / f"{st}_test.yaml"
        f.write_text("{}\n")
        recipes.append(str(f))
    env = dict(os.environ, FAKE=str(fake), PATH=f"{fake}:{os.environ['PATH']}")
    return fake, recipes, env


def _run(args, env, cwd=REPO):
    return subprocess.run(["bash", str(REPO / "slurm" / "pipeline.sh"), *args], cwd=cwd,
                          env=dict(env, PYTHON=sys.executable), capture_output=True, text=True)


def _calls(fake: Path) -> list[tuple[int, str]]:
    out = []
    for line in (fake / "sbatch.log").read_text().splitlines():
        n, rest = line.split(" ", 1)
        out.append((int(n), rest))
    return out


def test_pipeline_chain_dry_run_and_resume_after_a_failed_middle_job(tmp_path):
    fake, recipes, env = _setup(tmp_path)
    name = f"h12test-{os.getpid()}"
    state = REPO / "logs" / "pipeline" / name
    try:
        # dry run: six sbatch lines, chained, nothing submitted or written
        r = _run(["--dry-run", "--no-check", "--name", name, *recipes], env)
        assert r.returncode == 0, r.stderr
        lines = [x for x in r.stdout.splitlines() if x.startswith("sbatch ")]
        assert len(lines) == 6 and not (fake / "sbatch.log").exists() and not state.exists()
        assert "--dependency" not in lines[0]
        assert all(f"--dependency afterok:JOBID_{i} " in x for i, x in enumerate(lines[1:], 1))
        for st, x in zip(STAGES, lines):
            assert f"slurm/{st}.sbatch" in x

        # submit: each job after the previous one (afterok), the done file passed on
        r = _run(["--no-check", "--name", name, *recipes], env)
        assert r.returncode == 0, r.stderr
        calls = _calls(fake)
        assert len(calls) == 6
        for i, (n, args) in enumerate(calls):
            assert f"slurm/{STAGES[i]}.sbatch {recipes[i]}" in args
            assert f"MINITRON_DONE_FILE={state}/{i + 1}-" in args
            if i:
                assert f"--dependency afterok:{calls[i - 1][0]}" in args
        ids = [n for n, _ in calls]

        # import-hf, stats, plan completed (their jobs wrote .done and left the queue);
        # prune FAILED; distill and export-hf wait forever on the failed dependency
        for i, st in enumerate(["import-hf", "stats", "plan"], 1):
            (state / f"{i}-{st}.done").write_text("2026-01-01")
        with open(fake / "jobs", "a") as f:
            for n in ids[:3]:
                f.write(f"{n} COMPLETED\n")
            f.write(f"{ids[3]} FAILED\n")
        r = _run(["--no-check", "--name", name, *recipes], env)
        assert r.returncode == 0, r.stderr
        new = _calls(fake)[6:]
        assert [a.split("slurm/")[1].split(".sbatch")[0] for _, a in new] == ["prune", "distill", "export_hf"]
        assert "--dependency" not in new[0][1]  # plan is done: prune can start now
        assert f"--dependency afterok:{new[0][0]}" in new[1][1]
        assert f"--dependency afterok:{new[1][0]}" in new[2][1]
        # the stuck old distill / export-hf jobs were cancelled
        assert sorted(map(int, (fake / "scancel.log").read_text().split())) == ids[4:]

        # again while the new jobs are queued: nothing is submitted
        r = _run(["--no-check", "--name", name, *recipes], env)
        assert r.returncode == 0 and len(_calls(fake)) == 9, r.stdout
        assert r.stdout.count("still queued or running") == 3
    finally:
        import shutil

        shutil.rmtree(state, ignore_errors=True)


def _jobs(stdout: str) -> list[dict]:
    """A dry run's sbatch lines -> [{opts, stage, recipe, overrides}] (stage: the sbatch file's)."""
    out = []
    for line in stdout.splitlines():
        if line.startswith("sbatch "):
            w = shlex.split(line)
            k = next(i for i, x in enumerate(w) if x.startswith("slurm/") and x.endswith(".sbatch"))
            out.append({"opts": w[1:k], "stage": w[k][len("slurm/"):-len(".sbatch")], "recipe": w[k + 1],
                        "overrides": w[k + 2:]})
    return out


def _readme_pipeline_example() -> list[str]:
    """The README's slurm/pipeline.sh command block, as a user pastes it (words, as bash splits them)."""
    text = (REPO / "README.md").read_text()
    blocks = [b for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
              if b.lstrip().startswith("slurm/pipeline.sh")]
    assert len(blocks) == 1, "README prints one slurm/pipeline.sh example"
    return shlex.split(blocks[0].replace("\\\n", " "))


def _one_line_refusal(r, needle: str):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], r.stderr


def test_readme_pipeline_example_dry_runs_as_printed(tmp_path):
    fake, _, env = _setup(tmp_path)
    words = _readme_pipeline_example()
    assert words[:2] == ["slurm/pipeline.sh", "--dry-run"]
    r = _run(words[1:], env)  # from the repository root, as printed
    assert r.returncode == 0, r.stderr
    assert not (fake / "sbatch.log").exists()
    jobs = _jobs(r.stdout)
    assert [j["stage"] for j in jobs] == ["import_hf", "stats", "search", "prune", "distill", "export_hf"]
    assert all((REPO / j["recipe"]).is_file() for j in jobs)
    # the override reaches import-hf alone; --sbatch options their stage alone; the chain is afterok
    assert jobs[0]["overrides"] == ["hf_dir=/models/Nemotron-H-8B-Base-8K"]
    assert all(not j["overrides"] for j in jobs[1:])
    assert [j["opts"].count("--nodes=16") for j in jobs] == [0, 0, 1, 0, 1, 0]
    assert "--dependency" not in jobs[0]["opts"]
    for n, j in enumerate(jobs[1:], 1):
        assert j["opts"][j["opts"].index("--dependency") + 1] == f"afterok:JOBID_{n}"
    # each stage reads what an earlier one writes: the jobs' configs, loaded as the jobs load them
    from megatron_minitron.config import load_stage_config

    imp, stats, search, prune, distill, export = (
        load_stage_config(j["stage"].replace("_", "-"), str(REPO / j["recipe"]), j["overrides"]) for j in jobs)
    assert imp.hf_dir == "/models/Nemotron-H-8B-Base-8K"
    assert stats.checkpoint == imp.output_dir
    assert search.teacher == imp.output_dir and search.importance == f"{stats.output_dir}/importance.pt"
    assert prune.checkpoint == imp.output_dir and prune.plan == f"{search.output_dir}/chosen_plan.json"
    assert distill.student == prune.output and distill.teacher == imp.output_dir
    assert export.checkpoint == distill.output_dir and export.tokenizer == f"{imp.output_dir}/tokenizer"
    src = {m: (REPO / "megatron_minitron" / m).read_text() for m in ("importance/stage.py", "search/stage.py",
                                                                     "hf/stage.py")}
    assert 'out / "importance.pt"' in src["importance/stage.py"]  # the names those stages write
    assert 'out / "chosen_plan.json"' in src["search/stage.py"]
    assert 'out / "tokenizer"' in src["hf/stage.py"]
    # the dry run shows that wiring, and marks only what no stage writes (the HF folder, the data)
    for line in ("2 stats: configs/stats_nemotron_h_8b.yaml",
                 "reads checkpoint=runs/nemotron_h_8b/teacher  <- 1 import-hf",
                 "reads plan=runs/nemotron_h_4b/search/chosen_plan.json  <- 3 search",
                 "reads student=runs/nemotron_h_4b/pruned  <- 4 prune",
                 "reads tokenizer=runs/nemotron_h_8b/teacher/tokenizer  <- 1 import-hf"):
        assert line in r.stdout, line
    assert all(re.search(r"reads (hf_dir|data\.prefix|data\.tokenizer)=", x)
               for x in r.stdout.splitlines() if " reads " in x and "NOT FOUND" in x), r.stdout
    assert "warning" not in r.stderr

    # the same command without --dry-run: refused in one line (the HF folder and the data do not
    # exist here), before anything is submitted
    if not Path("/models/Nemotron-H-8B-Base-8K").exists():
        r = _run([w for w in words[1:] if w != "--dry-run"], env)
        _one_line_refusal(r, "not found, and written by no earlier stage of the chain: stage 1 import-hf hf_dir=")
        assert not (fake / "sbatch.log").exists()


def test_readme_chain_without_the_search(tmp_path):
    """The README's variant: the plan recipe in place of the search recipe (and its --sbatch),
    prune told where that plan is."""
    _, _, env = _setup(tmp_path)
    text = " ".join((REPO / "README.md").read_text().split())
    assert ("`configs/plan_nemotron_h_8b_to_4b.yaml` in place of the search recipe (and of its `--sbatch`), "
            "and `prune.plan=runs/nemotron_h_4b/plan/plan.json`") in text
    words, args = _readme_pipeline_example()[1:], []
    while words:
        w = words.pop(0)
        if w == "--sbatch" and words[0].startswith("search="):
            words.pop(0)
            continue
        args.append("configs/plan_nemotron_h_8b_to_4b.yaml" if w == "configs/search_nemotron_h_8b_to_4b.yaml" else w)
    r = _run([*args, "prune.plan=runs/nemotron_h_4b/plan/plan.json"], env)
    assert r.returncode == 0, r.stderr
    jobs = _jobs(r.stdout)
    assert [j["stage"] for j in jobs] == ["import_hf", "stats", "plan", "prune", "distill", "export_hf"]
    assert jobs[3]["overrides"] == ["plan=runs/nemotron_h_4b/plan/plan.json"]
    assert "reads importance=runs/nemotron_h_8b/stats/importance.pt  <- 2 stats" in r.stdout
    assert "reads plan=runs/nemotron_h_4b/plan/plan.json  <- 3 plan" in r.stdout


def test_overrides_and_sbatch_options_reach_their_stage_only(tmp_path):
    fake, recipes, env = _setup(tmp_path)
    second = tmp_path / "distill_second.yaml"
    second.write_text("{}\n")
    r = _run(["--dry-run", "--no-check", *recipes, str(second), "stats.samples=2048", "import_hf.hf_dir=/m/x",
              "5.train.steps=7", "stats.data.prefix=a b'c", "7.loss.alpha_kd=0",
              "--sbatch", "2=--nodes=3 --time=1:00:00", "--sbatch=distill_second=x", "--sbatch=7=--nodes=5"], env)
    assert r.returncode == 2 and "'distill_second' is not a stage" in r.stderr  # names are stages, not files
    r = _run(["--dry-run", "--no-check", *recipes, str(second), "stats.samples=2048", "import_hf.hf_dir=/m/x",
              "5.train.steps=7", "stats.data.prefix=a b'c", "7.loss.alpha_kd=0",
              "--sbatch", "2=--nodes=3 --time=1:00:00", "--sbatch=7=--nodes=5"], env)
    assert r.returncode == 0, r.stderr
    jobs = _jobs(r.stdout)
    assert [j["overrides"] for j in jobs] == [["hf_dir=/m/x"], ["samples=2048", "data.prefix=a b'c"], [], [],
                                              ["train.steps=7"], [], ["loss.alpha_kd=0"]]
    assert [j["recipe"] for j in jobs] == [*recipes, str(second)]
    assert jobs[1]["opts"][:3] == ["--parsable", "--nodes=3", "--time=1:00:00"]
    assert jobs[6]["opts"][:2] == ["--parsable", "--nodes=5"]
    assert all("--nodes" not in " ".join(j["opts"]) for i, j in enumerate(jobs) if i not in (1, 6))
    # a stage that appears twice is named by its position
    r = _run(["--dry-run", "--no-check", *recipes, str(second), "distill.train.steps=7"], env)
    _one_line_refusal(r, "the chain has 2 distill stages; name one by its position, e.g. 5.train.steps=7")
    # recipes relative to where the command runs; those in the repository printed relative to it
    r = _run(["--dry-run", "--no-check", "stats_test.yaml", "../configs/stats_nemotron_h_8b.yaml"], env, cwd=tmp_path)
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = _run(["--dry-run", "--no-check", "stats_test.yaml", "stats=plan_test.yaml"], env, cwd=tmp_path)
    assert [j["recipe"] for j in _jobs(r.stdout)] == [str(tmp_path / "stats_test.yaml"),
                                                      str(tmp_path / "plan_test.yaml")]
    r = _run(["--dry-run", "--no-check", "../configs/stats_nemotron_h_8b.yaml"], env, cwd=REPO / "slurm")
    assert [j["recipe"] for j in _jobs(r.stdout)] == ["configs/stats_nemotron_h_8b.yaml"]
    assert not (fake / "sbatch.log").exists()


def test_refusals_are_one_line_and_submit_nothing(tmp_path):
    fake, recipes, env = _setup(tmp_path)
    odd = tmp_path / "my_recipe.yaml"
    odd.write_text("{}\n")
    r = _run(["--dry-run", "--no-check", f"distill={odd}"], env)  # explicit stage: accepted
    assert r.returncode == 0 and "slurm/distill.sbatch" in r.stdout
    for args, needle in [
        ([str(odd)], "cannot tell the stage of"),
        ([f"frobnicate={odd}"], "unknown stage 'frobnicate' (no slurm/frobnicate.sbatch)"),
        ([str(tmp_path / "stats_missing.yaml")], "recipe " + str(tmp_path / "stats_missing.yaml") + " does not exist"),
        ([*recipes, "frob.x=1"], "frob.x=1: 'frob' is not a stage"),
        ([*recipes[:2], "distill.x=1"], "distill.x=1: the chain has no distill stage"),
        ([*recipes, "9.x=1"], "9.x=1: there is no stage 9"),
        ([*recipes, "samples=1"], "samples=1: an override names its stage: STAGE.samples=1"),
        ([*recipes, "stats.-x=1"], "is not a dotted.key"),
        (["--sbatch", "frob=--nodes=2", *recipes], "'frob' is not a stage"),
        (["--sbatch", "stats", *recipes], "--sbatch stats: write STAGE=OPTIONS"),
        (["--bogus", *recipes], "unknown option --bogus"),
        (["--name", "a/b", *recipes], "--name a/b:"),
        ([], "no recipe given"),
    ]:
        _one_line_refusal(_run(args, env), needle)  # no --dry-run: these would have submitted
    # the check (the recipes loaded as the jobs load them): an unknown key, a bad value
    chain = ["configs/import_hf_nemotron_h_8b.yaml", "configs/stats_nemotron_h_8b.yaml", "import-hf.hf_dir=/x"]
    _one_line_refusal(_run([*chain, "stats.sample=2048"], env),
                      "stage 2 stats (configs/stats_nemotron_h_8b.yaml sample=2048): unknown key sample; "
                      "did you mean samples?")
    # the README's former chain: the import recipe names no Hugging Face folder
    _one_line_refusal(_run(["--dry-run", "configs/import_hf_example.yaml", "configs/stats_default.yaml"], env),
                      "stage 1 import-hf (configs/import_hf_example.yaml): hf_dir is empty; give it as "
                      "import-hf.hf_dir=PATH")
    assert not (fake / "sbatch.log").exists() and not (fake / "scancel.log").exists()


def test_checked_submit_of_a_wired_chain(tmp_path):
    """Every input exists or comes from an earlier stage: submitted. An output no later stage
    reads (prune told to read another plan) is warned about."""
    fake, _, env = _setup(tmp_path)
    t = tmp_path
    (t / "hf").mkdir()
    for f in ("d.bin", "d.idx", "tok.json", "other_plan.json"):
        (t / f).write_text("x")
    data = f"data: {{prefix: {t}/d, tokenizer: {t}/tok.json}}\n"
    body = {
        "import_hf": f"hf_dir: {t}/hf\noutput_dir: {t}/run/teacher\n",
        "stats": f"checkpoint: {t}/run/teacher\noutput_dir: {t}/run/stats\n" + data,
        "plan": f"importance: {t}/run/stats/importance.pt\noutput_dir: {t}/run/plan\n",
        "prune": f"checkpoint: {t}/run/teacher\nplan: {t}/run/plan/plan.json\noutput: {t}/run/pruned\n",
        "distill": f"student: {t}/run/pruned\nteacher: {t}/run/teacher\noutput_dir: {t}/run/kd\n" + data,
        "export_hf": f"checkpoint: {t}/run/kd\noutput_dir: {t}/run/hf\ntokenizer: none\n",
    }
    recipes = []
    for st, text in body.items():
        (t / f"{st}_wired.yaml").write_text(text)
        recipes.append(str(t / f"{st}_wired.yaml"))
    name = f"wired-{os.getpid()}"
    state = REPO / "logs" / "pipeline" / name
    try:
        r = _run(["--name", name, *recipes, f"prune.plan={t}/other_plan.json"], env)
        assert r.returncode == 0, r.stderr
        assert len(_calls(fake)) == 6 and "NOT FOUND" not in r.stdout
        assert f"reads student={t}/run/pruned  <- 4 prune" in r.stdout
        assert f"reads plan={t}/other_plan.json  (exists)" in r.stdout
        assert f"warning: stage 3 plan writes {t}/run/plan, which no later stage reads" in r.stderr
        assert (state / "4-prune.cmd").read_text() == f"slurm/prune.sbatch {recipes[3]} plan={t}/other_plan.json "
    finally:
        import shutil

        shutil.rmtree(state, ignore_errors=True)


def test_changed_overrides_resubmit_from_that_stage(tmp_path):
    fake, recipes, env = _setup(tmp_path)
    name = f"changed-{os.getpid()}"
    state = REPO / "logs" / "pipeline" / name
    try:
        assert _run(["--no-check", "--name", name, *recipes], env).returncode == 0
        ids = [n for n, _ in _calls(fake)]
        (state / "1-import-hf.done").write_text("2026-01-01")
        with open(fake / "jobs", "a") as f:
            f.write(f"{ids[0]} COMPLETED\n")
        # stats changed while its old job is still queued: refused, nothing submitted or cancelled
        r = _run(["--no-check", "--name", name, *recipes, "stats.samples=5"], env)
        _one_line_refusal(r, f"stage 2 stats changed since job {ids[1]} was submitted")
        assert f"scancel {ids[1]} first" in r.stderr and len(_calls(fake)) == 6
        assert not (fake / "scancel.log").exists()
        # stats completed: the changed stats is resubmitted with everything after it, the old
        # queued jobs after it cancelled; import-hf stays done
        (state / "2-stats.done").write_text("2026-01-02")
        with open(fake / "jobs", "a") as f:
            f.write(f"{ids[1]} COMPLETED\n")
        r = _run(["--no-check", "--name", name, *recipes, "stats.samples=5"], env)
        assert r.returncode == 0, r.stderr
        assert "2-stats: changed since its last submission" in r.stdout and "1-import-hf: done" in r.stdout
        new = _calls(fake)[6:]
        assert len(new) == 5 and new[0][1].endswith(f"slurm/stats.sbatch {recipes[1]} samples=5")
        assert "--dependency" not in new[0][1]
        assert sorted(map(int, (fake / "scancel.log").read_text().split())) == ids[2:]
        # the same command again: all kept
        r = _run(["--no-check", "--name", name, *recipes, "stats.samples=5"], env)
        assert r.returncode == 0 and len(_calls(fake)) == 11 and r.stdout.count("still queued or running") == 5
    finally:
        import shutil

        shutil.rmtree(state, ignore_errors=True)


def test_help_names_real_files_and_the_readme_chain():
    r = subprocess.run(["bash", "slurm/pipeline.sh", "-h"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr
    for part in ("STAGE.KEY=VALUE", "--dry-run", "--sbatch STAGE=OPTS", "--name NAME", "--no-check",
                 "stats.samples=2048", "5.train.steps=1000", "STAGE=RECIPE.yaml"):
        assert part in r.stdout, part
    named = {m.rstrip(".,:;)") for m in re.findall(r"(?:configs|slurm)/[\w./-]+", r.stdout)}
    files = {m for m in named if m.endswith((".yaml", ".sh", ".sbatch", ".py"))}
    assert len(files) >= 10, files
    assert [f for f in sorted(files) if not (REPO / f).is_file()] == []
    # its example is the README's, without --dry-run
    lines = r.stdout.splitlines()
    k = next(i for i, x in enumerate(lines) if x.strip().startswith("slurm/pipeline.sh configs/"))
    block = []
    for x in lines[k:]:
        block.append(x)
        if not x.rstrip().endswith("\\"):
            break
    assert shlex.split("\n".join(block).replace("\\\n", " ")) == [
        w for w in _readme_pipeline_example() if w != "--dry-run"]

def test_long_stages_ask_for_a_warning_signal_and_requeue():
    for st in ("pretrain", "stats", "distill", "search"):
        text = (REPO / "slurm" / f"{st}.sbatch").read_text()
        assert "#SBATCH --signal=USR1@" in text and "#SBATCH --requeue" in text, st
    # every stage of the pipeline has an sbatch file that dry-runs its torchrun line, under
    # slurm/agent.sh (torchrun's agent ignores the warning signal)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    for st in ("search", "import_hf", "plan", "export_hf"):
        out = subprocess.run(["bash", f"slurm/{st}.sbatch", "k=1"], cwd=REPO, capture_output=True, text=True,
                             env=dict(env, DRY_RUN="1", SLURM_NNODES="1"), check=True).stdout
        assert "/slurm/agent.sh " in out and "-m torch.distributed.run --nnodes 1" in out
        assert f"-m megatron_minitron {st.replace('_', '-')} --config configs/" in out and out.strip().endswith("k=1")


def test_minitron_sbatch_requeues_an_interrupted_stage(tmp_path):
    """The launcher with stand-in srun (writes the interrupted marker, as rank 0 does on a
    stop) and scontrol: the job requeues itself and exits 0; a completed run touches the
    done file instead."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "srun").write_text('#!/usr/bin/env bash\n'
                               '[ "${STOP:-0}" = 1 ] && echo \'{"reason": "signal SIGUSR1"}\' '
                               '> "$MINITRON_INTERRUPTED_FILE"\nexit 0\n')
    (fake / "scontrol").write_text('#!/usr/bin/env bash\necho "$*" >> "$FAKE/scontrol.log"\n')
    for f in ("srun", "scontrol"):
        (fake / f).chmod(0o755)
    base = dict(os.environ, FAKE=str(fake), PATH=f"{fake}:{os.environ['PATH']}", SLURM_JOB_ID="77",
                SLURM_NNODES="1", REPO=str(tmp_path), MINITRON_DONE_FILE=str(tmp_path / "stage.done"))
    r = subprocess.run(["bash", "slurm/minitron.sbatch", "distill", "x.yaml"], cwd=REPO,
                       env=dict(base, STOP="1"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (fake / "scontrol.log").read_text().split() == ["requeue", "77"]
    assert not (tmp_path / "stage.done").exists()
    r = subprocess.run(["bash", "slurm/minitron.sbatch", "distill", "x.yaml"], cwd=REPO,
                       env=base, capture_output=True, text=True)
    assert r.returncode == 0 and (tmp_path / "stage.done").is_file()
    assert (fake / "scontrol.log").read_text().split() == ["requeue", "77"]  # not again
