"""Context parallelism: CP=2 against CP=1 on real megatron-core (gloo, 2 processes, one
launch: tests/dist/cp_worker.py). The CP=1 runs are the oracle (the same world at dp=2:
the same global batches, split over DP instead of the sequence). Padded documents: every
batch has masked tokens (checked).

Tolerances (relative to the largest |value| of the compared tensor; measured figures are
printed by each test):
  split: equal to megatron's get_batch_on_this_cp_rank, exactly;
  CP attention vs megatron's DotProductAttention: float32 1e-6, float64 1e-13 (out, dQ, dK, dV);
  model forward-backward: loss 1e-6 relative, token count exact, every parameter's
    reduced gradient 1e-5;
  pretrain 4 steps: losses, val losses 1e-5 relative, grad norms 1e-5 relative;
    resumed at CP=1 from the CP=2 step-2 checkpoint: steps 3-4 losses 1e-5, final weights 1e-5;
  eval of one checkpoint at CP=2 and CP=1: 1e-6 relative, same token count;
  distill 3 steps, loss.alpha_kd=0.5, online KD (teacher at CP=2 too) and KD from a top-8
    teacher-logits cache written at CP=1: per-step loss, CE, grad norm, the validation
    losses (teacher, student before, every evaluation) 1e-5 relative; KL 1e-5 relative
    online, 3e-5 from the cache (a KL of 0.01 there: 3e-7 absolute); final weights 1e-5;
  MoE (ME*-: 4 experts, top-2, a shared expert, load-balancing loss 1.0, expert bias rate
    1e-2) pretrain 3 steps: losses, grad norms, val losses, final weights 1e-5 relative,
    expert biases equal (their sign updates: exactly); without the load-balancing loss the
    CP=1 final weights differ by more than 1e-3 (the loss weighs);
  long context (the 128k recipe's settings, 4096 tokens, CP=2, 2 steps): runs end to end
    (finite losses, a checkpoint, the validation loss moved).
"""

import json
from pathlib import Path

import pytest

from tests.conftest import launch, write_data_json

WORKER = Path(__file__).with_name("cp_worker.py")


@pytest.fixture(scope="module")
def res(tmp_path_factory, real_data):
    wd = tmp_path_factory.mktemp("cp")
    write_data_json(wd, real_data)
    launch(WORKER, ["run", wd], nproc=2)
    return json.loads((wd / "result_cp.json").read_text())


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-30)


def close_lists(got, want, tol, what):
    assert len(got) == len(want) > 0, (what, got, want)
    worst = max(rel(g, w) for g, w in zip(got, want))
    print(f"{what}: worst relative difference {worst:.1e} (CP=2 {got}, CP=1 {want})")
    assert worst < tol, what


def test_batches_have_masked_tokens(res):
    print("masked fraction:", res["masked_fraction"])
    assert all(0.05 < f < 0.8 for f in res["masked_fraction"].values())


def test_split_is_megatrons(res):
    assert res["split_equals_megatron"]


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("float64", 1e-13)])
def test_cp_attention_matches_cp1_attention(res, dtype, tol):
    got = res["attention"][dtype]
    print(dtype, got)
    assert all(v < tol for v in got.values()), got


@pytest.mark.parametrize("name", ["model", "rope"])
def test_forward_backward_loss_tokens_and_gradients(res, name):
    r = res[name]
    print(name, {k: v for k, v in r.items()})
    assert rel(r["loss_cp2"], r["loss_cp1"]) < 1e-6
    assert r["tokens_cp2"] == r["tokens_cp1"] > 0  # each token counted once
    assert r["grad_worst"] < 1e-5, r["grad_worst_param"]
    assert r["nonzero_grads"] == r["params"]  # every parameter (Mamba slices included) has a gradient


def test_pretrain_cp2_equals_cp1(res):
    p = res["pretrain"]
    assert p["cp2"]["layout"]["cp"] == 2 and p["cp2"]["layout"]["dp"] == 1
    assert p["cp1"]["layout"]["cp"] == 1 and p["cp1"]["layout"]["dp"] == 2
    close_lists(p["cp2"]["loss"], p["cp1"]["loss"], 1e-5, "train loss")
    close_lists(p["cp2"]["grad_norm"], p["cp1"]["grad_norm"], 1e-5, "grad norm")
    close_lists(p["cp2"]["val"], p["cp1"]["val"], 1e-5, "val loss")
    print("final weights CP=1 vs CP=2 run:", p["cp1_vs_cp2_weights_worst"])
    assert p["cp1_vs_cp2_weights_worst"] < 1e-5


