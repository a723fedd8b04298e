"""Checkpoint tensor key -> (source key, keep indices per dimension). Pure: a Plan in,
index tensors out; no model, no process group (DESIGN sec. 3).

Keys are megatron-core 0.16 dist-checkpoint keys of the hybrid model (local spec), for a
PRUNED-model key with its pruned global layer id. `rule(key, plan)` returns the source key
(layer renumbered through plan.kept_layers) and, for every dimension of the pruned global
tensor, a LongTensor of SOURCE indices (pruned position i <- source index idx[i]) or None
(dimension unchanged). A dimension d > 0 may instead carry a 2-D LongTensor [n0, n]: its
indices depend on the position along dimension 0 (pruned [e, .., i, ..] <- source
[idx0[e], .., idx[e, i], ..]): each routed expert keeps its own FFN neurons. `take(tensor,
idxs)` applies it to a full global tensor: the reference twin of the sharded path in
rewrite/stage.py.

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
  mlp.router.weight / .expert_bias                         [E, h] / [E]  (experts, hidden) / (experts)
  mlp.experts.experts.linear_fc1.weight                    [E, f or 2f, d] (experts, per-expert ffn, hidden*)
  mlp.experts.experts.linear_fc2.weight                    [E, d, f]     (experts, hidden*, per-expert ffn)
  mlp.shared_experts.linear_fc1 / fc2.weight               [s or 2s, h] / [h, s]  (shared, hidden)
  mlp.fc1_latent_proj / fc2_latent_proj.weight             [l, h] / [h, l]  (-, hidden) / (hidden, -)
  (* d = h without a latent projection; with one, d = l is not the residual stream;
   per-expert ffn = the 2-D [E', f'] index, row j for pruned expert j <- source experts[j])
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
            return src_key, self._moe(key, rest[4:], hid, i)
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


    def _moe(self, key: str, part: str, hid: Tensor, i: int) -> list[Idx]:
        """An E layer's tensors: the hidden axis wherever the residual stream enters or
        leaves (router columns, expert projections unless a latent projection sits between,
        shared expert, latent projections); the kept experts (router rows, expert bias and
        the experts' leading axis together), each kept expert's own FFN neurons (a 2-D index:
        row j for pruned expert j) and the shared expert's neurons. An axis the plan leaves
        out is kept whole."""
        s, e, m_ = self.plan.source, self.plan.layers.get(i, {}), self._m
        hx = None if s.moe_latent_size > 0 else hid
        glu = s.activation == "swiglu"  # fc1 is [W; V]: the same neurons in both halves
        ex = m_(("experts", i), lambda: _t(e["experts"])) if "experts" in e else None
        effn = m_(("expert_ffn", i), lambda: _t(e["expert_ffn"])) if "expert_ffn" in e else None
        erows = None if effn is None else m_(("expert_rows", i), lambda: torch.cat(
            [effn, effn + s.moe_ffn_hidden_size], dim=1) if glu else effn)
        sh = m_(("shared", i), lambda: _t(e["shared_ffn"])) if "shared_ffn" in e else None
        srows = None if sh is None else m_(("shared_rows", i), lambda: torch.cat(
            [sh, sh + s.moe_shared_expert_intermediate_size]) if glu else sh)
        table: dict[str, list[Idx]] = {
            "router.weight": [ex, hid], "router.expert_bias": [ex],
            "experts.experts.linear_fc1.weight": [ex, erows, hx],
            "experts.experts.linear_fc2.weight": [ex, hx, effn],
            "shared_experts.linear_fc1.weight": [srows, hid],
            "shared_experts.linear_fc2.weight": [hid, sh],
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
    into `out` when given (its shape; any dtype / device: then it is converted). A 2-D
    index [n0, n] on dimension d > 0 is applied per position along dimension 0 (after that
    dimension's own index): row e for output slice e."""
    if len(idxs) != t.dim():
        raise ValueError(f"{len(idxs)} index dims for a {t.dim()}-D tensor {tuple(t.shape)}")
    if any(ix is not None and ix.dim() == 2 for ix in idxs):
        return _take_per_row(t, idxs, out)
    dims = [d for d, ix in enumerate(idxs) if ix is not None]
    for d in dims[:-1]:
        t = t.index_select(d, idxs[d].to(t.device))
    if out is None:
        return t.index_select(dims[-1], idxs[dims[-1]].to(t.device)) if dims else t
    if dims and out.dtype == t.dtype and out.device == t.device:
        return torch.index_select(t, dims[-1], idxs[dims[-1]].to(t.device), out=out)
    return out.copy_(t.index_select(dims[-1], idxs[dims[-1]].to(t.device)) if dims else t)


def _take_per_row(t: Tensor, idxs: list[Idx], out: Optional[Tensor]) -> Tensor:
    """`take` with 2-D indices (per-expert FFN neurons): the 1-D indices first, then each
    slice e along dimension 0 takes its own row of every 2-D index (a loop over the experts
    of the tensor: one per shard in the sharded rewrite)."""
    per_row = {d: ix for d, ix in enumerate(idxs) if ix is not None and ix.dim() == 2}
    if 0 in per_row or any(ix.dim() not in (1, 2) for ix in idxs if ix is not None):
        raise ValueError("2-D indices are only allowed on dimensions > 0; others are 1-D")
    for d, ix in enumerate(idxs):
        if ix is not None and ix.dim() == 1:
            t = t.index_select(d, ix.to(t.device))
    for d, ix in per_row.items():
        if ix.shape[0] != t.shape[0]:
            raise ValueError(f"dimension {d}: {ix.shape[0]} index rows for {t.shape[0]} slices along dimension 0")
    shape = [ix.shape[1] if d in per_row else n for d, (n, ix) in enumerate(zip(t.shape, idxs))]
    res = out if out is not None else t.new_empty(shape)
    if tuple(res.shape) != tuple(shape):
        raise ValueError(f"out has shape {tuple(res.shape)}, the indices give {tuple(shape)}")
    for e in range(t.shape[0]):
        sl = t[e]
        for d, ix in per_row.items():
            sl = sl.index_select(d - 1, ix[e].to(t.device))
        res[e].copy_(sl)
    return res


def shard_box(idxs: list[Idx], global_offset, local_shape, src_shape) -> tuple[tuple, tuple, list[Idx]]:
    """What one shard of the pruned tensor needs from the source: the region [lo, lo+box)
    (the bounding box of its source indices) and, within that region, the indices to take
    per dimension (None: the dimension is unpruned and the region is exactly the shard's).
    A 2-D index (per position along dimension 0) is cut to the shard's rows and columns."""
    lo, box, local = [], [], []
    for d, (ix, off, n) in enumerate(zip(idxs, global_offset, local_shape)):
        if ix is not None and ix.dim() == 2:  # rows: the shard's slices along dimension 0
            r0, nr = global_offset[0], local_shape[0]
            sel = ix[r0:r0 + nr, off:off + n]
            if d == 0 or tuple(sel.shape) != (nr, n) or n < 1 or nr < 1 or int(sel.max()) >= src_shape[d]:
                raise ValueError(f"dimension {d}: shard [{off}, {off + n}) x rows [{r0}, {r0 + nr}) does "
                                 f"not fit the per-row keep set {tuple(ix.shape)} / source size {src_shape[d]}")
            first, last = int(sel.min()), int(sel.max())
            lo.append(first)
            box.append(last - first + 1)
            local.append(sel - first)
            continue
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
