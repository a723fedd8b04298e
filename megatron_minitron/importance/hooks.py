"""Forward hooks that only ACCUMULATE (DESIGN.md sec. 2 and 8.1).

`StatsCollector` attaches hooks to this rank's PP stage of a megatron hybrid model. Each
hook turns one activation into an accumulator increment with the pure functions of
`scores.py` (`aggregate_batch`, `flap_moments`, `block_influence`) and adds it into a
pre-allocated buffer of `collector.acc` (a flat ``{key: tensor}`` dict). Nothing here
scores, reduces or communicates: `reduce.py` sums / gathers the buffers across ranks and
`stage.py` turns them into scores.

Keys (``L`` = GLOBAL layer id; local = this TP rank's slice, contiguous in global order):
  L{L}.x, L{L}.z       [d_inner_local] fp32  in_proj output parts      (Mamba, eq. 19-24)
  L{L}.y               [d_inner_local] fp32  out_proj input            (Mamba)
  L{L}.flap_n/_s1/_s2  [], [d_inner_local] x2 fp64  moments of out_proj input  (FLAP 3.3)
  L{L}.ffn             [ffn_local]     fp32  linear_fc2 input, AFTER the activation
                                             (Model Optimizer's FFN score; plan ffn_source=post)
  L{L}.ffn_pre         [ffn_local]     fp32  linear_fc1 output, BEFORE the activation
                                             (paper eq. 26; plan ffn_source=pre)
  L{L}.attn            [heads_local*kv] fp32 core-attention output = linear_proj input
  L{L}.hidden          [hidden]        fp32  this layer's input-norm output (eq. 27; MoE
                                             layers too: their pre_mlp_layernorm)
  final_norm           [hidden]        fp32  final norm output (last PP stage only)
  L{L}.cos_sum/.cos_n  []              fp64  sum over tokens of 1 - cos(in, out), tokens
  samples              []              fp64  calibration samples seen by this rank
Hidden-size keys are replicated over TP (sequence parallelism is off): count them once.
Sums of squares are of per-sample means (mean |a| over the sequence, `aggregate_batch`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

import torch

from ..config import ModelConfig
from . import scores as S

MAMBA_SOURCES = ("x", "z", "y")
# every source name the collector understands; `kl` (depth) lives in depth.py
SOURCES = ("x", "z", "y", "flap", "ffn", "ffn_pre", "attn", "hidden", "cosine")

# keys that are TP-sliced along their last dim (gather by concatenation); the rest are
# replicated over TP
TP_SLICED = ("x", "z", "y", "flap_s1", "flap_s2", "ffn", "ffn_pre", "attn", "flap_wcol")


def key_kind(key: str) -> str:
    return "tp" if key.rsplit(".", 1)[-1] in TP_SLICED else "rep"


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _is_identity(module) -> bool:
    return module is None or type(module).__name__ in ("IdentityOp", "IdentityFuncOp")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool = False):
    """RMSNorm as megatron / TE apply it (fp32 math): the norm fused into TE's
    LayerNormColumnParallelLinear, recomputed from its input for the embedding statistic."""
    xf = x.float()
    w = weight.float() + (1.0 if zero_centered else 0.0)
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w


def layer_kind(layer) -> str:
    """'M' Mamba, '*' attention, '-' MLP, 'E' mixture of experts for a layer of the stack."""
    if hasattr(layer, "mixer"):
        return "M"
    if not _is_identity(getattr(layer, "self_attention", None)):
        return "*"
    if hasattr(getattr(layer, "mlp", None), "router"):
        return "E"
    return "-"


class StatsCollector:
    """Accumulating hooks on one PP stage. Use as a context manager (hooks are removed on
    exit). `enabled=False` makes every hook a no-op (the depth pass's skip-layer forwards).

    Args:
        model: this rank's megatron hybrid model stage (bare, not DDP-wrapped).
        cfg: the model config (global sizes).
        tp: tensor-parallel size (local sizes = global / tp).
        layer_offset: global id of this stage's first layer.
        sources: subset of `SOURCES`.
    """

    def __init__(self, model, cfg: ModelConfig, tp: int, layer_offset: int,
                 sources: Iterable[str] = SOURCES, device=None, sp_group=None):
        self.model = model
        # sequence parallel: the residual stream (norm outputs, layer inputs/outputs) is
        # split along the sequence over this TP group; those hooks gather it back first
        self.sp_group = sp_group
        self.cfg = cfg
        self.tp = tp
        self.offset = layer_offset
        self.sources = set(sources)
        bad = self.sources - set(SOURCES)
        if bad:
            raise ValueError(f"unknown statistics sources {sorted(bad)}; known: {list(SOURCES)}")
        self.device = device or next(model.parameters()).device
        self.enabled = True
        self.acc: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self.layers = list(model.decoder.layers)
        self.kinds = [layer_kind(l) for l in self.layers]
        self._alloc()

    # ------------------------------------------------------------------ buffers

    def _zeros(self, key, shape=(), dtype=torch.float32):
        self.acc[key] = torch.zeros(shape, dtype=dtype, device=self.device)

    def _alloc(self) -> None:
        c, tp = self.cfg, self.tp
        di = c.mamba_d_inner // tp
        self._zeros("samples", dtype=torch.float64)
        for j, kind in enumerate(self.kinds):
            p = f"L{self.offset + j}."
            if "hidden" in self.sources:
                self._zeros(p + "hidden", (c.hidden_size,))
            if "cosine" in self.sources:
                self._zeros(p + "cos_sum", dtype=torch.float64)
                self._zeros(p + "cos_n", dtype=torch.float64)
            if kind == "M":
                for s in MAMBA_SOURCES:
                    if s in self.sources:
                        self._zeros(p + s, (di,))
                if "flap" in self.sources:
                    self._zeros(p + "flap_n", dtype=torch.float64)
                    self._zeros(p + "flap_s1", (di,), torch.float64)
                    self._zeros(p + "flap_s2", (di,), torch.float64)
            elif kind == "-":
                for s in ("ffn", "ffn_pre"):
                    if s in self.sources:
                        self._zeros(p + s, (c.ffn_hidden_size // tp,))
            elif kind == "*" and "attn" in self.sources:
                self._zeros(p + "attn", (c.num_attention_heads // tp * c.kv_channels,))
        if "hidden" in self.sources and self._final_norm() is not None:
            self._zeros("final_norm", (c.hidden_size,))

    def _final_norm(self):
        dec = self.model.decoder
        if getattr(dec, "post_process", False) and getattr(dec, "post_layer_norm", True):
            return getattr(dec, "final_norm", None)
        return None

    def _add(self, key: str, inc: torch.Tensor) -> None:
        buf = self.acc[key]
        buf.add_(inc.to(device=buf.device, dtype=buf.dtype))

    def count_samples(self, n: int) -> None:
        """Called once per calibration micro-batch by the driver (not a hook)."""
        self.acc["samples"] += n

    # ------------------------------------------------------------------ hooks

    def _fwd(self, module, fn):
        def hook(mod, args, out):
            if self.enabled:
                with torch.no_grad():
                    fn(_first(out))
        self._handles.append(module.register_forward_hook(hook))

    def _pre(self, module, fn):
        def hook(mod, args):
            if self.enabled:
                with torch.no_grad():
                    fn(args[0])
        self._handles.append(module.register_forward_pre_hook(hook))

    def _agg(self, key):
        return lambda a: self._add(key, S.aggregate_batch(a))

    def _seq_full(self, t: torch.Tensor) -> torch.Tensor:
        """[s/tp, b, ...] -> [s, b, ...] under sequence parallelism (else t itself)."""
        g = self.sp_group
        if g is None or torch.distributed.get_world_size(g) == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size(g))]
        torch.distributed.all_gather(parts, t.contiguous(), group=g)
        return torch.cat(parts, dim=0)

    def _agg_seq(self, key):
        return lambda a: self._add(key, S.aggregate_batch(self._seq_full(a)))

    def _hidden_hooks(self, layer, kind: str, key: str) -> None:
        """The layer's input norm (reads the residual stream): its output; with TE specs the
        norm is fused into the first linear, so recompute it from that linear's input."""
        norm_name, fused_name = {
            "M": ("norm", "mixer.in_proj"),
            "*": ("input_layernorm", "self_attention.linear_qkv"),
            "-": ("pre_mlp_layernorm", "mlp.linear_fc1"),
            "E": ("pre_mlp_layernorm", "mlp.router"),  # MoE: a separate norm in every spec
        }[kind]
        norm = getattr(layer, norm_name, None)
        if not _is_identity(norm):
            self._fwd(norm, self._agg_seq(key))
            return
        fused = layer.get_submodule(fused_name)
        w = getattr(fused, "layer_norm_weight", None)
        if w is None:
            raise RuntimeError(f"layer {key}: no input norm found ({norm_name} is an identity "
                               f"and {fused_name} has no fused layer_norm_weight)")
        eps = self.cfg.norm_epsilon
        zc = bool(getattr(fused, "zero_centered_gamma", False))
        self._pre(fused, lambda x: self._add(
            key, S.aggregate_batch(rms_norm(self._seq_full(x), w, eps, zc))))

    def _mamba_hooks(self, mixer, p: str) -> None:
        c, tp = self.cfg, self.tp
        di, gn, nh = c.mamba_d_inner // tp, c.mamba_num_groups // tp * c.mamba_state_dim, \
            c.mamba_num_heads // tp
        widths = [di, di, gn, gn, nh]  # in_proj output [z | x | B | C | dt], local sizes

        if {"x", "z"} & self.sources:
            def on_in_proj(out):
                if out.shape[-1] != sum(widths):
                    raise RuntimeError(f"{p}in_proj output width {out.shape[-1]} != {sum(widths)}")
                if {"x", "z"} <= self.sources:  # one pass over [z | x] (per-column math)
                    zx = S.aggregate_batch(out[..., :2 * di])
                    self._add(p + "z", zx[:di])
                    self._add(p + "x", zx[di:])
                elif "z" in self.sources:
                    self._add(p + "z", S.aggregate_batch(out[..., :di]))
                else:
                    self._add(p + "x", S.aggregate_batch(out[..., di:2 * di]))
            self._fwd(mixer.in_proj, on_in_proj)

        if {"y", "flap"} & self.sources:
            def on_out_proj_input(y):
                if "y" in self.sources:
                    self._add(p + "y", S.aggregate_batch(y))
                if "flap" in self.sources:
                    n, s1, s2 = S.flap_moments(y)
                    self._add(p + "flap_n", n)
                    self._add(p + "flap_s1", s1)
                    self._add(p + "flap_s2", s2)
            self._pre(mixer.out_proj, on_out_proj_input)

    def _ffn_pre_hook(self, fc1, key: str) -> None:
        width = self.cfg.ffn_hidden_size // self.tp

        def on_fc1(out):
            if out.shape[-1] != width:  # gated MLPs emit [gate | up]: 2x the FFN size
                raise RuntimeError(f"{key}: linear_fc1 output width {out.shape[-1]} != FFN size "
                                   f"{width}; the pre-activation FFN score needs a non-gated MLP")
            self._add(key, S.aggregate_batch(out))
        self._fwd(fc1, on_fc1)

    def _cosine_hook(self, layer, p: str) -> None:
        def hook(mod, args, kwargs, out):
            if not self.enabled:
                return
            h_in = kwargs.get("hidden_states", args[0] if args else None)
            h_out = _first(out)
            with torch.no_grad():
                h_in, h_out = self._seq_full(h_in), self._seq_full(h_out)
                self._add(p + "cos_sum", S.block_influence(h_in, h_out, reduction="sum"))
                self._add(p + "cos_n", torch.tensor(float(h_out.shape[0] * h_out.shape[1])))
        self._handles.append(layer.register_forward_hook(hook, with_kwargs=True))

    def attach(self) -> "StatsCollector":
        if self._handles:
            return self
        for j, (layer, kind) in enumerate(zip(self.layers, self.kinds)):
            p = f"L{self.offset + j}."
            if "hidden" in self.sources:
                self._hidden_hooks(layer, kind, p + "hidden")
            if "cosine" in self.sources:
                self._cosine_hook(layer, p)
            if kind == "M":
                self._mamba_hooks(layer.mixer, p)
            elif kind == "-":
                if "ffn" in self.sources:  # after the activation
                    self._pre(layer.mlp.linear_fc2, self._agg(p + "ffn"))
                if "ffn_pre" in self.sources:  # before it (eq. 26)
                    self._ffn_pre_hook(layer.mlp.linear_fc1, p + "ffn_pre")
            elif kind == "*" and "attn" in self.sources:
                self._pre(layer.self_attention.linear_proj, self._agg(p + "attn"))
        fn = self._final_norm()
        if fn is not None and "hidden" in self.sources:
            self._fwd(fn, self._agg_seq("final_norm"))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> "StatsCollector":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()

    @contextmanager
    def paused(self):
        prev, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = prev

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {k: v.detach().cpu().clone() for k, v in self.acc.items()}

    def load_state_dict(self, sd: dict) -> None:
        if set(sd) != set(self.acc):
            raise ValueError(f"accumulator keys differ: missing {sorted(set(self.acc) - set(sd))}, "
                             f"unexpected {sorted(set(sd) - set(self.acc))}")
        for k, v in sd.items():
            if v.shape != self.acc[k].shape:
                raise ValueError(f"accumulator {k}: shape {tuple(v.shape)} != {tuple(self.acc[k].shape)}")
            self.acc[k].copy_(v)


def out_proj_col_sq(model, offset: int, kinds: list[str]) -> dict[str, torch.Tensor]:
    """``L{L}.flap_wcol``: ||W_out[:, j]||^2 of every local out_proj input column (FLAP's
    weight factor), fp32 [d_inner_local]; a weight, not an accumulator (never DP-summed)."""
    out = {}
    for j, (layer, kind) in enumerate(zip(model.decoder.layers, kinds)):
        if kind == "M":
            w = layer.mixer.out_proj.weight.detach().float()  # [hidden, d_inner_local]
            out[f"L{offset + j}.flap_wcol"] = w.pow(2).sum(dim=0)
    return out
