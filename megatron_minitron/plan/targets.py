"""Pruning targets -> validated keep sets -> `Plan` (plan.json). Paper sec. 3.1-3.4.

A `Plan` holds, per SOURCE global layer id and axis, the kept indices (global, unsharded
order), the kept layers, the source and pruned ModelConfigs and the analytic parameter
counts before and after (model.count_parameters). The `prune` stage (rewrite/) reads it
on every rank; nothing in here touches a model or a process group.

Axis names in `Plan.layers[i]`:
  'M': "mamba_heads" [H'] (group order, the same count per group), "mamba_channels" [P']
  '-': "ffn" [F']
  '*': "attention_heads" [Q'] (query-group order, the same count per group)
  'E': "experts" [E'] (source expert ids; routing-group order, the same count per group),
       "expert_ffn" [E'][F'] (row j: the neurons kept in source expert experts[j], each
       expert its own set, the same count), "shared_ffn" [S'] (shared-expert neurons);
       each optional: an axis left out is kept whole in source order (no scores needed)
and `Plan.hidden` [h'] is shared by every tensor with a hidden dimension.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..config import ConfigError, ModelConfig, build
from ..model import count_parameters
from . import keep as K

FORMAT = "megatron-minitron-plan"
# plan ffn_source -> importance-file key: after the activation (linear_fc2 input) / before it
FFN_SOURCES = {"post": "ffn", "pre": "ffn_pre"}
# plan expert_score -> importance-file layers[i]["experts"] key (issue 19): the expert
# output's norm weighted by its routing weight, the routing mass, the routing frequency
EXPERT_SCORES = ("out", "mass", "freq")
MOE_AXES = ("num_moe_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size")
MOE_KEYS = {"experts", "expert_ffn", "shared_ffn"}
VERSION = 1


@dataclass
class TargetConfig:
    """Target sizes; 0 (or an empty list) leaves that axis unpruned."""

    hidden_size: int = 0
    ffn_hidden_size: int = 0
    mamba_num_heads: int = 0  # a multiple of mamba_num_groups (same count kept per group)
    mamba_head_dim: int = 0
    num_attention_heads: int = 0  # a multiple of num_query_groups (query groups kept whole)
    num_layers: int = 0  # depth target: layers remaining (0 = keep all) ...
    drop_layers: list[int] = field(default_factory=list)  # ... or exactly these layer ids
    depth_metric: str = "kl"  # kl | cosine: how layers are ranked for num_layers
    depth_layer_type: str = ""  # "" any layer, or only drop layers of this symbol (M, *, -)
    # mixture-of-experts (E layers): routed experts kept in every E layer (each layer keeps its
    # own top experts by plan.expert_score; with grouped routing the same count per group; a
    # multiple of parallel.ep, >= model.moe_router_topk) ...
    num_moe_experts: int = 0
    moe_ffn_hidden_size: int = 0  # ... FFN neurons kept in every expert (each expert its own) ...
    moe_shared_expert_intermediate_size: int = 0  # ... and in the shared expert


# ----------------------------------------------------------------------------- plan


@dataclass
class Plan:
    source: ModelConfig
    target: ModelConfig
    kept_layers: list[int]  # source layer ids kept, in order: pruned layer j <- source kept_layers[j]
    dropped_layers: list[int]
    hidden: list[int]
    layers: dict[int, dict[str, list]]  # source layer id -> axis -> kept indices (expert_ffn: [E'][F'])
    params_before: dict = field(default_factory=dict)
    params_after: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    # -- index helpers used by rewrite/rules.py (all global, source order) ------------
    def mamba_flat(self, layer: int) -> torch.Tensor:
        e = self.layers[layer]
        return K.mamba_flat_indices(torch.tensor(e["mamba_heads"]), torch.tensor(e["mamba_channels"]),
                                    self.source.mamba_head_dim)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "source": self.source.to_dict(),
            "target": self.target.to_dict(),
            "kept_layers": list(self.kept_layers),
            "dropped_layers": list(self.dropped_layers),
            "hidden": list(self.hidden),
            "layers": {str(k): v for k, v in sorted(self.layers.items())},
            "params_before": self.params_before,
            "params_after": self.params_after,
            "settings": self.settings,
        }

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)

    @classmethod
    def from_dict(cls, d: dict, where: str = "plan") -> "Plan":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ConfigError(f"{where} is not a megatron-minitron plan (run the `plan` stage)")
        if d.get("version") != VERSION:
            raise ConfigError(f"{where} has plan version {d.get('version')}; this release reads {VERSION}")
        try:  # a hand-edited plan: every field checked, the error names the file
            p = cls._from_dict(d)
            for name, m in (("source", p.source), ("target", p.target)):
                m.validate(prefix=f"{name}")
            check_plan(p, group_rule=p.settings.get("mamba_grouping", "aware") != "unaware")
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            what = f"missing field {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
            raise ConfigError(f"{where} is not a valid plan ({what}); re-run the `plan` stage") from None
        return p

    @classmethod
    def _from_dict(cls, d: dict) -> "Plan":
        return cls(source=build(ModelConfig, d["source"], "source."),
                target=build(ModelConfig, d["target"], "target."),
                kept_layers=[int(i) for i in d["kept_layers"]],
                dropped_layers=[int(i) for i in d["dropped_layers"]],
                hidden=[int(i) for i in d["hidden"]],
                layers={int(k): {a: _ints(v) for a, v in e.items()} for k, e in d["layers"].items()},
                params_before=d.get("params_before", {}), params_after=d.get("params_after", {}),
                settings=d.get("settings", {}))

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        if path.is_dir():
            path = path / "plan.json"
        if not path.is_file():
            raise ConfigError(f"plan {path} does not exist; run the `plan` stage first")
        try:
            d = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:  # truncated / not JSON
            raise ConfigError(f"plan {path} is not valid JSON ({e}); re-run the `plan` stage") from None
        return cls.from_dict(d, str(path))


# ----------------------------------------------------------------------------- assembly


def _ints(v) -> list:
    """A keep list (or a list of them, expert_ffn) from JSON / tensors as Python ints."""
    if isinstance(v, torch.Tensor):
        v = v.tolist()
    if not isinstance(v, (list, tuple)):
        raise TypeError(f"a keep set must be a list, found {type(v).__name__}")
    return [_ints(x) if isinstance(x, (list, tuple)) else int(x) for x in v]


def _check_index_list(name: str, idx: list[int], n: int) -> None:
    if len(idx) == 0:
        raise ConfigError(f"{name}: empty keep set")
    if len(set(idx)) != len(idx):
        raise ConfigError(f"{name}: repeated indices")
    if min(idx) < 0 or max(idx) >= n:
        raise ConfigError(f"{name}: indices must lie in [0, {n})")


def _check_grouped(name: str, idx: list[int], n: int, groups: int, what: str = "heads",
                   why: str = "which B/C or K/V a head reads") -> None:
    """Eq. 17: slot block g holds only members of group g, same count in every group."""
    _check_index_list(name, idx, n)
    if len(idx) % groups:
        raise ConfigError(f"{name}: {len(idx)} kept {what} is not a multiple of {groups} groups")
    per, k = n // groups, len(idx) // groups
    for g in range(groups):
        bad = [h for h in idx[g * k:(g + 1) * k] if h // per != g]
        if bad:
            raise ConfigError(
                f"{name}: {what} {bad} sit in the slots of group {g} but belong to group(s) "
                f"{sorted({h // per for h in bad})}; {what} may be reordered only within their "
                f"group (a cross-group move changes {why})")


def _check_moe_layer(i: int, e: dict, src: ModelConfig, tgt: ModelConfig) -> None:
    """An E layer's keep sets (all optional: an axis left out is kept whole)."""
    unknown = sorted(set(e) - MOE_KEYS)
    if unknown:
        raise ConfigError(f"plan layer {i} (MoE) has unknown axes {unknown}; known: {sorted(MOE_KEYS)}")
    n = len(e["experts"]) if "experts" in e else src.num_moe_experts
    if "experts" in e:
        _check_grouped(f"layer {i} experts", e["experts"], src.num_moe_experts, src.moe_router_num_groups,
                       what="experts", why="the routing group an expert competes in")
    if n != tgt.num_moe_experts:
        raise ConfigError(f"plan layer {i} keeps {n} experts; target.num_moe_experts={tgt.num_moe_experts}")
    if "expert_ffn" in e:
        rows = e["expert_ffn"]
        if len(rows) != n or not all(isinstance(r, list) for r in rows):
            raise ConfigError(f"plan layer {i} expert_ffn must hold one keep list per kept expert "
                              f"({n}), found {len(rows)}")
        for j, r in enumerate(rows):
            _check_index_list(f"layer {i} expert_ffn[{j}]", r, src.moe_ffn_hidden_size)
            if len(r) != tgt.moe_ffn_hidden_size:
                raise ConfigError(f"plan layer {i} expert_ffn[{j}] keeps {len(r)} neurons; target "
                                  f"moe_ffn_hidden_size={tgt.moe_ffn_hidden_size}")
    elif tgt.moe_ffn_hidden_size != src.moe_ffn_hidden_size:
        raise ConfigError(f"plan layer {i} has no expert_ffn but target moe_ffn_hidden_size="
                          f"{tgt.moe_ffn_hidden_size} != source {src.moe_ffn_hidden_size}")
    if "shared_ffn" in e:
        if not src.moe_shared_expert_intermediate_size:
            raise ConfigError(f"plan layer {i} has shared_ffn but the source has no shared expert")
        _check_index_list(f"layer {i} shared_ffn", e["shared_ffn"], src.moe_shared_expert_intermediate_size)
    s = len(e["shared_ffn"]) if "shared_ffn" in e else src.moe_shared_expert_intermediate_size
    if s != tgt.moe_shared_expert_intermediate_size:
        raise ConfigError(f"plan layer {i} keeps {s} shared-expert neurons; target "
                          f"moe_shared_expert_intermediate_size={tgt.moe_shared_expert_intermediate_size}")


