"""Forward-KL logit distillation loss over vocab-sharded logits (DESIGN.md sec. 5).

Layout conventions (Megatron's):
  * logits are ``[s, b, v_local]`` (sequence first), any float dtype; the math runs in fp32
    (fp64 for fp64 inputs, which the parity tests use) and per-token results come back in
    that dtype; with tensor parallelism each TP rank
    holds a contiguous, equal-sized slice of the vocabulary: rank r of ``tp_group`` holds
    global ids ``[r * v_local, (r + 1) * v_local)`` (Megatron's ``VocabUtility`` split).
    Any leading shape works; only the last dim is the vocabulary.
  * ``labels`` and ``loss_mask`` are ``[b, s]`` (batch first, as the data loader yields
    them); :func:`kd_loss` transposes them to ``[s, b]`` to match the logits.

Parallelism enters only through the explicit ``tp_group`` argument (DESIGN.md sec. 8.2):
``tp_group=None`` or a size-1 group means "no communication" -- NOTE: unlike
``torch.distributed`` convention, ``None`` does NOT mean the default world group. Nothing here
reads megatron's global parallel state. Only per-token statistics ([n] or [n, 2] floats)
are all-reduced; full-vocab logits are never gathered.

Temperature convention: :func:`vocab_parallel_forward_kl` returns the PLAIN
KL(softmax(t/T) || softmax(s/T)) at temperature T. It does NOT multiply by T^2 (Hinton's
gradient-scale correction); callers that want it scale the result themselves.

Memory: both autograd functions save only the inputs (references, no copy) plus one or
two fp32 log-sum-exp values per token, and recompute the softmaxes chunk by chunk in
backward. Tokens are processed ``chunk_size`` rows at a time, so the temporary memory is a
few ``chunk_size x v_local`` fp32 buffers (3 in the KL forward, 2 in backward) instead of
several ``s*b x v_local`` ones. The only full-size allocation is the returned gradient.

Reference twins (:func:`forward_kl_reference`, :func:`cross_entropy_reference`) are the
plain-autograd full-vocab versions used by the parity tests.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = [
    "vocab_parallel_forward_kl",
    "vocab_parallel_cross_entropy",
    "kd_loss",
    "forward_kl_reference",
    "cross_entropy_reference",
]


# --------------------------------------------------------------------------- helpers


def _group_size(group) -> int:
    """World size of ``group``; ``None`` means no communication (size 1)."""
    if group is None:
        return 1
    return dist.get_world_size(group=group)


def _group_rank(group) -> int:
    if group is None:
        return 0
    return dist.get_rank(group=group)


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    """In-place all-reduce over ``group``; a no-op for None / size-1 groups."""
    if _group_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _chunks(n: int, chunk_size: Optional[int]):
    """Yield (start, end) row ranges of at most ``chunk_size`` rows (None = one chunk)."""
    if chunk_size is None or chunk_size >= n:
        yield 0, n
        return
    for start in range(0, n, chunk_size):
        yield start, min(start + chunk_size, n)


def _check_chunk_size(chunk_size: Optional[int]) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def _check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.dim() < 1 or teacher_logits.dim() < 1:
        raise ValueError("logits need at least one (vocabulary) dimension")
    vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
    if vt != vs:
        raise ValueError(
            f"teacher vocab {vt} != student vocab {vs}; distillation needs a shared vocabulary"
            " (sizes are per TP rank when the logits are vocab-sharded)"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits shape {tuple(student_logits.shape)} != teacher logits shape "
            f"{tuple(teacher_logits.shape)}"
        )


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32 for half/bf16/fp32 inputs; fp64 inputs stay fp64 (used by the fp64 parity tests)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _buffers(count: int, n: int, chunk_size: Optional[int], v: int, dtype, device):
    """``count`` scratch buffers of [min(chunk_size, n), v], allocated once and reused by every
    chunk (fresh per-chunk allocations of this size cost page faults on CPU)."""
    rows = n if chunk_size is None else min(chunk_size, n)
    return [torch.empty(rows, v, dtype=dtype, device=device) for _ in range(count)]


def _shifted(rows: torch.Tensor, temperature: float, shift: torch.Tensor, out: torch.Tensor):
    """out = rows / T - shift[:, None], in ``out``'s dtype (one pass when T == 1). ``rows``
    may be bf16/fp16: the math promotes to ``out``'s dtype. Never modifies ``rows``."""
    if temperature == 1.0:
        return torch.sub(rows, shift.unsqueeze(-1), out=out)  # promotes: shift has out's dtype
    if rows.dtype != out.dtype:  # bf16 / T would round in bf16: upcast first
        rows = out.copy_(rows)
    return torch.div(rows, temperature, out=out).sub_(shift.unsqueeze(-1))


