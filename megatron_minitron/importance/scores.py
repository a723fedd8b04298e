"""Pure importance-score functions (Minitron-SSM, paper sec. 3.1-3.4; DESIGN.md sec. 2).

Everything here is a function of tensors: no hooks, no modules, no process groups. Hooks
call the *accumulator increment* functions (`aggregate_batch`, `flap_moments`,
`kl_next_token(..., reduction="sum")`) on each calibration batch and add the results;
data-parallel ranks all-reduce (SUM) the same accumulators; the *finalize / score*
functions below then turn the accumulated tensors into scores. All arithmetic is fp32
(inputs of any float dtype are upcast first), whatever the model's dtype.

Layout conventions:
- Activations are Megatron layout, sequence first: ``[seq, batch, *feat]``.
- Mamba per-(head, channel) tensors are ``[nheads, headdim]`` with the flat d_inner index
  ``h * headdim + p`` (the layout of the ``x``/``z`` parts of ``in_proj`` and of the
  ``out_proj`` input); `as_head_matrix` reshapes a flat ``[d_inner]`` vector.
- Higher score = more important, for every function in this module.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "aggregate_batch",
    "finalize",
    "as_head_matrix",
    "mamba_channel_scores",
    "mamba_head_scores",
    "flap_moments",
    "flap_variance",
    "flap_column_scores",
    "flap_column_scores_from_norms",
    "flap_head_scores",
    "flap_channel_scores",
    "ffn_neuron_scores",
    "attention_head_scores",
    "embedding_channel_scores",
    "router_increment",
    "segment_sum",
    "token_multiplicity",
    "expert_scores",
    "expert_ffn_scores",
    "kl_next_token",
    "block_influence",
]


def _f32(x: Tensor) -> Tensor:
    return x.detach().to(torch.float32)


def _leading_mask(
    act_shape: torch.Size, mask: Tensor | None, token_dim: int, batch_dim: int
) -> Tensor | None:
    """Mask of shape ``[seq, batch]`` (already moved to the canonical order), fp32."""
    if mask is None:
        return None
    seq, batch = act_shape[token_dim], act_shape[batch_dim]
    # The mask is given in the same relative order as act's token/batch dims.
    expected = (seq, batch) if token_dim < batch_dim else (batch, seq)
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match the activation's "
            f"token/batch dims {expected} (order as in act; Megatron's loss_mask is "
            f"[batch, seq], transpose it for [seq, batch, ...] activations)"
        )
    m = _f32(mask)
    return m if token_dim < batch_dim else m.transpose(0, 1)


# --------------------------------------------------------------------------- aggregation


def aggregate_batch(
    act: Tensor,
    mask: Tensor | None = None,
    *,
    token_dim: int = 0,
    batch_dim: int = 1,
) -> Tensor:
    """Accumulator increment for activation scores (paper eq. 19-20, 26, 27).

    Per sample, mean of ``|act|`` over the sequence; then the SUM OF SQUARES of those
    means over the batch. Increments add across batches and data-parallel ranks;
    `finalize` (sqrt) turns the total into the L2 over all calibration samples.

    Args:
        act: ``[seq, batch, *feat]`` (default dims) any float dtype.
        mask: optional ``[seq, batch]`` (same relative order as act's token/batch dims),
            nonzero = real token. Masked tokens are excluded from the per-sample mean.
            A sample with no real token contributes 0.
        token_dim, batch_dim: which dims of ``act`` are sequence and batch
            (e.g. ``token_dim=1, batch_dim=0`` for ``[batch, seq, *feat]``).

    Returns:
        ``[*feat]`` fp32 sum over the batch of (per-sample mean |act|)^2.
    """
    if act.dim() < 2:
        raise ValueError(f"act must have >= 2 dims [seq, batch, *feat], got {tuple(act.shape)}")
    token_dim %= act.dim()
    batch_dim %= act.dim()
    if token_dim == batch_dim:
        raise ValueError(f"token_dim and batch_dim must differ, both are {token_dim}")
    m = _leading_mask(act.shape, mask, token_dim, batch_dim)
    a = _f32(act).movedim((token_dim, batch_dim), (0, 1)).abs()  # [s, b, *feat]
    if m is not None:
        m = m.to(a.device)
    feat_ones = (1,) * (a.dim() - 2)
    if m is None:
        per_sample = a.mean(dim=0)  # [b, *feat]
    else:
        w = m.reshape(*m.shape, *feat_ones)  # [s, b, 1...]
        count = m.sum(dim=0).clamp_min(1.0).reshape(m.shape[1], *feat_ones)  # [b, 1...]
        per_sample = (a * w).sum(dim=0) / count
    return per_sample.pow(2).sum(dim=0)


def finalize(sumsq: Tensor) -> Tensor:
    """L2 over the batch from accumulated sums of squares: ``sqrt(sumsq)`` in fp32."""
    return _f32(sumsq).clamp_min(0.0).sqrt()


# --------------------------------------------------------------------------- Mamba


def as_head_matrix(scores: Tensor, nheads: int) -> Tensor:
    """Reshape a flat ``[d_inner]`` (index ``h*headdim + p``) to ``[nheads, headdim]``."""
    if scores.dim() != 1 or scores.numel() % nheads:
        raise ValueError(
            f"expected a flat [d_inner] tensor with d_inner divisible by nheads={nheads}, "
            f"got shape {tuple(scores.shape)}"
        )
    return _f32(scores).reshape(nheads, -1)


def _check_head_matrix(a: Tensor) -> Tensor:
    if a.dim() != 2:
        raise ValueError(
            f"expected [nheads, headdim] scores, got shape {tuple(a.shape)} "
            "(use as_head_matrix for a flat [d_inner] vector)"
        )
    return _f32(a)


def mamba_channel_scores(a: Tensor) -> Tensor:
    """Head-channel scores (paper eq. 19-21).

    Args:
        a: finalized per-(head, channel) score ``[nheads, headdim]``.
    Returns:
        ``[headdim]``: ``s_p = || a[:, p] ||_2`` (L2 over heads), fp32.
    """
    return _check_head_matrix(a).norm(dim=0)


def mamba_head_scores(a: Tensor, kept_channels: Tensor | Sequence[int] | None = None) -> Tensor:
    """Head scores restricted to the kept channels (paper eq. 22).

    Args:
        a: finalized per-(head, channel) score ``[nheads, headdim]``.
        kept_channels: indices into headdim (the shared channel keep set, eq. 21);
            ``None`` = all channels.
    Returns:
        ``[nheads]``: ``s_h = || a[h, kept_channels] ||_2``, fp32.
    """
    a = _check_head_matrix(a)
    if kept_channels is not None:
        idx = torch.as_tensor(kept_channels, dtype=torch.long).reshape(-1)
        if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= a.shape[1]:
            raise ValueError(
                f"kept_channels must be a non-empty set of indices in [0, {a.shape[1]}), "
                f"got {idx.tolist()}"
            )
        a = a.index_select(1, idx)
    return a.norm(dim=1)


# --------------------------------------------------------------------------- FLAP (sec 3.3)


def flap_moments(
    y: Tensor,
    mask: Tensor | None = None,
    *,
    token_dim: int = 0,
    batch_dim: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """Accumulator increment for FLAP: token count, sum, sum of squares per column.

    Args:
        y: out_proj input ``[seq, batch, d_inner]`` (default dims; any number of
            trailing feature dims is accepted).
        mask: optional ``[seq, batch]`` (order as act's token/batch dims), nonzero = real.
    Returns:
        ``(count, s1, s2)``: ``count`` scalar (number of real tokens), ``s1`` and ``s2``
        ``[*feat]`` = sum over real tokens of ``y`` and ``y**2``. All three add across
        batches and data-parallel ranks; variance comes at the end (`flap_variance`).

    All three are float64, the one exception to "fp32 everywhere": the variance is
    ``s2/n - (s1/n)^2``, a difference of two large, nearly equal numbers when
    ``|mean| >> std``, and fp32 sums leave an error of ~1e-7 * mean^2 in it (a constant
    column would score > 0). ``y`` is upcast to float64 (its squares are then exact);
    call this per micro-batch to bound the transient copy.
    """
    if y.dim() < 2:
        raise ValueError(f"y must have >= 2 dims [seq, batch, *feat], got {tuple(y.shape)}")
    token_dim %= y.dim()
    batch_dim %= y.dim()
    m = _leading_mask(y.shape, mask, token_dim, batch_dim)
    v = y.detach().double().movedim((token_dim, batch_dim), (0, 1)).flatten(0, 1)  # [tok, *f]
    if m is not None:
        v = v[(m != 0).flatten().to(v.device)]  # real tokens only
    count = torch.tensor(float(v.shape[0]), dtype=torch.float64, device=v.device)
    return count, v.sum(dim=0), v.pow(2).sum(dim=0)


def flap_variance(count: Tensor | float, s1: Tensor, s2: Tensor, unbiased: bool = True) -> Tensor:
    """Per-column variance from accumulated moments, fp32 ``[*feat]``.

    Computed in float64 (``s2 - s1^2/n`` cancels; see `flap_moments`), clamped at 0.
    ``unbiased`` divides by ``n - 1`` (sample variance, as in the paper); rankings do not
    depend on this choice.
    """
    n = float(count)
    denom = n - 1.0 if unbiased else n
    if n < 1 or denom <= 0:
        raise ValueError(f"need at least {2 if unbiased else 1} tokens for a variance, got {n:g}")
    s1d, s2d = s1.detach().double(), s2.detach().double()
    var = (s2d - s1d * s1d / n) / denom
    return var.clamp_min(0.0).to(torch.float32)


def flap_column_scores(
    w_out: Tensor, count: Tensor | float, s1: Tensor, s2: Tensor, unbiased: bool = True
) -> Tensor:
    """FLAP score of each out_proj input column (paper sec. 3.3).

    Args:
        w_out: out_proj weight ``[hidden, d_inner]`` (Megatron RowParallelLinear layout,
            global).
        count, s1, s2: accumulated `flap_moments` of the out_proj input, ``s1``/``s2``
            ``[d_inner]``.
    Returns:
        ``[d_inner]``: ``||W_out[:, j]||_2^2 * Var(y_j)``, fp32.
    """
    if w_out.dim() != 2 or s1.shape != (w_out.shape[1],) or s2.shape != s1.shape:
        raise ValueError(
            f"expected w_out [hidden, d_inner] and s1/s2 [d_inner]; got w_out "
            f"{tuple(w_out.shape)}, s1 {tuple(s1.shape)}, s2 {tuple(s2.shape)}"
        )
    col_sq = _f32(w_out).pow(2).sum(dim=0)
    return col_sq * flap_variance(count, s1, s2, unbiased=unbiased)


def flap_column_scores_from_norms(
    col_sq: Tensor, count: Tensor | float, s1: Tensor, s2: Tensor, unbiased: bool = True
) -> Tensor:
    """`flap_column_scores` given ``col_sq[j] = ||W_out[:, j]||_2^2`` ``[d_inner]`` instead
    of the weight (what TP ranks gather: one number per column, not the matrix)."""
    if col_sq.dim() != 1 or s1.shape != col_sq.shape or s2.shape != col_sq.shape:
        raise ValueError(
            f"expected col_sq, s1, s2 all [d_inner]; got {tuple(col_sq.shape)}, "
            f"{tuple(s1.shape)}, {tuple(s2.shape)}"
        )
    return _f32(col_sq) * flap_variance(count, s1, s2, unbiased=unbiased)


def flap_head_scores(col_scores: Tensor, nheads: int, headdim: int) -> Tensor:
    """``[nheads]``: sum of each head's FLAP column scores (columns ``h*headdim + p``)."""
    return _flap_matrix(col_scores, nheads, headdim).sum(dim=1)


def flap_channel_scores(col_scores: Tensor, nheads: int, headdim: int) -> Tensor:
    """``[headdim]``: for each channel p, the sum over heads of column ``h*headdim + p``."""
    return _flap_matrix(col_scores, nheads, headdim).sum(dim=0)


def _flap_matrix(col_scores: Tensor, nheads: int, headdim: int) -> Tensor:
    if col_scores.shape != (nheads * headdim,):
        raise ValueError(
            f"expected col_scores [nheads*headdim] = [{nheads * headdim}], "
            f"got {tuple(col_scores.shape)}"
        )
    return _f32(col_scores).reshape(nheads, headdim)


# --------------------------------------------------------------------------- FFN / attn / emb


def ffn_neuron_scores(finalized: Tensor) -> Tensor:
    """FFN neuron scores.

    Args:
        finalized: `finalize`-d aggregate ``[ffn_hidden]`` (mean |a| over the sequence,
            L2 over the batch already applied) of either FFN activation:
            - the first projection's output, BEFORE the activation (paper eq. 26;
              stats source ``ffn_pre``, plan ``ffn_source=pre``), or
            - ``linear_fc2``'s input, AFTER the activation (what Model Optimizer scores;
              stats source ``ffn``, plan ``ffn_source=post``).
    Returns:
        ``[ffn_hidden]`` fp32 (the aggregate is the score).
    """
    if finalized.dim() != 1:
        raise ValueError(f"expected [ffn_hidden] scores, got shape {tuple(finalized.shape)}")
    return _f32(finalized).clone()


def attention_head_scores(finalized: Tensor, num_heads: int) -> Tensor:
    """Attention head scores: per-head L2 of the finalized attention-output aggregate.

    Args:
        finalized: ``[num_heads * kv_channels]`` (core-attention output, the input of
            ``linear_proj``, head-major: index ``h * kv_channels + c``) or
            ``[num_heads, kv_channels]``.
        num_heads: number of query heads.
    Returns:
        ``[num_heads]``: ``|| a[h, :] ||_2``, fp32 (same reduction as Mamba heads, eq. 22).
    """
    a = _f32(finalized)
    if a.dim() == 1:
        a = as_head_matrix(a, num_heads)
    if a.dim() != 2 or a.shape[0] != num_heads:
        raise ValueError(
            f"expected [num_heads*kv_channels] or [num_heads, kv_channels] with "
            f"num_heads={num_heads}, got {tuple(finalized.shape)}"
        )
    return a.norm(dim=1)


def embedding_channel_scores(per_layer: Tensor | Sequence[Tensor]) -> Tensor:
    """Embedding (hidden) channel scores (paper eq. 27).

    Args:
        per_layer: finalized layer-normalised-input scores of every reader of the
            residual stream (each Mamba / attention / MLP input norm and the final norm),
            as a list of ``[hidden]`` tensors or one ``[n_readers, hidden]`` tensor.
    Returns:
        ``[hidden]``: sum over readers, fp32.
    """
    if isinstance(per_layer, Tensor):
        stacked = _f32(per_layer)
    else:
        if len(per_layer) == 0:
            raise ValueError("embedding_channel_scores needs at least one layer's scores")
        stacked = torch.stack([_f32(t) for t in per_layer])
    if stacked.dim() != 2:
        raise ValueError(f"expected [n_readers, hidden] scores, got {tuple(stacked.shape)}")
    return stacked.sum(dim=0)


# --------------------------------------------------------------------------- MoE (issue 19)
#
# Routed experts see a varying number of tokens, in no sample structure (the token
# dispatcher permutes tokens of every rank of the TP x EP group together), so their
# accumulators are per token: sums over the tokens routed to an expert, with that token
# count kept beside them. The shared expert sees every token and is scored like a dense FFN.


def router_increment(probs: Tensor, routing_map: Tensor) -> tuple[Tensor, Tensor]:
    """Accumulator increment of the router's choice for one forward.

    Args:
        probs: ``[tokens, experts]`` routing weights as megatron's TopKRouter returns them
            (the chosen experts' scores after top-k normalisation and the top-k scaling
            factor: the factor that multiplies each expert's output; 0 elsewhere).
        routing_map: ``[tokens, experts]`` bool, True where the expert is chosen.
    Returns:
        ``(mass, freq)`` ``[experts]`` float64: the sum of the chosen routing weights and the
        number of token assignments per expert.
    """
    if probs.shape != routing_map.shape or probs.dim() != 2:
        raise ValueError(f"expected probs and routing_map [tokens, experts], got "
                         f"{tuple(probs.shape)} and {tuple(routing_map.shape)}")
    chosen = routing_map.to(torch.bool)
    mass = torch.where(chosen, probs.detach().double(), torch.zeros((), dtype=torch.float64,
                                                                    device=probs.device)).sum(0)
    return mass, chosen.sum(0).double()


def segment_sum(values: Tensor, counts: Tensor | Sequence[int]) -> Tensor:
    """Sum of consecutive segments: ``values [N, *feat]`` split into ``len(counts)`` runs of
    ``counts[e]`` rows (a token dispatcher's expert-major order) -> ``[len(counts), *feat]``
    float64 (empty segments give 0)."""
    c = torch.as_tensor(counts, dtype=torch.long).reshape(-1).cpu()
    if int(c.sum()) != values.shape[0] or (c < 0).any():
        raise ValueError(f"segment counts {c.tolist()} do not add up to the {values.shape[0]} rows")
    seg = torch.repeat_interleave(torch.arange(c.numel()), c).to(values.device)
    out = torch.zeros((c.numel(), *values.shape[1:]), dtype=torch.float64, device=values.device)
    return out.index_add_(0, seg, values.detach().double())


def token_multiplicity(seen: Tensor, freq: Tensor) -> Tensor:
    """How many times the experts' side saw each token assignment: 1, or the TP size when
    sequence parallelism is off (every TP rank holds the whole sequence and megatron's
    allgather dispatcher gathers those copies). One integer for all experts, or an error."""
    seen, freq = seen.double(), freq.double()
    if seen.shape != freq.shape:
        raise ValueError(f"expert token counts {tuple(seen.shape)} vs router counts {tuple(freq.shape)}")
    if bool(((freq == 0) != (seen == 0)).any()):
        raise ValueError(f"experts' token counts {seen.tolist()} disagree with the router's "
                         f"assignments {freq.tolist()} (an expert saw tokens it was not given)")
    used = freq > 0
    if not bool(used.any()):
        return torch.ones((), dtype=torch.float64)
    r = seen[used] / freq[used]
    m = r[0].round()
    if m < 1 or bool(((r - m).abs() > 1e-9 * m).any()):
        raise ValueError(f"experts' token counts {seen.tolist()} are not one multiple of the "
                         f"router's assignments {freq.tolist()}")
    return m


def expert_scores(mass: Tensor, freq: Tensor, out_sum: Tensor, seen: Tensor) -> dict[str, Tensor]:
    """Routed-expert scores of one MoE layer, ``[experts]`` fp32 each, larger = more important.

    Args:
        mass, freq: the router's accumulated `router_increment` (every token once).
        out_sum: sum over the tokens the experts processed of ``||p * expert(x)||_2``, the
            expert's contribution to the layer output (routing weight p included; in the
            hidden width, after the latent up-projection in latent MoE).
        seen: the number of tokens the experts processed (``freq`` times a constant: see
            `token_multiplicity`).
    Returns:
        ``{"out": sum over routed tokens of p * ||expert(x)||, "mass": sum of p,
        "freq": token assignments}``.
    """
    m = token_multiplicity(seen, freq)
    return {"out": (out_sum.double() / m).float(), "mass": mass.double().float(),
            "freq": freq.double().float()}


def expert_ffn_scores(sumsq: Tensor, seen: Tensor) -> Tensor:
    """Expert FFN neuron scores ``[experts, moe_ffn]`` fp32: the RMS over the tokens routed to
    each expert of its ``linear_fc2`` input (after the activation, times the routing weight,
    as megatron's expert MLP computes it), ``sqrt(sum a^2 / count)``; 0 for an expert that
    saw no token.

    Why this aggregation: the dense FFN score (`aggregate_batch` + `finalize`) is the L2 over
    samples of the per-sample mean |a|; routed tokens carry no sample structure, so each
    token is its own sample (L2 over tokens, squares add across ranks), divided by the
    expert's count so that the score is that of a typical routed token, independent of the
    expert's load (load is what the expert scores measure) and of duplicated token copies.
    The keep sets are per expert, so only the order within a row matters for the plan.
    """
    if sumsq.dim() != 2 or seen.shape != (sumsq.shape[0],):
        raise ValueError(f"expected sumsq [experts, ffn] and counts [experts], got "
                         f"{tuple(sumsq.shape)} and {tuple(seen.shape)}")
    n = seen.double().clamp_min(1.0).unsqueeze(1)
    return (sumsq.double().clamp_min(0.0) / n).sqrt().float()


# --------------------------------------------------------------------------- depth (sec 3.4)


def _reduce_tokens(per_token: Tensor, mask: Tensor | None, reduction: str) -> Tensor:
    if mask is not None:
        if mask.shape != per_token.shape:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} must equal the token shape "
                f"{tuple(per_token.shape)} (logits/hidden shape without the last dim)"
            )
        w = (mask != 0).to(device=per_token.device, dtype=torch.float32)
    else:
        w = torch.ones_like(per_token)
    if reduction == "none":
        return per_token * w
    total = (per_token * w).sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        n = w.sum()
        if n == 0:
            raise ValueError("mask selects no token")
        return total / n
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def kl_next_token(
    p_logits_full: Tensor,
    q_logits_skip: Tensor,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Depth importance of a layer (paper sec. 3.4): KL(p_full || p_without_layer).

    Args:
        p_logits_full: logits of the full model ``[..., vocab]`` (any token layout).
        q_logits_skip: logits with the layer skipped, same shape.
        mask: optional ``[...]`` (logits shape without vocab), nonzero = real token.
        reduction: ``"mean"`` over real tokens (scalar), ``"sum"`` (scalar; accumulate
            with the real-token count across batches / ranks), or ``"none"``
            (per-token, masked tokens = 0).
    Returns:
        fp32 ``sum_v p(v) (log p(v) - log q(v))`` per token, reduced; computed with
        ``log_softmax`` in fp32 and clamped at 0 per token (negatives are rounding).
    """
    if p_logits_full.shape != q_logits_skip.shape:
        raise ValueError(
            f"logit shapes differ: {tuple(p_logits_full.shape)} vs {tuple(q_logits_skip.shape)}"
        )
    logp = torch.log_softmax(_f32(p_logits_full), dim=-1)
    logq = torch.log_softmax(_f32(q_logits_skip), dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(dim=-1).clamp_min(0.0)
    return _reduce_tokens(kl, mask, reduction)


def block_influence(
    h_in: Tensor, h_out: Tensor, mask: Tensor | None = None, reduction: str = "mean"
) -> Tensor:
    """Cheap depth importance ("block influence", ShortGPT): ``1 - cos(h_in, h_out)``.

    Args:
        h_in, h_out: hidden states entering / leaving the layer ``[..., hidden]``.
        mask: optional ``[...]``, nonzero = real token.
        reduction: as in `kl_next_token`.
    Returns:
        fp32 ``1 - cos`` per token (cosine over the hidden dim, eps 1e-8), reduced.
    """
    if h_in.shape != h_out.shape:
        raise ValueError(f"hidden shapes differ: {tuple(h_in.shape)} vs {tuple(h_out.shape)}")
    cos = torch.nn.functional.cosine_similarity(_f32(h_in), _f32(h_out), dim=-1, eps=1e-8)
    return _reduce_tokens(1.0 - cos, mask, reduction)
