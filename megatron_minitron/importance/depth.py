"""Depth importance (paper sec. 3.4): KL(p_full || p_without_layer) per layer, next to the
cosine block influence that `hooks.StatsCollector` accumulates.

Skipping a layer = making it the identity on the residual stream: its forward returns its
input hidden states unchanged (the layer's own compute is not run).

Pipeline parallelism: every forward (the full one and each skip-one-layer one) is driven
through megatron's pipeline schedule (`get_forward_backward_func`, forward_only, one
micro-batch), so activations travel between stages by the schedule's own p2p. The skipped
layer is patched only on the stage that owns it; every stage runs every forward. The
last stage holds the vocab-sharded logits and computes the KL with a TP all-reduce
(`distill.loss.vocab_parallel_forward_kl`, explicit tp_group): full-vocab logits are never
gathered.
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


def pipeline_forward(model, batch: dict, on_logits: Callable[[torch.Tensor], None]) -> None:
    """One forward of `batch` (tokens / position_ids [b, s]) through the pipeline schedule;
    on the last stage `on_logits(logits [b, s, vocab/tp])` is called (no labels, no loss)."""
    from ..compat import mcore

    tokens = batch["tokens"]
    b, s = tokens.shape

    def step(it, m):
        bt = next(it)
        out = m(bt["tokens"], bt["position_ids"], causal_mask(s, str(tokens.device)))

        def loss(o):
            on_logits(o.detach())
            return o.new_zeros(()), {}
        return out, loss

    mcore.get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter([batch]), model=[model],
        num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=True)


def accumulate_kl(model, batch: dict, full_logits: Optional[torch.Tensor], num_layers: int,
                  layer_offset: int, local_layers: int, is_last_stage: bool, tp_group,
                  kl_sum: Optional[torch.Tensor]) -> None:
    """For each global layer l: forward with l skipped; on the last stage add
    sum over tokens of KL(p_full || p_skip_l) into ``kl_sum[l]`` (fp64 [num_layers]).
    `full_logits` [b, s, vocab/tp] (last stage only) are the full model's on `batch`."""
    from ..distill.loss import vocab_parallel_forward_kl

    layers = model.decoder.layers
    for gid in range(num_layers):
        j = gid - layer_offset
        owned = 0 <= j < local_layers

        def on_logits(logits, gid=gid):
            kl = vocab_parallel_forward_kl(logits, full_logits, tp_group=tp_group)  # [b, s]
            # negative per-token values are rounding (KL >= 0)
            kl_sum[gid] += kl.clamp_min(0.0).double().sum().to(kl_sum.device)

        with (skip_layer(layers[j]) if owned else _null()):
            pipeline_forward(model, batch, on_logits if is_last_stage else (lambda _: None))


@contextmanager
def _null():
    yield
