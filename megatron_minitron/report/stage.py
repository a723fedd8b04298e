"""`report` stage: one table for every model of a run (teacher, pruned, distilled, ...),
measured here side by side on the same validation tokens and the same machine: parameter
count, validation loss / perplexity, forward throughput, training tokens; runs labelled
METHOD/SEED (KD/s1, CE/s1, KD+CE/s1, ...) are also summarised per method: the spread over
seeds and the paired difference to the baseline method (same seed = same training tokens).
Plots: recovery curves, loss vs throughput, and every plot of the run's stages (e.g. the
per-layer importance). Markdown + JSON."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import dist as D
from ..config import ConfigError, DataConfig, ParallelConfig
from ..model import build_model, causal_mask, count_parameters
from ..train import checkpoint as ckpt
from ..data.stage_data import check_data
from ..train.pretrain import eval_checkpoint
from . import compare as C
from . import plots


@dataclass
class ReportConfig:
    run_dir: str = "runs/default"
    # "label=path" (path relative to run_dir unless absolute); missing checkpoints are skipped
    # METHOD/SEED labels group runs: per method the spread over seeds, and per seed the
    # difference to `baseline` (the same training tokens)
    models: list[str] = field(default_factory=lambda: [
        "teacher=teacher", "pruned=pruned", "KD/s1=distilled", "KD/s2=distilled_s2",
        "CE/s1=ce_baseline", "CE/s2=ce_baseline_s2", "KD+CE/s1=kd_ce", "KD+CE/s2=kd_ce_s2"])
    output_dir: str = ""  # default: <run_dir>/report
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval_iters: int = 8
    micro_batch_size: int = 8
    throughput_iters: int = 4
    baseline: str = "CE"  # the method other METHOD/SEED runs are compared with, seed by seed


def _models(cfg: ReportConfig) -> list[tuple[str, Path]]:
    out = []
    for item in cfg.models:
        if "=" not in item:
            raise ConfigError(f"models entry {item!r} must look like label=path")
        label, path = item.split("=", 1)
        p = Path(path) if Path(path).is_absolute() else Path(cfg.run_dir) / path
        if ckpt.resolve(p) is not None:
            out.append((label, p))
    if not out:
        raise ConfigError(f"no checkpoint found for any of models={cfg.models} under run_dir={cfg.run_dir!r}")
    return out


@torch.no_grad()
def forward_throughput(checkpoint, par, micro_batch_size: int, iters: int) -> float:
    """Tokens/s of forward passes (random tokens, full sequence) on this machine."""
    mcfg = ckpt.read_model_config(checkpoint)
    model = build_model(mcfg, par, initialize=False).eval()  # weights loaded next
    ckpt.load_model_weights(checkpoint, model)
    s = mcfg.seq_length
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, mcfg.vocab_size, (micro_batch_size, s), generator=g).to(par.device)
    pos = torch.arange(s, device=par.device)[None].expand(micro_batch_size, -1)
    mask = causal_mask(s, str(par.device))
    model(tok, pos, mask)  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        model(tok, pos, mask)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return iters * micro_batch_size * s / (time.perf_counter() - t0)


def _train_tail(losses) -> dict:
    """Mean training loss over the last tenth of a pretraining run (at least 10 steps)."""
    if not losses:
        return {}
    n = max(10, len(losses) // 10)
    tail = losses[-n:]
    return {"train_loss_tail": sum(tail) / len(tail), "train_loss_tail_steps": len(tail)}


def _train_tokens(data_summary: dict, split: str) -> int | None:
    """Tokens in the train split (megatron splits by document: approximately)."""
    try:
        w = [float(x) for x in split.split(",")]
        return int(data_summary["tokens"] * w[0] / sum(w))
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def _describe(mcfg) -> str:
    return (f"`{mcfg.pattern}` h{mcfg.hidden_size} ffn{mcfg.ffn_hidden_size} "
            f"mamba {mcfg.mamba_num_heads}x{mcfg.mamba_head_dim}")


def _loss_curves(run_dir: Path, labels: list[tuple[str, Path]], out: Path) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    any_curve = False
    for label, path in labels:
        f = path / "metrics.jsonl"
        if not f.is_file():
            continue
        recs = [json.loads(l) for l in f.read_text().splitlines() if l.strip()]
        steps = [r["step"] for r in recs if "val_loss" in r]
        if steps:
            ax.plot(steps, [r["val_loss"] for r in recs if "val_loss" in r], marker="o", label=f"{label} (val)")
            any_curve = True
    if not any_curve:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("validation LM loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out.name


def run_report(cfg: ReportConfig) -> dict:
    cfg.parallel.validate()  # (refuses parallel.cp > 1: the throughput pass is not split)
    cfg.data.validate()
    models = _models(cfg)
    data_summary = check_data(cfg.data)
    par = D.init(cfg.parallel)
    out = Path(cfg.output_dir or Path(cfg.run_dir) / "report")
    rows = []
    for label, path in models:
        mcfg = ckpt.read_model_config(path)
        ev = eval_checkpoint(path, cfg.data, par, cfg.eval_iters, cfg.micro_batch_size)
        tps = forward_throughput(path, par, cfg.micro_batch_size, cfg.throughput_iters)
        run = plots.run_summary(path)  # the stage summary of the run that made it (if any)
        rows.append({"model": label, "checkpoint": ev["checkpoint"], "architecture": _describe(mcfg),
                     "parameters": count_parameters(mcfg)["total"], "val_loss": ev["loss"],
                     "val_ppl": ev["ppl"], "forward_tokens_per_s": tps,
                     "tokens_seen": run.get("tokens_seen"), "stage": run.get("stage"),
                     **_train_tail(run.get("losses")),
                     "loss_config": run.get("loss")})
        D.print0(f"[report] {label}: {rows[-1]['parameters']:,} params, val loss {ev['loss']:.4f}, "
                 f"{tps:,.0f} tok/s")
    base = rows[0]
    for r in rows:
        r["params_vs_first"] = r["parameters"] / base["parameters"]
        r["speedup_vs_first"] = r["forward_tokens_per_s"] / base["forward_tokens_per_s"]
    report = {"stage": "report", "rows": rows, "eval_tokens": cfg.eval_iters * cfg.micro_batch_size
              * par.dp * ckpt.read_model_config(models[0][1]).seq_length,
              "unigram_baseline": data_summary.get("unigram_entropy"),
              "layout": {"tp": par.tp, "pp": par.pp, "ep": par.ep, "dp": par.dp},
              "methods": C.method_summary(rows, cfg.baseline), "baseline": cfg.baseline,
              "train_tokens_available": _train_tokens(data_summary, cfg.data.split)}
    if D.is_rank0():
        out.mkdir(parents=True, exist_ok=True)
        by = {r["model"]: r for r in rows}
        made = [plots.recovery_curves(models, out / "recovery_curves.png",
                                      by.get("teacher", {}).get("val_loss"), by.get("pruned", {}).get("val_loss")),
                plots.loss_vs_throughput([{"label": r["model"], "tokens_per_s": r["forward_tokens_per_s"],
                                           "loss": r["val_loss"], "params": r["parameters"]} for r in rows],
                                         out / "loss_vs_throughput.png", "report models: loss vs throughput")]
        if not any(C.parse_label(label)[1] for label, _ in models):
            made.append(_loss_curves(Path(cfg.run_dir), models, out / "val_loss_curves.png"))
        plots_ = [p for p in made if p]
        for png in sorted(Path(cfg.run_dir).glob("*/*.png")):
            if png.parent != out:
                plots_.append(str(Path("..") / png.relative_to(cfg.run_dir)))
        report["plots"] = plots_
        (out / "report.json").write_text(json.dumps(report, indent=2))
        (out / "report.md").write_text(_markdown(report))
        D.print0(_markdown(report))
        D.print0(f"[report] wrote {out / 'report.md'} and report.json")
    D.shutdown()
    return report


def _markdown(rep: dict) -> str:
    lines = ["# megatron-minitron report", "",
             f"Validation on {rep['eval_tokens']:,} held-out tokens (the same for every model); "
             f"unigram baseline {rep['unigram_baseline']:.3f} nats/token." if rep.get("unigram_baseline")
             else f"Validation on {rep['eval_tokens']:,} held-out tokens.", "",
             "| model | architecture | parameters | x first | training tokens | val loss | val ppl "
             "| fwd tokens/s | speedup |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rep["rows"]:
        lines.append(f"| {r['model']} | {r['architecture']} | {r['parameters']:,} | "
                     f"{r['params_vs_first']:.2f} | {C.fmt_tokens(r.get('tokens_seen'))} | {r['val_loss']:.4f} | "
                     f"{r['val_ppl']:.1f} | {r['forward_tokens_per_s']:,.0f} | {r['speedup_vs_first']:.2f} |")
    lines += _teacher_lines(rep) + _method_lines(rep)
    for p in rep.get("plots", []):
        lines += ["", f"![{Path(p).stem}]({p})"]
    return "\n".join(lines) + "\n"


def _teacher_lines(rep: dict) -> list[str]:
    t = next((r for r in rep["rows"] if r.get("stage") == "pretrain"), None)
    if t is None or not t.get("tokens_seen"):
        return []
    out = ["", f"The teacher ({t['model']}) trained on {C.fmt_tokens(t['tokens_seen'])} tokens"]
    avail = rep.get("train_tokens_available")
    if avail:
        out[-1] += (f", {t['tokens_seen'] / avail:.0%} of the {C.fmt_tokens(avail)}-token train split "
                    f"({'no token seen twice' if t['tokens_seen'] <= avail else 'REPEATED data'})")
    if t.get("train_loss_tail") is not None:  # each batch is unseen when its loss is taken
        out[-1] += (f"; training loss {t['train_loss_tail']:.4f} (mean of the last "
                    f"{t['train_loss_tail_steps']} steps) vs validation {t['val_loss']:.4f} "
                    f"(train-valid gap {t['val_loss'] - t['train_loss_tail']:+.4f})")
    out[-1] += "."
    return out


def _method_lines(rep: dict) -> list[str]:
    ms = rep.get("methods") or []
    if not ms:
        return []
    base = rep.get("baseline", "CE")
    out = ["", f"## Recovery after pruning, for the same training tokens (seeds paired against {base})", "",
           "| method | seeds | training tokens | val loss: mean (min..max) | minus " + base +
           ": mean (min..max) | lower than " + base + " |",
           "|---|---:|---:|---:|---:|---:|"]
    for m in ms:
        vb = m.get("vs_baseline")
        out.append(f"| {m['method']} | {len(m['seeds'])} | {C.fmt_tokens(m.get('tokens'))} | "
                   f"{C.fmt_spread(m['val_loss'])} | "
                   + (f"{vb['mean']:+.4f} ({vb['min']:+.4f}..{vb['max']:+.4f}) | {vb['wins']}/{vb['n']} |"
                      if vb else "- | - |"))
    return out
