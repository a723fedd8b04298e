"""Parity of the pure-PyTorch Mamba2 kernels (compat/ssd.py, compat/gated_norm.py) with
their plainly written float64 references."""

import pytest
import torch

from megatron_minitron.compat.gated_norm import RMSNormGated, rms_norm_gated_ref
from megatron_minitron.compat.ssd import chunk_scan_combined, ssd_recurrence_ref

# Scan tolerance, fp32 compute vs float64 recurrence: max |y - y_ref| / max(1, max |y_ref|).
# Measured 8e-8..3e-7 on these shapes (absolute up to 1.3e-5 where |y| ~ 60); asserted at 1e-5.
SCAN_TOL = 1e-5
# Gated norm, same measure: fp32 vs float64 measured ~1e-7 (5e-7 absolute); asserted at 1e-5.
# bf16 output is rounded to 8 mantissa bits (2^-8 ~ 4e-3): measured ~3e-3; asserted at 1e-2.
NORM_TOL_FP32 = 1e-5
NORM_TOL_BF16 = 1e-2


def _rel_err(y, ref):
    return ((y.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1.0)).item()


def _inputs(b, l, h, p, g, n, d_per_hp=False, gen_seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(gen_seed)

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=dtype)

    return dict(
        x=r(b, l, h, p),
        dt=r(b, l, h),
        A=-(torch.rand(h, generator=gen, dtype=dtype) * 2 + 0.2),  # A = -exp(A_log) < 0
        B=r(b, l, g, n),
        C=r(b, l, g, n),
        D=r(h, p) if d_per_hp else r(h),
        z=r(b, l, h, p),
        dt_bias=r(h),
        initial_states=r(b, h, p, n),
    )


# (b, seqlen, nheads, headdim, ngroups, dstate, chunk_size, D per (h, p))
SCAN_SHAPES = [
    (2, 37, 4, 8, 1, 16, 8, False),  # seqlen not a multiple of chunk, one group
    (1, 64, 8, 4, 4, 8, 16, True),  # multiple of chunk, 4 groups, D per (h, p)
    (2, 5, 6, 3, 3, 4, 16, False),  # shorter than one chunk
    (1, 50, 4, 16, 2, 32, 1, True),  # chunk_size 1: pure state passing
]


@pytest.mark.parametrize("shape", SCAN_SHAPES)
@pytest.mark.parametrize("full", [False, True], ids=["plain", "z+dtbias+init+final"])
def test_scan_matches_recurrence(shape, full):
    b, l, h, p, g, n, chunk, d_hp = shape
    inp = _inputs(b, l, h, p, g, n, d_hp)
    if full:
        kw = dict(D=inp["D"], z=inp["z"], dt_bias=inp["dt_bias"], dt_softplus=True,
                  initial_states=inp["initial_states"], return_final_states=True)
    else:
        # no softplus: dt must be >= 0 for a stable decay
        kw = dict(D=inp["D"])
        inp["dt"] = inp["dt"].abs() * 0.5
    args = (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], chunk)
    out = chunk_scan_combined(*args, **kw)
    ref = ssd_recurrence_ref(*args, **kw)
    if full:
        (y, st), (y_ref, st_ref) = out, ref
        assert st.shape == (b, h, p, n) and st.dtype == torch.float32
        assert _rel_err(st, st_ref) < SCAN_TOL
    else:
        y, y_ref = out, ref
    assert y.shape == inp["x"].shape and y.dtype == torch.float32
    assert _rel_err(y, y_ref) < SCAN_TOL


