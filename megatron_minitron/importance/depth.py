"""Depth importance (paper sec. 3.4): KL(p_full || p_without_layer) per layer, next to the
cosine block influence that `hooks.StatsCollector` accumulates.

Skipping a layer = making it the identity on the residual stream: its forward returns its
input hidden states unchanged (the layer's own compute is not run).

Pipeline parallelism: every forward (the full one and each skip-one-layer one) is driven
through megatron's pipeline schedule (`get_forward_backward_func`, forward_only, one
micro-batch), so activations travel between stages by the schedule's own p2p. The skipped
layer is patched only on the stage that owns it; every stage runs every forward. The
last stage keeps the final hidden states (not logits) and makes the vocab-sharded
logits chunk by chunk of tokens, computing the KL with a TP all-reduce
(`distill.loss.vocab_parallel_forward_kl`, explicit tp_group): full-vocab logits are never
gathered, and no [tokens, vocab/tp] tensor of a whole micro-batch is held.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Optional

import torch

from ..model import causal_mask


@contextmanager
def skip_layer(layer):
    """Within the block, `layer(hidden_states=h, ...)` returns h (attention / MLP layers,
    which megatron calls for a (hidden, context) pair, return (h, None))."""
    tuple_out = hasattr(layer, "input_layernorm")  # TransformerLayer (attention and MLP)

    def identity(hidden_states=None, *args, **kwargs):
        h = hidden_states if hidden_states is not None else args[0]
        return (h, None) if tuple_out else h

    layer.forward = identity  # instance attribute shadows the class's forward
    try:
        yield
    finally:
        del layer.forward


def pipeline_forward(model, batch: dict, on_logits: Callable[[torch.Tensor], None],
                     cp_group=None) -> None:
    """One forward of `batch` (tokens / position_ids [b, s]) through the pipeline schedule;
    on the last stage `on_logits(logits [b, s, vocab/tp])` is called (no labels, no loss).
    cp_group (size > 1): each rank runs its part of the sequences (train/cp.py; logits
    [b, s/cp, vocab/tp]), no mask (the CP attention masks its chunks)."""
    from ..compat import mcore
    from ..train import cp as cpsplit

    tokens = batch["tokens"]
    b, s = tokens.shape
    cp = cp_group.size() if cp_group is not None else 1

    def step(it, m):
        bt = next(it)
        if cp > 1:
            bt = cpsplit.split_batch(bt, cp, cp_group.rank())
        out = m(bt["tokens"], bt["position_ids"], causal_mask(s, str(tokens.device)) if cp == 1 else None)

        def loss(o):
            on_logits(o.detach())
            return o.new_zeros(()), {}
        return out, loss

    mcore.get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter([batch]), model=[model],
        num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=True)


@contextmanager
def hidden_out(model):
    """Within the block the last stage's model returns its output layer's INPUT (the final
    normed hidden states, [b, s', h]; s' = s / tp under sequence parallelism) instead of
    logits: the depth KL builds logits from it chunk by chunk (chunked_kl), so no
    [tokens, vocab/tp] tensor of the whole micro-batch ever exists."""
    out_layer = getattr(model, "output_layer", None)
    if out_layer is None or not getattr(model, "post_process", True):
        yield
        return

    def passthrough(hidden_states, *args, **kwargs):
        return hidden_states, None

    out_layer.forward = passthrough
    try:
        yield
    finally:
        del out_layer.forward


def chunked_kl(model, h_skip: torch.Tensor, h_full: torch.Tensor, tp_group,
               chunk_tokens: int) -> torch.Tensor:
    """sum over tokens of KL(p_full || p_skip), logits made `chunk_tokens` tokens at a time
    from the hidden states [b, s', h] (output layer forward, vocab-sharded, the vocab-parallel
    KL of distill.loss). Under sequence parallelism every TP rank passes the same number of
    rows (s / tp) and the output layer gathers each chunk's rows across the group."""
    from ..distill.loss import vocab_parallel_forward_kl

    b, s_local = h_full.shape[0], h_full.shape[1]
    rows = s_local if chunk_tokens <= 0 else max(1, min(s_local, chunk_tokens // max(b, 1)))
    weight = None
    if getattr(model, "share_embeddings_and_output_weights", False):
        weight = model.shared_embedding_or_output_weight()
    hs, hf = h_skip.transpose(0, 1), h_full.transpose(0, 1)  # [s', b, h]
    layer = model.output_layer
    forward = type(layer).forward  # the class's: hidden_out may be shadowing it right now
    total = torch.zeros((), dtype=torch.float64, device=h_full.device)
    for a in range(0, s_local, rows):
        ls, _ = forward(layer, hs[a:a + rows], weight=weight)
        lf, _ = forward(layer, hf[a:a + rows], weight=weight)
        kl = vocab_parallel_forward_kl(ls, lf, tp_group=tp_group)  # [rows(*tp), b]
        total += kl.clamp_min(0.0).double().sum()  # negative values are rounding (KL >= 0)
        del ls, lf, kl
    return total


def accumulate_kl(model, batch: dict, full_hidden: Optional[torch.Tensor], num_layers: int,
                  layer_offset: int, local_layers: int, is_last_stage: bool, tp_group,
                  kl_sum: Optional[torch.Tensor], chunk_tokens: int = 1024) -> None:
    """For each global layer l: forward with l skipped; on the last stage add
    sum over tokens of KL(p_full || p_skip_l) into ``kl_sum[l]`` (fp64 [num_layers]).
    `full_hidden` [b, s', h] (last stage only): the full model's output-layer input on
    `batch` (a forward under `hidden_out`). Peak extra memory on the last stage: two
    logits chunks plus the KL's three fp32 buffers of `chunk_tokens` x vocab/tp."""
    layers = model.decoder.layers
    for gid in range(num_layers):
        j = gid - layer_offset
        owned = 0 <= j < local_layers

        def on_hidden(h, gid=gid):
            kl_sum[gid] += chunked_kl(model, h, full_hidden, tp_group, chunk_tokens).to(kl_sum.device)

        with (skip_layer(layers[j]) if owned else _null()), hidden_out(model):
            pipeline_forward(model, batch, on_hidden if is_last_stage else (lambda _: None))


@contextmanager
def _null():
    yield
