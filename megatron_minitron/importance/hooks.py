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
 MoE layers ('E', source "moe"; E = num_moe_experts, E_loc = E / ep this rank's experts,
 global ids [ep_rank * E_loc, (ep_rank + 1) * E_loc)):
  L{L}.moe_mass        [E]             fp64  router output: sum of the chosen experts' routing
                                             weights (probs after top-k normalisation and scaling)
  L{L}.moe_freq        [E]             fp64  router output: token assignments per expert
  L{L}.moe_seen        [E_loc]         fp64  tokens each local expert processed (SequentialMLP
                                             input; TP copies of a token each count, see below)
  L{L}.moe_out         [E_loc]         fp64  sum over those tokens of ||p * expert(x)||_2 (the
                                             expert's output summed over expert-TP ranks; hidden
                                             width: through fc2_latent_proj in latent MoE)
  L{L}.moe_ffn         [E_loc, moe_ffn_local] fp64  sum over those tokens of a^2, a = each local
                                             expert's linear_fc2 input (p * activation)
  L{L}.shared_ffn      [shared_local]  fp32  shared expert's linear_fc2 input (as L{L}.ffn)
Hidden-size keys are replicated over TP (with sequence parallelism the hooks gather the
sequence first): count them once. So are the router keys (under sequence parallelism each
TP rank routes its own sequence slice: the increments are summed over the TP group in the
hook). Sums of squares are of per-sample means (mean |a| over the sequence, `aggregate_batch`),
except the routed experts' (per token: routed tokens have no sample structure).
Expert-side keys (moe_seen/out/ffn) hold this rank's experts over the tokens of its whole
TP x EP group (megatron's allgather dispatcher): `reduce.py` sums them over the expert-data-
parallel group and concatenates EP blocks (moe_ffn also expert-TP slices). Without sequence
parallelism every TP rank holds the whole sequence and the dispatcher gathers all TP copies,
so each token reaches the experts TP times: `scores.expert_scores` divides by that
multiplicity (`scores.token_multiplicity`: moe_seen / moe_freq, checked to be one integer;
recorded as meta["moe_token_copies"]).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

import torch

from ..config import ModelConfig
from . import scores as S

MAMBA_SOURCES = ("x", "z", "y")
# every source name the collector understands; `kl` (depth) lives in depth.py
SOURCES = ("x", "z", "y", "flap", "ffn", "ffn_pre", "attn", "hidden", "cosine", "moe")

# keys that are TP-sliced along their last dim (gather by concatenation); the rest are
# replicated over TP
TP_SLICED = ("x", "z", "y", "flap_s1", "flap_s2", "ffn", "ffn_pre", "attn", "flap_wcol", "shared_ffn")
# expert-side keys: this rank's block of experts (EP-sliced along dim 0); "ep_tp" also
# expert-TP-sliced along the last dim
EP_SLICED = ("moe_seen", "moe_out")
EP_TP_SLICED = ("moe_ffn",)


def key_kind(key: str) -> str:
    """'tp' (TP-sliced, DP-summed), 'rep' (replicated over TP, DP-summed), 'ep' / 'ep_tp'
    (experts of this EP rank, summed over the expert-data-parallel group)."""
    name = key.rsplit(".", 1)[-1]
    if name in TP_SLICED:
        return "tp"
    if name in EP_SLICED:
        return "ep"
    if name in EP_TP_SLICED:
        return "ep_tp"
    return "rep"


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


def _local_experts(layer, p: str):
    """The MoE layer's SequentialMLP experts (one MLP module per local expert)."""
    experts = getattr(layer.mlp, "experts", None)
    local = getattr(experts, "local_experts", None)
    if local is None:
        raise RuntimeError(
            f"layer {p[1:-1]}: the expert statistics hook each local expert of megatron's "
            f"SequentialMLP; this model has {type(experts).__name__} experts (grouped GEMM): "
            "build it with moe_grouped_gemm off (the stats stage does), or leave 'moe' out of sources")
    return local


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
        tp: tensor-parallel size (local sizes = global / tp; the experts' TP size too).
        layer_offset: global id of this stage's first layer.
        sources: subset of `SOURCES`.
        sp_group: the TP group when sequence parallelism is on, else None.
        expt_tp_group: the experts' tensor-parallel group (megatron `pg.expt_tp`): each rank's
            expert output is a partial sum over its FFN slice, summed over this group before
            its norm is taken (one all-reduce per E layer and forward); None at TP 1.
    """

    def __init__(self, model, cfg: ModelConfig, tp: int, layer_offset: int,
                 sources: Iterable[str] = SOURCES, device=None, sp_group=None, expt_tp_group=None):
        self.model = model
        # sequence parallel: the residual stream (norm outputs, layer inputs/outputs) is
        # split along the sequence over this TP group; those hooks gather it back first
        self.sp_group = sp_group
        self.expt_tp_group = expt_tp_group
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
            elif kind == "E" and "moe" in self.sources:
                n_loc = len(_local_experts(self.layers[j], p))
                f64 = torch.float64
                self._zeros(p + "moe_mass", (c.num_moe_experts,), f64)
                self._zeros(p + "moe_freq", (c.num_moe_experts,), f64)
                self._zeros(p + "moe_seen", (n_loc,), f64)
                self._zeros(p + "moe_out", (n_loc,), f64)
                self._zeros(p + "moe_ffn", (n_loc, c.moe_ffn_hidden_size // tp), f64)
                if c.moe_shared_expert_intermediate_size:
                    self._zeros(p + "shared_ffn", (c.moe_shared_expert_intermediate_size // tp,))
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

    def _moe_hooks(self, layer, p: str) -> None:
        """Router output (every token once), the experts' outputs (per local expert), each
        local expert's linear_fc2 input, the shared expert's linear_fc2 input."""
        mlp, c = layer.mlp, self.cfg

        def on_router(out):
            probs, routing_map = out[0], out[1]  # [tokens, E] each
            mass, freq = S.router_increment(probs, routing_map)
            if self.sp_group is not None and torch.distributed.get_world_size(self.sp_group) > 1:
                both = torch.cat([mass, freq])  # this rank's sequence slice: sum over TP
                torch.distributed.all_reduce(both, group=self.sp_group)
                mass, freq = both[:mass.numel()], both[mass.numel():]
            self._add(p + "moe_mass", mass)
            self._add(p + "moe_freq", freq)
        self._handles.append(mlp.router.register_forward_hook(
            lambda mod, args, out: self._hooked(on_router, out)))

        latent = getattr(mlp, "fc2_latent_proj", None) if c.moe_latent_size else None

        def on_experts(mod, args, kwargs, out):
            # SequentialMLP(permuted_tokens [N, h], tokens_per_expert [E_loc], probs [N])
            counts = kwargs.get("tokens_per_expert", args[1] if len(args) > 1 else None)
            y = _first(out).detach().float()  # [N, h]: p * expert(x), a partial sum at TP > 1
            g = self.expt_tp_group
            if g is not None and torch.distributed.get_world_size(g) > 1:
                y = y.clone()  # never reduce the model's own output in place
                torch.distributed.all_reduce(y, group=g)
            if latent is not None:  # the expert's contribution in the hidden width
                y = torch.nn.functional.linear(y, latent.weight.detach().float())
            self._add(p + "moe_seen", torch.as_tensor(counts).reshape(-1).double())
            self._add(p + "moe_out", S.segment_sum(y.norm(dim=-1), counts))
        self._handles.append(mlp.experts.register_forward_hook(
            lambda mod, args, kwargs, out: self._hooked(on_experts, mod, args, kwargs, out),
            with_kwargs=True))

        width = c.moe_ffn_hidden_size // self.tp
        for i, expert in enumerate(_local_experts(layer, p)):
            def on_fc2_input(a, i=i):
                if a.shape[-1] != width:
                    raise RuntimeError(f"{p}experts[{i}] linear_fc2 input width {a.shape[-1]} != {width}")
                self.acc[p + "moe_ffn"][i].add_(a.detach().double().pow(2).sum(0))
            self._pre(expert.linear_fc2, on_fc2_input)

        if c.moe_shared_expert_intermediate_size:
            self._pre(mlp.shared_experts.linear_fc2, self._agg(p + "shared_ffn"))

    def _hooked(self, fn, *args) -> None:
        if self.enabled:
            with torch.no_grad():
                fn(*args)

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
            elif kind == "E" and "moe" in self.sources:
                self._moe_hooks(layer, p)
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
