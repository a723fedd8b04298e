"""Report plots (matplotlib, Agg): validation-loss curves of the recovery runs (KD vs CE vs
KD+CE, one colour per method, one line style per seed) and loss vs measured throughput.
Each returns the written file's name, or None when there is nothing to draw."""

from __future__ import annotations

import json
from pathlib import Path

from .compare import parse_label


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _records(path: Path) -> list[dict]:
    f = path / "metrics.jsonl"
    if not f.is_file():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def recovery_curves(models: list[tuple[str, Path]], out: Path, teacher_loss: float | None = None,
                    pruned_loss: float | None = None) -> str | None:
    """Validation loss vs step of every seeded run (labels METHOD/SEED); the training
    cross-entropy (logged by CE and KD+CE runs) as thin lines."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colours, styles, drawn = {}, {}, False
    for label, path in models:
        method, seed = parse_label(label)
        recs = _records(path)
        if seed is None or not recs:
            continue
        c = colours.setdefault(method, f"C{len(colours)}")
        ls = styles.setdefault(seed, ["-", "--", ":", "-."][len(styles) % 4])
        pts = [(0, r["student_val_before"]) for r in [run_summary(path)] if r.get("student_val_before")]
        pts += [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
        if pts:
            ax.plot(*zip(*pts), color=c, ls=ls, marker="o", ms=3, label=f"{label} (val)")
            drawn = True
        ce = [(r["step"], r["ce"]) for r in recs if "ce" in r]
        if ce:
            ax.plot(*zip(*ce), color=c, ls=ls, lw=0.6, alpha=0.45)
    if not drawn:
        plt.close(fig)
        return None
    if teacher_loss is not None:
        ax.axhline(teacher_loss, color="k", lw=0.8, ls="--", label=f"teacher {teacher_loss:.3f} (fixed set)")
    if pruned_loss is not None:
        ax.set_ylim(top=min(pruned_loss, ax.get_ylim()[1]))
    ax.set_xlabel("distillation / training step (same tokens for every method at a seed)")
    ax.set_ylabel("validation LM loss (nats/token)")
    # the distill stage validates on a sample that follows data.seed: curves of different
    # seeds sit on different samples; the report's table uses one fixed set for all
    ax.set_title("recovery after pruning: KD vs CE\n(each run's own validation sample; thin: training CE)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out.name


def run_summary(path: Path) -> dict:
    f = path / "summary.json"
    try:
        return json.loads(f.read_text()) if f.is_file() else {}
    except ValueError:
        return {}


def loss_vs_throughput(points: list[dict], out: Path, title: str) -> str | None:
    """Scatter of {label, tokens_per_s, loss[, params]} points, labelled."""
    pts = [p for p in points if p.get("tokens_per_s") and p.get("loss") is not None]
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.scatter([p["tokens_per_s"] for p in pts], [p["loss"] for p in pts], c="C0")
    for p in pts:
        txt = p["label"] + (f" ({p['params'] / 1e6:.2f}M)" if p.get("params") else "")
        ax.annotate(txt, (p["tokens_per_s"], p["loss"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel("forward throughput (tokens/s, this machine)")
    ax.set_ylabel("validation LM loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out.name
