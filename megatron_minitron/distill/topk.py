"""Top-K teacher distributions and the forward KL against them (issue 22), over
vocab-sharded logits with an explicit `tp_group` (None / size 1 = no communication), in the
layout conventions of loss.py (logits [..., v_local], rank r of tp_group holds global ids
[r * v_local, (r + 1) * v_local)).

A cached teacher token is (ids [K] global, logprobs [K] = log softmax(t/T)[ids], log_rest =
log of the probability mass outside ids). The loss is the KL over K + 1 buckets, the K ids
and "everything else":

    KL_K = sum_k p_k (log p_k - log q_k) + r (log r - log q_rest),  q = softmax(s/T),
    q_rest = 1 - sum_k q_k (computed as the masked sum exp over the other ids, no 1 - x).

With K = the vocabulary it is the full forward KL (r = 0). Its gradient with respect to the
student's logit v is (q_v - p_v) / T for v in ids and q_v (1 - r / q_rest) / T otherwise:
the outside ids share the remaining mass in the student's own proportions.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

from .loss import _all_reduce, _buffers, _check_chunk_size, _chunks, _group_rank, _group_size, _shifted

__all__ = ["teacher_topk", "topk_forward_kl", "topk_kd_loss"]


def _owned(ids: torch.Tensor, v_local: int, tp_group):
    """(local index, owned mask) of global `ids` on this rank's vocabulary slice."""
    local = ids.long() - _group_rank(tp_group) * v_local
    owned = (local >= 0) & (local < v_local)
    return torch.where(owned, local, torch.zeros_like(local)), owned


def _zero_at(e: torch.Tensor, local: torch.Tensor, owned: torch.Tensor) -> None:
    """e[row, local] = 0 where owned, in place. Ids of other ranks point at index 0 with
    factor 1, so a product (not an assignment) is exact whatever the order of duplicates."""
    e.scatter_reduce_(-1, local, (~owned).to(e.dtype), reduce="prod")