_PRUNED_FIELDS = {"pattern", "hidden_size", "ffn_hidden_size", "mamba_num_heads", "mamba_head_dim",
                  "num_attention_heads", *MOE_AXES}


def check_plan(p: Plan, group_rule: bool = True) -> None:
    """Internal consistency of a plan (sizes agree with the target config)."""
    src, tgt = p.source, p.target
    types = K.pattern_layers(src.pattern)
    fixed = {k: (v, getattr(tgt, k)) for k, v in src.to_dict().items() if k not in _PRUNED_FIELDS
             and getattr(tgt, k) != v}
    if fixed:
        raise ConfigError(f"target differs from source in fields pruning never changes: {fixed}")
    _check_index_list("hidden", p.hidden, src.hidden_size)
    if len(p.hidden) != tgt.hidden_size:
        raise ConfigError(f"plan keeps {len(p.hidden)} hidden channels but target.hidden_size={tgt.hidden_size}")
    if sorted(set(p.kept_layers) | set(p.dropped_layers)) != list(range(len(types))) or \
            set(p.kept_layers) & set(p.dropped_layers):
        raise ConfigError("plan kept_layers and dropped_layers must partition the source layers")
    if K.pattern_layers(tgt.pattern) != "".join(types[i] for i in p.kept_layers):
        raise ConfigError(f"target pattern {tgt.pattern!r} does not match the kept layers")
    for i in p.kept_layers:
        e = p.layers.get(i)
        t = types[i]
        if t == "M":
            if e is None or "mamba_heads" not in e or "mamba_channels" not in e:
                raise ConfigError(f"plan layer {i} (Mamba) needs mamba_heads and mamba_channels")
            heads, ch = e["mamba_heads"], e["mamba_channels"]
            if group_rule:
                _check_grouped(f"layer {i} mamba_heads", heads, src.mamba_num_heads, src.mamba_num_groups)
            else:
                _check_index_list(f"layer {i} mamba_heads", heads, src.mamba_num_heads)
            _check_index_list(f"layer {i} mamba_channels", ch, src.mamba_head_dim)
            if len(heads) != tgt.mamba_num_heads or len(ch) != tgt.mamba_head_dim:
                raise ConfigError(f"plan layer {i} keeps {len(heads)} heads x {len(ch)} channels; "
                                  f"target is {tgt.mamba_num_heads} x {tgt.mamba_head_dim}")
        elif t == "-":
            if e is None or "ffn" not in e:
                raise ConfigError(f"plan layer {i} (MLP) needs ffn")
            _check_index_list(f"layer {i} ffn", e["ffn"], src.ffn_hidden_size)
            if len(e["ffn"]) != tgt.ffn_hidden_size:
                raise ConfigError(f"plan layer {i} keeps {len(e['ffn'])} FFN neurons; target {tgt.ffn_hidden_size}")
        elif t == "*":
            if e is None or "attention_heads" not in e:
                raise ConfigError(f"plan layer {i} (attention) needs attention_heads")
            if group_rule:
                _check_grouped(f"layer {i} attention_heads", e["attention_heads"],
                               src.num_attention_heads, src.num_query_groups)
            else:
                _check_index_list(f"layer {i} attention_heads", e["attention_heads"], src.num_attention_heads)
            if len(e["attention_heads"]) != tgt.num_attention_heads:
                raise ConfigError(f"plan layer {i} keeps {len(e['attention_heads'])} attention heads; "
                                  f"target {tgt.num_attention_heads}")
        elif t == "E":
            _check_moe_layer(i, e or {}, src, tgt)
    if "E" in types:
        _check_routing(tgt, "plan target")


