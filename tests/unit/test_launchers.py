"""The launchers' dry runs print exactly the commands the README documents."""

import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _clean_env() -> dict:
    """The environment minus what a launcher reads (in-process tests may have set some)."""
    drop = ("MASTER_ADDR", "MASTER_PORT", "NPROC", "NNODES", "NODE_RANK", "SLURM_JOB_NODELIST",
            "SLURM_NNODES", "SLURM_JOB_ID", "SLURM_SUBMIT_DIR", "REPO", "PYTHON", "HEAD_NODE")
    return {k: v for k, v in os.environ.items() if k not in drop}


def _documented_dry_runs():
    """(env+command, expected output) pairs from the README's `$ DRY_RUN=1 ...` blocks."""
    text = (REPO / "README.md").read_text()
    pairs = re.findall(r"^\$ (DRY_RUN=1 [^\n]+)\n([^\n]+)\n", text, flags=re.M)
    assert len(pairs) >= 2, "README documents the torchrun and slurm dry runs"
    return pairs


def test_readme_dry_runs_match_launchers():
    for line, expected in _documented_dry_runs():
        words = line.split()
        env = _clean_env()
        while "=" in words[0]:
            k, v = words.pop(0).split("=", 1)
            env[k] = v
        out = subprocess.run(words, cwd=REPO, env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected.strip(), (line, out.stdout)


def test_every_stage_has_an_sbatch_file_that_dry_runs():
    for stage in ("pretrain", "stats", "prune", "distill", "eval", "teacher_logits"):
        f = REPO / "slurm" / f"{stage}.sbatch"
        assert "#SBATCH --gpus-per-node=8" in f.read_text()
        env = dict(_clean_env(), DRY_RUN="1", SLURM_NNODES="4", SLURM_JOB_ID="7")
        out = subprocess.run(["bash", str(f), "x.key=1"], cwd=REPO, env=env,
                             capture_output=True, text=True, check=True).stdout
        assert f"-m megatron_minitron {stage.replace('_', '-')} --config configs/" in out
        assert "--nnodes 4 --nproc_per_node 8 --rdzv_backend c10d" in out and out.strip().endswith("x.key=1")


def test_launcher_usage_error():
    r = subprocess.run(["bash", "scripts/torchrun.sh", "pretrain"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "usage:" in r.stderr
