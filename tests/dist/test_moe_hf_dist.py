"""import-hf / export-hf of mixture-of-experts (E) layers against transformers' own
NemotronH MoE (real transformers, real megatron-core, torchrun with gloo): one folder per
router option, imported at TP=1 EP=1, EP=2 and TP=2, exported back. Two launches, see
moe_hf_worker.py."""

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import launch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

WORKER = Path(__file__).with_name("moe_hf_worker.py")
VARIANTS = ("shared_top2", "no_shared", "grouped", "latent", "top1", "top6", "scaled")
TP2_VARIANTS = ("shared_top2", "latent", "grouped")

# fp32 on CPU, logits up to ~5: observed <= 3.9e-6 for every option and layout (same math in
# another order; routing picks the same experts). Asserted: 1e-4. A different expert choice
# for one token, or a lost bias / scaling / normalisation, moves logits by ~1.
LOGIT_ATOL = 1e-4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    wd = tmp_path_factory.mktemp("moehf")
    launch(WORKER, ["par", wd], nproc=2)
    launch(WORKER, ["exp", wd])
    res = {p: json.loads((wd / f"result_{p}.json").read_text()) for p in ("make", "exp")}
    return wd, res


def _l(wd, variant, name):
    return torch.load(wd / variant / f"logits_{name}.pt")


def _diff(a, b):
    assert a.shape == b.shape == (2, 40, 256)
    return (a - b).abs().max().item()


def test_routing_is_non_trivial(runs):
    for v, st in runs[1]["make"].items():
        assert st["experts_used"] == 8, v
        assert st["bias_changed_tokens"] > st["tokens"] // 10, v  # the correction bias decides
    assert runs[1]["make"]["grouped"]["group_changed_tokens"] > 0  # the group limit decides too


@pytest.mark.parametrize("variant", VARIANTS)
def test_options_change_the_function(runs, variant):
    # parity below is not vacuous: every option moves transformers' logits far from the base
    # (same seeds: same weights where shapes agree)
    if variant != "shared_top2":
        wd = runs[0]
        assert _diff(_l(wd, variant, "hf"), _l(wd, "shared_top2", "hf")) > 0.1


@pytest.mark.parametrize("variant,layout", [(v, lay) for v in VARIANTS for lay in ("tp1", "ep2")]
                         + [(v, "tp2") for v in TP2_VARIANTS])
def test_imported_moe_logits_match_transformers(runs, variant, layout):
    wd = runs[0]
    assert _diff(_l(wd, variant, f"imp_{layout}"), _l(wd, variant, "hf")) < LOGIT_ATOL


@pytest.mark.parametrize("layout", ["tp1", "tp2"])
def test_ep2_import_loads_at_other_layouts(runs, layout):
    wd = runs[0]
    assert _diff(_l(wd, "shared_top2", f"ep2_as_{layout}"), _l(wd, "shared_top2", "hf")) < LOGIT_ATOL


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_of_ep2_import_loads_in_transformers(runs, variant):
    wd, res = runs
    r = res["exp"][variant]
    assert r["loading_info"] == {}  # nothing missing, unexpected or mismatched
    assert r["max_abs_diff_tensors"] == 0.0 and r["bias_dtype"] == "torch.float32"
    if variant == "no_shared":  # a zero shared MLP of width 1 instead of the folder's zero one
        assert r["only_in_hf"] == r["only_in_export"] and len(r["only_in_hf"]) == 4
        assert all("shared_experts" in n for n in r["only_in_hf"])
    else:
        assert r["only_in_hf"] == r["only_in_export"] == []
    c = r["config"]
    assert c["layers_block_type"][1] == c["layers_block_type"][3] == "moe" and c["num_nextn_predict_layers"] == 0
    assert _diff(_l(wd, variant, "exp"), _l(wd, variant, "hf")) < LOGIT_ATOL


def test_mtp_is_refused_unless_dropped_and_the_drop_is_recorded(runs):
    r = runs[1]["exp"]
    assert "drop_mtp=true" in r["mtp_refusal"] and "num_nextn_predict_layers=1" in r["mtp_refusal"]
    assert r["mtp_refused_wrote_nothing"]
    s = r["mtp_summary"]
    assert s["dropped_mtp"] == s["file"] == {"layers": 1, "tensors": 21}
    assert any("dropped 1 multi-token-prediction layer" in n for n in s["notes"])