def _row_max(rows: torch.Tensor, temperature: float, dtype) -> torch.Tensor:
    # max(x / T) == round(max(x) / T) for T > 0 (rounding is monotone), so this is exact.
    return rows.amax(dim=-1).to(dtype) / temperature


# --------------------------------------------------------------------------- forward KL


class _VocabParallelForwardKL(torch.autograd.Function):
    """KL(p_t || p_s) per token with p = softmax(logits / T) over a vocab-sharded last dim.

    Forward per chunk (rows n, local vocab v), 3 comm rounds of [n]/[n, 2] tensors:
      1. m = max over the global vocab of s/T and t/T       (all-reduce MAX of [n, 2])
      2. Z = sum exp(x/T - m) over the global vocab            (all-reduce SUM of [n, 2])
      3. KL = sum_v p_t * (log p_t - log p_s), partial sums    (all-reduce SUM of [n])
    Backward (all local, no comm): dKL/ds = (p_s - p_t) / T, times grad_out per token.
    The teacher gets no gradient (it is treated as a constant).
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, temperature, tp_group, chunk_size):
        v_local = student_logits.shape[-1]
        lead_shape = student_logits.shape[:-1]
        s2d = student_logits.reshape(-1, v_local)  # view when contiguous (Megatron's case)
        t2d = teacher_logits.reshape(-1, v_local)
        n = s2d.shape[0]
        device = student_logits.device
        dtype = _compute_dtype(student_logits, teacher_logits)

        kl = torch.empty(n, dtype=dtype, device=device)
        # Log-sum-exp of s/T and t/T per token (column 0: student, 1: teacher), for backward.
        lse = torch.empty(n, 2, dtype=dtype, device=device)

        # Peak temporaries: 3 [chunk, v_local] buffers here, 2 in backward (see module doc).
        buf_s, buf_t, buf_e = _buffers(3, n, chunk_size, v_local, dtype, device)
        for start, end in _chunks(n, chunk_size):
            r = end - start
            s_rows, t_rows = s2d[start:end], t2d[start:end]
            m = torch.stack(
                (_row_max(s_rows, temperature, dtype), _row_max(t_rows, temperature, dtype)), -1
            )  # [r, 2]
            _all_reduce(m, dist.ReduceOp.MAX, tp_group)
            s = _shifted(s_rows, temperature, m[:, 0], buf_s[:r])  # s/T - m_s
            t = _shifted(t_rows, temperature, m[:, 1], buf_t[:r])  # t/T - m_t
            e = torch.exp(s, out=buf_e[:r])
            z_s = e.sum(dim=-1)
            torch.exp(t, out=e)  # e = exp(t/T - m_t), kept for p_t
            z_t = e.sum(dim=-1)
            z = torch.stack((z_s, z_t), dim=-1)  # [r, 2]
            _all_reduce(z, dist.ReduceOp.SUM, tp_group)
            log_z = torch.log(z)
            # log p_t - log p_s = (t - s) + c with c = log Z_s - log Z_t (shifted units), so
            # the local partial sum_v p_t (log p_t - log p_s) = (sum_v e (t - s) + c z_t) / Z_t.
            c = log_z[:, 0] - log_z[:, 1]
            # In place (t -= s; t *= e): linalg.vecdot would allocate a 4th full-chunk temp.
            partial = (t.sub_(s).mul_(e).sum(dim=-1) + c * z_t) / z[:, 1]
            _all_reduce(partial, dist.ReduceOp.SUM, tp_group)
            kl[start:end] = partial
            lse[start:end] = m + log_z
        del buf_s, buf_t, buf_e

        ctx.save_for_backward(student_logits, teacher_logits, lse)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        return kl.view(lead_shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        student_logits, teacher_logits, lse = ctx.saved_tensors
        temperature, chunk_size = ctx.temperature, ctx.chunk_size
        v_local = student_logits.shape[-1]
        s2d = student_logits.reshape(-1, v_local)
        t2d = teacher_logits.reshape(-1, v_local)
        dtype = lse.dtype
        g = grad_out.reshape(-1).to(dtype) / temperature  # [n]
        grad = torch.empty_like(s2d)  # the only full-size allocation (in the student's dtype)
        n = s2d.shape[0]
        buf_s, buf_t = _buffers(2, n, chunk_size, s2d.shape[-1], dtype, s2d.device)
        for start, end in _chunks(n, chunk_size):
            r = end - start
            p_s = _shifted(s2d[start:end], temperature, lse[start:end, 0], buf_s[:r]).exp_()
            p_t = _shifted(t2d[start:end], temperature, lse[start:end, 1], buf_t[:r]).exp_()
            torch.mul(p_s.sub_(p_t), g[start:end].unsqueeze(-1), out=grad[start:end])
        del buf_s, buf_t
        return grad.view_as(student_logits), None, None, None, None


def vocab_parallel_forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    tp_group=None,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Per-token forward KL(softmax(t/T) || softmax(s/T)) over vocab-sharded logits.

    Args:
      student_logits, teacher_logits: ``[s, b, v_local]`` (any leading shape), same shape and
        dtype-agnostic (computed in fp32). Each rank of ``tp_group`` holds a contiguous slice of
        the vocabulary. The teacher is treated as a constant (no gradient flows to it).
      temperature: T > 0. The result is the plain KL at temperature T, NOT multiplied by T^2.
      tp_group: process group over which the vocabulary is sharded; None or a size-1 group =
        no communication (NOT the default world group).
      chunk_size: number of flattened tokens processed at a time (None = all). Bounds the
        temporaries to a few ``chunk_size x v_local`` fp32 buffers.

    Returns:
      fp32 (fp64 for fp64 inputs) tensor of the leading shape (``[s, b]``), identical on
      every TP rank. Backward
      gives d/ds = (softmax(s/T) - softmax(t/T)) / T * grad_out, computed locally.
    """
    _check_logits(student_logits, teacher_logits)
    _check_chunk_size(chunk_size)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _VocabParallelForwardKL.apply(
        student_logits, teacher_logits.detach(), float(temperature), tp_group, chunk_size
    )


