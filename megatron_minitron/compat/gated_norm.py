"""Pure-PyTorch gated RMSNorm: CPU stand-in for mamba_ssm.ops.triton.layernorm_gated.RMSNorm.

Mamba2 normalises the scan output y (..., d_inner) per group of d_inner / ngroups channels
(so that TP sharding by group gives the same result) and gates it with silu(z):
    norm_before_gate=True:  rmsnorm(y) * weight * silu(z)
    norm_before_gate=False: rmsnorm(y * silu(z)) * weight       (megatron's MambaMixer default)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _rms_norm_gated(x, weight, z, eps, group_size, norm_before_gate):
    dtype = x.dtype
    ct = torch.float64 if dtype == torch.float64 else torch.float32  # fp32 inside
    x = x.to(ct)
    if z is not None and not norm_before_gate:
        x = x * F.silu(z.to(ct))
    d = x.shape[-1]
    gs = d if group_size is None else group_size
    assert d % gs == 0, f"hidden size {d} is not a multiple of group_size {gs}"
    xg = x.reshape(*x.shape[:-1], d // gs, gs)  # (..., groups, group_size)
    xg = xg * torch.rsqrt(xg.square().mean(-1, keepdim=True) + eps)
    out = xg.reshape(x.shape) * weight.to(ct)
    if z is not None and norm_before_gate:
        out = out * F.silu(z.to(ct))
    return out.to(dtype)


class RMSNormGated(torch.nn.Module):
    """Drop-in for mamba_ssm's gated RMSNorm: same constructor, `weight` only in state_dict."""

    def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=True, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)  # mamba_ssm's RMSNorm has no bias
        self.reset_parameters()

    def reset_parameters(self):
        torch.nn.init.ones_(self.weight)

    def forward(self, x, z=None):
        """x, z (..., hidden_size) -> (..., hidden_size) in x.dtype."""
        return _rms_norm_gated(x, self.weight, z, self.eps, self.group_size, self.norm_before_gate)


def rms_norm_gated_ref(x, weight, z=None, eps=1e-5, group_size=None, norm_before_gate=True):
    """Reference: float64, one group at a time. Returns float64."""
    x = x.double()
    w = weight.double()
    zd = z.double() if z is not None else None
    gate = (zd * torch.sigmoid(zd)) if zd is not None else None
    if gate is not None and not norm_before_gate:
        x = x * gate
    d = x.shape[-1]
    gs = d if group_size is None else group_size
    pieces = []
    for start in range(0, d, gs):
        xs = x[..., start : start + gs]
        rms = torch.sqrt((xs * xs).sum(-1, keepdim=True) / gs + eps)
        pieces.append(xs / rms * w[start : start + gs])
    out = torch.cat(pieces, dim=-1)
    if gate is not None and norm_before_gate:
        out = out * gate
    return out
