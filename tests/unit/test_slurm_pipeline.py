"""slurm/pipeline.sh against stand-in sbatch / squeue / scancel (small bash scripts that
record their arguments and keep a job table in files): dependency chain, dry run, and the
resume of a pipeline whose middle job failed. Also the requeue path of minitron.sbatch."""

import os
import subprocess
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


def _run(args, env):
    return subprocess.run(["bash", "slurm/pipeline.sh", *args], cwd=REPO, env=env,
                          capture_output=True, text=True)


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
        r = _run(["--dry-run", "--name", name, *recipes], env)
        assert r.returncode == 0, r.stderr
        lines = [x for x in r.stdout.splitlines() if x.startswith("sbatch ")]
        assert len(lines) == 6 and not (fake / "sbatch.log").exists() and not state.exists()
        assert "--dependency" not in lines[0]
        assert all("--dependency afterok:" in x for x in lines[1:])
        for st, x in zip(STAGES, lines):
            assert f"slurm/{st}.sbatch" in x

        # submit: each job after the previous one (afterok), the done file passed on
        r = _run(["--name", name, *recipes], env)
        assert r.returncode == 0, r.stderr
        calls = _calls(fake)
        assert len(calls) == 6
        for i, (n, args) in enumerate(calls):
            assert f"slurm/{STAGES[i]}.sbatch {recipes[i]}" in args
            assert f"MINITRON_DONE_FILE={state}/{i}-" in args
            if i:
                assert f"--dependency afterok:{calls[i - 1][0]}" in args
        ids = [n for n, _ in calls]

        # import-hf, stats, plan completed (their jobs wrote .done and left the queue);
        # prune FAILED; distill and export-hf wait forever on the failed dependency
        for i, st in enumerate(["import-hf", "stats", "plan"]):
            (state / f"{i}-{st}.done").write_text("2026-01-01")
        with open(fake / "jobs", "a") as f:
            for n in ids[:3]:
                f.write(f"{n} COMPLETED\n")
            f.write(f"{ids[3]} FAILED\n")
        r = _run(["--name", name, *recipes], env)
        assert r.returncode == 0, r.stderr
        new = _calls(fake)[6:]
        assert [a.split("slurm/")[1].split(".sbatch")[0] for _, a in new] == ["prune", "distill", "export_hf"]
        assert "--dependency" not in new[0][1]  # plan is done: prune can start now
        assert f"--dependency afterok:{new[0][0]}" in new[1][1]
        assert f"--dependency afterok:{new[1][0]}" in new[2][1]
        # the stuck old distill / export-hf jobs were cancelled
        assert sorted(map(int, (fake / "scancel.log").read_text().split())) == ids[4:]

        # again while the new jobs are queued: nothing is submitted
        r = _run(["--name", name, *recipes], env)
        assert r.returncode == 0 and len(_calls(fake)) == 9, r.stdout
        assert r.stdout.count("still queued or running") == 3
    finally:
        import shutil

        shutil.rmtree(state, ignore_errors=True)


def test_pipeline_refuses_bad_arguments(tmp_path):
    fake, recipes, env = _setup(tmp_path)
    odd = tmp_path / "my_recipe.yaml"
    odd.write_text("{}\n")
    r = _run(["--dry-run", str(odd)], env)
    assert r.returncode == 2 and "cannot tell the stage" in r.stderr and "STAGE=" in r.stderr
    r = _run(["--dry-run", f"distill={odd}"], env)  # explicit stage: accepted
    assert r.returncode == 0 and "slurm/distill.sbatch" in r.stdout
    r = _run(["--dry-run", str(tmp_path / "stats_missing.yaml")], env)
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = _run(["--dry-run", f"frobnicate={odd}"], env)
    assert r.returncode == 2 and "no slurm/frobnicate.sbatch" in r.stderr


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