# --------------------------------------------------------------------------- cross entropy


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross entropy over vocab-sharded logits with an explicit group (Megatron's algorithm,
    without reading global parallel state and without modifying the input in place).

    Labels are global vocab ids; the owning rank contributes the target logit, the others 0.
    """

    @staticmethod
    def forward(ctx, logits, labels, tp_group, chunk_size):
        v_local = logits.shape[-1]
        x2d = logits.reshape(-1, v_local)
        n = x2d.shape[0]
        vocab_start = _group_rank(tp_group) * v_local
        # Local target index and ownership mask ([n]); out-of-range ids are owned by no rank.
        local_target = labels.reshape(-1).to(torch.long) - vocab_start
        owned = (local_target >= 0) & (local_target < v_local)
        local_target = torch.where(owned, local_target, torch.zeros_like(local_target))

        dtype = _compute_dtype(logits)
        loss = torch.empty(n, dtype=dtype, device=logits.device)
        lse = torch.empty(n, dtype=dtype, device=logits.device)
        (buf,) = _buffers(1, n, chunk_size, v_local, dtype, logits.device)
        for start, end in _chunks(n, chunk_size):
            r = end - start
            m = _row_max(x2d[start:end], 1.0, dtype)
            _all_reduce(m, dist.ReduceOp.MAX, tp_group)
            x = _shifted(x2d[start:end], 1.0, m, buf[:r])
            rows = torch.arange(r, device=x.device)
            pred = x[rows, local_target[start:end]] * owned[start:end]  # shifted target logit
            z_pred = torch.stack((x.exp_().sum(dim=-1), pred), dim=-1)  # [r, 2]
            _all_reduce(z_pred, dist.ReduceOp.SUM, tp_group)
            log_z = torch.log(z_pred[:, 0])
            loss[start:end] = log_z - z_pred[:, 1]
            lse[start:end] = m + log_z
        del buf
        ctx.save_for_backward(logits, local_target, owned, lse)
        ctx.chunk_size = chunk_size
        return loss.view(logits.shape[:-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        logits, local_target, owned, lse = ctx.saved_tensors
        v_local = logits.shape[-1]
        x2d = logits.reshape(-1, v_local)
        g = grad_out.reshape(-1).to(lse.dtype)
        grad = torch.empty_like(x2d)
        n = x2d.shape[0]
        (buf,) = _buffers(1, n, ctx.chunk_size, v_local, lse.dtype, x2d.device)
        for start, end in _chunks(n, ctx.chunk_size):
            r = end - start
            p = _shifted(x2d[start:end], 1.0, lse[start:end], buf[:r]).exp_()
            rows = torch.arange(r, device=p.device)
            p[rows, local_target[start:end]] -= owned[start:end].to(p.dtype)
            torch.mul(p, g[start:end].unsqueeze(-1), out=grad[start:end])
        del buf
        return grad.view_as(logits), None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    tp_group=None,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Per-token cross entropy (temperature 1) of vocab-sharded ``logits`` [s, b, v_local]
    against global-id ``labels`` [s, b] (same leading shape as the logits). fp32 result
    (fp64 for fp64 logits),
    identical on every rank of ``tp_group`` (None / size 1 = no communication). Labels outside
    [0, V) give a meaningless loss: mask those tokens out. Does not modify ``logits``
    (unlike megatron's version, which works in place on fp32 input)."""
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} != logits leading shape {tuple(logits.shape[:-1])}"
        )
    _check_chunk_size(chunk_size)
    return _VocabParallelCrossEntropy.apply(logits, labels, tp_group, chunk_size)


