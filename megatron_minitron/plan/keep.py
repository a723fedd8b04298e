"""Pure keep-set selection (Minitron-SSM paper sec. 3.1-3.4; DESIGN.md sec. 2-3).

Inputs are score tensors (higher = more important, from `importance.scores`); outputs
are LongTensors of indices to KEEP (or, for depth, layer ids to DROP). No model, no
process group. Every ranking is deterministic: descending score, ties broken by the
lower index.

Ordering of returned keep sets: ranking order (most important first), except that
group-constrained sets (Mamba heads, attention heads) are the concatenation over groups,
in group order, of each group's ranking (eq. 17/24). Any within-group order reproduces
the original function when nothing is pruned (DESIGN sec. 3), so callers may sort within
groups if they prefer; they must never move an index across groups.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "topk_indices",
    "mamba_keep_sets",
    "mamba_heads_group_unaware",
    "mamba_flat_indices",
    "ffn_keep",
    "hidden_keep",
    "attention_keep",
    "attention_flat_indices",
    "attention_qkv_rows",
    "experts_keep",
    "expert_ffn_keep",
    "pattern_layers",
    "layers_to_drop",
    "apply_depth_to_pattern",
]

PIPE = "|"  # pipeline-stage separator in hybrid_override_pattern (newer megatron-core)


def topk_indices(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` highest scores, by descending score; ties -> lower index first.

    Args:
        scores: ``[n]`` real scores (NaN is rejected).
        k: ``0 <= k <= n``.
    Returns:
        ``LongTensor[k]``.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D, got shape {tuple(scores.shape)}")
    n = scores.numel()
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= n:
        raise ValueError(f"k must be an int in [0, {n}], got {k!r}")
    s = scores.detach().to(torch.float64).cpu()
    if torch.isnan(s).any():
        bad = torch.nonzero(torch.isnan(s)).flatten().tolist()
        raise ValueError(f"scores contain NaN at {bad}")
    # Stable sort of the negated scores: equal scores keep index order (lower index first).
    # (-x) also maps -0.0/0.0 to equal keys, so they tie as well.
    order = torch.sort(-s, stable=True).indices
    return order[:k].to(torch.long)


def _check_count(name: str, k: int, n: int, what: str) -> None:
    if not isinstance(k, int) or isinstance(k, bool):
        raise ValueError(f"{name} must be an int, got {k!r}")
    if k < 1 or k > n:
        raise ValueError(
            f"{name}={k} is out of range: keep between 1 and {n} {what} "
            f"(valid alternative: {min(max(k, 1), n)})"
        )


def _grouped_topk(scores: Tensor, ngroups: int, keep: int, name: str, what: str) -> Tensor:
    """Group-constrained ranking (eq. 17, 23-24): equal count per contiguous group."""
    if scores.dim() != 1:
        raise ValueError(f"{what} scores must be 1-D, got shape {tuple(scores.shape)}")
    n = scores.numel()
    if not isinstance(ngroups, int) or ngroups < 1 or n % ngroups:
        raise ValueError(f"number of {what}={n} is not divisible by ngroups={ngroups!r}")
    if not isinstance(keep, int) or isinstance(keep, bool):
        raise ValueError(f"{name} must be an int, got {keep!r}")
    per_group = n // ngroups
    if keep < 1 or keep > n or keep % ngroups:
        lo = max(ngroups, min(n, keep) // ngroups * ngroups)
        hi = min(n, lo + ngroups)
        alts = sorted({lo, hi} - {keep})
        raise ValueError(
            f"{name}={keep} is invalid for {n} {what} in {ngroups} groups: it must be a "
            f"multiple of ngroups={ngroups} between {ngroups} and {n} (the same number "
            f"kept in every group); valid alternatives: {' or '.join(map(str, alts))}"
        )
    k = keep // ngroups
    parts = [
        g * per_group + topk_indices(scores[g * per_group : (g + 1) * per_group], k)
        for g in range(ngroups)
    ]
    return torch.cat(parts)


def mamba_keep_sets(
    head_scores: Tensor,
    channel_scores: Tensor,
    ngroups: int,
    keep_heads: int,
    keep_channels: int,
) -> tuple[Tensor, Tensor]:
    """Mamba heads and head channels to keep (paper eq. 17-18, 21, 23-24).

    Args:
        head_scores: ``[nheads]`` (eq. 22, computed on the kept channels, or FLAP).
        channel_scores: ``[headdim]`` (eq. 20).
        ngroups: Mamba groups; head h is in group ``h // (nheads // ngroups)``.
        keep_heads: a multiple of ngroups, ``<= nheads``.
        keep_channels: ``1 <= keep_channels <= headdim``.
    Returns:
        ``(heads, channels)``: ``heads`` LongTensor[keep_heads] = for g in group order,
        group g's top ``keep_heads // ngroups`` heads by descending score (ranked only
        within the group); ``channels`` LongTensor[keep_channels] = top channels by
        descending score, ONE set shared by every head.
    """
    if channel_scores.dim() != 1:
        raise ValueError(f"channel scores must be 1-D, got shape {tuple(channel_scores.shape)}")
    _check_count("keep_channels", keep_channels, channel_scores.numel(), "head channels")
    heads = _grouped_topk(head_scores, ngroups, keep_heads, "keep_heads", "Mamba heads")
    channels = topk_indices(channel_scores, keep_channels)
    return heads, channels


def mamba_heads_group_unaware(head_scores: Tensor, ngroups: int, keep_heads: int) -> Tensor:
    """The ABLATION baseline that eq. 17 forbids (a transformer-style head pruner): rank
    heads over the whole layer, keep the top ``keep_heads``, and force them into the pruned
    layer's ``ngroups`` groups in index order (slot block g = the g-th run of
    ``keep_heads // ngroups`` kept heads, ascending). Whenever the global top-k is not
    balanced over the groups, some heads land in another group's slots and read that
    group's B/C: the function changes. Returns LongTensor[keep_heads], ascending; the
    plan must be checked with ``group_rule=False``. Use `mamba_keep_sets` for real pruning.
    """
    if head_scores.dim() != 1:
        raise ValueError(f"Mamba heads scores must be 1-D, got shape {tuple(head_scores.shape)}")
    n = head_scores.numel()
    if not isinstance(ngroups, int) or ngroups < 1 or n % ngroups:
        raise ValueError(f"number of Mamba heads={n} is not divisible by ngroups={ngroups!r}")
    if not isinstance(keep_heads, int) or isinstance(keep_heads, bool) or \
            not ngroups <= keep_heads <= n or keep_heads % ngroups:
        raise ValueError(f"keep_heads={keep_heads!r} must be a multiple of ngroups={ngroups} "
                         f"between {ngroups} and {n} (the pruned layer keeps {ngroups} equal groups)")
    return topk_indices(head_scores, keep_heads).sort().values


def mamba_flat_indices(heads: Tensor, channels: Tensor, headdim: int) -> Tensor:
    """Flat d_inner indices ``[h*headdim + p for h in heads for p in channels]``.

    These index the ``z`` and ``x`` rows of in_proj, ``norm.weight``, the out_proj
    input columns and the x-channels of conv1d (DESIGN sec. 3). Returns
    ``LongTensor[len(heads) * len(channels)]``.
    """
    h = torch.as_tensor(heads, dtype=torch.long).reshape(-1)
    p = torch.as_tensor(channels, dtype=torch.long).reshape(-1)
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= headdim):
        raise ValueError(f"channel indices must be in [0, {headdim}), got {p.tolist()}")
    if h.numel() and int(h.min()) < 0:
        raise ValueError(f"head indices must be >= 0, got {h.tolist()}")
    return (h[:, None] * headdim + p[None, :]).reshape(-1)


def ffn_keep(scores: Tensor, k: int) -> Tensor:
    """FFN neurons to keep (eq. 26 scores): top ``k`` by descending score, LongTensor[k]."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D, got shape {tuple(scores.shape)}")
    _check_count("ffn_hidden_size", k, scores.numel(), "FFN neurons")
    return topk_indices(scores, k)


