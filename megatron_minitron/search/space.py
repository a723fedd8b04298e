"""Candidate architectures under a parameter budget (paper sec. 3.5, table 1). Pure.

A search space gives, per axis, the values to try: a YAML list (`[3072, 3584, 4096]`), a
range mapping (`{start: 3072, stop: 4096, step: 256}`, stop inclusive) or the string
"start:stop:step". A candidate fixes the number of layers, hidden size, FFN size, Mamba
heads and Mamba head dim; which layers go when depth is pruned follows the teacher's depth
importance (lowest first), so the candidate's pattern, and hence its parameter count, is
known exactly (model.count_parameters, which equals the built model).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..config import ConfigError, ModelConfig
from ..model import count_parameters

AXES = ("num_layers", "hidden_size", "ffn_hidden_size", "mamba_num_heads", "mamba_head_dim")


@dataclass
class SearchSpace:
    """Values per axis; an empty list means 'keep the teacher's value'."""

    num_layers: Any = field(default_factory=list)
    hidden_size: Any = field(default_factory=list)
    ffn_hidden_size: Any = field(default_factory=list)
    mamba_num_heads: Any = field(default_factory=list)
    mamba_head_dim: Any = field(default_factory=list)

    def values(self, axis: str, teacher_value: int) -> list[int]:
        return parse_axis(getattr(self, axis), f"search.space.{axis}") or [teacher_value]


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
    mamba_num_heads: int
    mamba_head_dim: int
    pattern: str
    params: int

    @property
    def name(self) -> str:
        return (f"L{self.num_layers}-h{self.hidden_size}-f{self.ffn_hidden_size}"
                f"-mh{self.mamba_num_heads}-hd{self.mamba_head_dim}")

    def model_config(self, teacher: ModelConfig) -> ModelConfig:
        return dataclasses.replace(
            teacher, pattern=self.pattern, hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size, mamba_num_heads=self.mamba_num_heads,
            mamba_head_dim=self.mamba_head_dim)

    def to_dict(self) -> dict:
        return dict(dataclasses.asdict(self), name=self.name)


def drop_pattern(pattern: str, drop_order: Sequence[int], num_layers: int) -> str:
    """The teacher pattern minus its first `len - num_layers` layers of `drop_order`."""
    flat = pattern.replace("|", "")
    n_drop = len(flat) - num_layers
    drop = set(drop_order[:n_drop])
    return "".join(c for i, c in enumerate(flat) if i not in drop)


def enumerate_candidates(teacher: ModelConfig, space: SearchSpace, budget: int,
                         tolerance: float, drop_order: Sequence[int], tp: int = 1,
                         pp: int = 1) -> tuple[list[Candidate], dict]:
    """All candidates within `budget * (1 +- tolerance)` parameters that the teacher can be
    pruned to (no axis larger than the teacher's) and that run at (tp, pp). Returns the
    candidates (closest to the budget first) and counts of what was rejected and why."""
    flat = teacher.pattern.replace("|", "")
    if budget <= 0 or not 0 <= tolerance < 1:
        raise ConfigError(f"search.budget={budget} must be > 0 and search.tolerance={tolerance} in [0, 1)")
    if sorted(drop_order) != list(range(len(flat))):
        raise ValueError("drop_order must be a permutation of the teacher's layer ids")
    grid = {a: space.values(a, _teacher_value(teacher, a)) for a in AXES}
    rejected = {"larger_than_teacher": 0, "divisibility": 0, "budget": 0}
    out = []
    for combo in itertools.product(*(grid[a] for a in AXES)):
        vals = dict(zip(AXES, combo))
        if any(vals[a] > _teacher_value(teacher, a) for a in AXES):
            rejected["larger_than_teacher"] += 1
            continue
        pattern = drop_pattern(teacher.pattern, drop_order, vals["num_layers"])
        cfg = dataclasses.replace(teacher, pattern=pattern, **{a: vals[a] for a in AXES[1:]})
        try:
            cfg.validate(tp=tp, pp=pp)
        except ConfigError:
            rejected["divisibility"] += 1
            continue
        params = count_parameters(cfg)["total"]
        if abs(params - budget) > tolerance * budget:
            rejected["budget"] += 1
            continue
        out.append(Candidate(pattern=pattern, params=params, **vals))
    out.sort(key=lambda c: (abs(c.params - budget), c.name))
    return out, {"grid": {a: grid[a] for a in AXES}, "rejected": rejected,
                 "combinations": sum(rejected.values()) + len(out)}


def _teacher_value(teacher: ModelConfig, axis: str) -> int:
    return teacher.num_layers if axis == "num_layers" else getattr(teacher, axis)
