"""Candidate architectures under a budget (paper sec. 3.5, table 1). Pure.

A search space gives, per axis, the values to try: a YAML list (`[3072, 3584, 4096]`), a
range mapping (`{start: 3072, stop: 4096, step: 256}`, stop inclusive) or the string
"start:stop:step". A candidate fixes the number of layers, hidden size, FFN size, Mamba
heads and Mamba head dim, and for a mixture-of-experts teacher the routed experts per E
layer, each expert's FFN and the shared expert's FFN; which layers go when depth is pruned
follows the teacher's depth importance (lowest first), so the candidate's pattern, and hence
its total and active parameter counts (model.count_parameters, which equal the built model)
and its serving memory (resources.estimate.serving), are known exactly. A Budget bounds any
combination of the three.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..config import ConfigError, ModelConfig, ParallelConfig, check_cp
from ..model import count_parameters
from ..resources.estimate import GiB, serving

DENSE_AXES = ("num_layers", "hidden_size", "ffn_hidden_size", "mamba_num_heads", "mamba_head_dim")
MOE_AXES = ("num_moe_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size")
AXES = DENSE_AXES + MOE_AXES


@dataclass
class SearchSpace:
    """Values per axis; an empty list means 'keep the teacher's value'."""

    num_layers: Any = field(default_factory=list)
    hidden_size: Any = field(default_factory=list)
    ffn_hidden_size: Any = field(default_factory=list)
    mamba_num_heads: Any = field(default_factory=list)
    mamba_head_dim: Any = field(default_factory=list)
    # mixture-of-experts teachers only (a dense teacher refuses them)
    num_moe_experts: Any = field(default_factory=list)
    moe_ffn_hidden_size: Any = field(default_factory=list)
    moe_shared_expert_intermediate_size: Any = field(default_factory=list)

    def values(self, axis: str, teacher_value: int) -> list[int]:
        return parse_axis(getattr(self, axis), f"search.space.{axis}") or [teacher_value]


@dataclass(frozen=True)
class Budget:
    """What every candidate must meet; 0 leaves a bound off (at least one is on). Parameter
    counts are windows (the paper's "4B" means about 4B, not any smaller model); memory is a
    ceiling: bf16 weights + KV cache + Mamba conv / SSM state of `memory_batch_size`
    sequences of `memory_seq_length` tokens (resources.estimate.serving)."""

    params: int = 0  # total parameters within params * (1 +- tolerance)
    active_params: int = 0  # parameters one token uses, within active_params * (1 +- tolerance)
    memory_gib: float = 0.0  # serving memory at most this many GiB
    tolerance: float = 0.05
    memory_seq_length: int = 8192
    memory_batch_size: int = 1
    memory_state_dtype: str = "fp32"  # Mamba SSM state: fp32 (as transformers' cache) | bf16

    def validate(self, prefix: str = "") -> None:
        p = prefix
        if self.params < 0 or self.active_params < 0 or not self.memory_gib >= 0:
            raise ConfigError(f"{p}budget={self.params}, {p}active_budget={self.active_params}, "
                              f"{p}memory_budget_gib={self.memory_gib}: none may be negative (0 = off)")
        if not (self.params or self.active_params or self.memory_gib):
            raise ConfigError(f"{p}budget, {p}active_budget and {p}memory_budget_gib are all 0: give at "
                              f"least one (e.g. {p}budget=2065000 total parameters)")
        if not 0 <= self.tolerance < 1:
            raise ConfigError(f"{p}tolerance={self.tolerance} must be in [0, 1) (relative to the budgets)")
        if self.memory_seq_length <= 0 or self.memory_batch_size <= 0:
            raise ConfigError(f"{p}memory_seq_length={self.memory_seq_length} and {p}memory_batch_size="
                              f"{self.memory_batch_size} must be > 0")
        if self.memory_state_dtype not in ("bf16", "fp32"):
            raise ConfigError(f"{p}memory_state_dtype={self.memory_state_dtype!r}: use bf16 or fp32")

    def memory(self, cfg: ModelConfig) -> dict:
        return serving(cfg, self.memory_seq_length, self.memory_batch_size, self.memory_state_dtype)

    def misses(self, params: int, active: int, memory: float) -> str:
        """'' when within every bound, else which bound failed (the rejection count's key)."""
        t = self.tolerance
        if self.params and abs(params - self.params) > t * self.params:
            return "budget"
        if self.active_params and abs(active - self.active_params) > t * self.active_params:
            return "active_budget"
        if self.memory_gib and memory > self.memory_gib * GiB:
            return "memory_budget"
        return ""

    def distance(self, params: int, active: int, memory: float) -> float:
        """How far a candidate is from the budget (candidates sort by it): the largest relative
        distance to a parameter target; with only a memory ceiling, the memory left unused."""
        d = [abs(params - self.params) / self.params] if self.params else []
        d += [abs(active - self.active_params) / self.active_params] if self.active_params else []
        if not d:
            return (self.memory_gib * GiB - memory) / (self.memory_gib * GiB)
        return max(d)

    def describe(self) -> str:
        parts = [f"{self.params:,} params" if self.params else "",
                 f"{self.active_params:,} active" if self.active_params else ""]
        s = " and ".join(p for p in parts if p)
        s = f"{s} +- {self.tolerance:.1%}" if s else ""
        if self.memory_gib:
            s += (", " if s else "") + (f"serving memory <= {self.memory_gib:g} GiB (bf16, "
                                        f"{self.memory_state_dtype} SSM state, {self.memory_batch_size} x "
                                        f"{self.memory_seq_length} tokens)")
        return s


