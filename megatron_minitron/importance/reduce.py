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


def all_reduce_dp(acc: dict[str, torch.Tensor], dp_group) -> dict[str, torch.Tensor]:
    """SUM over `dp_group`, one flat all-reduce per dtype (keys in sorted order, identical
    on DP peers: same stage, same TP rank). Returns new tensors; `acc` is not modified."""
    out = {k: v.detach().clone() for k, v in acc.items()}
    if _size(dp_group) == 1:
        return out
    for dtype, keys in _flat_by_dtype(out, sorted(out)).items():
        flat = torch.cat([out[k].reshape(-1) for k in keys])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=dp_group)
        i = 0
        for k in keys:
            n = out[k].numel()
            out[k] = flat[i:i + n].view_as(out[k])
            i += n
    return out


def gather_tp(acc: dict[str, torch.Tensor], tp_group) -> dict[str, torch.Tensor]:
    """Concatenate TP slices in rank order (one all-gather per dtype); keep replicated keys."""
    tp = _size(tp_group)
    out = {k: v.detach().clone() for k, v in acc.items()}
    if tp == 1:
        return out
    sliced = sorted(k for k in out if key_kind(k) == "tp")
    for dtype, keys in _flat_by_dtype(out, sliced).items():
        flat = torch.cat([out[k].reshape(-1) for k in keys])
        parts = [torch.empty_like(flat) for _ in range(tp)]
        dist.all_gather(parts, flat.contiguous(), group=tp_group)
        i = 0
        for k in keys:
            n = out[k].numel()
            out[k] = torch.cat([p[i:i + n].view_as(acc[k]) for p in parts], dim=-1)
            i += n
    return out


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
               weights: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """DP sum, then TP gather, then PP collection. `weights` (e.g. FLAP's column norms)
    are TP-gathered and PP-collected but never DP-summed (they are equal on DP peers)."""
    red = all_reduce_dp(acc, dp_group)
    red.update(weights or {})
    return collect_pp(gather_tp(red, tp_group), pp_group)
