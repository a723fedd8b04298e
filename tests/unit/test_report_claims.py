"""Pure report pieces: METHOD/SEED grouping with paired differences to the baseline, and the
ablation claims judged from given numbers (hand-computed expectations)."""

import pytest

from megatron_minitron.ablations import claims as CL
from megatron_minitron.report import compare as C


def _rows():
    return [{"model": "teacher", "val_loss": 4.0}, {"model": "pruned", "val_loss": 7.0},
            {"model": "KD/s1", "val_loss": 5.0, "tokens_seen": 100},
            {"model": "KD/s2", "val_loss": 5.2, "tokens_seen": 100},
            {"model": "CE/s1", "val_loss": 5.3, "tokens_seen": 100},
            {"model": "CE/s2", "val_loss": 5.1, "tokens_seen": 100},
            {"model": "KD+CE/s1", "val_loss": 5.1, "tokens_seen": 100}]


def test_method_summary_pairs_seeds_against_the_baseline():
    ms = {m["method"]: m for m in C.method_summary(_rows(), "CE")}
    assert list(ms) == ["KD", "CE", "KD+CE"]  # unseeded rows are not methods
    kd = ms["KD"]
    assert kd["seeds"] == ["s1", "s2"] and kd["tokens"] == 100
    assert kd["val_loss"]["mean"] == pytest.approx(5.1) and kd["val_loss"]["min"] == 5.0
    vb = kd["vs_baseline"]  # s1: 5.0 - 5.3 = -0.3, s2: 5.2 - 5.1 = +0.1
    assert vb["diffs"] == pytest.approx({"s1": -0.3, "s2": 0.1})
    assert vb["mean"] == pytest.approx(-0.1) and vb["wins"] == 1 and vb["n"] == 2
    assert "vs_baseline" not in ms["CE"]
    assert ms["KD+CE"]["vs_baseline"]["seeds"] == ["s1"]  # only the seeds both have
    assert C.parse_label("KD+CE/s2") == ("KD+CE", "s2") and C.parse_label("teacher") == ("teacher", None)
    assert C.fmt_spread(kd["val_loss"]) == "5.1000 (5.0000..5.2000)"


def test_claims_verdicts():
    g = CL.group_aware({"zero_shot": {"4 heads": {"aware": 5.0, "unaware": 6.0, "same_sets": False},
                                      "6 heads": {"aware": 4.5, "unaware": 4.5, "same_sets": True}},
                        "kd": {"aware": 4.2, "unaware": 4.3, "steps": "40"}})
    assert g["holds"] == "yes" and "identical keep sets" in g["ours"]
    g = CL.group_aware({"zero_shot": {"4 heads": {"aware": 5.0, "unaware": 6.0, "same_sets": False}},
                        "kd": {"aware": 4.4, "unaware": 4.3, "steps": "40"}})
    assert g["holds"] == "mixed"
    s = CL.mamba_source({"a": {"x": 1.0, "z": 2.0, "y": 3.0}, "b": {"x": 2.0, "z": 1.0, "y": 3.0},
                         "c": {"x": 1.0, "z": 1.5, "y": 3.0}})
    assert s["holds"] == "yes" and "x best in 2 of 3" in s["ours"]
    f = CL.flap({"zero_shot": {"a": {"l2": 5.0, "flap": 5.3}}, "kd": {"l2": 4.0, "flap": 4.01, "steps": "40"}})
    assert f["holds"] == "yes"
    f = CL.flap({"zero_shot": {"a": {"l2": 5.0, "flap": 5.01}}, "kd": {"l2": 4.0, "flap": 4.3, "steps": "40"}})
    assert f["holds"] == "no"
    h = CL.heads_vs_channels({"steps": "40", "heads": {"label": "4x32", "params": 10, "zero_shot": 5.0,
                                                       "kd": 4.0, "tokens_per_s": 200.0},
                              "channels": {"label": "8x16", "params": 11, "zero_shot": 5.5, "kd": 4.1,
                                           "tokens_per_s": 150.0}})
    assert h["holds"] == "yes"
    w = CL.width_vs_depth({"steps": "40", "rows": {
        "width-only": {"label": "w", "params": 1, "zero_shot": 5, "kd": 4.5},
        "depth-only": {"label": "d", "params": 1, "zero_shot": 6, "kd": 4.4}}})
    assert w["holds"] == "no"
    d = CL.depth_metric({1: {"kl": {"layers": [3], "loss": 5.0}, "cosine": {"layers": [3], "loss": 5.0}},
                         2: {"kl": {"layers": [3, 4], "loss": 5.5}, "cosine": {"layers": [1, 3], "loss": 6.0}}})
    assert d["holds"] == "yes" and "both drop [3]" in d["ours"]
    ff = CL.ffn_source({"zero_shot": {"pre": 5.0, "post": 4.9}, "kd": {"pre": 4.2, "post": 4.3, "steps": "40"},
                        "default": "pre"})
    assert ff["holds"] == "yes"  # judged after KD when there is a KD figure
    md = CL.markdown([g, s])
    assert md.count("\n") == 4 and md.startswith("| claim |")
