"""Pure summaries for the report: runs labelled ``METHOD/SEED`` (e.g. ``KD/s1``, ``CE/s1``)
grouped by method, the spread over seeds, and each method's difference to a baseline method
on the SAME seed (the same training tokens), so the comparison is paired."""

from __future__ import annotations

import math
import statistics


def parse_label(label: str) -> tuple[str, str | None]:
    """``"KD/s1"`` -> ``("KD", "s1")``; a label without ``/`` is its own method, no seed."""
    method, sep, seed = label.partition("/")
    return (method, seed) if sep and seed else (label, None)


def _spread(vals: list[float]) -> dict:
    return {"n": len(vals), "mean": statistics.fmean(vals), "min": min(vals), "max": max(vals),
            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}


def method_summary(rows: list[dict], baseline: str = "CE", key: str = "val_loss") -> list[dict]:
    """One entry per method that has seeded runs, in first-appearance order.

    Each: method, seeds, tokens (the runs' `tokens_seen`, if all equal), the val-loss spread
    ({n, mean, min, max, std}), and against `baseline` (the same seeds only): the per-seed
    differences (method - baseline; negative = lower loss than the baseline), their spread,
    and `wins` = seeds where the method is lower.
    """
    by: dict[str, dict[str, dict]] = {}
    for r in rows:
        m, s = parse_label(r["model"])
        if s is not None:
            by.setdefault(m, {})[s] = r
    base = by.get(baseline, {})
    out = []
    for m, runs in by.items():
        seeds = list(runs)
        toks = {runs[s].get("tokens_seen") for s in seeds}
        e = {"method": m, "seeds": seeds, "tokens": toks.pop() if len(toks) == 1 else None,
             key: _spread([runs[s][key] for s in seeds])}
        common = [s for s in seeds if s in base]
        if m != baseline and common:
            diffs = [runs[s][key] - base[s][key] for s in common]
            e["vs_baseline"] = {"baseline": baseline, "seeds": common,
                                "diffs": dict(zip(common, diffs)), **_spread(diffs),
                                "wins": sum(d < 0 for d in diffs)}
        out.append(e)
    return out


def fmt_spread(sp: dict, digits: int = 4) -> str:
    """``mean (min..max)`` or just the value for one run."""
    if sp["n"] == 1:
        return f"{sp['mean']:.{digits}f}"
    return f"{sp['mean']:.{digits}f} ({sp['min']:.{digits}f}..{sp['max']:.{digits}f})"


def fmt_tokens(n) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"
