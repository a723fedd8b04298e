"""Checkpoint tensor key -> (source key, keep indices per dimension). Pure: a Plan in,
index tensors out; no model, no process group (DESIGN sec. 3).

Keys are megatron-core 0.16 dist-checkpoint keys of the hybrid model (local spec), for a
PRUNED-model key with its pruned global layer id. `rule(key, plan)` returns the source key
(layer renumbered through plan.kept_layers) and, for every dimension of the pruned global
tensor, a LongTensor of SOURCE indices (pruned position i <- source index idx[i]) or None
(dimension unchanged). `take(tensor, idxs)` applies it to a full global tensor: the
reference twin of the sharded path in rewrite/stage.py.

  embedding.word_embeddings.weight, output_layer.weight    [V, h]        (-, hidden)
  decoder.final_norm.weight, *.layer_norm_weight, norms    [h]           (hidden)
  mixer.in_proj.weight.{z,x}                               [d_in, h]     (flat, hidden)
  mixer.in_proj.weight.{B,C}                               [G*N, h]      (-, hidden)
  mixer.in_proj.weight.dt                                  [nh, h]       (heads, hidden)
  mixer.conv1d.weight.x / .bias.x                          [d_in, 1, k]  (flat)    B, C unchanged
  mixer.A_log, mixer.D, mixer.dt_bias                      [nh]          (heads)
  mixer.norm.weight (gated RMSNorm)                        [d_in]        (flat)
  mixer.out_proj.weight                                    [h, d_in]     (hidden, flat)
  mlp.linear_fc1.weight                                    [F or 2F, h]  (ffn, hidden)
  mlp.linear_fc2.weight                                    [h, F]        (hidden, ffn)
  self_attention.linear_qkv.weight                         [(nq+2g)kv, h](qkv rows, hidden)
  self_attention.linear_proj.weight                        [h, nq*kv]    (hidden, q cols)
  mlp.router.weight / .expert_bias                         [E, h] / [E]  (-, hidden) / (-)
  mlp.experts.experts.linear_fc1.weight                    [E, f, d]     (-, -, hidden*)
  mlp.experts.experts.linear_fc2.weight                    [E, d, f]     (-, hidden*, -)
  mlp.shared_experts.linear_fc1 / fc2.weight               [s, h] / [h, s]
  mlp.fc1_latent_proj / fc2_latent_proj.weight             [l, h] / [h, l]
  (* d = h without a latent projection; with one, d = l is not the residual stream)
flat = mamba_flat_indices(heads, channels) = {h*headdim + p}; heads never leave their group.
"""

from __future__ import annotations

import re
from typing import Optional

import torch
from torch import Tensor

from ..plan import keep as K
from ..plan.targets import Plan

Idx = Optional[Tensor]
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


class RuleError(KeyError):
    pass


def _t(v) -> Tensor:
    return torch.as_tensor(v, dtype=torch.long)


