"""Per-GPU memory of a stage at its layout, itemised, from the configs alone (pure functions).

Items, for the worst pipeline stage of one rank (bytes):
  weights      local parameters x params bytes (embedding on the first PP stage, output
               layer on the last; matrices / TP, norms replicated)
  grads        megatron's DDP gradient buffer, fp32 (grad_reduce_in_fp32)
  optimizer    Adam moments (8 B) + fp32 main params for 16-bit models (4 B); divided by DP
               with the distributed optimizer
  activations  bytes autograd keeps per micro-batch x micro-batches in flight (1F1B: the
               first of pp stages holds min(pp, num_micro)); with recompute only what the
               recompute region keeps; plus one layer's worth for the gradients of its
               intermediates during its backward (two with full recompute)
  logits       LM head output and loss buffers (CE: logits + fp32 softmax; KD: student
               logits + their gradient + teacher logits + the loss's fp32 chunk buffers)
  teacher      distill: frozen teacher weights and one layer of forward activations
  depth_kl     stats: hidden states held for the depth KL + logits chunks + KL buffers
  runtime      CUDA context, NCCL buffers, allocator slack (GPU only; an assumption)

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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..config import ModelConfig
from ..model import layer_param_counts

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


def local_params(cfg: ModelConfig, pattern: str, tp: int, first: bool, last: bool) -> int:
    """Parameters one TP rank of one PP stage holds (norm weights are replicated)."""
    per = layer_param_counts(cfg)
    h = cfg.hidden_size
    n = 0
    for c in pattern:
        n += (per[c] - h) // tp + h  # each layer has one replicated input norm of size h
    if first:
        n += cfg.vocab_size * h // tp
    if last:
        n += h  # final norm
        if cfg.untie_embeddings or not first:
            n += cfg.vocab_size * h // tp
    return n


# ----------------------------------------------------------------------------- activations


def layer_activation_bytes(kind: str, cfg: ModelConfig, tp: int, seq: int, sp: bool,
                           recompute: str, impl: str) -> float:
    """Bytes autograd keeps for backward, per token, for one layer of `kind`."""
    a = _bytes(cfg.params_dtype)
    h = cfg.hidden_size
    hq = h / tp if sp and tp > 1 else h  # residual-stream tensors: split by SP
    if recompute == "full":
        return hq * a  # only the layer's input; the rest is recomputed in backward
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
        else:  # unfused: q, k, v, context and the [s x s] probabilities per head
            core = 3 * qw * a + seq * heads * 4
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


# Fitted per-token element counts of compat/ssd.py + megatron's mixer (fp32 internals)
# on top of 3h (norms, in_proj input) and the in_proj output; see module docstring.
_CPU_MAMBA = {"di": 11.205, "gn": 6.469, "nhT": 1.932, "gT": 1.636, "states": 2.106,
              "nh": 5.735, "const": -40.225}


def _stage_activations(cfg: ModelConfig, pattern: str, lay: Layout, impl: str) -> float:
    """Per micro-batch, all layers of one stage."""
    seq = lay.seq_length or cfg.seq_length
    tokens = lay.micro_batch_size * seq
    per = [layer_activation_bytes(k, cfg, lay.tp, seq, lay.sequence_parallel, lay.recompute, impl)
           for k in pattern]
    total = tokens * sum(per)
    if pattern:
        # backward of one layer: gradients of its intermediates beside the saved tensors
        # (and, with full recompute, the layer's recomputed activations): one more layer
        one = max(layer_activation_bytes(k, cfg, lay.tp, seq, lay.sequence_parallel, "none", impl)
                  for k in set(pattern))
        total += tokens * one * (2 if lay.recompute == "full" else 1)
    return total


def _optimizer_bytes(n: int, cfg: ModelConfig, lay: Layout) -> float:
    main = 4 if cfg.params_dtype == "bf16" else 0
    per = 8 + main
    return n * per / (lay.dp if lay.distributed_optimizer else 1)


def _runtime(impl: str, rest: float) -> float:
    return (2.5 * GiB + 0.05 * rest) if impl == "gpu" else 0.0


def _stages(cfg: ModelConfig, lay: Layout):
    """Per pipeline stage: (index, layer pattern, first, last, local parameter count)."""
    for i, pat in enumerate(cfg.stage_patterns(lay.pp)):
        first, last = i == 0, i == lay.pp - 1
        yield i, pat, first, last, local_params(cfg, pat, lay.tp, first, last)


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
             kd_chunk: Optional[int] = None, teacher: Optional[ModelConfig] = None) -> Estimate:
    """pretrain (LM cross-entropy) or distill (teacher given: forward KL on logits)."""
    seq = lay.seq_length or cfg.seq_length
    tokens = lay.micro_batch_size * seq
    a = _bytes(cfg.params_dtype)
    per_stage = []
    for i, pat, first, last, n in _stages(cfg, lay):
        in_flight = min(lay.pp - i, max(1, lay.num_micro))
        items = {
            "weights": n * a,
            "grads": n * 4.0,
            "optimizer": _optimizer_bytes(n, cfg, lay),
            "activations": _stage_activations(cfg, pat, lay, impl) * in_flight,
        }
        if first:
            items["activations"] += tokens * cfg.hidden_size * a * in_flight  # embedding output
        if last:
            v = cfg.vocab_size / lay.tp
            if teacher is None:  # logits, fp32 softmax (in place when fp32), their gradient
                items["logits"] = tokens * v * (2 * a + (4 if a < 4 else 0))
            else:
                chunk = min(kd_chunk or tokens, tokens)
                items["logits"] = tokens * v * 3 * a + 3 * chunk * v * 4
        if teacher is not None:
            tpat = teacher.stage_patterns(lay.pp)[i]
            tn = local_params(teacher, tpat, lay.tp, first, last)
            ta = _bytes(teacher.params_dtype)
            one = max((layer_activation_bytes(k, teacher, lay.tp, seq, lay.sequence_parallel,
                                              "none", impl) for k in set(tpat)), default=0.0)
            items["teacher"] = tn * ta + tokens * one
        per_stage.append((i, items))
    return _largest(stage, per_stage, impl)


def stats(cfg: ModelConfig, lay: Layout, impl: str = "gpu", depth: bool = True,
          depth_chunk: int = 1024) -> Estimate:
    """Forward-only calibration: weights, one layer's activations at a time, hooks'
    accumulators; on the last stage the depth KL's held hidden states and chunk buffers."""
    seq = lay.seq_length or cfg.seq_length
    tokens = lay.micro_batch_size * seq
    a = _bytes(cfg.params_dtype)
    per_stage = []
    for i, pat, first, last, n in _stages(cfg, lay):
        one = max(layer_activation_bytes(k, cfg, lay.tp, seq, lay.sequence_parallel, "none", impl)
                  for k in set(pat))
        items = {"weights": n * a, "activations": tokens * (one + 2 * cfg.hidden_size * a)}
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
    biggest = max(per_layer, cfg.vocab_size * cfg.hidden_size) * _bytes(cfg.params_dtype)
    return Estimate("prune", {"tensor buffers": 3.0 * biggest}, notes=["host memory, no GPU"])


def fits(est: Estimate, limit_gb: float) -> bool:
    return est.total <= limit_gb * GiB
