"""Cross-rank reduction of accumulator dicts (DESIGN.md sec. 6). Process groups are
arguments; ``None`` (or a group of size 1) means "no communication", so the world-size-1
path runs the same code.

Order of operations, every rank calls all three with its own groups:
  1. `all_reduce_dp`: SUM every accumulator over the data-parallel group (different
     samples; sums of squares / moments / counts add).
  2. `gather_tp`: TP-sliced keys (`hooks.key_kind(k) == "tp"`) are concatenated along their
     last dim in TP-rank order: each rank's slice is contiguous in the global order
     (Mamba heads [r*nh/tp, (r+1)*nh/tp), FFN neurons, attention heads). Replicated keys
     (hidden-size statistics, depth) are kept from the local rank: counted once.
  3. `collect_pp`: the union of every PP stage's dicts (keys carry global layer ids), on
     every rank of the PP group (rank 0 writes the file).
Expert-side keys of MoE layers (`key_kind` 'ep' / 'ep_tp': this rank's block of experts over
the tokens of its TP x EP group) skip 1-2 and go through `reduce_experts` instead, on
megatron's expert grid: SUM over the expert-data-parallel group (the ranks holding the same
experts that processed other tokens; summing over the dense DP group would add the EP
peers' blocks, which hold other experts), concatenation of the EP blocks in EP-rank order
(global expert id = ep_rank * local + i), and for 'ep_tp' of the expert-TP slices.
The router's keys are replicated over TP and hold this rank's own tokens: steps 1-2.
Every token is summed exactly once: DP ranks (EP peers included) route distinct tokens;
expert-DP peers process distinct token sets (their TP x EP groups' tokens).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .hooks import key_kind


def _size(group) -> int:
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group=group)


def _flat_by_dtype(acc: dict, keys: list[str]) -> dict:
    by: dict = {}
    for k in keys:
        by.setdefault(acc[k].dtype, []).append(k)
    return by


def _sum_over(out: dict, group) -> dict:
    """In-place SUM of every tensor of `out` over `group`, one flat all-reduce per dtype."""
    if _size(group) == 1:
        return out
    for dtype, keys in _flat_by_dtype(out, sorted(out)).items():
        flat = torch.cat([out[k].reshape(-1) for k in keys])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        i = 0
        for k in keys:
            n = out[k].numel()
            out[k] = flat[i:i + n].view_as(out[k])
            i += n
    return out


def _gather_cat(out: dict, keys: list[str], group, dim: int) -> dict:
    """Concatenate each key's tensors of the ranks of `group` along `dim`, in rank order
    (one all-gather per dtype; shapes equal on every rank)."""
    n_ranks = _size(group)
    if n_ranks == 1 or not keys:
        return out
    for dtype, ks in _flat_by_dtype(out, sorted(keys)).items():
        flat = torch.cat([out[k].reshape(-1) for k in ks])
        parts = [torch.empty_like(flat) for _ in range(n_ranks)]
        dist.all_gather(parts, flat.contiguous(), group=group)
        i = 0
        for k in ks:
            n, shape = out[k].numel(), out[k].shape
            out[k] = torch.cat([p[i:i + n].view(shape) for p in parts], dim=dim)
            i += n
    return out


def reduce_experts(acc: dict[str, torch.Tensor], expt_dp_group, ep_group,
                   expt_tp_group) -> dict[str, torch.Tensor]:
    """Expert-side keys -> global: SUM over `expt_dp_group`, concatenate EP blocks (dim 0)
    over `ep_group`, and expert-TP slices (last dim) of 'ep_tp' keys over `expt_tp_group`.
    Returns new tensors for the expert-side keys of `acc` only."""
    keys = [k for k in acc if key_kind(k) in ("ep", "ep_tp")]
    out = _sum_over({k: acc[k].detach().clone() for k in keys}, expt_dp_group)
    out = _gather_cat(out, keys, ep_group, dim=0)
    return _gather_cat(out, [k for k in keys if key_kind(k) == "ep_tp"], expt_tp_group, dim=-1)


def all_reduce_dp(acc: dict[str, torch.Tensor], dp_group) -> dict[str, torch.Tensor]:
    """SUM over `dp_group`, one flat all-reduce per dtype (keys in sorted order, identical
    on DP peers: same stage, same TP rank). Returns new tensors; `acc` is not modified."""
    return _sum_over({k: v.detach().clone() for k, v in acc.items()}, dp_group)


def gather_tp(acc: dict[str, torch.Tensor], tp_group) -> dict[str, torch.Tensor]:
    """Concatenate TP slices in rank order (one all-gather per dtype); keep replicated keys."""
    out = {k: v.detach().clone() for k, v in acc.items()}
    return _gather_cat(out, [k for k in out if key_kind(k) == "tp"], tp_group, dim=-1)


def collect_pp(acc: dict[str, torch.Tensor], pp_group) -> dict[str, torch.Tensor]:
    """Union of the PP stages' dicts (CPU tensors) on every rank of `pp_group`. A key held by
    two stages (only ``samples``, which is equal on all stages) keeps the first stage's."""
    local = {k: v.detach().cpu() for k, v in acc.items()}
    if _size(pp_group) == 1:
        return local
    parts: list = [None] * _size(pp_group)
    dist.all_gather_object(parts, local, group=pp_group)
    merged: dict = {}
    for part in parts:
        for k, v in part.items():
            merged.setdefault(k, v)
    return merged


def reduce_all(acc: dict[str, torch.Tensor], dp_group, tp_group, pp_group,
               weights: Optional[dict[str, torch.Tensor]] = None, *, ep_group=None,
               expt_dp_group=None, expt_tp_group=None) -> dict[str, torch.Tensor]:
    """DP sum, then TP gather, then PP collection. `weights` (e.g. FLAP's column norms)
    are TP-gathered and PP-collected but never DP-summed (they are equal on DP peers).
    Expert-side keys go through `reduce_experts` with the expert groups (`Parallel.expert_groups`)."""
    experts = [k for k in acc if key_kind(k) in ("ep", "ep_tp")]
    if experts and max(_size(dp_group), _size(tp_group)) > 1 and \
            ep_group is None and expt_dp_group is None and expt_tp_group is None:
        raise ValueError("expert-side statistics need the expert groups (ep_group, expt_dp_group, "
                         "expt_tp_group: Parallel.expert_groups()) on more than one rank")
    dense = {k: v for k, v in acc.items() if k not in experts}
    red = all_reduce_dp(dense, dp_group)
    red.update(weights or {})
    red = gather_tp(red, tp_group)
    red.update(reduce_experts({k: acc[k] for k in experts}, expt_dp_group, ep_group, expt_tp_group))
    return collect_pp(red, pp_group)