class Rules:
    """`rule` for one plan, each index tensor built once (a rewrite asks for every key)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self._memo: dict = {}

    def _m(self, name, fn) -> Tensor:
        if name not in self._memo:
            self._memo[name] = fn()
        return self._memo[name]

    def __call__(self, key: str) -> tuple[str, list[Idx]]:
        plan, m_ = self.plan, self._m
        hid = m_("hidden", lambda: _t(plan.hidden))
        if key in ("embedding.word_embeddings.weight", "output_layer.weight"):
            return key, [None, hid]
        if key == "decoder.final_norm.weight":
            return key, [hid]
        m = _LAYER.match(key)
        if not m:
            raise RuleError(f"no pruning rule for checkpoint key {key!r}")
        j, rest = int(m.group(1)), m.group(2)
        if j >= len(plan.kept_layers):
            raise RuleError(f"{key!r}: pruned layer {j} does not exist (plan keeps {len(plan.kept_layers)})")
        i = plan.kept_layers[j]
        src_key = f"decoder.layers.{i}.{rest}"
        e = plan.layers.get(i, {})
        s = plan.source

        # every norm in front of a mixer / MLP / attention (fused-name or plain-name layout)
        if rest.endswith("layer_norm_weight") or rest in (
                "norm.weight", "input_layernorm.weight", "pre_mlp_layernorm.weight"):
            return src_key, [hid]
        if rest.startswith("mixer."):
            heads = m_(("heads", i), lambda: _t(e["mamba_heads"]))
            flat = m_(("flat", i), lambda: plan.mamba_flat(i))
            part = rest[len("mixer."):]
            table: dict[str, list[Idx]] = {
                "in_proj.weight.z": [flat, hid], "in_proj.weight.x": [flat, hid],
                "in_proj.weight.B": [None, hid], "in_proj.weight.C": [None, hid],
                "in_proj.weight.dt": [heads, hid],
                "conv1d.weight.x": [flat, None, None], "conv1d.bias.x": [flat],
                "conv1d.weight.B": [None, None, None], "conv1d.weight.C": [None, None, None],
                "conv1d.bias.B": [None], "conv1d.bias.C": [None],
                "A_log": [heads], "D": [heads], "dt_bias": [heads],
                "norm.weight": [flat],
                "out_proj.weight": [hid, flat],
            }
            if part not in table:
                raise RuleError(f"no pruning rule for Mamba key {key!r}")
            return src_key, table[part]
        if rest.startswith(MOE_PREFIXES):
            return src_key, self._moe(key, rest[4:], hid)
        if rest.startswith("mlp."):
            ffn = m_(("ffn", i), lambda: _t(e["ffn"]))
            # swiglu: the global fc1 is [W; V] (2F rows): keep the same neurons in both halves
            rows = m_(("ffn_rows", i), lambda: torch.cat([ffn, ffn + s.ffn_hidden_size])
                      if s.activation == "swiglu" else ffn)
            table = {"linear_fc1.weight": [rows, hid], "linear_fc1.bias": [rows],
                     "linear_fc2.weight": [hid, ffn], "linear_fc2.bias": [hid]}
            if rest[4:] not in table:
                raise RuleError(f"no pruning rule for MLP key {key!r}")
            return src_key, table[rest[4:]]
        if rest.startswith("self_attention."):
            heads = m_(("attn", i), lambda: _t(e["attention_heads"]))
            qkv = m_(("qkv", i), lambda: K.attention_qkv_rows(
                heads, s.num_attention_heads, s.num_query_groups, s.kv_channels))
            cols = m_(("proj", i), lambda: K.attention_flat_indices(heads, s.kv_channels))
            table = {"linear_qkv.weight": [qkv, hid], "linear_qkv.bias": [qkv],
                     "linear_proj.weight": [hid, cols], "linear_proj.bias": [hid]}
            part = rest[len("self_attention."):]
            if part not in table:
                raise RuleError(f"no pruning rule for attention key {key!r}")
            return src_key, table[part]
        raise RuleError(f"no pruning rule for checkpoint key {key!r}")


    def _moe(self, key: str, part: str, hid: Tensor) -> list[Idx]:
        """An E layer's tensors: the hidden axis wherever the residual stream enters or
        leaves (router columns, expert projections unless a latent projection sits between,
        shared expert, latent projections); experts and their FFN are kept whole."""
        latent = self.plan.source.moe_latent_size > 0
        table: dict[str, list[Idx]] = {
            "router.weight": [None, hid], "router.expert_bias": [None],
            "experts.experts.linear_fc1.weight": [None, None, None if latent else hid],
            "experts.experts.linear_fc2.weight": [None, None if latent else hid, None],
            "shared_experts.linear_fc1.weight": [None, hid],
            "shared_experts.linear_fc2.weight": [hid, None],
            "fc1_latent_proj.weight": [None, hid], "fc2_latent_proj.weight": [hid, None],
        }
        if part not in table:
            raise RuleError(f"no pruning rule for MoE key {key!r}")
        return table[part]


MOE_PREFIXES = ("mlp.router.", "mlp.experts.", "mlp.shared_experts.", "mlp.fc1_latent_proj.",
                "mlp.fc2_latent_proj.")


def rule(key: str, plan: Plan) -> tuple[str, list[Idx]]:
    """(source key, per-dim source indices) for a pruned-model checkpoint key."""
    return Rules(plan)(key)


def take(t: Tensor, idxs: list[Idx], out: Optional[Tensor] = None) -> Tensor:
    """Apply per-dimension source indices to a full (global) tensor; the result is written
    into `out` when given (its shape; any dtype / device: then it is converted)."""
    if len(idxs) != t.dim():
        raise ValueError(f"{len(idxs)} index dims for a {t.dim()}-D tensor {tuple(t.shape)}")
    dims = [d for d, ix in enumerate(idxs) if ix is not None]
    for d in dims[:-1]:
        t = t.index_select(d, idxs[d].to(t.device))
    if out is None:
        return t.index_select(dims[-1], idxs[dims[-1]].to(t.device)) if dims else t
    if dims and out.dtype == t.dtype and out.device == t.device:
        return torch.index_select(t, dims[-1], idxs[dims[-1]].to(t.device), out=out)
    return out.copy_(t.index_select(dims[-1], idxs[dims[-1]].to(t.device)) if dims else t)


def shard_box(idxs: list[Idx], global_offset, local_shape, src_shape) -> tuple[tuple, tuple, list[Idx]]:
    """What one shard of the pruned tensor needs from the source: the region [lo, lo+box)
    (the bounding box of its source indices) and, within that region, the indices to take
    per dimension (None: the dimension is unpruned and the region is exactly the shard's)."""
    lo, box, local = [], [], []
    for d, (ix, off, n) in enumerate(zip(idxs, global_offset, local_shape)):
        sel = None if ix is None else ix[off:off + n]
        first, last = (off, off + n - 1) if sel is None else (
            (int(sel.min()), int(sel.max())) if sel.numel() == n and n else (0, -1))
        if n < 1 or last >= src_shape[d] or (sel is not None and sel.numel() != n):
            raise ValueError(f"dimension {d}: shard [{off}, {off + n}) does not fit the keep set / "
                             f"source size {src_shape[d]}")
        lo.append(first)
        box.append(last - first + 1)
        local.append(None if sel is None else sel - first)
    return tuple(lo), tuple(box), local
