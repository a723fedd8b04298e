"""Layer importance by layer index, coloured by layer type (the paper's figure 4), and the
routed experts' scores of MoE layers."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

COLORS = {"M": "#1f77b4", "*": "#d62728", "-": "#2ca02c", "E": "#9467bd"}
NAMES = {"M": "Mamba", "*": "attention", "-": "MLP", "E": "MoE"}


def plot_layer_importance(depth: dict[str, torch.Tensor], pattern: str, path: str | Path,
                          title: str = "") -> Optional[Path]:
    """One bar panel per depth metric ('kl', 'cosine') that has any finite value. Returns
    the path, or None when matplotlib is not installed (the stage says so; nothing else
    depends on the plot)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    kinds = pattern.replace("|", "")
    labels = {"kl": "KL(full || layer skipped)", "cosine": "1 - cos(in, out)"}
    metrics = [k for k in ("kl", "cosine")
               if k in depth and any(math.isfinite(float(v)) for v in depth[k])]
    if not metrics:
        return None
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(6.0, 0.35 * len(kinds) + 2), 3.0 * len(metrics)),
                             squeeze=False)
    for ax, key in zip(axes[:, 0], metrics):
        vals = [float(v) for v in depth[key]]
        ax.bar(range(len(vals)), [v if math.isfinite(v) else 0.0 for v in vals],
               color=[COLORS[k] for k in kinds])
        ax.set_ylabel(labels[key])
        ax.set_xlim(-0.6, len(vals) - 0.4)
        if key == "kl" and all(v > 0 for v in vals if math.isfinite(v)):
            ax.set_yscale("log")
    axes[-1, 0].set_xlabel("layer index")
    from matplotlib.patches import Patch

    present = [k for k in "M*-E" if k in kinds]
    axes[0, 0].legend(handles=[Patch(color=COLORS[k], label=NAMES[k]) for k in present],
                      loc="upper right", fontsize=8)
    if title:
        axes[0, 0].set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_expert_importance(layers: dict, pattern: str, path: str | Path, score: str = "out",
                           title: str = "") -> Optional[Path]:
    """One row per MoE layer, one column per routed expert: its `score` ("out", "mass" or
    "freq") as a share of the layer's total, and the routing frequency beside it. Returns
    the path, or None without matplotlib or without expert scores."""
    rows = [(i, layers[i]["experts"]) for i, t in enumerate(pattern.replace("|", ""))
            if t == "E" and "experts" in layers.get(i, {})]
    if not rows:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys = [score] + (["freq"] if score != "freq" else [])
    n_exp = len(rows[0][1][score])
    fig, axes = plt.subplots(1, len(keys), figsize=(min(24.0, 2.0 + 0.12 * n_exp) * len(keys),
                                                    1.2 + 0.3 * len(rows)), squeeze=False)
    for ax, key in zip(axes[0], keys):
        share = torch.stack([e[key].float() / e[key].float().sum().clamp_min(1e-30) for _, e in rows])
        im = ax.imshow(share.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(len(rows)), [f"L{i}" for i, _ in rows], fontsize=7)
        ax.set_xlabel("expert")
        ax.set_title(f"{key} (share of the layer's total)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.03)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
