"""Stage configs: one dataclass per stage, YAML mapped 1:1, dotted `key=value` overrides.

A recipe is a YAML mapping whose keys are the stage dataclass's fields (nested dataclasses
are nested mappings). `include: [other.yaml, ...]` composes recipes (paths relative to
the including file; later files and the including file win). Overrides on the command
line are `dotted.key=value`, parsed as YAML scalars and checked against the field type.
Unknown keys, wrong types and impossible sizes are refused with a `ConfigError` that
names the key and the fix, before any model is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import ConfigError  # noqa: F401


# ----------------------------------------------------------------------------- model


@dataclass
class ModelConfig:
    """Architecture of a hybrid Mamba2 / attention / MLP / MoE model (Nemotron-H style).

    `pattern` has one character per layer: `M` Mamba2 mixer, `*` self-attention, `-` MLP,
    `E` mixture-of-experts MLP (megatron-core's hybrid_override_pattern).
    """

    pattern: str = "M-M*-M-"
    hidden_size: int = 256
    ffn_hidden_size: int = 768
    activation: str = "squared_relu"  # squared_relu | relu | gelu | swiglu
    mamba_num_heads: int = 8
    mamba_head_dim: int = 32
    mamba_num_groups: int = 2
    mamba_state_dim: int = 16
    mamba_conv_kernel: int = 4
    mamba_chunk_size: int = 64
    # Mamba dt clamp: dt = softplus(dt_raw + dt_bias) clamped to [min, max] in the scan, as
    # transformers' NemotronH and mamba_ssm's kernels do at config.json time_step_limit
    # (import-hf keeps it, export-hf writes it); 0 = no bound. Megatron-trained models have
    # none (compat/dt_limit.py applies it).
    mamba_dt_clamp_min: float = 0.0
    mamba_dt_clamp_max: float = 0.0
    num_attention_heads: int = 4
    num_query_groups: int = 2
    kv_channels: int = 64
    vocab_size: int = 4096
    seq_length: int = 256
    norm_epsilon: float = 1e-5
    position_embedding: str = "none"  # none (Nemotron-H) | rope
    rotary_percent: float = 0.5
    rotary_base: int = 10000
    untie_embeddings: bool = True
    init_method_std: float = 0.02
    params_dtype: str = "fp32"  # fp32 | bf16
    # Mixture-of-experts layers ('E'): megatron-core MoELayer, as Nemotron 3 (transformers'
    # NemotronH "moe" layers): ungated experts with `activation`, a sigmoid router whose
    # top-k weights are normalised (norm_topk_prob) and scaled by routed_scaling_factor.
    num_moe_experts: int = 0  # routed experts per E layer (n_routed_experts)
    moe_ffn_hidden_size: int = 0  # each expert's FFN width (moe_intermediate_size)
    moe_router_topk: int = 2  # experts per token (num_experts_per_tok)
    moe_shared_expert_intermediate_size: int = 0  # 0 = no shared expert
    moe_router_score_function: str = "sigmoid"  # sigmoid | softmax
    # per-expert score-correction bias added to the scores for the choice only (fp32;
    # transformers' gate.e_score_correction_bias)
    moe_router_expert_bias: bool = True
    moe_router_topk_scaling_factor: float = 1.0  # routed_scaling_factor
    moe_router_num_groups: int = 1  # grouped routing: n_group (1 = off)
    moe_router_group_topk: int = 1  # groups a token may use: topk_group
    moe_latent_size: int = 0  # latent MoE: experts work in this width (0 = off)

    @property
    def num_layers(self) -> int:
        return len(self.pattern.replace("|", ""))

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def is_moe(self) -> bool:
        return "E" in self.pattern

    def validate(self, tp: int = 1, pp: int = 1, prefix: str = "model", ep: int = 1) -> None:
        p = prefix + "."
        bad = set(self.pattern) - set(LAYER_SYMBOLS)
        if bad:
            raise ConfigError(
                f"{p}pattern={self.pattern!r} has unknown layer symbols {sorted(bad)}; "
                "use M (Mamba), * (attention), - (MLP), E (mixture of experts)"
            )
        if self.num_layers == 0:
            raise ConfigError(f"{p}pattern is empty; give at least one layer, e.g. 'M-*-'")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"{p}activation={self.activation!r} is unknown; choose one of {sorted(ACTIVATIONS)}"
            )
        if self.position_embedding not in ("rope", "none"):
            raise ConfigError(f"{p}position_embedding={self.position_embedding!r}: use 'rope' or 'none'")
        if self.params_dtype not in ("fp32", "bf16"):
            raise ConfigError(f"{p}params_dtype={self.params_dtype!r}: use 'fp32' or 'bf16'")
        for name in ("hidden_size", "ffn_hidden_size", "vocab_size", "seq_length"):
            _positive(self, name, p)

        def divisible(key: str, value: int, by: int, what: str) -> None:
            if value % by:
                lo = value - value % by
                alt = f"{lo} or {lo + by}" if lo else f"{by}"
                raise ConfigError(
                    f"{p}{key}={value} is not divisible by {what}={by}; use e.g. {alt}"
                )

        if "M" in self.pattern:
            for name in ("mamba_num_heads", "mamba_head_dim", "mamba_num_groups",
                         "mamba_state_dim", "mamba_conv_kernel", "mamba_chunk_size"):
                _positive(self, name, p)
            divisible("mamba_num_heads", self.mamba_num_heads, self.mamba_num_groups,
                      "model.mamba_num_groups")
            lo, hi = self.mamba_dt_clamp_min, self.mamba_dt_clamp_max
            if not (lo >= 0 and hi >= 0) or (hi and hi <= lo) or lo == float("inf"):
                raise ConfigError(
                    f"{p}mamba_dt_clamp_min={lo}, {p}mamba_dt_clamp_max={hi}: give 0 <= min < max "
                    "(0 = no bound), e.g. mamba_dt_clamp_min=0.001 as transformers' "
                    "time_step_limit=[0.001, inf]")
            divisible("mamba_num_heads", self.mamba_num_heads, tp, "parallel.tp")
            divisible("mamba_num_groups", self.mamba_num_groups, tp, "parallel.tp")
        if "*" in self.pattern:
            for name in ("num_attention_heads", "num_query_groups", "kv_channels"):
                _positive(self, name, p)
            divisible("num_attention_heads", self.num_attention_heads, self.num_query_groups,
                      "model.num_query_groups")
            divisible("num_query_groups", self.num_query_groups, tp, "parallel.tp")
            if self.position_embedding == "rope":
                rot = int(self.kv_channels * self.rotary_percent)
                if rot <= 0 or rot % 2:
                    raise ConfigError(
                        f"{p}rotary_percent={self.rotary_percent} gives {rot} rotary dims of "
                        f"kv_channels={self.kv_channels}; it must be a positive even number"
                    )
        if "-" in self.pattern:
            divisible("ffn_hidden_size", self.ffn_hidden_size, tp, "parallel.tp")
        if self.is_moe:
            self._validate_moe(tp, ep, p, divisible)
        divisible("vocab_size", self.vocab_size, tp, "parallel.tp")
        if pp > 1:
            stages = self.pattern.split("|") if "|" in self.pattern else None
            if stages is not None and len(stages) != pp:
                raise ConfigError(
                    f"{p}pattern has {len(stages)} '|'-separated stages but parallel.pp={pp}"
                )
            if stages is None and self.num_layers % pp:
                raise ConfigError(
                    f"{p}pattern has {self.num_layers} layers, not divisible by parallel.pp={pp}; "
                    f"choose pp in {[d for d in range(1, self.num_layers + 1) if self.num_layers % d == 0]}"
                )

    def _validate_moe(self, tp: int, ep: int, p: str, divisible) -> None:
        n = self.num_moe_experts
        if n <= 0:
            raise ConfigError(f"{p}pattern has E (mixture-of-experts) layers but "
                              f"{p}num_moe_experts={n}; give the routed experts per layer, e.g. 8")
        _positive(self, "moe_ffn_hidden_size", p)
        if not 1 <= self.moe_router_topk <= n:
            raise ConfigError(f"{p}moe_router_topk={self.moe_router_topk} must be between 1 and "
                              f"{p}num_moe_experts={n}")
        if self.moe_router_score_function not in ("sigmoid", "softmax"):
            raise ConfigError(f"{p}moe_router_score_function={self.moe_router_score_function!r}: "
                              "use sigmoid (Nemotron 3) or softmax")
        if self.moe_router_expert_bias and self.moe_router_score_function != "sigmoid":
            raise ConfigError(f"{p}moe_router_expert_bias=true needs "
                              f"{p}moe_router_score_function=sigmoid (megatron-core's rule); set "
                              f"{p}moe_router_expert_bias=false for softmax routing")
        if not self.moe_router_topk_scaling_factor > 0:
            raise ConfigError(f"{p}moe_router_topk_scaling_factor="
                              f"{self.moe_router_topk_scaling_factor} must be positive (1 = none)")
        for name in ("moe_shared_expert_intermediate_size", "moe_latent_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{p}{name}={getattr(self, name)} must be >= 0 (0 = none)")
        g, gk = self.moe_router_num_groups, self.moe_router_group_topk
        if g < 1 or not 1 <= gk <= g:
            raise ConfigError(f"{p}moe_router_num_groups={g}, {p}moe_router_group_topk={gk}: "
                              "give 1 <= group_topk <= num_groups (1, 1 = no grouped routing)")
        divisible("num_moe_experts", n, g, "model.moe_router_num_groups")
        if g > 1:
            divisible("moe_router_topk", self.moe_router_topk, gk, "model.moe_router_group_topk")
            if self.moe_router_topk > gk * (n // g):
                raise ConfigError(f"{p}moe_router_topk={self.moe_router_topk} exceeds the "
                                  f"{gk} groups x {n // g} experts a token may use")
        if ep < 1:
            raise ConfigError(f"parallel.ep={ep} must be >= 1")
        if n % ep:
            ok = [d for d in range(1, n + 1) if n % d == 0]
            raise ConfigError(f"{p}num_moe_experts={n} is not divisible by parallel.ep={ep}; "
                              f"choose parallel.ep in {ok}")
        divisible("moe_ffn_hidden_size", self.moe_ffn_hidden_size, tp, "parallel.tp")
        if self.moe_shared_expert_intermediate_size:
            divisible("moe_shared_expert_intermediate_size",
                      self.moe_shared_expert_intermediate_size, tp, "parallel.tp")

    def stage_patterns(self, pp: int) -> list[str]:
        """The layer pattern of each pipeline stage: the '|'-separated parts, else equal parts."""
        if "|" in self.pattern:
            return self.pattern.split("|")
        n = len(self.pattern) // pp
        return [self.pattern[i * n:(i + 1) * n] for i in range(pp)]

    def layer_offset(self, pp: int, pp_rank: int) -> int:
        """Global id of pipeline stage pp_rank's first layer."""
        return len("".join(self.stage_patterns(pp)[:pp_rank]))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_moe_train(train: "TrainConfig", model: "ModelConfig", prefix: str = "train") -> None:
    """The router's training settings act on E layers only: set on a model without any,
    they would change nothing, so they are refused (the defaults pass)."""
    if model.is_moe:
        return
    for f in ("moe_aux_loss_coeff", "moe_router_bias_update_rate"):
        if getattr(train, f) != getattr(TrainConfig, f):
            raise ConfigError(f"{prefix}.{f}={getattr(train, f)} acts on mixture-of-experts layers, but "
                              f"pattern {model.pattern!r} has no E layer; leave {prefix}.{f} at its default")


def check_ep_used(ep: int, *models: "ModelConfig") -> None:
    """parallel.ep > 1 splits MoE experts; refused when no model of the stage has any (it
    would change nothing). A dense model beside an MoE one (a dense KD student) is fine."""
    if ep > 1 and not any(m.is_moe for m in models):
        pats = ", ".join(repr(m.pattern) for m in models)
        raise ConfigError(f"parallel.ep={ep} splits mixture-of-experts layers, but pattern {pats} "
                          "has no E layer; use parallel.ep=1")


ACTIVATIONS = {"squared_relu", "relu", "gelu", "swiglu"}
LAYER_SYMBOLS = "M*-E|"


def _positive(obj: Any, name: str, p: str) -> None:
    v = getattr(obj, name)
    if v <= 0:
        raise ConfigError(f"{p}{name}={v} must be positive")


# ----------------------------------------------------------------------------- shared


@dataclass
class ParallelConfig:
    """Model-parallel layout. Data parallel size = world size / (tp * pp). Expert parallel
    (ep) splits each MoE layer's experts over ep ranks of the data-parallel group (as in
    megatron: dp must be a multiple of ep); expert weights are TP-sharded like the MLP's."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    # MoE token dispatcher: auto = alltoall on GPU, allgather on CPU (megatron's alltoall
    # records CUDA stream events) | allgather | alltoall | flex (GPU; flex needs DeepEP)
    moe_dispatcher: str = "auto"
    # experts as one grouped GEMM (Transformer Engine's TEGroupedMLP) instead of a loop of
    # SequentialMLP experts: auto = on where TE runs (GPU); the checkpoint keys are the same
    moe_grouped_gemm: str = "auto"  # auto | true | false
    sequence_parallel: bool = False
    # "auto": Megatron's distributed optimizer on GPU; the plain fp32 optimizer on CPU,
    # where megatron-core's distributed optimizer refuses non-CUDA tensors.
    distributed_optimizer: str = "auto"  # auto | true | false
    # how the distributed optimizer's state is saved: dp_sharded (each DP rank writes its
    # slice; resumes at the same layout) | reshardable (gathered per parameter; any layout)
    optimizer_checkpoint: str = "dp_sharded"
    # mamba_ssm's fused conv+scan+norm kernel: auto = on for training on GPU with mamba_ssm,
    # off elsewhere (the stats hooks read the unfused in_proj / out_proj tensors)
    mamba_mem_eff_path: str = "auto"  # auto | true | false
    fp8: str = ""  # '' | e4m3 | hybrid: Transformer Engine fp8 GEMMs (GPU with TE only)
    overlap_grad_reduce: bool = False  # DDP: overlap DP gradient reduce with backward (GPU)
    overlap_param_gather: bool = False  # distributed optimizer: overlap param all-gather (GPU)
    # context parallelism: each sequence split over cp ranks (megatron's load-balanced
    # chunks; Mamba through megatron's MambaContextParallel, attention through TE on GPU
    # and compat/cp_attention.py elsewhere). Data parallel size = world / (tp * pp * cp).
    # pretrain, eval, distill and search (CP_STAGES); the other stages refuse cp > 1.
    cp: int = 1
    # the stage refuses to start when its memory estimate per GPU exceeds this (GiB);
    # 0 = the device's memory (on CPU: host memory / ranks per node). --dry-run prints it.
    memory_limit_gb: float = 0.0
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo

    def validate(self, prefix: str = "parallel", cp_ok: bool = False) -> None:
        """cp_ok: the calling stage runs with context parallelism (CP_STAGES)."""
        if self.tp < 1 or self.pp < 1 or self.ep < 1 or self.cp < 1:
            raise ConfigError(f"{prefix}.tp={self.tp}, {prefix}.pp={self.pp}, {prefix}.ep={self.ep}, "
                              f"{prefix}.cp={self.cp}: all must be >= 1")
        if self.moe_dispatcher not in ("auto", "allgather", "alltoall", "flex"):
            raise ConfigError(f"{prefix}.moe_dispatcher={self.moe_dispatcher!r}: use auto, "
                              "allgather, alltoall or flex")
        for key in ("distributed_optimizer", "mamba_mem_eff_path", "moe_grouped_gemm"):
            if getattr(self, key) not in ("auto", "true", "false"):
                raise ConfigError(f"{prefix}.{key}={getattr(self, key)!r}: use auto, true or false")
        if self.cp != 1 and not cp_ok:
            raise ConfigError(
                f"{prefix}.cp={self.cp}: context parallelism runs in {', '.join(CP_STAGES)} only "
                "so far; this stage's batches, hooks and losses are not split over CP ranks. Use "
                f"{prefix}.cp=1 here (with {prefix}.tp / sequence_parallel for long sequences)")
        if not self.memory_limit_gb >= 0:
            raise ConfigError(f"{prefix}.memory_limit_gb={self.memory_limit_gb} must be >= 0 "
                              "(0 = the device's memory)")
        if self.fp8 not in ("", "e4m3", "hybrid"):
            raise ConfigError(f"{prefix}.fp8={self.fp8!r}: use '' (off), e4m3 or hybrid")
        if self.optimizer_checkpoint not in ("dp_sharded", "reshardable"):
            raise ConfigError(f"{prefix}.optimizer_checkpoint={self.optimizer_checkpoint!r}: use "
                              "dp_sharded or reshardable")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ConfigError(f"{prefix}.backend={self.backend!r}: use auto, nccl or gloo")


CP_STAGES = ("pretrain", "eval", "distill", "search")  # the stages that accept parallel.cp > 1


def check_cp(model: "ModelConfig", parallel: ParallelConfig, prefix: str = "model") -> None:
    """The model splits over parallel.cp ranks: the sequence into 2*cp equal chunks; each
    Mamba layer's heads (and B/C groups) over the CP ranks of a TP rank, as megatron's
    MambaContextParallel requires. MoE layers need nothing more: tokens route independently,
    and megatron reduces the load-balancing loss's counts over TP x CP and the expert bias's
    over TP x DP x CP (tests/dist/cp_worker.py checks both)."""
    cp, tp, p = parallel.cp, parallel.tp, prefix + "."
    if cp == 1:
        return
    if model.seq_length % (2 * cp):
        lo = model.seq_length - model.seq_length % (2 * cp)
        raise ConfigError(f"{p}seq_length={model.seq_length} is not divisible by 2 x parallel.cp = "
                          f"{2 * cp} (each CP rank holds two equal chunks); use e.g. {lo or 2 * cp}")
    if "M" in model.pattern:
        heads, groups = model.mamba_num_heads // tp, model.mamba_num_groups // tp
        if heads % cp:
            raise ConfigError(f"{p}mamba_num_heads={model.mamba_num_heads} gives {heads} heads per "
                              f"TP rank, not divisible by parallel.cp={cp} (Mamba layers split heads "
                              f"over CP ranks); choose parallel.cp dividing {heads}")
        if (groups < cp and cp % groups) or (groups >= cp and groups % cp):
            raise ConfigError(f"{p}mamba_num_groups={model.mamba_num_groups} gives {groups} groups "
                              f"per TP rank: parallel.cp={cp} must divide it or be a multiple of it "
                              "(megatron's MambaContextParallel)")


@dataclass
class DataConfig:
    """Where tokens come from: megatron indexed dataset(s) and their tokenizer.

    `prefix`: one prefix, a blend [w1, p1, w2, p2, ...] / [p1, p2, ...], or per-split blends
    {train: ..., valid: ..., test: ...} (megatron's forms; data/blend.py). `tokenizer`: a
    tokenizer.json or a Hugging Face tokenizer folder; `eod_token`: its end-of-document
    token when it names no eos (empty = its eos / <|endoftext|>).
    """

    prefix: Any = "data/default/corpus_text_document"
    tokenizer: str = "data/default/tokenizer.json"
    eod_token: str = ""
    split: str = "98,2,0"
    seed: int = 1234

    def validate(self, prefix: str = "data") -> None:
        from .data.blend import parse_blend

        parse_blend(self.prefix, f"{prefix}.prefix")
        parts = self.split.split(",")
        try:
            vals = [float(x) for x in parts]
        except ValueError:
            vals = []
        if len(vals) != 3 or min(vals) < 0 or sum(vals) <= 0:
            raise ConfigError(
                f"{prefix}.split={self.split!r} must be three non-negative weights 'train,valid,test', e.g. '98,2,0'"
            )


@dataclass
class TrainConfig:
    steps: int = 300
    global_batch_size: int = 16
    micro_batch_size: int = 4
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 30
    lr_decay_style: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int = 100
    eval_iters: int = 8
    save_interval: int = 100
    # activation recompute: none | selective (attention core + MLP) | full (every layer)
    recompute: str = "none"
    # Save and stop (exit 0) once this many minutes have passed since the stage started;
    # 0 = no limit. For clusters without a warning signal (preempt.py; Slurm jobs also
    # stop on SIGUSR1 / SIGTERM). Re-running the same command resumes.
    exit_duration_minutes: float = 0.0
    # MoE router while training (E layers only): the load-balancing loss coefficient
    # (megatron's aux_loss over the batch; 0 = off) and the update rate of the aux-loss-free
    # expert bias (DeepSeek-V3 style: after each step the bias of under-used experts rises;
    # 0 = frozen). Nemotron 3 trains with both; frozen-weight stages (stats, eval, the KD
    # teacher) never update either.
    moe_aux_loss_coeff: float = 1e-4
    moe_router_bias_update_rate: float = 1e-3

    def validate(self, dp: int = 1, prefix: str = "train") -> None:
        for name in ("steps", "global_batch_size", "micro_batch_size", "log_interval",
                     "eval_interval", "eval_iters", "save_interval"):
            _positive(self, name, prefix + ".")
        if not self.exit_duration_minutes >= 0:  # also NaN
            raise ConfigError(f"{prefix}.exit_duration_minutes={self.exit_duration_minutes} must be "
                              ">= 0 minutes (0 = no limit), e.g. 230 for a 4-hour job")
        if self.global_batch_size % (self.micro_batch_size * dp):
            mb = self.micro_batch_size * dp
            raise ConfigError(
                f"{prefix}.global_batch_size={self.global_batch_size} is not divisible by "
                f"micro_batch_size x data-parallel size = {self.micro_batch_size} x {dp}; "
                f"use e.g. {max(mb, self.global_batch_size - self.global_batch_size % mb)}"
            )
        for name in ("moe_aux_loss_coeff", "moe_router_bias_update_rate"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{prefix}.{name}={getattr(self, name)} must be >= 0 (0 = off)")
        if self.recompute not in ("none", "selective", "full"):
            raise ConfigError(f"{prefix}.recompute={self.recompute!r}: use none, selective or full")
        if self.lr_decay_style not in ("cosine", "linear", "constant"):
            raise ConfigError(f"{prefix}.lr_decay_style={self.lr_decay_style!r}: use cosine, linear or constant")
        if self.warmup_steps >= self.steps:
            raise ConfigError(
                f"{prefix}.warmup_steps={self.warmup_steps} must be < {prefix}.steps={self.steps}; "
                f"set {prefix}.warmup_steps={self.steps - 1} (or less) or {prefix}.steps="
                f"{self.warmup_steps + 1} (or more)"
            )
        if not self.lr > 0:  # also NaN
            raise ConfigError(f"{prefix}.lr={self.lr} must be a positive learning rate, e.g. 3e-4")
        if not self.min_lr >= 0:
            raise ConfigError(f"{prefix}.min_lr={self.min_lr} must be >= 0 (0 decays to zero)")
        if self.min_lr > self.lr:
            raise ConfigError(f"{prefix}.min_lr={self.min_lr} exceeds {prefix}.lr={self.lr}")


# ----------------------------------------------------------------------------- stages


@dataclass
class PretrainConfig:
    output_dir: str = "runs/teacher"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    resume: bool = True  # continue from output_dir's latest checkpoint when there is one
    init_from: str = ""  # start from this checkpoint's weights (new optimizer, step 0)


@dataclass
class EvalConfig:
    checkpoint: str = "runs/teacher"
    # its shape for --dry-run / --print-config before that checkpoint exists: a model YAML
    # (configs/model/*.yaml), a recipe with a model: mapping, a plan.json (its target) or a
    # checkpoint; the checkpoint's own config wins once it exists
    checkpoint_model: str = ""
    output_dir: str = ""  # default: <checkpoint>/eval
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval_iters: int = 16
    micro_batch_size: int = 4
    split: str = "valid"  # valid | test | train




# ----------------------------------------------------------------------------- loading


def load_yaml(path: str | Path, _seen: Optional[set] = None) -> dict:
    """Read a recipe, resolving `include:` (depth-first, includer wins)."""
    path = Path(path).resolve()
    seen = _seen or set()
    if path in seen:
        raise ConfigError(f"recipe include cycle at {path}")
    seen = seen | {path}
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:  # one line: where and what, no parser traceback
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"recipe {path} is not valid YAML{where}: {what}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"recipe {path} cannot be read: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a YAML mapping, got {type(data).__name__}")
    includes = data.pop("include", []) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict = {}
    for inc in includes:
        merged = _deep_merge(merged, load_yaml(path.parent / inc, seen))
    return _deep_merge(merged, data)


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(items: list[str]) -> dict:
    """['a.b=1', 'c=x'] -> {'a': {'b': 1}, 'c': 'x'} (values parsed as YAML scalars)."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like dotted.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:  # e.g. `*-*-` (an alias for YAML): quote it for YAML and for the shell
            import shlex

            sq, dq = "'", '"'
            if not set(item) & set('"$`\\!'):  # bash "...", YAML '...'
                hint = dq + key + "=" + sq + raw.replace(sq, sq * 2) + sq + dq
            elif sq not in item:  # bash '...', YAML "..."
                hint = sq + key + "=" + dq + raw.replace("\\", "\\\\").replace(dq, "\\" + dq) + dq + sq
            else:
                hint = shlex.quote(key + "=" + sq + raw.replace(sq, sq * 2) + sq)
            raise ConfigError(f"override {item!r}: the value is not a valid YAML scalar; quote it "
                              f"(YAML quotes inside shell quotes), e.g. {hint}") from None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override")
        node[parts[-1]] = value
    return out


def build(cls: type, data: dict, prefix: str = "") -> Any:
    """Instantiate dataclass `cls` from a mapping, strictly: unknown keys and wrong types fail."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            removed = getattr(cls, "REMOVED_KEYS", {}).get(key)  # a key of earlier versions
            if removed:
                raise ConfigError(f"{prefix}{key} was removed: {removed}")
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {sorted(fields)}"
            raise ConfigError(f"unknown key {prefix}{key}{hint}")
        kwargs[key] = _coerce(hints[key], value, prefix + key)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key + ".")
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list")
        (inner,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '3e-4' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} must be a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r} must be a string")
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} must be a mapping")
        return value
    return value


def load_stage_config(stage: str, recipe: Optional[str], overrides: list[str]) -> Any:
    from .stages import available, config_class

    if stage not in available():
        raise ConfigError(f"unknown stage {stage!r}; stages: {', '.join(available())}")
    data = load_yaml(recipe) if recipe else {}
    data = _deep_merge(data, parse_overrides(overrides))
    return build(config_class(stage), data)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_json(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)