def parse_axis(spec: Any, key: str) -> list[int]:
    """A list, a {start, stop, step} mapping or 'start:stop:step' -> sorted unique ints."""
    if spec is None or spec == [] or spec == "":
        return []
    if isinstance(spec, str):
        parts = spec.split(":")
        if len(parts) != 3:
            raise ConfigError(f"{key}={spec!r}: use a list, or 'start:stop:step' (stop inclusive)")
        try:
            spec = dict(zip(("start", "stop", "step"), (int(p) for p in parts)))
        except ValueError:
            raise ConfigError(f"{key}={spec!r}: start, stop and step must be integers") from None
    if isinstance(spec, dict):
        unknown = set(spec) - {"start", "stop", "step"}
        if unknown or not {"start", "stop"} <= set(spec):
            raise ConfigError(f"{key}={spec!r}: a range needs start and stop (and optionally step)")
        start, stop, step = int(spec["start"]), int(spec["stop"]), int(spec.get("step", 1))
        if step <= 0 or stop < start:
            raise ConfigError(f"{key}={spec!r}: need step > 0 and stop >= start")
        spec = list(range(start, stop + 1, step))
    if not isinstance(spec, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in spec):
        raise ConfigError(f"{key}={spec!r}: give integers")
    if any(v <= 0 for v in spec):
        raise ConfigError(f"{key}={spec!r}: values must be positive")
    return sorted(set(spec))


@dataclass(frozen=True)
class Candidate:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    pattern: str
    params: int
    mamba_num_heads: int = 0  # the Mamba axes: 0 for a teacher without Mamba layers
    mamba_head_dim: int = 0
    num_moe_experts: int = 0  # the MoE axes: 0 for a dense teacher
    moe_ffn_hidden_size: int = 0
    moe_shared_expert_intermediate_size: int = 0
    active_params: int = 0  # per token (= params for a dense model)
    memory_bytes: int = 0  # serving memory at the budget's batch and sequence length

    @property
    def name(self) -> str:
        n = f"L{self.num_layers}-h{self.hidden_size}-f{self.ffn_hidden_size}"
        if self.mamba_num_heads:
            n += f"-mh{self.mamba_num_heads}-hd{self.mamba_head_dim}"
        if self.num_moe_experts:
            n += (f"-e{self.num_moe_experts}-ef{self.moe_ffn_hidden_size}"
                  f"-sh{self.moe_shared_expert_intermediate_size}")
        return n

    def model_config(self, teacher: ModelConfig) -> ModelConfig:
        return dataclasses.replace(teacher, pattern=self.pattern,
                                   **{a: getattr(self, a) for a in axes_of(teacher)[1:]})

    def to_dict(self) -> dict:
        return dict(dataclasses.asdict(self), name=self.name)


def drop_pattern(pattern: str, drop_order: Sequence[int], num_layers: int) -> str:
    """The teacher pattern minus its first `len - num_layers` layers of `drop_order`."""
    flat = pattern.replace("|", "")
    n_drop = len(flat) - num_layers
    drop = set(drop_order[:n_drop])
    return "".join(c for i, c in enumerate(flat) if i not in drop)