# --------------------------------------------------------------------------- combined loss


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: Optional[torch.Tensor],
    labels: Optional[torch.Tensor] = None,
    loss_mask: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    alpha_kd: float = 1.0,
    tp_group=None,
    chunk_size: Optional[int] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Masked token mean of ``alpha_kd * KL_T + (1 - alpha_kd) * CE``.

    Args:
      student_logits, teacher_logits: ``[s, b, v_local]`` vocab-sharded over ``tp_group``.
        ``teacher_logits`` may be None only when ``alpha_kd == 0``.
      labels: ``[b, s]`` global token ids (Megatron data layout; transposed here to [s, b]).
        Required when ``alpha_kd < 1``.
      loss_mask: ``[b, s]`` (0/1 or weights), transposed to [s, b]; None = all tokens.
      temperature: KL temperature; plain KL at T (no T^2 factor, see module doc). CE is at T=1.
      alpha_kd: 1 = pure KD (CE is not computed), 0 = CE only (the paper's baseline, KL is not
        computed), otherwise the convex mix.

    Returns:
      (loss, logs): ``loss`` is an fp32 (fp64) scalar, identical on all TP ranks; mean over this
      rank's tokens (sum(mask * per_token) / max(sum(mask), 1)) -- averaging over data-parallel
      ranks is the caller's job. ``logs`` holds detached masked means of the computed terms
      only: 'kd' when alpha_kd > 0, 'ce' when alpha_kd < 1.
    """
    if not 0.0 <= alpha_kd <= 1.0:
        raise ValueError(f"alpha_kd must be in [0, 1], got {alpha_kd}")
    need_kd, need_ce = alpha_kd > 0.0, alpha_kd < 1.0
    if need_kd:
        if teacher_logits is None:
            raise ValueError("teacher_logits are required when alpha_kd > 0")
        _check_logits(student_logits, teacher_logits)
    if need_ce and labels is None:
        raise ValueError("labels are required when alpha_kd < 1")

    token_shape = student_logits.shape[:-1]  # [s, b]
    if loss_mask is None:
        mask = torch.ones(token_shape, dtype=torch.float32, device=student_logits.device)
    else:
        mask = loss_mask.transpose(0, 1).to(torch.float32)  # [b, s] -> [s, b]
        if mask.shape != token_shape:
            raise ValueError(
                f"loss_mask shape {tuple(loss_mask.shape)} is not [b, s] for logits "
                f"{tuple(student_logits.shape)} ([s, b, v])"
            )
    denom = mask.sum().clamp(min=1.0)

    loss = torch.zeros((), dtype=_compute_dtype(student_logits), device=student_logits.device)
    logs: Dict[str, torch.Tensor] = {}
    if need_kd:
        kl = vocab_parallel_forward_kl(
            student_logits, teacher_logits, temperature, tp_group=tp_group, chunk_size=chunk_size
        )
        kd_mean = (kl * mask).sum() / denom
        loss = loss + alpha_kd * kd_mean
        logs["kd"] = kd_mean.detach()
    if need_ce:
        labels_sb = labels.transpose(0, 1)  # [b, s] -> [s, b]
        if labels_sb.shape != token_shape:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} is not [b, s] for logits "
                f"{tuple(student_logits.shape)} ([s, b, v])"
            )
        ce = vocab_parallel_cross_entropy(
            student_logits, labels_sb, tp_group=tp_group, chunk_size=chunk_size
        )
        ce_mean = (ce * mask).sum() / denom
        loss = loss + (1.0 - alpha_kd) * ce_mean
        logs["ce"] = ce_mean.detach()
    return loss, logs


# --------------------------------------------------------------------------- reference twins


def forward_kl_reference(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Full-vocab, plain-autograd twin of :func:`vocab_parallel_forward_kl` (in input dtype)."""
    return F.kl_div(
        F.log_softmax(student_logits / temperature, dim=-1),
        F.log_softmax(teacher_logits.detach() / temperature, dim=-1),
        log_target=True,
        reduction="none",
    ).sum(-1)


def cross_entropy_reference(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Full-vocab twin of :func:`vocab_parallel_cross_entropy`: per-token CE, leading shape."""
    v = logits.shape[-1]
    return F.cross_entropy(logits.reshape(-1, v), labels.reshape(-1), reduction="none").view(
        labels.shape
    )