def hidden_keep(scores: Tensor, k: int) -> Tensor:
    """Embedding channels to keep (eq. 27 scores): top ``k``, LongTensor[k]."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D, got shape {tuple(scores.shape)}")
    _check_count("hidden_size", k, scores.numel(), "embedding channels")
    return topk_indices(scores, k)


def attention_keep(head_scores: Tensor, num_query_groups: int, keep_heads: int) -> Tensor:
    """Attention query heads to keep, GQA-safe.

    Query head h reads KV group ``h // (num_heads // num_query_groups)`` (Megatron's
    layout). Heads are ranked only within their query group and the same number
    ``keep_heads // num_query_groups`` is kept in every group, so the number of KV groups
    and every kept head's K/V are unchanged (the analogue of the Mamba rule, eq. 17);
    K/V projections are not pruned.

    Returns:
        LongTensor[keep_heads], groups concatenated in group order, each in descending
        score order.
    """
    return _grouped_topk(
        head_scores, num_query_groups, keep_heads, "keep_heads", "attention heads"
    )


def attention_flat_indices(heads: Tensor, kv_channels: int) -> Tensor:
    """Flat query indices ``[h*kv_channels + c for h in heads for c in range(kv_channels)]``.

    Use for a separate query projection's rows and for ``linear_proj``'s input columns
    (core-attention output is head-major). For Megatron's fused ``linear_qkv`` see
    `attention_qkv_rows`.
    """
    return mamba_flat_indices(heads, torch.arange(kv_channels), kv_channels)


def attention_qkv_rows(
    heads: Tensor, num_heads: int, num_query_groups: int, kv_channels: int
) -> Tensor:
    """Rows of Megatron's fused ``linear_qkv`` weight to keep for the kept query heads.

    Megatron interleaves per query group: ``[ng, (np/ng + 2) * hn]`` = for each group g,
    its ``np/ng`` query heads, then its key, then its value. Kept rows are, per group in
    group order, the kept query heads of that group (in the given order), then the
    group's full K and V. ``heads`` must satisfy the `attention_keep` rule (grouped,
    equal count per group, groups in order).

    Returns:
        LongTensor[(keep_heads + 2 * num_query_groups) * kv_channels].
    """
    h = torch.as_tensor(heads, dtype=torch.long).reshape(-1)
    if num_heads % num_query_groups:
        raise ValueError(
            f"num_heads={num_heads} not divisible by num_query_groups={num_query_groups}"
        )
    per = num_heads // num_query_groups
    if h.numel() % num_query_groups or h.numel() == 0:
        raise ValueError(
            f"{h.numel()} kept heads is not a positive multiple of "
            f"num_query_groups={num_query_groups}"
        )
    k = h.numel() // num_query_groups
    hn = torch.arange(kv_channels)
    block = (per + 2) * kv_channels
    rows = []
    for g in range(num_query_groups):
        hg = h[g * k : (g + 1) * k]
        if bool(((hg // per) != g).any()):
            raise ValueError(
                f"heads {hg.tolist()} at group slot {g} are not all in query group {g}; "
                "use attention_keep to build the head list"
            )
        local = hg - g * per
        rows.append(g * block + (local[:, None] * kv_channels + hn[None, :]).reshape(-1))
        rows.append(g * block + per * kv_channels + hn)  # key
        rows.append(g * block + (per + 1) * kv_channels + hn)  # value
    return torch.cat(rows)


# --------------------------------------------------------------------------- MoE


def experts_keep(scores: Tensor, num_groups: int, keep: int) -> Tensor:
    """Routed experts of one E layer to keep, by their expert score (issue 19).

    With grouped routing (``num_groups > 1``; expert e is in group ``e // (E / num_groups)``,
    megatron's and transformers' layout) every group keeps its own top ``keep / num_groups``
    experts, so each kept expert stays with its group-mates (the group limit compares the
    same experts as before, minus the dropped ones). ``num_groups=1``: the top ``keep``.

    Returns:
        LongTensor[keep]: groups concatenated in group order, each by descending score.
    """
    return _grouped_topk(scores, num_groups, keep, "num_moe_experts", "experts")


def expert_ffn_keep(scores: Tensor, experts: Tensor, k: int) -> Tensor:
    """FFN neurons of each kept expert: row j = the top ``k`` neurons of source expert
    ``experts[j]`` by its own scores (every expert keeps its own set, the same count).

    Args:
        scores: ``[E, F]`` per-expert neuron scores (global expert order).
        experts: ``[E']`` kept source expert ids (the order of the pruned experts).
    Returns:
        LongTensor[E', k] of neuron indices into each expert's F axis, by descending score.
    """
    if scores.dim() != 2:
        raise ValueError(f"expert FFN scores must be [experts, ffn], got shape {tuple(scores.shape)}")
    _check_count("moe_ffn_hidden_size", k, scores.shape[1], "expert FFN neurons")
    ex = torch.as_tensor(experts, dtype=torch.long).reshape(-1)
    return torch.stack([topk_indices(scores[int(e)], k) for e in ex]) if ex.numel() else \
        torch.empty(0, k, dtype=torch.long)


# --------------------------------------------------------------------------- depth


def pattern_layers(pattern: str) -> str:
    """Layer symbols of a hybrid pattern without the ``'|'`` stage separators."""
    return pattern.replace(PIPE, "")


def layers_to_drop(
    layer_scores: Tensor | Sequence[float] | None,
    layer_types: str,
    n_drop: int | None = None,
    *,
    explicit: Sequence[int] | None = None,
    only_type: str | None = None,
) -> list[int]:
    """Layers to remove (paper sec. 3.4): lowest importance first.

    Args:
        layer_scores: ``[L]`` (KL or block influence; higher = more important). May be
            ``None`` with ``explicit``.
        layer_types: the hybrid pattern (one symbol per layer, ``'|'`` separators are
            ignored), length L after removing separators.
        n_drop: number of layers to drop (``0 <= n_drop < L``; with ``only_type``,
            at most the number of layers of that type).
        explicit: instead of ``n_drop``, the exact layer ids to drop (validated: ints in
            range, unique, of ``only_type`` if given, not every layer); returned in
            the given order.
        only_type: restrict candidates to layers with this symbol (e.g. ``'M'``).
    Returns:
        list of global layer ids, ascending score (ties: lower id first).
    """
    types = pattern_layers(layer_types)
    L = len(types)
    if L == 0:
        raise ValueError("layer_types pattern has no layers")
    if (n_drop is None) == (explicit is None):
        raise ValueError("give exactly one of n_drop or explicit")
    if only_type is not None and (len(only_type) != 1 or only_type == PIPE):
        raise ValueError(f"only_type must be one layer symbol, got {only_type!r}")
    candidates = [i for i, t in enumerate(types) if only_type is None or t == only_type]

    if explicit is not None:
        drop = list(explicit)
        _validate_drop(drop, L)
        bad = [i for i in drop if only_type is not None and types[i] != only_type]
        if bad:
            raise ValueError(
                f"layers {bad} are not of type {only_type!r} (types: {[types[i] for i in bad]})"
            )
        return drop

    if layer_scores is None:
        raise ValueError("layer_scores is required with n_drop")
    scores = torch.as_tensor(layer_scores, dtype=torch.float64).reshape(-1)
    if scores.numel() != L:
        raise ValueError(f"{scores.numel()} layer scores for a pattern of {L} layers")
    if not isinstance(n_drop, int) or isinstance(n_drop, bool) or n_drop < 0:
        raise ValueError(f"n_drop must be a non-negative int, got {n_drop!r}")
    limit = min(len(candidates), L - 1)
    if n_drop > limit:
        what = f"layers of type {only_type!r}" if only_type is not None else "layers"
        raise ValueError(
            f"n_drop={n_drop} is too many: {len(candidates)} {what} in a {L}-layer model, "
            f"at least one layer must remain (valid alternative: {limit})"
        )
    cand = torch.tensor(candidates, dtype=torch.long)
    order = topk_indices(-scores[cand], n_drop)  # lowest score first, ties -> lower id
    return cand[order].tolist()


def _validate_drop(drop: Sequence[int], L: int) -> None:
    for i in drop:
        if not isinstance(i, int) or isinstance(i, bool):
            raise ValueError(f"layer ids must be ints, got {i!r}")
        if not 0 <= i < L:
            raise ValueError(f"layer id {i} out of range [0, {L})")
    dup = sorted({i for i in drop if list(drop).count(i) > 1})
    if dup:
        raise ValueError(f"layer ids repeated: {dup}")
    if len(drop) >= L:
        raise ValueError(f"cannot drop all {L} layers")


def apply_depth_to_pattern(pattern: str, drop: Sequence[int]) -> str:
    """Remove the dropped layers' symbols from a hybrid pattern.

    Layer ids count layer symbols only (``'|'`` separators are not layers); separators
    are preserved. A pipeline stage left empty is an error (rebalance the stages).
    """
    drop_list = [int(i) if isinstance(i, torch.Tensor) else i for i in drop]
    L = len(pattern_layers(pattern))
    _validate_drop(drop_list, L)
    dropped = set(drop_list)
    out: list[str] = []
    layer = 0
    for ch in pattern:
        if ch == PIPE:
            out.append(ch)
            continue
        if layer not in dropped:
            out.append(ch)
        layer += 1
    result = "".join(out)
    if PIPE in pattern:
        empty = [i for i, seg in enumerate(result.split(PIPE)) if not seg]
        if empty:
            raise ValueError(
                f"dropping layers {sorted(dropped)} from {pattern!r} leaves pipeline "
                f"stage(s) {empty} empty ({result!r}); move the '|' separators"
            )
    return result
