"""import-hf keeps the Mamba dt clamp config.json time_step_limit asks for (as transformers
>= 5.25 and mamba_ssm's kernels apply it), export-hf writes it back: a model whose clamp
binds gives transformers' logits after import, import -> export, and import -> prune
(keep-all, permuted) -> export; an upper clamp after import and import -> export (real
transformers, real megatron-core; dtclamp_worker.py)."""

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import launch

pytest.importorskip("transformers")

WORKER = Path(__file__).with_name("dtclamp_worker.py")
# fp32 on CPU: the same math in another order (observed ~1e-6 on logits ~3); the bound
LOGIT_ATOL = 1e-4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    wd = tmp_path_factory.mktemp("dtclamp")
    launch(WORKER, ["make", wd])
    launch(WORKER, ["run", wd])
    return wd, json.loads((wd / "result.json").read_text())


def _d(wd, a, b):
    return (torch.load(wd / f"logits_{a}.pt") - torch.load(wd / f"logits_{b}.pt")).abs().max().item()


@pytest.mark.parametrize("sfx", ["", "_upper"])
def test_the_clamp_binds(runs, sfx):
    wd, _ = runs
    d = _d(wd, f"hf{sfx}", f"hf{sfx}_noclamp")
    print(f"transformers with vs without its dt clamp{sfx}: max |logits diff| = {d:.3e}")
    assert d > 1e-2


@pytest.mark.parametrize("sfx,clamp,limit", [("", [0.02, 0.0], "[0.02, inf]"),
                                              ("_upper", [0.0, 0.05], "[0.0, 0.05]")])
def test_import_keeps_the_clamp(runs, sfx, clamp, limit):
    wd, res = runs
    assert res[f"dt_clamp{sfx}"] == clamp
    assert f"time_step_limit={limit}" in res[f"import_notes{sfx}"][0]
    d = _d(wd, f"imp{sfx}", f"hf{sfx}")
    print(f"import-hf (clamp{sfx} kept) vs transformers: {d:.3e}")
    assert d < LOGIT_ATOL


@pytest.mark.parametrize("sfx,limit", [("", [0.02, math.inf]), ("_upper", [0.0, 0.05])])
def test_import_export_round_trip(runs, sfx, limit):
    wd, res = runs
    assert res[f"exp_time_step_limit{sfx}"] == limit
    d = _d(wd, f"exp{sfx}", f"hf{sfx}")
    print(f"import -> export (clamp{sfx}) vs transformers: {d:.3e}")
    assert d < LOGIT_ATOL


def test_import_prune_keepall_export(runs):
    wd, res = runs
    assert res["pruned_dt_clamp"] == [0.02, 0.0]
    d = _d(wd, "exp_pruned", "hf")
    print(f"import -> prune (keep-all, permuted) -> export vs transformers: {d:.3e}")
    assert d < LOGIT_ATOL
