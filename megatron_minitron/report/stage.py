"""`report` stage: one table for every model of a run (teacher, pruned, distilled, ...),
measured here side by side on the same validation tokens and the same machine: parameter
count, validation loss / perplexity, forward throughput; plus plots. Markdown + JSON."""

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
from ..train.pretrain import check_data, eval_checkpoint


@dataclass
class ReportConfig:
    run_dir: str = "runs/default"
    # "label=path" (path relative to run_dir unless absolute); missing checkpoints are skipped
    models: list[str] = field(default_factory=lambda: [
        "teacher=teacher", "pruned=pruned", "distilled=distilled", "ce-only=ce_baseline"])
    output_dir: str = ""  # default: <run_dir>/report
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval_iters: int = 8
    micro_batch_size: int = 8
    throughput_iters: int = 4


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
    model = build_model(mcfg, par).eval()
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
        rows.append({"model": label, "checkpoint": ev["checkpoint"], "architecture": _describe(mcfg),
                     "parameters": count_parameters(mcfg)["total"], "val_loss": ev["loss"],
                     "val_ppl": ev["ppl"], "forward_tokens_per_s": tps})
        D.print0(f"[report] {label}: {rows[-1]['parameters']:,} params, val loss {ev['loss']:.4f}, "
                 f"{tps:,.0f} tok/s")
    base = rows[0]
    for r in rows:
        r["params_vs_first"] = r["parameters"] / base["parameters"]
        r["speedup_vs_first"] = r["forward_tokens_per_s"] / base["forward_tokens_per_s"]
    report = {"stage": "report", "rows": rows, "eval_tokens": cfg.eval_iters * cfg.micro_batch_size
              * par.dp * ckpt.read_model_config(models[0][1]).seq_length,
              "unigram_baseline": data_summary.get("unigram_entropy"),
              "layout": {"tp": par.tp, "pp": par.pp, "dp": par.dp}}
    if D.is_rank0():
        out.mkdir(parents=True, exist_ok=True)
        curves = _loss_curves(Path(cfg.run_dir), models, out / "val_loss_curves.png")
        plots = [curves] if curves else []
        for png in sorted(Path(cfg.run_dir).glob("*/*.png")):
            if png.parent != out:
                plots.append(str(Path("..") / png.relative_to(cfg.run_dir)))
        report["plots"] = plots
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
             "| model | architecture | parameters | x first | val loss | val ppl | fwd tokens/s | speedup |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rep["rows"]:
        lines.append(f"| {r['model']} | {r['architecture']} | {r['parameters']:,} | "
                     f"{r['params_vs_first']:.2f} | {r['val_loss']:.4f} | {r['val_ppl']:.1f} | "
                     f"{r['forward_tokens_per_s']:,.0f} | {r['speedup_vs_first']:.2f} |")
    for p in rep.get("plots", []):
        lines += ["", f"![{Path(p).stem}]({p})"]
    return "\n".join(lines) + "\n"
