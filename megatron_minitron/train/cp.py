"""Context parallelism (CP): megatron's load-balanced sequence split of a batch.

A sequence of length s is cut into 2*cp chunks of s/(2cp); CP rank r holds chunks r and
2cp-1-r, so causal attention costs the same on every rank (megatron's
get_batch_on_this_cp_rank). Tokens, labels, loss_mask and position_ids are split alike.
Mamba layers undo the order inside megatron's MambaContextParallel (all-to-all: whole
sequence, heads split); attention masks it (compat/cp_attention.py on CPU, TE on GPU).
The loss sums of the kept tokens are per rank: each token is counted once, where it is.
"""

from __future__ import annotations

import torch

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def chunk_ids(cp: int, rank: int) -> tuple[int, int]:
    """The two chunks (of 2*cp) that CP rank `rank` holds, in its local order."""
    if not 0 <= rank < cp:
        raise ValueError(f"CP rank {rank} outside a CP group of {cp}")
    return rank, 2 * cp - 1 - rank


def split_seq(x: torch.Tensor, cp: int, rank: int, seq_dim: int = 1) -> torch.Tensor:
    """This rank's part of `x` along `seq_dim` (length divisible by 2*cp)."""
    if cp == 1:
        return x
    s = x.shape[seq_dim]
    if s % (2 * cp):
        raise ValueError(f"sequence length {s} is not divisible by 2 x cp = {2 * cp}")
    v = x.view(*x.shape[:seq_dim], 2 * cp, s // (2 * cp), *x.shape[seq_dim + 1:])
    idx = torch.tensor(chunk_ids(cp, rank), device=x.device)
    v = v.index_select(seq_dim, idx)
    return v.reshape(*x.shape[:seq_dim], s // cp, *x.shape[seq_dim + 1:])


def split_batch(batch: dict, cp: int, rank: int) -> dict:
    """A collated batch ([b, s] tensors) -> this CP rank's [b, s/cp] part; other keys kept."""
    return {k: split_seq(v, cp, rank) if k in BATCH_KEYS else v for k, v in batch.items()}


def merge_seq(parts: list[torch.Tensor], seq_dim: int = 1) -> torch.Tensor:
    """Inverse of split_seq over all ranks: parts[r] is rank r's piece -> the full sequence."""
    cp = len(parts)
    halves = {}
    for r, p in enumerate(parts):
        a, b = p.chunk(2, dim=seq_dim)
        i, j = chunk_ids(cp, r)
        halves[i], halves[j] = a, b
    return torch.cat([halves[i] for i in range(2 * cp)], dim=seq_dim)
