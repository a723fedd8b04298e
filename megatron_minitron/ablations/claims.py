"""Pure: ablation results -> the claims table (claim, the paper's finding, our figure, holds?).

Every function takes the measured numbers (dicts of losses / throughputs) and returns one
row: {"claim", "paper", "ours", "holds"} where holds is "yes", "no", "mixed" or "n/a"
(with the reason in "ours"). Lower loss is better everywhere.
"""

from __future__ import annotations

from typing import Optional


def _f(x: Optional[float], d: int = 4) -> str:
    return "-" if x is None else f"{x:.{d}f}"


def _row(claim: str, paper: str, ours: str, holds: str) -> dict:
    return {"claim": claim, "paper": paper, "ours": ours, "holds": holds}


def _verdict(flags: list[bool]) -> str:
    if not flags:
        return "n/a"
    return "yes" if all(flags) else "no" if not any(flags) else "mixed"


def group_aware(res: dict) -> dict:
    """res: {"zero_shot": {cfg: {"aware", "unaware", "same_sets"}}, "kd": {"aware", "unaware"}}."""
    parts, flags = [], []
    for cfg, r in res.get("zero_shot", {}).items():
        if r.get("same_sets"):
            parts.append(f"{cfg}: identical keep sets (the global top-k was balanced over groups)")
            continue
        parts.append(f"{cfg} zero-shot: aware {_f(r['aware'])} vs unaware {_f(r['unaware'])}")
        flags.append(r["aware"] < r["unaware"])
    kd = res.get("kd")
    if kd:
        parts.append(f"after {kd['steps']} KD steps: aware {_f(kd['aware'])} vs unaware {_f(kd['unaware'])}")
        flags.append(kd["aware"] < kd["unaware"])
    return _row("Group-aware Mamba head pruning beats group-unaware (heads ranked over the layer, then "
                "forced into groups)",
                "Cross-group permutations change the layer's function (sec. 3.1, eq. 16-17); "
                "group-aware pruning preserves it", "; ".join(parts), _verdict(flags))


def mamba_source(res: dict) -> dict:
    """res: {cfg: {"x": loss, "z": loss, "y": loss}} (zero-shot)."""
    parts, best_x = [], []
    for cfg, r in res.items():
        best = min(r, key=r.get)
        parts.append(f"{cfg}: x {_f(r['x'])}, z {_f(r['z'])}, y {_f(r['y'])} (best {best})")
        best_x.append(best == "x")
    n, k = len(best_x), sum(best_x)
    holds = "n/a" if not n else "yes" if k * 2 > n else "no" if k == 0 else "mixed"
    return _row("Scoring Mamba heads/channels on x (in_proj's x part) gives the lowest pruned loss",
                "Table 2: the first column (read as x, the paper's choice in eq. 19; the extracted "
                "text lost the headers) is lowest in 4 of 6 configurations",
                "; ".join(parts) + f" -> x best in {k} of {n}", holds)


def flap(res: dict) -> dict:
    """res: {"zero_shot": {cfg: {"l2", "flap"}}, "kd": {"l2", "flap", "steps"}}."""
    parts, before = [], []
    for cfg, r in res.get("zero_shot", {}).items():
        parts.append(f"{cfg} zero-shot: L2 {_f(r['l2'])} vs FLAP {_f(r['flap'])}")
        before.append(r["flap"] - r["l2"])
    kd = res.get("kd")
    holds = "n/a"
    if kd:
        gap = kd["flap"] - kd["l2"]
        parts.append(f"after {kd['steps']} KD steps: L2 {_f(kd['l2'])} vs FLAP {_f(kd['flap'])} "
                     f"({gap:+.4f})")
        biggest = max((abs(b) for b in before), default=0.0)
        holds = "yes" if abs(gap) <= max(0.02, 0.5 * biggest) else "no"
    return _row("FLAP vs L2 importance: mixed before KD, on par after KD",
                "Table 3: FLAP better for FFN, worse for Mamba heads before KD; both 1.380 after "
                "lightweight KD", "; ".join(parts), holds)


def heads_vs_channels(res: dict) -> dict:
    """res: {"heads": {"params", "zero_shot", "kd", "tokens_per_s"}, "channels": {...}, "steps"}."""
    h, c = res["heads"], res["channels"]
    flags = [h["zero_shot"] < c["zero_shot"]]
    ours = (f"heads {h['label']} ({h['params']:,} params) vs channels {c['label']} ({c['params']:,}): "
            f"zero-shot {_f(h['zero_shot'])} vs {_f(c['zero_shot'])}")
    if h.get("kd") is not None and c.get("kd") is not None:
        ours += f"; after {res['steps']} KD steps {_f(h['kd'])} vs {_f(c['kd'])}"
        flags.append(h["kd"] < c["kd"])
    ours += f"; forward throughput {h['tokens_per_s']:,.0f} vs {c['tokens_per_s']:,.0f} tokens/s"
    flags.append(h["tokens_per_s"] >= c["tokens_per_s"])
    return _row("Pruning Mamba heads beats pruning head channels at equal parameters (loss and speed)",
                "Fig. 7: fewer heads gives lower LM loss, lower latency and higher throughput than "
                "fewer head channels", ours, _verdict(flags))


