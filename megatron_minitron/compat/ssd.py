"""Pure-PyTorch Mamba2 SSD scan: CPU stand-in for mamba_ssm's Triton kernel.

`chunk_scan_combined` has the signature and semantics of
`mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined` (the forward path that
megatron-core's MambaMixer calls when `use_mamba_mem_eff_path=False`); autograd gives the
backward. `ssd_recurrence_ref` is the plain step-by-step recurrence it is tested against.

Recurrence, per batch b and head h (group g = h // (nheads / ngroups)):
    state_t = exp(dt_t * A_h) * state_{t-1} + dt_t * outer(x_t, B_t)     (p, n)
    y_t     = state_t @ C_t + D_h * x_t                                    (p,)
    y_t     = y_t * silu(z_t)                                              (if z given)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_DEFAULT_DT_LIMIT = (0.0, float("inf"))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # fp32 inside, as the Triton kernel does; float64 inputs stay float64 (gradcheck).
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _prep_dt(dt, dt_bias, dt_softplus, dt_limit, dtype):
    """Bias, softplus, clamp; same order as the kernel. dt (b, l, h) -> (b, l, h) in dtype."""
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)  # threshold 20, like the kernel
    if tuple(dt_limit) != _DEFAULT_DT_LIMIT:
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def _check_unsupported(seq_idx, cu_seqlens, return_varlen_states):
    if seq_idx is not None or cu_seqlens is not None or return_varlen_states:
        raise NotImplementedError(
            "megatron_minitron's CPU SSD scan does not support packed sequences "
            "(seq_idx / cu_seqlens / return_varlen_states); install mamba_ssm on a GPU node, "
            "or feed unpacked batches."
        )


def _segsum_exp(a: torch.Tensor) -> torch.Tensor:
    """a (..., T) -> (..., T, T) with out[..., i, j] = exp(sum_{k=j+1..i} a_k) for i >= j, else 0.

    Summed over a masked copy (not as a difference of two cumsums) so long chunks do not
    lose precision; the upper triangle is -inf before exp, so no inf/NaN in forward or grad.
    """
    T = a.shape[-1]
    rep = a.unsqueeze(-1).expand(*a.shape, T)  # rep[..., i, j] = a_i
    strict = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)
    seg = torch.cumsum(rep.masked_fill(~strict, 0.0), dim=-2)  # sum_{j<k<=i} a_k
    keep = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device))
    return torch.exp(seg.masked_fill(~keep, float("-inf")))


def chunk_scan_combined(
    x,
    dt,
    A,
    B,
    C,
    chunk_size,
    D=None,
    z=None,
    dt_bias=None,
    initial_states=None,
    seq_idx=None,
    cu_seqlens=None,
    dt_softplus=False,
    dt_limit=_DEFAULT_DT_LIMIT,
    return_final_states=False,
    return_varlen_states=False,
):
    """Chunked SSD scan (Mamba2 paper, "SSD minimal" algorithm), vectorised over time.

    x (b, l, h, p), dt (b, l, h), A (h,), B/C (b, l, g, n), D (h,) or (h, p), z (b, l, h, p),
    dt_bias (h,), initial_states (b, h, p, n).
    Returns y (b, l, h, p) in x.dtype, or (y, final_states (b, h, p, n) fp32).
    """
    _check_unsupported(seq_idx, cu_seqlens, return_varlen_states)
    bsz, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    assert nheads % ngroups == 0, "nheads must be a multiple of ngroups"
    r = nheads // ngroups  # heads per group
    T = int(chunk_size)
    ct = _compute_dtype(x)

    dt = _prep_dt(dt, dt_bias, dt_softplus, dt_limit, ct)
    xf, Bf, Cf = x.to(ct), B.to(ct), C.to(ct)

    # Pad time to a multiple of T with dt = 0: padded steps neither decay nor add to the
    # state, so the final state is the state after the last real token.
    nchunks = math.ceil(seqlen / T) if seqlen > 0 else 0
    pad = nchunks * T - seqlen
    if pad:
        xf = F.pad(xf, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        Bf = F.pad(Bf, (0, 0, 0, 0, 0, pad))
        Cf = F.pad(Cf, (0, 0, 0, 0, 0, pad))

    # chunked views; heads split as (g, r) so B/C are never copied per head
    xc = xf.reshape(bsz, nchunks, T, ngroups, r, headdim)
    dtc = dt.reshape(bsz, nchunks, T, ngroups, r)
    Bc = Bf.reshape(bsz, nchunks, T, ngroups, dstate)
    Cc = Cf.reshape(bsz, nchunks, T, ngroups, dstate)
    dA = dtc * A.to(ct).reshape(ngroups, r)  # (b, c, T, g, r), <= 0 for A < 0
    dA_cum = torch.cumsum(dA, dim=2)  # (b, c, T, g, r)
    dtx = xc * dtc.unsqueeze(-1)  # dt_j * x_j  (b, c, T, g, r, p)

    # 1. within-chunk (diagonal blocks): y_i += sum_{j<=i} (C_i.B_j) exp(cumA_i - cumA_j) dt_j x_j
    L = _segsum_exp(dA.permute(0, 1, 3, 4, 2))  # (b, c, g, r, T, T)
    CB = torch.einsum("bcign,bcjgn->bcgij", Cc, Bc)  # (b, c, g, T, T), shared by the group's heads
    y = torch.einsum("bcgrij,bcjgrp->bcigrp", L * CB.unsqueeze(3), dtx)

    # 2. state each chunk adds by its end: sum_j exp(cumA_last - cumA_j) dt_j x_j B_j^T
    decay_to_end = torch.exp(dA_cum[:, :, -1:] - dA_cum)  # (b, c, T, g, r)
    chunk_states = torch.einsum("bcjgn,bcjgrp->bcgrpn", Bc, dtx * decay_to_end.unsqueeze(-1))

    # 3. pass states between chunks (a scan over chunks, written as a (c+1)x(c+1) decay matrix)
    if initial_states is None:
        init = chunk_states.new_zeros(bsz, 1, ngroups, r, headdim, dstate)
    else:
        init = initial_states.to(ct).reshape(bsz, 1, ngroups, r, headdim, dstate)
    states = torch.cat([init, chunk_states], dim=1)  # (b, c+1, g, r, p, n)
    chunk_decay = F.pad(dA_cum[:, :, -1].permute(0, 2, 3, 1), (1, 0))  # (b, g, r, c+1)
    Lc = _segsum_exp(chunk_decay)  # (b, g, r, c+1, c+1)
    states = torch.einsum("bgrzc,bcgrpn->bzgrpn", Lc, states)  # state entering chunk z
    final_states = states[:, -1]  # (b, g, r, p, n)
    states = states[:, :-1]

    # 4. contribution of the entering state: y_i += exp(cumA_i) C_i . state
    y = y + torch.einsum("bcign,bcgrpn->bcigrp", Cc, states) * torch.exp(dA_cum).unsqueeze(-1)

    y = y.reshape(bsz, nchunks * T, nheads, headdim)[:, :seqlen]
    if D is not None:
        Df = D.to(ct)
        y = y + x.to(ct) * (Df if Df.dim() == 2 else Df.unsqueeze(-1))
    if z is not None:
        y = y * F.silu(z.to(ct))
    y = y.to(x.dtype)
    if not return_final_states:
        return y
    # final states stay in the compute dtype (fp32, as the kernel returns them)
    return y, final_states.reshape(bsz, nheads, headdim, dstate)


def ssd_recurrence_ref(
    x,
    dt,
    A,
    B,
    C,
    chunk_size=None,
    D=None,
    z=None,
    dt_bias=None,
    initial_states=None,
    seq_idx=None,
    cu_seqlens=None,
    dt_softplus=False,
    dt_limit=_DEFAULT_DT_LIMIT,
    return_final_states=False,
    return_varlen_states=False,
):
    """Reference: the recurrence one time step at a time, in float64. chunk_size is ignored.

    Same arguments and returns as chunk_scan_combined, but y and final_states are float64.
    """
    _check_unsupported(seq_idx, cu_seqlens, return_varlen_states)
    f64 = torch.float64
    bsz, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    r = nheads // ngroups
    dt = _prep_dt(dt, dt_bias, dt_softplus, dt_limit, f64)
    xd, Ad = x.to(f64), A.to(f64)
    # broadcast B/C from groups to heads: head h reads group h // r
    Bh = B.to(f64).repeat_interleave(r, dim=2)  # (b, l, h, n)
    Ch = C.to(f64).repeat_interleave(r, dim=2)
    if initial_states is None:
        state = torch.zeros(bsz, nheads, headdim, dstate, dtype=f64, device=x.device)
    else:
        state = initial_states.to(f64)
    ys = []
    for t in range(seqlen):
        decay = torch.exp(dt[:, t] * Ad)  # (b, h)
        inp = (dt[:, t, :, None] * xd[:, t])[..., None] * Bh[:, t, :, None, :]  # (b, h, p, n)
        state = decay[..., None, None] * state + inp
        ys.append((state * Ch[:, t, :, None, :]).sum(-1))  # (b, h, p)
    y = torch.stack(ys, dim=1) if ys else xd.new_zeros(bsz, 0, nheads, headdim)
    if D is not None:
        Dd = D.to(f64)
        y = y + xd * (Dd if Dd.dim() == 2 else Dd[:, None])
    if z is not None:
        zd = z.to(f64)
        y = y * zd * torch.sigmoid(zd)
    return (y, state) if return_final_states else y