@torch.no_grad()
def teacher_topk(logits: torch.Tensor, k: int, temperature: float = 1.0, tp_group=None,
                 chunk_size: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's top-K per token of vocab-sharded `logits` [..., v_local]:
    (ids int64 [..., K] global, descending by probability; logprobs fp32 [..., K] of
    softmax(logits / T); log_rest fp32 [...], the log of the mass outside ids, -inf when K
    is the vocabulary). Identical on every rank of tp_group; per chunk, one all-gather of
    [rows, K] candidates per TP rank and one all-reduce of [rows, 3]."""
    _check_chunk_size(chunk_size)
    v_local = logits.shape[-1]
    tp = _group_size(tp_group)
    if not 1 <= k <= v_local * tp:
        raise ValueError(f"top_k={k} must be between 1 and the vocabulary ({v_local * tp})")
    lead = logits.shape[:-1]
    x2d = logits.reshape(-1, v_local)
    n = x2d.shape[0]
    dtype = torch.promote_types(torch.float32, logits.dtype)
    ids = torch.empty(n, k, dtype=torch.long, device=logits.device)
    lps = torch.empty(n, k, dtype=torch.float32, device=logits.device)
    rest = torch.empty(n, dtype=torch.float32, device=logits.device)
    kl = min(k, v_local)
    (buf,) = _buffers(1, n, chunk_size, v_local, dtype, logits.device)
    offset = _group_rank(tp_group) * v_local
    for a, b in _chunks(n, chunk_size):
        r = b - a
        x = buf[:r].copy_(x2d[a:b])
        if temperature != 1.0:
            x.div_(temperature)
        val, idx = x.topk(kl, dim=-1)  # sorted, descending
        idx = idx + offset
        if tp > 1:
            vals = [torch.empty_like(val) for _ in range(tp)]
            idxs = [torch.empty_like(idx) for _ in range(tp)]
            dist.all_gather(vals, val.contiguous(), group=tp_group)
            dist.all_gather(idxs, idx.contiguous(), group=tp_group)
            val, pick = torch.cat(vals, -1).topk(k, dim=-1)
            idx = torch.cat(idxs, -1).gather(-1, pick)
        local, owned = _owned(idx, v_local, tp_group)
        m = x.amax(dim=-1)
        _all_reduce(m, dist.ReduceOp.MAX, tp_group)
        z = x.sub_(m.unsqueeze(-1)).exp_()  # in place: exp(x / T - m)
        z_all = z.sum(dim=-1)
        _zero_at(z, local, owned)
        sums = torch.stack((z_all, z.sum(dim=-1)), -1)
        _all_reduce(sums, dist.ReduceOp.SUM, tp_group)
        lse = m + sums[:, 0].log()
        ids[a:b] = idx
        lps[a:b] = (val - lse.unsqueeze(-1)).float()
        rest[a:b] = (m + sums[:, 1].log() - lse).float()
    return ids.view(*lead, k), lps.view(*lead, k), rest.view(lead)


class _TopKForwardKL(torch.autograd.Function):
    """Per-token KL_K (module doc) of vocab-sharded student logits against cached top-K
    targets. Forward per chunk: one all-reduce MAX of [rows], one all-reduce SUM of
    [rows, K + 2] (the student's logits at the K ids, its full and its outside-ids sums).
    Backward: local, from the saved log-sum-exp and log q_rest."""

    @staticmethod
    def forward(ctx, student_logits, ids, logprobs, log_rest, temperature, tp_group, chunk_size):
        v_local = student_logits.shape[-1]
        lead = student_logits.shape[:-1]
        s2d = student_logits.reshape(-1, v_local)
        n, k = s2d.shape[0], ids.shape[-1]
        ids2 = ids.reshape(n, k)
        dtype = torch.promote_types(torch.float32, student_logits.dtype)
        lp = logprobs.reshape(n, k).to(dtype)
        lr = log_rest.reshape(n).to(dtype)
        local, owned = _owned(ids2, v_local, tp_group)
        kl = torch.empty(n, dtype=dtype, device=s2d.device)
        saved = torch.empty(n, 2, dtype=dtype, device=s2d.device)  # lse, log q_rest
        (buf,) = _buffers(1, n, chunk_size, v_local, dtype, s2d.device)
        zero = torch.zeros((), dtype=dtype, device=s2d.device)
        for a, b in _chunks(n, chunk_size):
            r = b - a
            rows = s2d[a:b]
            m = rows.amax(dim=-1).to(dtype) / temperature
            _all_reduce(m, dist.ReduceOp.MAX, tp_group)
            x = _shifted(rows, temperature, m, buf[:r])  # s/T - m
            at = torch.where(owned[a:b], x.gather(-1, local[a:b]), zero)  # [r, K]
            e = x.exp_()
            z_all = e.sum(dim=-1)
            _zero_at(e, local[a:b], owned[a:b])
            red = torch.cat((at, z_all[:, None], e.sum(dim=-1)[:, None]), -1)
            _all_reduce(red, dist.ReduceOp.SUM, tp_group)
            log_z = red[:, k].log()
            log_q = red[:, :k] - log_z[:, None]  # log q at the K ids
            log_q_rest = red[:, k + 1].log() - log_z
            p = lp[a:b].exp()
            rest_m = lr[a:b].exp()
            term_rest = torch.where(rest_m > 0, rest_m * (lr[a:b] - log_q_rest), zero)
            kl[a:b] = (p * (lp[a:b] - log_q)).sum(-1) + term_rest
            saved[a:b, 0] = m + log_z
            saved[a:b, 1] = log_q_rest
        ctx.save_for_backward(student_logits, ids2, lp, lr, saved)
        ctx.temperature, ctx.tp_group, ctx.chunk_size = temperature, tp_group, chunk_size
        return kl.view(lead)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        student_logits, ids2, lp, lr, saved = ctx.saved_tensors
        T = ctx.temperature
        v_local = student_logits.shape[-1]
        s2d = student_logits.reshape(-1, v_local)
        n = s2d.shape[0]
        dtype = saved.dtype
        local, owned = _owned(ids2, v_local, ctx.tp_group)
        g = grad_out.reshape(-1).to(dtype) / T
        rest_m = lr.exp()
        # outside the K ids: d/ds_v = q_v (1 - r / q_rest) / T
        ratio = torch.where(rest_m > 0, rest_m / saved[:, 1].exp(), torch.zeros_like(rest_m))
        grad = torch.empty_like(s2d)
        (buf,) = _buffers(1, n, ctx.chunk_size, v_local, dtype, s2d.device)
        for a, b in _chunks(n, ctx.chunk_size):
            r = b - a
            q = _shifted(s2d[a:b], T, saved[a:b, 0], buf[:r]).exp_()
            out = q * (1 - ratio[a:b, None])
            # at the K ids q_v - p_v: add q_v ratio - p_v (0 for ids of other ranks, which
            # all point at index 0: adding 0 leaves it whatever the order)
            fix = torch.where(owned[a:b], q.gather(-1, local[a:b]) * ratio[a:b, None] - lp[a:b].exp(),
                              torch.zeros((), dtype=dtype, device=q.device))
            out.scatter_add_(-1, local[a:b], fix)
            torch.mul(out, g[a:b, None], out=grad[a:b])
        return grad.view_as(student_logits), None, None, None, None, None, None


def topk_forward_kl(student_logits: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor,
                    log_rest: torch.Tensor, temperature: float = 1.0, tp_group=None,
                    chunk_size: Optional[int] = None) -> torch.Tensor:
    """Per-token KL_K (module doc), fp32 of the leading shape, identical on every TP rank.
    `ids` / `logprobs` [..., K] and `log_rest` [...] share the logits' leading shape; the
    targets are constants (no gradient)."""
    _check_chunk_size(chunk_size)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    lead = tuple(student_logits.shape[:-1])
    if tuple(ids.shape[:-1]) != lead or ids.shape != logprobs.shape or tuple(log_rest.shape) != lead:
        raise ValueError(f"cached targets ids {tuple(ids.shape)}, logprobs {tuple(logprobs.shape)}, "
                         f"log_rest {tuple(log_rest.shape)} do not match the logits' tokens {lead}")
    return _TopKForwardKL.apply(student_logits, ids, logprobs.detach(), log_rest.detach(),
                                float(temperature), tp_group, chunk_size)


def topk_kd_loss(student_logits, ids, logprobs, log_rest, labels=None, loss_mask=None,
                 temperature: float = 1.0, alpha_kd: float = 1.0, tp_group=None,
                 chunk_size: Optional[int] = None):
    """kd_loss (loss.py) with the KL term from cached top-K targets: the masked token mean
    of alpha_kd * KL_K + (1 - alpha_kd) * CE. Logits [s, b, v_local]; the targets [s, b, K]
    / [s, b]; labels and loss_mask [b, s] (transposed here, as in kd_loss)."""
    from .loss import kd_loss

    kl = topk_forward_kl(student_logits, ids, logprobs, log_rest, temperature, tp_group, chunk_size)
    mask = (torch.ones_like(kl) if loss_mask is None else loss_mask.transpose(0, 1).to(kl.dtype))
    if mask.shape != kl.shape:
        raise ValueError(f"loss_mask shape {tuple(loss_mask.shape)} is not [b, s] for logits "
                         f"{tuple(student_logits.shape)} ([s, b, v])")
    kd_mean = (kl * mask).sum() / mask.sum().clamp(min=1.0)
    loss, logs = alpha_kd * kd_mean, {"kd": kd_mean.detach()}
    if alpha_kd < 1.0:
        ce, ce_logs = kd_loss(student_logits, None, labels, loss_mask, alpha_kd=0.0,
                              tp_group=tp_group, chunk_size=chunk_size)
        loss = loss + (1.0 - alpha_kd) * ce
        logs.update(ce_logs)
    return loss, logs
