"""Per-GPU memory of a stage at its layout, itemised, from the configs alone (pure functions).

Items, for the worst pipeline stage of one rank (bytes):
  weights      local parameters x params bytes (embedding on the first PP stage, output
               layer on the last; matrices / TP, norms replicated; MoE layers as megatron
               shards them: routed experts / (EP x TP), shared expert / TP, router and
               latent projections replicated)
  grads        megatron's DDP gradient buffer, fp32 (grad_reduce_in_fp32)
  optimizer    Adam moments (8 B) + fp32 main params for 16-bit models (4 B); with the
               distributed optimizer divided by DP, routed-expert parameters by their own
               expert-data-parallel group (DP / EP), over which they are reduced
  activations  bytes autograd keeps per micro-batch x micro-batches in flight (1F1B: the
               first of pp stages holds min(pp, num_micro)); with recompute only what the
               recompute region keeps; plus one layer's worth for the gradients of its
               intermediates during its backward (two with full recompute)
  logits       LM head output and loss buffers (CE: logits + fp32 softmax; KD: student
               logits + their gradient + teacher logits + the loss's fp32 chunk buffers)
  moe_dispatch MoE token dispatch beyond the saved tensors: allgather (CPU) gathers the
               tokens of the TP x EP group ([local tokens x TP x EP, hidden], megatron's
               persistent global buffer) and, for one layer at a time, their fp32 probs,
               routing map and fp32 combine input; alltoall (GPU) holds one layer's permuted
               top-k copies sent and received (and TP-gathered under ETP)
  teacher      distill: frozen teacher weights (its experts split by EP x TP like the
               student's) and one layer of forward activations
  depth_kl     stats: hidden states held for the depth KL + logits chunks + KL buffers
  runtime      CUDA context, NCCL buffers, allocator slack (GPU only; an assumption)

Context parallelism (Layout.cp > 1): every sequence-proportional item is per CP rank, which
holds seq / cp tokens of each sequence (activations, embedding output, logits and the loss's
chunk buffers, a teacher cache's targets, the teacher's layer, MoE dispatch); weights and
gradients are whole on every CP rank; the distributed optimizer shards over dp x cp
(megatron's data-parallel group with CP). Per local token the layers keep what they keep
without CP: Mamba layers' all-to-all trades s / cp tokens x all heads for s tokens x heads /
cp (the same bytes); attention's [s / cp x s] scores on CPU still span all s keys, and the
CPU CP attention (compat/cp_attention.py) keeps the gathered K and V (cp x the local ones);
TE's ring attention on GPU keeps the local q, k, v, output and log-sum-exp.

Activation bytes per token are counted per layer kind for two implementations:
  "gpu": Transformer Engine (flash attention: q, k, v, output, fp32 log-sum-exp) and
         mamba_ssm's fused Mamba path (see layer_activation_bytes): what their autograd
         functions save (mamba_ssm ops/triton/ssd_combined.py's save_for_backward); not
         measured here (no GPU in this project's CI).
  "cpu": this package's CPU path (megatron's unfused DotProductAttention, torch norms,
         compat/ssd.py's pure-torch scan), whose saved tensors were counted with
         torch.autograd saved-tensor hooks on small models; the Mamba scan's per-token
         coefficients are a least-squares fit over 12 widths (tests compare the whole
         estimate with measured peaks at other shapes).
MoE layers ('E', moe_activation_bytes): per token the norms, the fp32 router (input copy,
scores and top-k for sigmoid routing), the dispatcher's routing map and probs, the shared
expert's FFN, and per routed copy (top-k of them per token, balanced over experts) the
permuted input, the expert's fc1 output / activation / prob-scaled activation (width
moe_ffn_hidden_size / TP) and its index and prob; counted exactly with saved-tensor hooks on
the CPU path (SequentialMLP experts, allgather dispatcher), derived for TE's grouped GEMM on
GPU. Selective recompute leaves MoE layers whole (megatron's "mlp" module skips them).
Balanced routing is assumed: early in training, before the load balancing settles, the
busiest expert rank can receive several times its share of copies.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from ..config import ModelConfig
from ..model import count_parameters, layer_param_counts, moe_param_counts

GiB = 2 ** 30


@dataclass
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    micro_batch_size: int = 1
    seq_length: int = 0  # 0 = the model's
    num_micro: int = 1  # micro-batches per step (gradient accumulation)
    sequence_parallel: bool = False
    recompute: str = "none"  # none | selective | full
    distributed_optimizer: bool = True
    # MoE: routed experts split over ep ranks of the DP group (dp a multiple of ep); token
    # dispatcher auto = alltoall on GPU, allgather on CPU (as parallel.moe_dispatcher)
    ep: int = 1
    moe_dispatcher: str = "auto"
    moe_aux_loss: bool = False  # train.moe_aux_loss_coeff > 0: the aux loss keeps its scores
    cp: int = 1  # context parallel: each rank holds seq_length / cp tokens of every sequence

    def local_tokens(self, seq: int) -> float:
        """Tokens of one micro-batch on one rank: micro_batch_size x seq / cp."""
        return self.micro_batch_size * seq / self.cp

    def dispatcher(self, impl: str) -> str:
        if self.moe_dispatcher == "auto":
            return "alltoall" if impl == "gpu" else "allgather"
        return self.moe_dispatcher


@dataclass
class Estimate:
    stage: str
    items: dict = field(default_factory=dict)  # name -> bytes
    pp_stage: int = 0
    notes: list = field(default_factory=list)

    @property
    def total(self) -> float:
        return float(sum(self.items.values()))

    def table(self) -> str:
        w = max(len(k) for k in self.items) if self.items else 8
        rows = [f"  {k:<{w}}  {v / GiB:8.2f} GiB" for k, v in self.items.items()]
        rows.append(f"  {'total':<{w}}  {self.total / GiB:8.2f} GiB")
        return "\n".join(rows)


def _bytes(dtype: str) -> int:
    return 2 if dtype == "bf16" else 4


def local_param_split(cfg: ModelConfig, pattern: str, tp: int, first: bool, last: bool,
                      ep: int = 1) -> tuple[int, int]:
    """(dense, expert) parameters one rank of one PP stage holds. dense: TP-sharded matrices,
    replicated norms, and in E layers the replicated router and latent projections and the
    TP-sharded shared expert; expert: this rank's routed experts (num_moe_experts / ep of
    them, each TP-sharded: expert_tensor_parallel = tp), which megatron's DDP and
    distributed optimizer reduce and shard over the expert-data-parallel group."""
    per = layer_param_counts(cfg)
    h = cfg.hidden_size
    dense = expert = 0
    for c in pattern:
        if c == "E":
            m = moe_param_counts(cfg)
            dense += m["norm"] + m["router"] + m["latent"] + m["shared_expert"] // tp
            expert += m["experts"] // (ep * tp)
        else:
            dense += (per[c] - h) // tp + h  # each layer has one replicated input norm of size h
    if first:
        dense += cfg.vocab_size * h // tp
    if last:
        dense += h  # final norm
        if cfg.untie_embeddings or not first:
            dense += cfg.vocab_size * h // tp
    return dense, expert


def local_params(cfg: ModelConfig, pattern: str, tp: int, first: bool, last: bool,
                 ep: int = 1) -> int:
    """Parameters one TP (and EP) rank of one PP stage holds."""
    return sum(local_param_split(cfg, pattern, tp, first, last, ep))


# ----------------------------------------------------------------------------- activations


def layer_activation_bytes(kind: str, cfg: ModelConfig, tp: int, seq: int, sp: bool,
                           recompute: str, impl: str, ep: int = 1, moe_aux: bool = False,
                           cp: int = 1) -> float:
    """Bytes autograd keeps for backward, per token (of this rank's seq / cp), for one
    layer of `kind`. seq: the whole sequence (the keys each query attends to)."""
    a = _bytes(cfg.params_dtype)
    h = cfg.hidden_size
    hq = h / tp if sp and tp > 1 else h  # residual-stream tensors: split by SP
    if recompute == "full":
        return hq * a  # only the layer's input; the rest is recomputed in backward
    if kind == "E":  # not recomputed by selective recompute (megatron's "mlp" skips MoE)
        return moe_activation_bytes(cfg, tp, sp, impl, ep, moe_aux)
    if kind == "-":
        f = cfg.ffn_hidden_size * (2 if cfg.activation == "swiglu" else 1) / tp
        # norm input, normed fc1 input, norm stats | fc1 output + activation output
        inner = 2 * f * a
        return 3 * hq * a + (0 if recompute == "selective" else inner) + 4
    if kind == "*":
        qw = cfg.num_attention_heads * cfg.kv_channels / tp
        kvw = 2 * cfg.num_query_groups * cfg.kv_channels / tp
        heads = cfg.num_attention_heads / tp
        if impl == "gpu":  # TE flash attention: q, k, v, output, fp32 log-sum-exp
            core = (qw + kvw + qw) * a + heads * 4
        else:  # unfused: q, k, v, context and the [s x s] probabilities per head; under
            # CP the K and V gathered from the other cp - 1 ranks too
            core = 3 * qw * a + seq * heads * 4 + (cp - 1) * kvw * a
        if recompute == "selective":  # core attention recomputed from q, k, v
            core = (qw + kvw) * a
        return 3 * hq * a + qw * a + core + 4
    # Mamba
    nh = cfg.mamba_num_heads / tp
    di = cfg.mamba_d_inner / tp
    gn = cfg.mamba_num_groups / tp * cfg.mamba_state_dim
    T = cfg.mamba_chunk_size
    states = nh * cfg.mamba_head_dim * cfg.mamba_state_dim / T  # chunk states per token
    proj = (2 * di + 2 * gn + nh) * a  # in_proj output [z|x|B|C|dt]
    if impl == "gpu":
        # mamba_ssm's fused path (MambaSplitConv1dScanCombinedFn, use_mamba_mem_eff_path, the
        # GPU training default) saves the in_proj output zxbcdt, the scan output out_x and the
        # gated norm's fp32 rstd, recomputing conv and chunk states in backward; megatron's
        # out_proj keeps its input (the gated norm's output)
        inner = 2 * di * a + cfg.mamba_num_groups / tp * 4
        return 3 * hq * a + proj + inner
    c = _CPU_MAMBA
    scan = 4 * (c["di"] * di + c["gn"] * gn + c["nhT"] * nh * T + c["gT"] * gn / cfg.mamba_state_dim * T
                + c["states"] * states + c["nh"] * nh + c["const"])
    return 3 * hq * a + proj + scan


def _moe_rows(tp: int, sp: bool, ep: int) -> tuple[float, float, float]:
    """Per token of the micro-batch: (rows the router sees on this rank, rows after the
    dispatcher's TP x EP allgather, rows whose top-k copies this rank's experts process:
    k x this many copies). Under SP a rank routes its s/tp tokens; without SP (tp > 1,
    forward only: megatron refuses MoE + TP training without SP) every TP rank routes all of
    them and the TP x EP gather holds each token tp times. Of a gathered row's k copies 1/ep
    land on this rank's experts (balanced routing)."""
    local = 1 / tp if sp and tp > 1 else 1.0
    gathered = local * tp * ep if tp * ep > 1 else 1.0
    return local, gathered, gathered / ep


def moe_activation_bytes(cfg: ModelConfig, tp: int, sp: bool, impl: str, ep: int = 1,
                         aux_loss: bool = False) -> float:
    """Bytes an E layer keeps for backward per token of the micro-batch (module docstring).
    CPU terms are exact saved-tensor counts of megatron's MoELayer (allgather dispatcher,
    SequentialMLP experts, unfused permute); GPU: TEGroupedMLP, alltoall (not measured).
    aux_loss: the load-balancing loss's own fp32 scores and top-k indices (and, for sigmoid,
    their sum) are kept too."""
    a = _bytes(cfg.params_dtype)
    h, k, n_exp = cfg.hidden_size, cfg.moe_router_topk, cfg.num_moe_experts
    hq = h / tp if sp and tp > 1 else h
    d = cfg.moe_latent_size or h  # width the tokens travel and the experts work in
    f = cfg.moe_ffn_hidden_size / tp
    s = cfg.moe_shared_expert_intermediate_size / tp
    gated = cfg.activation == "swiglu"
    local, gathered, rows = _moe_rows(tp, sp, ep)
    norm = 3 * hq * a + 4  # as the MLP: norm input, normed output, their stats
    # router in fp32: input copy (16-bit models), sigmoid scores [E] and their top-k sum,
    # top-k indices (int64) and weights; latent: fc2_latent_proj's input
    sigmoid = cfg.moe_router_score_function == "sigmoid"
    router = ((h * 4 if a < 4 else 0) + (n_exp * 4 + 4 if sigmoid else 0) + k * 12
              + cfg.moe_latent_size * a)
    if aux_loss:  # its own fp32 scores, top-k indices (and, sigmoid, their sum)
        router += n_exp * 4 + k * 8 + (4 if sigmoid else 0)
    # shared expert (all tokens, TP-sharded): fc1 output + activation (gated: 5 widths)
    shared = (5 if gated else 2) * s * a
    if impl == "gpu":
        # alltoall: the routing map (bool) and probs (fp32) of the rank's own tokens; TE's
        # grouped GEMM keeps fc1 input, fc1 output and the fused activation x probs output
        routing = local * n_exp * 5
        per_copy = d * a + ((2 if gated else 1) + 1) * f * a + 12
    else:
        # allgather: the local experts' slice of the gathered routing map and probs; per copy
        # the permuted input, fc1 output, activation, prob-scaled activation (gated: fc1
        # output 2f, then four f-wide tensors), its int64 permutation index and fp32 prob
        routing = gathered * n_exp / ep * 5
        per_copy = d * a + (6 if gated else 3) * f * a + 12
    return norm + local * router + shared + routing + rows * k * per_copy


def moe_dispatch_bytes(cfg: ModelConfig, lay: "Layout", tokens: int, impl: str) -> float:
    """Dispatch buffers of the E layers beyond the saved tensors (module docstring)."""
    if "E" not in cfg.pattern:
        return 0.0
    a = _bytes(cfg.params_dtype)
    d = cfg.moe_latent_size or cfg.hidden_size
    sp = lay.sequence_parallel and lay.tp > 1
    local, gathered, rows = _moe_rows(lay.tp, sp, lay.ep)
    if lay.dispatcher(impl) == "allgather":
        if lay.tp * lay.ep == 1:
            return 0.0
        # persistent gathered hidden states + one layer's gathered fp32 probs, bool routing
        # map and the fp32 copy of the combine's reduce-scatter input (+ its unpermuted output)
        return tokens * gathered * (d * a + cfg.num_moe_experts * 5 + d * (4 + a))
    # alltoall / flex: one layer's top-k copies of the rank's tokens sent and received, and
    # under ETP (tp > 1) the TP-gathered copies
    k = cfg.moe_router_topk
    return tokens * (2 * local * k * d * a + (rows * k * d * a if lay.tp > 1 else 0))


# Fitted per-token element counts of compat/ssd.py + megatron's mixer (fp32 internals)
# on top of 3h (norms, in_proj input) and the in_proj output; see module docstring.
_CPU_MAMBA = {"di": 11.205, "gn": 6.469, "nhT": 1.932, "gT": 1.636, "states": 2.106,
              "nh": 5.735, "const": -40.225}


def _stage_activations(cfg: ModelConfig, pattern: str, lay: Layout, impl: str) -> float:
    """Per micro-batch, all layers of one stage (this CP rank's seq / cp tokens)."""
    seq = lay.seq_length or cfg.seq_length
    tokens = lay.local_tokens(seq)
    per = [layer_activation_bytes(k, cfg, lay.tp, seq, lay.sequence_parallel, lay.recompute, impl,
                                  lay.ep, lay.moe_aux_loss, lay.cp) for k in pattern]
    total = tokens * sum(per)
    if pattern:
        # backward of one layer: gradients of its intermediates beside the saved tensors
        # (and, with full recompute, the layer's recomputed activations): one more layer
        one = max(layer_activation_bytes(k, cfg, lay.tp, seq, lay.sequence_parallel, "none", impl,
                                         lay.ep, lay.moe_aux_loss, lay.cp) for k in set(pattern))
        total += tokens * one * (2 if lay.recompute == "full" else 1)
    return total


def _optimizer_bytes(dense: int, expert: int, cfg: ModelConfig, lay: Layout) -> float:
    """Adam state (+ fp32 main params); the distributed optimizer shards dense parameters
    over DP x CP and routed-expert parameters over the expert-data-parallel group (DP / EP)."""
    main = 4 if cfg.params_dtype == "bf16" else 0
    per = 8 + main
    if not lay.distributed_optimizer:
        return (dense + expert) * per
    return dense * per / (lay.dp * lay.cp) + expert * per / max(1, lay.dp // lay.ep)


def _runtime(impl: str, rest: float) -> float:
    return (2.5 * GiB + 0.05 * rest) if impl == "gpu" else 0.0


def _stages(cfg: ModelConfig, lay: Layout):
    """Per pipeline stage: (index, layer pattern, first, last, (dense, expert) local
    parameter counts)."""
    for i, pat in enumerate(cfg.stage_patterns(lay.pp)):
        first, last = i == 0, i == lay.pp - 1
        yield i, pat, first, last, local_param_split(cfg, pat, lay.tp, first, last, lay.ep)


def _largest(name: str, per_stage: list, impl: str) -> Estimate:
    """The stage whose items (plus the runtime's share) total the most: the one that binds."""
    best = None
    for i, items in per_stage:
        items["runtime"] = _runtime(impl, sum(items.values()))
        est = Estimate(name, items, pp_stage=i)
        if best is None or est.total > best.total:
            best = est
    return best


# ----------------------------------------------------------------------------- stages


def training(cfg: ModelConfig, lay: Layout, impl: str = "gpu", stage: str = "pretrain",
             kd_chunk: Optional[int] = None, teacher: Optional[ModelConfig] = None,
             cache_k: int = 0) -> Estimate:
    """pretrain (LM cross-entropy) or distill (teacher given: forward KL on logits; cache_k
    > 0: KL against a teacher-logits cache of top-K targets, no teacher in memory).
    Sequence-proportional items count this CP rank's tokens (module docstring)."""
    seq = lay.seq_length or cfg.seq_length
    tokens = lay.local_tokens(seq)
    a = _bytes(cfg.params_dtype)
    per_stage = []
    for i, pat, first, last, (dense, expert) in _stages(cfg, lay):
        n = dense + expert
        in_flight = min(lay.pp - i, max(1, lay.num_micro))
        items = {
            "weights": n * a,
            "grads": n * 4.0,
            "optimizer": _optimizer_bytes(dense, expert, cfg, lay),
            "activations": _stage_activations(cfg, pat, lay, impl) * in_flight,
        }
        stage_cfg = dataclasses.replace(cfg, pattern=pat)
        dispatch = moe_dispatch_bytes(stage_cfg, lay, tokens, impl)
        if first:
            items["activations"] += tokens * cfg.hidden_size * a * in_flight  # embedding output
        if last:
            v = cfg.vocab_size / lay.tp
            if cache_k:  # logits, their gradient, one fp32 chunk buffer; the micro-batch's
                # targets (int64 ids, fp32 log-probs, log rest) read from the cache
                chunk = min(kd_chunk or tokens, tokens)
                items["logits"] = tokens * v * 2 * a + chunk * v * 4
                items["teacher cache"] = tokens * (cache_k * 12 + 4)
            elif teacher is None:  # logits, fp32 softmax (in place when fp32), their gradient
                items["logits"] = tokens * v * (2 * a + (4 if a < 4 else 0))
            else:
                chunk = min(kd_chunk or tokens, tokens)
                items["logits"] = tokens * v * 3 * a + 3 * chunk * v * 4
        if teacher is not None:
            tpat = teacher.stage_patterns(lay.pp)[i]
            tn = local_params(teacher, tpat, lay.tp, first, last, lay.ep)
            ta = _bytes(teacher.params_dtype)
            one = max((layer_activation_bytes(k, teacher, lay.tp, seq, lay.sequence_parallel,
                                              "none", impl, lay.ep, cp=lay.cp) for k in set(tpat)), default=0.0)
            items["teacher"] = tn * ta + tokens * one
            # megatron's gather buffer is one per process, sized for the larger of the two
            dispatch = max(dispatch, moe_dispatch_bytes(dataclasses.replace(teacher, pattern=tpat),
                                                        lay, tokens, impl))
        if dispatch:
            items["moe_dispatch"] = dispatch
        per_stage.append((i, items))
    return _largest(stage, per_stage, impl)


def forward_peak_bytes(kind: str, cfg: ModelConfig, lay: Layout, seq: int, impl: str) -> float:
    """Per token, what one layer's forward without autograd holds at its peak: the tensors
    layer_activation_bytes counts, plus on CPU the temporaries alive beside them (ru_maxrss
    of single-layer forwards, h 512, 2 x 1024 tokens): unfused attention holds the [s x s]
    scores and their softmax at once (one more fp32 copy per head: measured 150 MiB, saved
    tensors 80 + 64), the MLP its fc1 output beside the activation's intermediate and output
    (one more FFN width: measured 76 MiB, 44 + 16; the rest is likely GEMM workspace). Mamba
    and MoE layers measured within 1% of their saved-tensor counts (86 / 87, 93 / 92.5 MiB).
    The stats loop's total on a MoE hybrid: tests/unit/test_resources.py (-3.9%)."""
    base = layer_activation_bytes(kind, cfg, lay.tp, seq, lay.sequence_parallel, "none", impl,
                                  lay.ep, cp=lay.cp)
    if impl != "cpu":
        return base
    if kind == "*":
        return base + seq * cfg.num_attention_heads / lay.tp * 4
    if kind == "-":
        gate = 2 if cfg.activation == "swiglu" else 1
        return base + cfg.ffn_hidden_size * gate / lay.tp * _bytes(cfg.params_dtype)
    return base


def stats(cfg: ModelConfig, lay: Layout, impl: str = "gpu", depth: bool = True,
          depth_chunk: int = 1024) -> Estimate:
    """Forward-only calibration: weights, one layer's activations at a time, hooks'
    accumulators; on the last stage the depth KL's held hidden states and chunk buffers.
    (Also eval's forward: under CP, this rank's seq / cp tokens.)"""
    seq = lay.seq_length or cfg.seq_length
    tokens = lay.local_tokens(seq)
    a = _bytes(cfg.params_dtype)
    per_stage = []
    for i, pat, first, last, (dense, expert) in _stages(cfg, lay):
        one = max(forward_peak_bytes(k, cfg, lay, seq, impl) for k in set(pat))
        items = {"weights": (dense + expert) * a,
                 "activations": tokens * (one + 2 * cfg.hidden_size * a)}
        dispatch = moe_dispatch_bytes(dataclasses.replace(cfg, pattern=pat), lay, tokens, impl)
        if dispatch:
            items["moe_dispatch"] = dispatch
        if last:
            v = cfg.vocab_size / lay.tp
            if depth:
                chunk = min(depth_chunk or tokens, tokens)
                items["depth_kl"] = 2 * tokens * cfg.hidden_size * a + chunk * v * (2 * a + 3 * 4)
            else:
                items["logits"] = tokens * v * a
        per_stage.append((i, items))
    return _largest("stats", per_stage, impl)


def prune(cfg: ModelConfig, impl: str = "gpu") -> Estimate:
    """prune rewrites the checkpoint tensor by tensor on the host: the largest global
    tensor read, sliced and written (about 3 copies)."""
    per_layer = max(cfg.hidden_size * (2 * cfg.mamba_d_inner + 2 * cfg.mamba_num_groups
                                       * cfg.mamba_state_dim + cfg.mamba_num_heads),
                    cfg.hidden_size * cfg.ffn_hidden_size)
    if cfg.is_moe:  # one global [experts, ffn (x2 gated), width] tensor per expert projection
        gate = 2 if cfg.activation == "swiglu" else 1
        per_layer = max(per_layer, cfg.num_moe_experts * cfg.moe_ffn_hidden_size * gate
                        * (cfg.moe_latent_size or cfg.hidden_size))
    biggest = max(per_layer, cfg.vocab_size * cfg.hidden_size) * _bytes(cfg.params_dtype)
    return Estimate("prune", {"tensor buffers": 3.0 * biggest}, notes=["host memory, no GPU"])


def serving(cfg: ModelConfig, seq_length: int, batch: int = 1, state_dtype: str = "fp32") -> dict:
    """Bytes to serve `batch` sequences of `seq_length` tokens: bf16 weights, the attention
    layers' bf16 K and V cache, and each Mamba layer's bf16 conv window and SSM state in
    `state_dtype` (the shapes and dtypes transformers' NemotronH cache holds: conv [B,
    conv_dim, d_conv], state [B, heads, head_dim, d_state] in fp32). Activations are left out: a decode step's
    are small, a prefill's depend on its chunking."""
    flat = cfg.pattern.replace("|", "")
    conv_dim = cfg.mamba_d_inner + 2 * cfg.mamba_num_groups * cfg.mamba_state_dim
    out = {
        "weights": 2 * count_parameters(cfg)["total"],
        "kv_cache": flat.count("*") * 2 * batch * seq_length * cfg.num_query_groups * cfg.kv_channels * 2,
        "mamba_conv_state": flat.count("M") * batch * conv_dim * cfg.mamba_conv_kernel * 2,
        "mamba_ssm_state": flat.count("M") * batch * cfg.mamba_d_inner * cfg.mamba_state_dim
        * _bytes(state_dtype),
    }
    out["total"] = sum(out.values())
    return out


def fits(est: Estimate, limit_gb: float) -> bool:
    return est.total <= limit_gb * GiB