def test_scan_chunk_size_invariant_and_dt_limit():
    # the answer must not depend on the chunking; dt_limit clamps after softplus
    inp = _inputs(2, 45, 4, 8, 2, 16)
    args = (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"])
    kw = dict(D=inp["D"], dt_bias=inp["dt_bias"], dt_softplus=True, dt_limit=(0.01, 0.3))
    ys = [chunk_scan_combined(*args, cs, **kw) for cs in (4, 7, 16, 64)]
    for y in ys[1:]:
        assert _rel_err(y, ys[0]) < SCAN_TOL
    y_ref = ssd_recurrence_ref(*args, **kw)
    assert _rel_err(ys[0], y_ref) < SCAN_TOL
    # and the clamp matters: without it the result differs
    y_free = chunk_scan_combined(*args, 16, D=inp["D"], dt_bias=inp["dt_bias"], dt_softplus=True)
    assert _rel_err(y_free, y_ref) > 1e-3


def test_scan_bf16_inputs_return_bf16():
    inp = _inputs(1, 33, 4, 8, 2, 16)
    bf = {k: v.bfloat16() for k, v in inp.items()}
    y = chunk_scan_combined(bf["x"], bf["dt"], inp["A"], bf["B"], bf["C"], 16,
                            D=inp["D"], z=bf["z"], dt_bias=inp["dt_bias"], dt_softplus=True)
    y_ref = ssd_recurrence_ref(bf["x"], bf["dt"], inp["A"], bf["B"], bf["C"], 16,
                               D=inp["D"], z=bf["z"], dt_bias=inp["dt_bias"], dt_softplus=True)
    assert y.dtype == torch.bfloat16
    # only the final cast to bf16 differs: relative 2^-8
    assert _rel_err(y, y_ref) < 1e-2


def test_scan_packed_sequences_not_supported():
    inp = _inputs(1, 8, 2, 2, 1, 2)
    args = (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], 4)
    with pytest.raises(NotImplementedError, match="packed"):
        chunk_scan_combined(*args, seq_idx=torch.zeros(1, 8, dtype=torch.int32))
    with pytest.raises(NotImplementedError):
        chunk_scan_combined(*args, cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(NotImplementedError):
        chunk_scan_combined(*args, return_varlen_states=True)


def test_scan_gradcheck_float64():
    # tiny case; float64 inputs are computed in float64, so gradcheck's finite differences
    # check every input's gradient (x, dt, A, B, C, D, z, dt_bias, initial_states).
    # fast_mode compares random projections u^T J v (the full Jacobian took ~20 s here).
    inp = _inputs(1, 5, 4, 2, 2, 3, d_per_hp=True, dtype=torch.float64)  # 2 heads per group
    names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"]
    tensors = [inp[k].clone().requires_grad_() for k in names]

    def f(x, dt, A, B, C, D, z, dt_bias, init):
        y, st = chunk_scan_combined(x, dt, A, B, C, 2, D=D, z=z, dt_bias=dt_bias, dt_softplus=True,
                                    initial_states=init, return_final_states=True)
        return y, st

    assert torch.autograd.gradcheck(f, tensors, eps=1e-6, atol=1e-6, fast_mode=True)


def test_scan_grads_match_reference_fp32():
    # fp32 scan backward vs autograd through the float64 recurrence, same upstream gradient
    inp = _inputs(2, 21, 4, 4, 2, 8, d_per_hp=False)
    names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"]

    def grads(fn):
        ts = {k: inp[k].clone().requires_grad_() for k in names}
        y, st = fn(ts["x"], ts["dt"], ts["A"], ts["B"], ts["C"], 8, D=ts["D"], z=ts["z"],
                   dt_bias=ts["dt_bias"], dt_softplus=True, initial_states=ts["initial_states"],
                   return_final_states=True)
        gy = torch.cos(torch.arange(y.numel(), dtype=torch.float64)).reshape(y.shape)
        gs = torch.sin(torch.arange(st.numel(), dtype=torch.float64)).reshape(st.shape)
        ((y.double() * gy).sum() + (st.double() * gs).sum()).backward()
        return {k: ts[k].grad for k in names}

    g, g_ref = grads(chunk_scan_combined), grads(ssd_recurrence_ref)
    for k in names:
        assert torch.isfinite(g[k]).all(), k
        # gradients sum over the sequence (A, dt_bias, D get up to b*l*p terms): 1e-4 relative
        assert _rel_err(g[k], g_ref[k]) < 1e-4, (k, _rel_err(g[k], g_ref[k]))


# ---------------------------------------------------------------- gated RMSNorm


@pytest.mark.parametrize("norm_before_gate", [True, False])
@pytest.mark.parametrize("group_size", [None, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_z", [True, False])
def test_gated_norm_matches_reference(norm_before_gate, group_size, dtype, with_z):
    gen = torch.Generator().manual_seed(1)
    d = 32
    x = (torch.randn(3, 5, d, generator=gen) * 3).to(dtype)
    z = torch.randn(3, 5, d, generator=gen).to(dtype) if with_z else None
    norm = RMSNormGated(d, eps=1e-5, group_size=group_size, norm_before_gate=norm_before_gate, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d, generator=gen) * 0.5 + 1)
    y = norm(x, z)
    ref = rms_norm_gated_ref(x, norm.weight, z, 1e-5, group_size, norm_before_gate)
    assert y.dtype == dtype and y.shape == x.shape
    tol = NORM_TOL_FP32 if dtype == torch.float32 else NORM_TOL_BF16
    assert _rel_err(y, ref) < tol


def test_gated_norm_groups_and_state_dict():
    norm = RMSNormGated(16, group_size=4, norm_before_gate=False)
    assert list(norm.state_dict()) == ["weight"] and norm.bias is None
    assert torch.equal(norm.weight, torch.ones(16))
    # each group is normalised on its own: scaling one group leaves the others unchanged
    x = torch.randn(2, 16)
    x2 = x.clone()
    x2[:, 4:8] *= 10
    y, y2 = norm(x), norm(x2)
    torch.testing.assert_close(y[:, :4], y2[:, :4])
    torch.testing.assert_close(y[:, 4:8], y2[:, 4:8], rtol=1e-4, atol=1e-5)
    # gradients reach x, z and weight
    x.requires_grad_()
    z = torch.randn(2, 16, requires_grad=True)
    norm(x, z).sum().backward()
    assert x.grad is not None and z.grad is not None and norm.weight.grad is not None