def test_cp2_checkpoint_resumes_at_cp1_as_at_cp2(res):
    p = res["pretrain"]
    r = p["resumed_cp1"]
    assert r["resumed_from"] == 2
    close_lists(r["loss"], p["cp2"]["loss"][2:], 1e-5, "steps 3-4 loss, resumed at CP=1 vs CP=2")
    close_lists(r["grad_norm"], p["cp2"]["grad_norm"][2:], 1e-5, "steps 3-4 grad norm")
    close_lists(r["val"], p["cp2"]["val"][1:], 1e-5, "step-4 val loss")
    print("final weights, resumed vs CP=2:", p["resume_weights_worst"], "; moved from init:", p["trained_vs_init"])
    assert p["resume_weights_worst"] < 1e-5
    assert p["trained_vs_init"] > 1e-3  # the steps changed the weights


def test_eval_loss_cp2_equals_cp1(res):
    e = res["eval"]
    print(e)
    assert e["cp2"]["layout"]["cp"] == 2
    assert e["cp2"]["tokens"] == e["cp1"]["tokens"]
    assert rel(e["cp2"]["loss"], e["cp1"]["loss"]) < 1e-6


def test_moe_pretrain_cp2_equals_cp1(res):
    m = res["moe"]
    a, b, c = m["cp2"], m["cp1"], m["cp1_noaux"]
    assert a["layout"]["cp"] == 2 and a["layout"]["dp"] == 1 and b["layout"]["dp"] == 2
    assert len(a["loss"]) == 3 and len(a["val"]) == 1
    for k in ("loss", "grad_norm", "val"):
        close_lists(a[k], b[k], 1e-5, f"MoE {k}")
    print(f"MoE final weights {m['weights_worst']:.1e} (moved {m['moved']:.1e}), expert bias "
          f"{m['bias_worst']:.1e} (moved {m['bias_moved']:.1e}); without the aux loss: weights "
          f"{m['aux_effect']:.1e}, losses {max(rel(x, y) for x, y in zip(c['loss'], b['loss'])):.1e}")
    assert m["weights_worst"] < 1e-5 and m["moved"] > 1e-3
    assert m["bias_keys"] and m["bias_worst"] == 0 and m["bias_moved"] > 0
    assert m["aux_effect"] > 1e-3  # the load-balancing loss weighs: 100 x the tolerance


@pytest.mark.parametrize("kind", ["online", "cached"])
def test_distill_cp2_equals_cp1(res, kind):
    d = res["distill"]
    a, b = d[f"{kind}_cp2"], d[f"{kind}_cp1"]
    assert a["layout"]["cp"] == 2 and a["layout"]["dp"] == 1
    assert b["layout"].get("cp", 1) == 1 and b["layout"]["dp"] == 2
    assert len(a["loss"]) == 3 and len(a["val_loss"]) == 2
    for key in ("loss", "ce", "grad_norm", "val_loss"):
        close_lists(a[key], b[key], 1e-5, f"distill {kind} {key}")
    close_lists(a["kd"], b["kd"], 1e-5 if kind == "online" else 3e-5, f"distill {kind} KL")
    assert min(a["kd"]) > 1e-3 and min(a["ce"]) > 1.0  # both terms weigh (alpha_kd=0.5)
    for key in ("teacher_val", "student_before", "after"):
        assert rel(a[key], b[key]) < 1e-5, (key, a[key], b[key])
    print(f"final weights {kind}: CP=2 vs CP=1 {d['weights_' + kind]:.1e}; moved from init {d['moved_from_init']:.1e}")
    assert d[f"weights_{kind}"] < 1e-5
    assert d["moved_from_init"] > 1e-3


def test_long_context_recipe_runs_at_4096_tokens_cp2(res):
    """configs/distill_nemotron_h_4b_128k.yaml's phase end to end on the tiny pair: 4096
    tokens per sequence split over 2 CP ranks (2048 each), full recompute, 2 steps, a
    checkpoint. (The CP=2 vs CP=1 parity of this path: test_distill_cp2_equals_cp1.)"""
    import math

    a = res["long"]["cp2"]
    print(a)
    assert a["seq_length"] == 4096 and a["layout"]["cp"] == 2 and a["layout"]["dp"] == 1
    assert a["recompute"] == "full" and a["checkpoint"] == "iter_0000002" and a["tokens_seen"] == 2 * 1 * 4096
    assert len(a["loss"]) == 2 and len(a["val"]) == 1
    assert all(math.isfinite(x) and x > 0 for x in a["loss"] + a["grad_norm"] + a["val"])
    assert a["after"] < a["before"]  # the two steps moved the student