def axes_of(teacher: ModelConfig) -> tuple[str, ...]:
    """The axes a teacher has: the Mamba ones only with M layers, the MoE ones with E layers."""
    axes = DENSE_AXES if "M" in teacher.pattern else DENSE_AXES[:3]
    return axes + MOE_AXES if teacher.is_moe else axes


def check_space(teacher: ModelConfig, space: SearchSpace) -> None:
    if "M" not in teacher.pattern:  # attention / MLP teacher: hidden, FFN and depth remain
        asked = [a for a in ("mamba_num_heads", "mamba_head_dim")
                 if parse_axis(getattr(space, a), f"search.space.{a}")]
        if asked:
            raise ConfigError(f"search.space.{asked[0]} is set but the teacher ({teacher.pattern!r}) has "
                              f"no Mamba (M) layer; remove that axis (search.space.{asked[0]}=[])")
    if not teacher.is_moe:
        asked = [a for a in MOE_AXES if parse_axis(getattr(space, a), f"search.space.{a}")]
        if asked:
            raise ConfigError(f"search.space.{asked[0]} is set but the teacher ({teacher.pattern!r}) has "
                              "no E (mixture-of-experts) layer; remove the space.num_moe_experts / "
                              "moe_ffn_hidden_size / moe_shared_expert_intermediate_size axes")
    elif teacher.moe_shared_expert_intermediate_size == 0 and parse_axis(
            space.moe_shared_expert_intermediate_size, "search.space.moe_shared_expert_intermediate_size"):
        raise ConfigError("search.space.moe_shared_expert_intermediate_size is set but the teacher has "
                          "no shared expert; remove that axis")


def enumerate_candidates(teacher: ModelConfig, space: SearchSpace, budget: Budget | int,
                         tolerance: float | None = None, drop_order: Sequence[int] = (),
                         tp: int = 1, pp: int = 1, ep: int = 1, cp: int = 1) -> tuple[list[Candidate], dict]:
    """All candidates within the budget that the teacher can be pruned to (no axis larger
    than the teacher's) and that run at (tp, pp, ep, cp). `budget` an int: total parameters
    within budget * (1 +- tolerance). Returns the candidates (closest to the budget first)
    and counts of what was rejected and why."""
    if not isinstance(budget, Budget):
        budget = Budget(params=budget, tolerance=tolerance)
    budget.validate("search.")
    flat = teacher.pattern.replace("|", "")
    if sorted(drop_order) != list(range(len(flat))):
        raise ValueError("drop_order must be a permutation of the teacher's layer ids")
    check_space(teacher, space)
    axes = axes_of(teacher)
    grid = {a: space.values(a, _teacher_value(teacher, a)) for a in axes}
    rejected = {"larger_than_teacher": 0, "divisibility": 0, "budget": 0}
    rejected.update({"active_budget": 0} if budget.active_params else {})
    rejected.update({"memory_budget": 0} if budget.memory_gib else {})
    out = []
    for combo in itertools.product(*(grid[a] for a in axes)):
        vals = dict(zip(axes, combo))
        if any(vals[a] > _teacher_value(teacher, a) for a in axes):
            rejected["larger_than_teacher"] += 1
            continue
        pattern = drop_pattern(teacher.pattern, drop_order, vals["num_layers"])
        cfg = dataclasses.replace(teacher, pattern=pattern, **{a: vals[a] for a in axes[1:]})
        try:
            cfg.validate(tp=tp, pp=pp, ep=ep)
            if cp > 1:  # Mamba heads / groups per TP rank split over CP (the sequence: the teacher's check)
                check_cp(dataclasses.replace(cfg, seq_length=2 * cp), ParallelConfig(tp=tp, pp=pp, ep=ep, cp=cp))
        except ConfigError:
            rejected["divisibility"] += 1
            continue
        n = count_parameters(cfg)
        mem = budget.memory(cfg)["total"]
        why = budget.misses(n["total"], n["active"], mem)
        if why:
            rejected[why] += 1
            continue
        out.append(Candidate(pattern=pattern, params=n["total"], active_params=n["active"],
                             memory_bytes=int(mem), **vals))
    out.sort(key=lambda c: (budget.distance(c.params, c.active_params, c.memory_bytes), c.name))
    return out, {"grid": {a: grid[a] for a in axes}, "rejected": rejected,
                 "combinations": sum(rejected.values()) + len(out)}


def _teacher_value(teacher: ModelConfig, axis: str) -> int:
    return teacher.num_layers if axis == "num_layers" else getattr(teacher, axis)
