"""Pruning targets -> validated keep sets -> `Plan` (plan.json). Paper sec. 3.1-3.4.

A `Plan` holds, per SOURCE global layer id and axis, the kept indices (global, unsharded
order), the kept layers, the source and pruned ModelConfigs and the analytic parameter
counts before and after (model.count_parameters). The `prune` stage (rewrite/) reads it
on every rank; nothing in here touches a model or a process group.

Axis names in `Plan.layers[i]`:
  'M': "mamba_heads" [H'] (group order, the same count per group), "mamba_channels" [P']
  '-': "ffn" [F']
  '*': "attention_heads" [Q'] (query-group order, the same count per group)
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


# ----------------------------------------------------------------------------- plan


@dataclass
class Plan:
    source: ModelConfig
    target: ModelConfig
    kept_layers: list[int]  # source layer ids kept, in order: pruned layer j <- source kept_layers[j]
    dropped_layers: list[int]
    hidden: list[int]
    layers: dict[int, dict[str, list[int]]]  # source layer id -> axis -> kept indices
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
                layers={int(k): {a: [int(i) for i in v] for a, v in e.items()}
                        for k, e in d["layers"].items()},
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


def _check_index_list(name: str, idx: list[int], n: int) -> None:
    if len(idx) == 0:
        raise ConfigError(f"{name}: empty keep set")
    if len(set(idx)) != len(idx):
        raise ConfigError(f"{name}: repeated indices")
    if min(idx) < 0 or max(idx) >= n:
        raise ConfigError(f"{name}: indices must lie in [0, {n})")


def _check_grouped(name: str, idx: list[int], n: int, groups: int) -> None:
    """Eq. 17: slot block g holds only members of group g, same count in every group."""
    _check_index_list(name, idx, n)
    if len(idx) % groups:
        raise ConfigError(f"{name}: {len(idx)} kept heads is not a multiple of {groups} groups")
    per, k = n // groups, len(idx) // groups
    for g in range(groups):
        bad = [h for h in idx[g * k:(g + 1) * k] if h // per != g]
        if bad:
            raise ConfigError(
                f"{name}: heads {bad} sit in the slots of group {g} but belong to group(s) "
                f"{sorted({h // per for h in bad})}; heads may be reordered only within their "
                "group (a cross-group move changes which B/C or K/V a head reads)")


_PRUNED_FIELDS = {"pattern", "hidden_size", "ffn_hidden_size", "mamba_num_heads", "mamba_head_dim",
                  "num_attention_heads"}


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


def assemble_plan(source: ModelConfig, hidden, layers: dict, dropped=(), settings: Optional[dict] = None,
                  group_rule: bool = True) -> Plan:
    """Build a Plan from explicit keep sets (what `make_plan` computes from scores; tests
    use it directly with permutations). The target ModelConfig is derived from the sets."""
    types = K.pattern_layers(source.pattern)
    dropped = [int(i) for i in dropped]
    kept = [i for i in range(len(types)) if i not in set(dropped)]
    as_list = lambda v: [int(x) for x in (v.tolist() if isinstance(v, torch.Tensor) else v)]  # noqa: E731
    layers = {int(i): {a: as_list(v) for a, v in e.items()} for i, e in layers.items() if int(i) in set(kept)}
    first = {t: next((layers[i] for i in kept if types[i] == t and i in layers), None) for t in "M-*"}
    tgt = dataclasses.replace(
        source,
        pattern=K.apply_depth_to_pattern(source.pattern, dropped) if dropped else source.pattern,
        hidden_size=len(hidden),
        ffn_hidden_size=len(first["-"]["ffn"]) if first["-"] else source.ffn_hidden_size,
        mamba_num_heads=len(first["M"]["mamba_heads"]) if first["M"] else source.mamba_num_heads,
        mamba_head_dim=len(first["M"]["mamba_channels"]) if first["M"] else source.mamba_head_dim,
        num_attention_heads=len(first["*"]["attention_heads"]) if first["*"] else source.num_attention_heads,
    )
    p = Plan(source=source, target=tgt, kept_layers=kept, dropped_layers=dropped,
             hidden=as_list(hidden), layers=layers,
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


def validate_targets(src: ModelConfig, t: TargetConfig, tp: int = 1, pp: int = 1,
                     prefix: str = "target") -> None:
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


# ----------------------------------------------------------------------------- scores -> plan


def make_plan(imp, t: TargetConfig, *, mamba_source: str = "x", mamba_metric: str = "l2",
              order: str = "sorted", tp: int = 1, pp: int = 1, ffn_source: str = "post",
              mamba_grouping: str = "aware") -> Plan:
    """Keep sets from an ImportanceFile and a target (paper sec. 3.1-3.4).

    order="sorted": every keep set sorted ascending (Mamba / attention heads stay within
    their groups, so this is still the group-order concatenation of eq. 17); any order is
    functionally identical, and sorted sets let each rank of the rewrite read a compact
    slice of the source. order="ranked": most important first (within groups).

    ffn_source="post" scores FFN neurons by linear_fc2's input (after the activation; Model
    Optimizer's choice), "pre" by the first projection's output (before it; paper eq. 26).
    mamba_grouping="unaware" is an ablation baseline only (keep.mamba_heads_group_unaware:
    heads ranked over the whole layer, then forced into groups; changes the function).
    """
    from ..importance import scores as S

    src = imp.model
    validate_targets(src, t, tp, pp)
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

    def fin(v: torch.Tensor) -> torch.Tensor:
        return v.sort().values if order == "sorted" else v

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
    settings = {"mamba_source": mamba_source, "mamba_metric": mamba_metric, "order": order,
                "ffn_source": ffn_source, "mamba_grouping": mamba_grouping,
                "target": dataclasses.asdict(t), "tp": tp, "pp": pp,
                "importance_meta": {k: v for k, v in (imp.meta or {}).items()
                                    if isinstance(v, (int, float, str, bool))}}
    try:
        plan = assemble_plan(src, hidden, layers, dropped, settings,
                             group_rule=mamba_grouping == "aware")
        plan.target.validate(tp=tp, pp=pp, prefix="pruned model")
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
            ("num_attention_heads", s.num_attention_heads, t.num_attention_heads),
            ("parameters", p.params_before["total"], p.params_after["total"])]
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
    return out