def width_vs_depth(res: dict) -> dict:
    """res: {"budget", "steps", "rows": {"width-only"|"depth-only"|"depth+width": {label, params,
    zero_shot, kd}}}."""
    rows = res["rows"]
    ours = "; ".join(f"{k} {r['label']} ({r['params']:,}): zero-shot {_f(r['zero_shot'])}, "
                     f"after {res['steps']} KD steps {_f(r['kd'])}" for k, r in rows.items())
    w, d = rows.get("width-only"), rows.get("depth-only")
    holds = "n/a" if not (w and d) else "yes" if w["kd"] < d["kd"] else "no"
    return _row("Width-only pruning beats depth-only at equal parameters after equal KD "
                "(depth+width in between)",
                "Table 1: #1 width-only 1.380 vs #24 depth-only 1.533; best depth+width #7 1.393",
                ours, holds)


def depth_metric(res: dict) -> dict:
    """res: {n_drop: {"kl": {"layers", "loss"}, "cosine": {...}}} (zero-shot)."""
    parts, flags = [], []
    for n, r in res.items():
        k, c = r["kl"], r["cosine"]
        if k["layers"] == c["layers"]:
            parts.append(f"drop {n}: both drop {k['layers']} (loss {_f(k['loss'])})")
            continue
        parts.append(f"drop {n}: KL drops {k['layers']} -> {_f(k['loss'])}, cosine drops "
                     f"{c['layers']} -> {_f(c['loss'])}")
        flags.append(k["loss"] <= c["loss"])
    holds = _verdict(flags) if flags else "n/a"
    return _row("Depth ranking by KL divergence picks better layers to drop than cosine",
                "Sec. 3.4 ranks layers by KL(full || without layer) on 256 samples (no cosine "
                "comparison given)", "; ".join(parts), holds)


def ffn_source(res: dict) -> dict:
    """res: {"zero_shot": {"pre", "post"}, "kd": {"pre", "post", "steps"}, "default"}."""
    z, kd = res["zero_shot"], res.get("kd")
    ours = f"zero-shot: pre {_f(z['pre'])} vs post {_f(z['post'])}"
    if kd:
        ours += f"; after {kd['steps']} KD steps: pre {_f(kd['pre'])} vs post {_f(kd['post'])}"
    ours += f"; default kept: ffn_source={res['default']}"
    better = "pre" if (kd or z)["pre"] < (kd or z)["post"] else "post"
    return _row("FFN neurons scored before the activation (eq. 26, first projection output) vs "
                "after it (linear_fc2 input, Model Optimizer)",
                "Eq. 26 scores the first projection's output (pre-activation)", ours,
                "yes" if better == "pre" else "no")


def teacher_cache(res: dict) -> dict:
    """res: {"k", "steps", "tolerance", "online": {seed: loss}, "cached": {seed: loss},
    "step_seconds": {"online"|"cached": {seed: median KD step s}}, "cache_seconds": {seed: s},
    "bytes_per_token"}."""
    on, ca, k, tol = res["online"], res["cached"], res["k"], res["tolerance"]
    common = [s for s in on if s in ca]
    gaps = {s: ca[s] - on[s] for s in common}
    ts = res.get("step_seconds") or {}
    ratio = [ts["cached"][s] / ts["online"][s] for s in common
             if (ts.get("cached") or {}).get(s) and (ts.get("online") or {}).get(s)]
    ours = (f"after {res['steps']} KD steps, cached top-{k} {_f(_mean({s: ca[s] for s in common}))} vs online "
            f"{_f(_mean({s: on[s] for s in common}))} (gap per seed "
            + ", ".join(f"{s} {gaps[s]:+.4f}" for s in common) + ")"
            + (f"; KD step time (median) cached / online {sum(ratio) / len(ratio):.2f} (the cache's write, "
               f"{sum(v for v in res['cache_seconds'].values() if v):.0f} s for all seeds, paid once per "
               "token set, not included)" if ratio else "")
            + (f"; {res['bytes_per_token']} bytes/token" if res.get("bytes_per_token") else "")) if common else \
        "not measured"
    return _row(f"KD from a cache of the teacher's top-{k} logits recovers as well as online full-vocabulary "
                f"KD (within {tol} on every seed)",
                "No Minitron-SSM figure; Megatron-LM (offline top-K teacher log-probs) and Model Optimizer "
                "(top-K logits KL) offer it", ours, _verdict([abs(g) <= tol for g in gaps.values()]))


# ----------------------------------------------------------------------------- MoE (issue 19)


def _mean(d: dict) -> Optional[float]:
    return sum(d.values()) / len(d) if d else None