def _check_routing(m: ModelConfig, where: str) -> None:
    """The router's top-k must fit in the experts a token may still use."""
    g, gk, k = m.moe_router_num_groups, m.moe_router_group_topk, m.moe_router_topk
    usable = gk * (m.num_moe_experts // g)
    if k > usable:
        extra = f" ({gk} of {g} routing groups x {m.num_moe_experts // g} experts)" if g > 1 else ""
        raise ConfigError(f"{where} keeps {m.num_moe_experts} experts per layer, fewer than the router's "
                          f"top-k: moe_router_topk={k} > {usable} usable experts{extra}; keep more experts")


def assemble_plan(source: ModelConfig, hidden, layers: dict, dropped=(), settings: Optional[dict] = None,
                  group_rule: bool = True) -> Plan:
    """Build a Plan from explicit keep sets (what `make_plan` computes from scores; tests
    use it directly with permutations). The target ModelConfig is derived from the sets."""
    types = K.pattern_layers(source.pattern)
    dropped = [int(i) for i in dropped]
    kept = [i for i in range(len(types)) if i not in set(dropped)]
    layers = {int(i): {a: _ints(v) for a, v in e.items()} for i, e in layers.items() if int(i) in set(kept)}
    first = {t: next((layers[i] for i in kept if types[i] == t and i in layers), None) for t in "M-*"}

    def moe(axis: str, size):  # an E layer axis: the first kept E layer that prunes it, else the source's
        e = next((layers[i] for i in kept if types[i] == "E" and axis in layers.get(i, {})), None)
        return size(e[axis]) if e is not None else None

    tgt = dataclasses.replace(
        source,
        pattern=K.apply_depth_to_pattern(source.pattern, dropped) if dropped else source.pattern,
        hidden_size=len(hidden),
        ffn_hidden_size=len(first["-"]["ffn"]) if first["-"] else source.ffn_hidden_size,
        mamba_num_heads=len(first["M"]["mamba_heads"]) if first["M"] else source.mamba_num_heads,
        mamba_head_dim=len(first["M"]["mamba_channels"]) if first["M"] else source.mamba_head_dim,
        num_attention_heads=len(first["*"]["attention_heads"]) if first["*"] else source.num_attention_heads,
        num_moe_experts=moe("experts", len) or moe("expert_ffn", len) or source.num_moe_experts,
        moe_ffn_hidden_size=moe("expert_ffn", lambda r: len(r[0]) if r else 0) or source.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=moe("shared_ffn", len) or source.moe_shared_expert_intermediate_size,
    )
    p = Plan(source=source, target=tgt, kept_layers=kept, dropped_layers=dropped,
             hidden=_ints(hidden), layers=layers,
             params_before=_counts(source), params_after=_counts(tgt), settings=settings or {})
    check_plan(p, group_rule=group_rule)
    return p


def _counts(cfg: ModelConfig) -> dict:
    c = count_parameters(cfg)
    return {k: v for k, v in c.items() if k != "per_layer_kind"}


def identity_plan(cfg: ModelConfig) -> Plan:
    """Keep everything in the original order (the trivial plan)."""
    layers = {}
    for i, t in enumerate(K.pattern_layers(cfg.pattern)):
        if t == "M":
            layers[i] = {"mamba_heads": list(range(cfg.mamba_num_heads)),
                         "mamba_channels": list(range(cfg.mamba_head_dim))}
        elif t == "-":
            layers[i] = {"ffn": list(range(cfg.ffn_hidden_size))}
        elif t == "*":
            layers[i] = {"attention_heads": list(range(cfg.num_attention_heads))}
    return assemble_plan(cfg, list(range(cfg.hidden_size)), layers)


# ----------------------------------------------------------------------------- validation


def _alt_multiple(v: int, m: int, hi: int) -> str:
    lo = max(m, v // m * m)
    cands = sorted({c for c in (lo, lo + m) if m <= c <= hi and c != v})
    return " or ".join(map(str, cands)) or str(m)


def valid_expert_counts(src: ModelConfig, ep: int = 1) -> list[int]:
    """Expert counts a plan may keep in every E layer: a multiple of the routing groups (the
    same count kept per group) and of parallel.ep, enough for the router's top-k."""
    g, gk, k = src.moe_router_num_groups, src.moe_router_group_topk, src.moe_router_topk
    return [n for n in range(1, src.num_moe_experts + 1)
            if n % g == 0 and n % ep == 0 and k <= gk * (n // g)]


def _nearest(vals: list[int], v: int, m: int = 4) -> str:
    near = sorted(sorted(vals, key=lambda x: (abs(x - v), x))[:m])
    return ", ".join(map(str, near)) if near else "none"


def validate_targets(src: ModelConfig, t: TargetConfig, tp: int = 1, pp: int = 1,
                     prefix: str = "target", ep: int = 1) -> None:
    """Refuse impossible targets before any work; messages name the value and a valid one."""
    p = prefix + "."
    types = K.pattern_layers(src.pattern)

    def le(name: str, v: int, n: int) -> None:
        if v < 0:
            raise ConfigError(f"{p}{name}={v} must be >= 0 (0 keeps the source size {n})")
        if v > n:
            raise ConfigError(f"{p}{name}={v} is larger than the source ({n}); pruning only "
                              f"shrinks: use a value <= {n}, or 0 to keep {n}")

    def div(name: str, v: int, by: int, what: str, hi: int) -> None:
        if v and v % by:
            raise ConfigError(f"{p}{name}={v} is not divisible by {what}={by}; "
                              f"use e.g. {_alt_multiple(v, by, hi)}")

    if "M" not in types:  # an attention / MLP (/ MoE) model: its axes are hidden, FFN, heads, depth
        for name in ("mamba_num_heads", "mamba_head_dim"):
            if getattr(t, name):
                raise ConfigError(f"{p}{name}={getattr(t, name)} is set but the source pattern "
                                  f"{src.pattern!r} has no Mamba (M) layer; set {p}{name}=0")
    le("hidden_size", t.hidden_size, src.hidden_size)
    le("ffn_hidden_size", t.ffn_hidden_size, src.ffn_hidden_size)
    le("mamba_num_heads", t.mamba_num_heads, src.mamba_num_heads)
    le("mamba_head_dim", t.mamba_head_dim, src.mamba_head_dim)
    le("num_attention_heads", t.num_attention_heads, src.num_attention_heads)
    le("num_layers", t.num_layers, len(types))
    div("mamba_num_heads", t.mamba_num_heads, src.mamba_num_groups, "model.mamba_num_groups",
        src.mamba_num_heads)
    div("num_attention_heads", t.num_attention_heads, src.num_query_groups,
        "model.num_query_groups", src.num_attention_heads)
    if tp > 1:
        div("mamba_num_heads", t.mamba_num_heads, tp, "parallel.tp", src.mamba_num_heads)
        div("ffn_hidden_size", t.ffn_hidden_size, tp, "parallel.tp", src.ffn_hidden_size)
    _validate_moe_targets(src, t, tp, ep, p, le, div)
    if t.depth_metric not in ("kl", "cosine"):
        raise ConfigError(f"{p}depth_metric={t.depth_metric!r}: use 'kl' or 'cosine'")
    if t.depth_layer_type not in ("", "M", "*", "-", "E"):
        raise ConfigError(f"{p}depth_layer_type={t.depth_layer_type!r}: use '', 'M', '*', '-' or 'E'")
    if t.depth_layer_type and t.depth_layer_type not in types:
        raise ConfigError(f"{p}depth_layer_type={t.depth_layer_type!r}: the pattern {src.pattern!r} "
                          "has no such layer")
    if t.num_layers and t.drop_layers:
        raise ConfigError(f"give {p}num_layers={t.num_layers} or {p}drop_layers={t.drop_layers}, not both")
    remaining = t.num_layers or len(types) - len(t.drop_layers)
    try:
        if t.drop_layers:
            K.layers_to_drop(None, src.pattern, explicit=list(t.drop_layers),
                             only_type=t.depth_layer_type or None)
    except ValueError as e:
        raise ConfigError(f"{p}drop_layers={t.drop_layers}: {e}") from None
    if t.num_layers and t.depth_layer_type:
        n_type = types.count(t.depth_layer_type)
        if len(types) - t.num_layers > n_type:
            raise ConfigError(f"{p}num_layers={t.num_layers} needs dropping {len(types) - t.num_layers} "
                              f"layers but only {n_type} are of type {t.depth_layer_type!r}; "
                              f"use num_layers >= {len(types) - n_type}")
    if pp > 1 and "|" not in src.pattern and remaining % pp:
        ok = [n for n in range(pp, len(types) + 1, pp)]
        raise ConfigError(f"{p}num_layers={remaining} (layers left) is not divisible by parallel.pp={pp}; "
                          f"use one of {ok}")


def _validate_moe_targets(src: ModelConfig, t: TargetConfig, tp: int, ep: int, p: str, le, div) -> None:
    """Grouped routing: each routing group keeps the same number of its own experts (the
    group limit then compares the same experts as before, less the dropped ones; a count
    not divisible by the groups is refused rather than regrouping experts)."""
    if not src.is_moe:
        set_ = [a for a in MOE_AXES if getattr(t, a)]
        if set_:
            raise ConfigError(f"{p}{set_[0]}={getattr(t, set_[0])} prunes mixture-of-experts layers, but "
                              f"the pattern {src.pattern!r} has no E layers; leave it 0")
        return
    le("num_moe_experts", t.num_moe_experts, src.num_moe_experts)
    le("moe_ffn_hidden_size", t.moe_ffn_hidden_size, src.moe_ffn_hidden_size)
    if t.moe_shared_expert_intermediate_size and not src.moe_shared_expert_intermediate_size:
        raise ConfigError(f"{p}moe_shared_expert_intermediate_size={t.moe_shared_expert_intermediate_size}: "
                          "the model has no shared expert; leave it 0")
    le("moe_shared_expert_intermediate_size", t.moe_shared_expert_intermediate_size,
       src.moe_shared_expert_intermediate_size)
    n = t.num_moe_experts or src.num_moe_experts
    g, gk, k = src.moe_router_num_groups, src.moe_router_group_topk, src.moe_router_topk
    ok = valid_expert_counts(src, ep)
    if t.num_moe_experts and n % g:
        raise ConfigError(f"{p}num_moe_experts={n} is not divisible by model.moe_router_num_groups={g} "
                          f"(grouped routing: every group keeps the same number of its own experts); "
                          f"valid: {_nearest(ok, n)}")
    if t.num_moe_experts and k > gk * (n // g):
        usable = f"{gk} of {g} groups x {n // g} experts = {gk * (n // g)}" if g > 1 else str(n)
        raise ConfigError(f"{p}num_moe_experts={n} keeps fewer experts than a token routes to: "
                          f"model.moe_router_topk={k} > {usable}; valid: {_nearest(ok, n)}")
    if n % ep:
        what = f"{p}num_moe_experts={n}" if t.num_moe_experts else f"the kept expert count {n} ({p}num_moe_experts=0)"
        raise ConfigError(f"{what} is not divisible by parallel.ep={ep} (each EP rank holds the same "
                          f"number of experts); valid {p}num_moe_experts at ep={ep}: {_nearest(ok, n)}"
                          + ("" if ok else "; none: choose another parallel.ep"))
    if tp > 1:
        div("moe_ffn_hidden_size", t.moe_ffn_hidden_size, tp, "parallel.tp", src.moe_ffn_hidden_size)
        div("moe_shared_expert_intermediate_size", t.moe_shared_expert_intermediate_size, tp, "parallel.tp",
            src.moe_shared_expert_intermediate_size)


def _moe_keep(i: int, e: dict, src: ModelConfig, t: TargetConfig, expert_score: str, fin) -> dict:
    """An E layer's keep sets for the MoE axes the target prunes (an axis at its source size
    is left out of the plan: kept whole, no scores needed)."""
    n, f, s = src.num_moe_experts, src.moe_ffn_hidden_size, src.moe_shared_expert_intermediate_size
    kn, kf, ks = t.num_moe_experts or n, t.moe_ffn_hidden_size or f, t.moe_shared_expert_intermediate_size or s
    out: dict = {}

    def scores(key: str, shape: tuple, axis: str, sub: Optional[str] = None) -> torch.Tensor:
        v = e.get(key)
        if sub is not None:
            v = v.get(sub) if isinstance(v, dict) else None
        name = f"{key}[{sub!r}]" if sub else repr(key)
        if not isinstance(v, torch.Tensor):
            raise ConfigError(f"importance layer {i} (MoE) has no {name} scores, needed for "
                              f"target.{axis}; re-run stats (this importance file has no MoE scores) "
                              f"or leave target.{axis}=0")
        if tuple(v.shape) != shape:
            raise ConfigError(f"importance layer {i} {name} scores have shape {tuple(v.shape)}, "
                              f"expected {shape}; re-run stats")
        return v.float()

    experts = torch.arange(n)
    if kn != n:
        sc = scores("experts", (n,), "num_moe_experts", expert_score)
        experts = fin(K.experts_keep(sc, src.moe_router_num_groups, kn))  # sorted: still group order
        out["experts"] = experts
    if kf != f:
        out["expert_ffn"] = fin(K.expert_ffn_keep(scores("expert_ffn", (n, f), "moe_ffn_hidden_size"), experts, kf))
    if ks != s:
        out["shared_ffn"] = fin(K.topk_indices(scores("shared_ffn", (s,), "moe_shared_expert_intermediate_size"), ks))
    return out


# ----------------------------------------------------------------------------- scores -> plan


def make_plan(imp, t: TargetConfig, *, mamba_source: str = "x", mamba_metric: str = "l2",
              order: str = "sorted", tp: int = 1, pp: int = 1, ffn_source: str = "post",
              mamba_grouping: str = "aware", ep: int = 1, expert_score: str = "out") -> Plan:
    """Keep sets from an ImportanceFile and a target (paper sec. 3.1-3.4).

    order="sorted": every keep set sorted ascending (Mamba / attention heads stay within
    their groups, so this is still the group-order concatenation of eq. 17); any order is
    functionally identical, and sorted sets let each rank of the rewrite read a compact
    slice of the source. order="ranked": most important first (within groups).

    ffn_source="post" scores FFN neurons by linear_fc2's input (after the activation; Model
    Optimizer's choice), "pre" by the first projection's output (before it; paper eq. 26).
    mamba_grouping="unaware" is an ablation baseline only (keep.mamba_heads_group_unaware:
    heads ranked over the whole layer, then forced into groups; changes the function).
    expert_score ranks each E layer's routed experts (importance layers[i]["experts"][score]):
    "out" = the expert output's norm weighted by its routing weight, "mass" = routing weight
    summed over tokens, "freq" = tokens routed to it. Expert FFN neurons are ranked per expert
    (layers[i]["expert_ffn"] [E, F]), shared-expert neurons by layers[i]["shared_ffn"].
    ep: the expert-parallel size the pruned model will run at (it must divide the experts kept).
    """
    from ..importance import scores as S

    src = imp.model
    validate_targets(src, t, tp, pp, ep=ep)
    if expert_score not in EXPERT_SCORES:
        raise ConfigError(f"expert_score={expert_score!r}: use out (routing-weighted output norm), "
                          "mass (routing weight summed) or freq (tokens routed)")
    if mamba_source not in ("x", "z", "y"):
        raise ConfigError(f"mamba_source={mamba_source!r}: use x, z or y")
    if mamba_metric not in ("l2", "flap"):
        raise ConfigError(f"mamba_metric={mamba_metric!r}: use l2 or flap")
    if order not in ("sorted", "ranked"):
        raise ConfigError(f"order={order!r}: use sorted or ranked")
    if ffn_source not in FFN_SOURCES:
        raise ConfigError(f"ffn_source={ffn_source!r}: use post (linear_fc2 input, after the "
                          "activation) or pre (first projection output, paper eq. 26)")
    if mamba_grouping not in ("aware", "unaware"):
        raise ConfigError(f"mamba_grouping={mamba_grouping!r}: use aware (eq. 17) or unaware "
                          "(ablation baseline only)")
    types = K.pattern_layers(src.pattern)

    def fin(v: torch.Tensor) -> torch.Tensor:  # expert_ffn [E', F']: each row sorted
        return v.sort(dim=-1).values if order == "sorted" else v

    # depth
    dropped: list[int] = []
    if t.drop_layers:
        dropped = list(t.drop_layers)
    elif t.num_layers and t.num_layers < len(types):
        sc = imp.depth.get(t.depth_metric) if isinstance(imp.depth, dict) else None
        if sc is None or torch.isnan(torch.as_tensor(sc, dtype=torch.float64)).any():
            raise ConfigError(f"the importance file has no complete depth scores for "
                              f"target.depth_metric={t.depth_metric!r}; re-run `stats` with depth "
                              f"scoring, use the other metric, or give target.drop_layers")
        dropped = K.layers_to_drop(sc, src.pattern, len(types) - t.num_layers,
                                   only_type=t.depth_layer_type or None)
    kept = [i for i in range(len(types)) if i not in set(dropped)]

    hidden = fin(K.hidden_keep(imp.hidden.float(), t.hidden_size or src.hidden_size))
    layers: dict[int, dict] = {}
    for i in kept:
        e = imp.layers.get(i, {})
        typ = types[i]
        if typ == "M":
            nh, hd = src.mamba_num_heads, src.mamba_head_dim
            kh, kc = t.mamba_num_heads or nh, t.mamba_head_dim or hd
            if mamba_metric == "flap":
                if "flap" not in e:
                    raise ConfigError(f"importance layer {i} has no 'flap' scores; use mamba_metric=l2")
                mat = S.as_head_matrix(e["flap"], nh)
                ch_scores = mat.sum(0)
                ch = K.topk_indices(ch_scores, kc)
                head_scores = mat[:, ch].sum(1)
            else:
                a = e.get("mamba", {}).get(mamba_source)
                if a is None:
                    raise ConfigError(f"importance layer {i} has no mamba[{mamba_source!r}] scores; "
                                      "choose another mamba_source")
                ch_scores = S.mamba_channel_scores(a)
                ch = K.topk_indices(ch_scores, kc)
                head_scores = S.mamba_head_scores(a, ch)
            heads, ch = K.mamba_keep_sets(head_scores, ch_scores, src.mamba_num_groups, kh, kc)
            if mamba_grouping == "unaware":
                heads = K.mamba_heads_group_unaware(head_scores, src.mamba_num_groups, kh)
            layers[i] = {"mamba_heads": fin(heads), "mamba_channels": fin(ch)}
        elif typ == "-":
            key = FFN_SOURCES[ffn_source]
            if key not in e:
                raise ConfigError(f"importance layer {i} has no {key!r} scores (ffn_source={ffn_source}); "
                                  f"re-run `stats` with {key} in sources or use the other ffn_source")
            layers[i] = {"ffn": fin(K.ffn_keep(e[key].float(), t.ffn_hidden_size or src.ffn_hidden_size))}
        elif typ == "*":
            na = t.num_attention_heads or src.num_attention_heads
            sc = e.get("attn")
            if sc is None:
                if na != src.num_attention_heads:
                    raise ConfigError(f"importance layer {i} has no 'attn' scores; leave "
                                      "target.num_attention_heads=0")
                sc = torch.zeros(src.num_attention_heads)
            layers[i] = {"attention_heads": fin(K.attention_keep(sc.float(), src.num_query_groups, na))}
        elif typ == "E":
            layers[i] = _moe_keep(i, e, src, t, expert_score, fin)
    settings = {"mamba_source": mamba_source, "mamba_metric": mamba_metric, "order": order,
                "ffn_source": ffn_source, "mamba_grouping": mamba_grouping,
                **({"expert_score": expert_score} if src.is_moe else {}),
                "target": dataclasses.asdict(t), "tp": tp, "pp": pp, "ep": ep,
                "importance_meta": {k: v for k, v in (imp.meta or {}).items()
                                    if isinstance(v, (int, float, str, bool))}}
    try:
        plan = assemble_plan(src, hidden, layers, dropped, settings,
                             group_rule=mamba_grouping == "aware")
        plan.target.validate(tp=tp, pp=pp, prefix="pruned model", ep=ep)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return plan


def summary_lines(p: Plan) -> list[str]:
    """Per axis: before, after, share kept; per Mamba layer: heads per group and channels."""
    s, t = p.source, p.target
    rows = [("layers", s.num_layers, t.num_layers), ("hidden_size", s.hidden_size, t.hidden_size),
            ("ffn_hidden_size", s.ffn_hidden_size, t.ffn_hidden_size),
            ("mamba_num_heads", s.mamba_num_heads, t.mamba_num_heads),
            ("mamba_head_dim", s.mamba_head_dim, t.mamba_head_dim),
            ("num_attention_heads", s.num_attention_heads, t.num_attention_heads)]
    if "M" not in s.pattern:  # no Mamba layer: its fields are unused
        rows = [r for r in rows if not r[0].startswith("mamba_")]
    if s.is_moe:
        rows += [(n, getattr(s, a), getattr(t, a)) for n, a in zip(
            ("num_moe_experts", "moe_ffn_hidden_size", "moe_shared_ffn"), MOE_AXES) if getattr(s, a)]
    rows.append(("parameters", p.params_before["total"], p.params_after["total"]))
    if s.is_moe:
        rows.append(("active parameters", p.params_before["active"], p.params_after["active"]))
    out = [f"pattern {s.pattern} -> {t.pattern} (dropped {p.dropped_layers})",
           f"{'axis':<22}{'before':>14}{'after':>14}{'kept':>8}"]
    out += [f"{n:<22}{a:>14,}{b:>14,}{b / a:>8.1%}" for n, a, b in rows]
    types = K.pattern_layers(s.pattern)
    per = s.mamba_num_heads // s.mamba_num_groups
    for i in p.kept_layers:
        if types[i] == "M":
            h = p.layers[i]["mamba_heads"]
            k = len(h) // s.mamba_num_groups
            groups = " | ".join(",".join(map(str, h[g * k:(g + 1) * k])) for g in range(s.mamba_num_groups))
            out.append(f"  layer {i:>3} M: heads per group ({per} each) [{groups}]; "
                       f"channels {len(p.layers[i]['mamba_channels'])}/{s.mamba_head_dim}")
        elif types[i] == "E" and "experts" in p.layers.get(i, {}):
            out.append(f"  layer {i:>3} E: experts kept {p.layers[i]['experts']} of {s.num_moe_experts}")
    return out