# ---------------------------------------------------------------- CP with TP and PP (4 processes)
@pytest.fixture(scope="module")
def res_tp(tmp_path_factory, real_data):
    """tests/dist/cp_tp_worker.py: CP=2 x TP=2 vs TP=2 x DP=2 and CP=2 x PP=2 vs PP=2 x DP=2
    (pretrain 3 steps, and distill 3 steps with alpha_kd=0.5), MoE CP=2 x EP=2 vs EP=2 x DP=4.
    Tolerances as at TP=1: 1e-5 relative for losses, grad norms, validation losses, weights."""
    wd = tmp_path_factory.mktemp("cp_tp")
    write_data_json(wd, real_data)
    launch(WORKER.with_name("cp_tp_worker.py"), ["run", wd], nproc=4)
    return json.loads((wd / "result_cp_tp.json").read_text())


@pytest.mark.parametrize("lay", ["tp", "pp"])
def test_pretrain_cp2_with_tp_or_pp_equals_cp1(res_tp, lay):
    p = res_tp["pretrain"]
    a, b = p[f"{lay}_cp2"], p[f"{lay}_cp1"]
    assert a["layout"]["cp"] == 2 and a["layout"][lay] == 2 and a["layout"]["dp"] == 1
    assert b["layout"]["cp"] == 1 and b["layout"][lay] == 2 and b["layout"]["dp"] == 2
    assert len(a["loss"]) == 3 and len(a["val"]) == 1
    for k in ("loss", "grad_norm", "val"):
        close_lists(a[k], b[k], 1e-5, f"{lay} {k}")
    assert p[f"{lay}_weights_worst"] < 1e-5 and p[f"{lay}_moved"] > 1e-3
    print(f"CP=2 x {lay.upper()}=2 vs {lay.upper()}=2 x DP=2: losses {max(rel(x, y) for x, y in zip(a['loss'], b['loss'])):.1e}, "
          f"grad norms {max(rel(x, y) for x, y in zip(a['grad_norm'], b['grad_norm'])):.1e}, "
          f"val {rel(a['val'][0], b['val'][0]):.1e}, weights {p[f'{lay}_weights_worst']:.1e}")


@pytest.mark.parametrize("lay", ["tp", "pp"])
def test_distill_cp2_with_tp_or_pp_equals_cp1(res_tp, lay):
    d = res_tp["distill"]
    a, b = d[f"kd_{lay}_cp2"], d[f"kd_{lay}_cp1"]
    assert a["layout"]["cp"] == 2 and a["layout"][lay] == 2 and b["layout"][lay] == 2 and b["layout"]["dp"] == 2
    assert len(a["loss"]) == 3 and min(a["kd"]) > 0 and min(a["ce"]) > 0
    for k in ("loss", "kd", "ce", "grad_norm", "val_loss"):
        close_lists(a[k], b[k], 1e-5, f"distill {lay} {k}")
    for k in ("teacher_val", "student_before", "after"):
        assert rel(a[k], b[k]) < 1e-5, k
    assert d[f"{lay}_weights_worst"] < 1e-5 and d[f"{lay}_moved"] > 1e-3
    L = lay.upper()
    print(f"distill CP=2 x {L}=2 vs {L}=2 x DP=2: loss {max(rel(x, y) for x, y in zip(a['loss'], b['loss'])):.1e}, "
          f"KL {max(rel(x, y) for x, y in zip(a['kd'], b['kd'])):.1e}, CE {max(rel(x, y) for x, y in zip(a['ce'], b['ce'])):.1e}, "
          f"grad norms {max(rel(x, y) for x, y in zip(a['grad_norm'], b['grad_norm'])):.1e}, "
          f"val {max(rel(x, y) for x, y in zip(a['val_loss'], b['val_loss'])):.1e}, "
          f"weights {d[f'{lay}_weights_worst']:.1e}; seconds {res_tp['seconds']}")


def test_moe_cp2_x_ep2_equals_ep2(res_tp):
    """MoE pretrain 3 steps, CP=2 x EP=2 (dp=2) vs EP=2 x DP=4: tolerances as above, the
    expert biases equal."""
    m = res_tp["moe_ep"]
    a, b = m["moe_ep_cp2"], m["moe_ep_cp1"]
    assert a["layout"]["cp"] == 2 and a["layout"]["ep"] == 2 and a["layout"]["dp"] == 2
    assert b["layout"]["cp"] == 1 and b["layout"]["ep"] == 2 and b["layout"]["dp"] == 4
    for k in ("loss", "grad_norm", "val"):
        close_lists(a[k], b[k], 1e-5, f"MoE EP=2 {k}")
    print(f"MoE CP=2 x EP=2 vs EP=2 x DP=4: weights {m['weights_worst']:.1e} (moved {m['moved']:.1e}), "
          f"expert bias {m['bias_worst']:.1e}")
    assert m["weights_worst"] < 1e-5 and m["moved"] > 1e-3 and m["bias_worst"] == 0