def _seedwise(a: dict, b: dict) -> str:
    """"(a lower on k of n seeds)" over the seeds both have."""
    common = [s for s in a if s in b]
    return f" (lower on {sum(a[s] < b[s] for s in common)} of {len(common)} seeds)" if common else ""


def expert_score(res: dict) -> dict:
    """res: {"default": "out", "zero_shot": {score: loss}, "same_sets": {score: bool},
    "kd": {score: {seed: loss}}, "steps"}: the default score against each alternative."""
    d, z, kd = res["default"], res["zero_shot"], res.get("kd") or {}
    parts, flags = [], []
    for s in z:
        if s == d:
            continue
        if res.get("same_sets", {}).get(s):
            parts.append(f"{s}: the same experts as {d} in every layer (zero-shot {_f(z[s])})")
            continue
        p = f"{d} vs {s}: zero-shot {_f(z[d])} vs {_f(z[s])}"
        flags.append(z[d] < z[s])
        if kd.get(d) and kd.get(s):
            p += (f", after {res['steps']} KD steps {_f(_mean(kd[d]))} vs {_f(_mean(kd[s]))}"
                  + _seedwise(kd[d], kd[s]))
            flags.append(_mean(kd[d]) < _mean(kd[s]))
        parts.append(p)
    return _row(f"Routed experts kept by the default score ({d}: the routing-weighted output norm) "
                "beat those kept by the alternative scores (mass: routing weight summed; freq: "
                "tokens routed)",
                "No paper figure (Minitron-SSM has no MoE layers); issue 19 recommends `out` as "
                "the default, to be measured here; Model Optimizer ranks experts by one rule",
                "; ".join(parts) or "no alternative score measured", _verdict(flags))


def expert_random(res: dict) -> dict:
    """res: {"score", "zero_shot": {"scored": loss, "random": {draw: loss}},
    "kd": {"scored": {seed: loss}, "random": {seed: loss}}, "steps"}; random draw k is
    distilled with KD seed k."""
    z, kd, sc = res["zero_shot"], res.get("kd") or {}, res["score"]
    zr = z["random"]
    ours = (f"zero-shot {sc} {_f(z['scored'])} vs random {_f(_mean(zr))} (draws "
            + ", ".join(f"{k} {_f(v)}" for k, v in zr.items()) + ")")
    flags = [z["scored"] < _mean(zr)] if zr else []
    if kd.get("scored") and kd.get("random"):
        ours += (f"; after {res['steps']} KD steps {_f(_mean(kd['scored']))} vs "
                 f"{_f(_mean(kd['random']))}" + _seedwise(kd["scored"], kd["random"]))
        flags.append(_mean(kd["scored"]) < _mean(kd["random"]))
    return _row(f"Experts kept by importance ({sc}) beat experts kept at random (the same count "
                "per layer, a seeded draw per seed)",
                "Expected of any importance score (random keep sets are the usual pruning "
                "baseline); no published MoE figure", ours, _verdict(flags))


def experts_vs_ffn(res: dict, budget: str) -> dict:
    """res: {"experts": {label, params, active, zero_shot, kd: {seed: loss}}, "ffn": {...},
    "steps"}; budget "total" or "active": the parameter count the two targets share."""
    e, f = res["experts"], res["ffn"]
    ours = (f"{e['label']} ({e['params']:,} params, {e['active']:,} active) vs {f['label']} "
            f"({f['params']:,}, {f['active']:,} active): zero-shot {_f(e['zero_shot'])} vs "
            f"{_f(f['zero_shot'])}")
    flags = [e["zero_shot"] < f["zero_shot"]]
    if e.get("kd") and f.get("kd"):
        ours += (f"; after {res['steps']} KD steps {_f(_mean(e['kd']))} vs {_f(_mean(f['kd']))}"
                 + _seedwise(e["kd"], f["kd"]))
        flags.append(_mean(e["kd"]) < _mean(f["kd"]))
    if budget == "total":
        paper = ("Model Optimizer's Nemotron 3 Nano 30B-A3B recipe prunes experts (128 -> 104) "
                 "and keeps the expert FFN (1856)")
    else:
        paper = ("Not a published claim. With top-k fixed, dropping experts removes only router "
                 "rows from the active count, so the equal-active FFN target keeps nearly every "
                 "neuron: expected no (experts buy memory, not compute per token)")
    return _row(f"At equal {budget} parameters, pruning routed experts beats pruning every "
                "expert's FFN width", paper, ours, _verdict(flags))


def moe_skipped(reason: str) -> dict:
    """The MoE rows' place when there is no MoE teacher / importance file."""
    return _row("MoE expert pruning (experts: score out vs mass/freq vs random; expert_ffn: "
                "experts vs expert FFN at equal total and active parameters)",
                "-", f"not measured: {reason}", "n/a")


def markdown(rows: list[dict]) -> str:
    lines = ["| claim | paper's finding | our figure | holds? |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['claim']} | {r['paper']} | {r['ours']} | {r['holds']} |")
    return "\n".join(lines) + "\n"
