"""Context-parallel core attention for machines without Transformer Engine (CPU, gloo).

megatron-core's local DotProductAttention asserts context_parallel_size == 1; its CP
attention exists only in TE. This twin all-gathers K and V over the CP group and applies
the causal mask of the rank's two load-balanced chunks (train/cp.py: rank r holds chunks r
and 2cp-1-r of the sequence), then runs megatron's own DotProductAttention math on
[s/cp queries x s keys]. Backward: the gathered K / V gradients are reduce-scattered back
(summed over the ranks whose queries used them). Memory is O(s/cp x s) scores per rank
(no ring / online softmax): right for CPU tests and short CPU runs, not for 128k on GPU,
where TE's attention is used.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.distributed as dist

from megatron.core.transformer.dot_product_attention import DotProductAttention


def cp_positions(seq_local: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Global positions of the seq_local tokens CP rank `rank` holds, in its local order:
    chunk `rank`, then chunk 2cp-1-rank (each seq_local/2 long)."""
    half = seq_local // 2
    a = torch.arange(rank * half, (rank + 1) * half, device=device)
    b = torch.arange((2 * cp - 1 - rank) * half, (2 * cp - rank) * half, device=device)
    return torch.cat([a, b])


class _GatherSeq(torch.autograd.Function):
    """[s_local, ...] -> [cp * s_local, ...] (rank order) over `group`; backward sums the
    gradient over the ranks and keeps this rank's rows (a reduce-scatter, written with
    all_to_all_single: gloo has no reduce_scatter)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(group.size())]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        n = ctx.group.size()
        grad = grad.contiguous()
        recv = torch.empty_like(grad)  # row block j of `grad` goes to rank j
        dist.all_to_all_single(recv, grad, group=ctx.group)
        return recv.view(n, grad.shape[0] // n, *grad.shape[1:]).sum(0), None


def gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    return _GatherSeq.apply(x, group)


def causal_mask_cp(seq_local: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """[1, 1, s_local, cp * s_local] boolean, True = masked (megatron's convention): query
    rows are this rank's tokens, key columns are every rank's tokens in gather order."""
    q = cp_positions(seq_local, cp, rank, device)
    k = torch.cat([cp_positions(seq_local, cp, r, device) for r in range(cp)])
    return (k[None, :] > q[:, None])[None, None]


class CPDotProductAttention(DotProductAttention):
    """DotProductAttention that also runs with context_parallel_size > 1 (see the module
    docstring). At cp == 1 it is megatron's class unchanged."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        # the parent asserts cp == 1; everything it builds is per query / per head
        base = copy.copy(config)
        base.context_parallel_size = 1
        super().__init__(base, layer_number, attn_mask_type, attention_type,
                         attention_dropout=attention_dropout, softmax_scale=softmax_scale,
                         pg_collection=pg_collection)
        if pg_collection is not None and getattr(pg_collection, "cp", None) is not None:
            self.cp_group = pg_collection.cp
        else:
            from megatron.core import parallel_state

            self.cp_group = parallel_state.get_context_parallel_group()
        self.cp_size = self.cp_group.size()
        if self.cp_size != config.context_parallel_size:
            raise ValueError(f"context_parallel_size={config.context_parallel_size} but the CP "
                             f"group has {self.cp_size} ranks")
        if self.cp_size > 1 and self.config.window_size is not None:
            raise NotImplementedError("sliding-window attention under CP needs TE's attention")

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if self.cp_size == 1:
            return super().forward(query, key, value, attention_mask, attn_mask_type,
                                   attention_bias, packed_seq_params)
        if attention_mask is not None:
            # a mask from outside would be in local-query x local-key coordinates
            raise ValueError("under context parallelism pass attention_mask=None: the causal "
                             "mask of this rank's chunks is built here")
        s_local = query.shape[0]
        key = gather_seq(key, self.cp_group)  # [cp * s_local, b, ng, hn]
        value = gather_seq(value, self.cp_group)
        mask = causal_mask_cp(s_local, self.cp_size, self.cp_group.rank(), query.device)
        return super().forward(query, key, value, mask, attn_mask_type, attention_bias,
                               packed_seq_params)
