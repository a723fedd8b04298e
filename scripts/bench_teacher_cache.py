"""Cached top-K KD against online full-vocabulary KD on the default (issue 22), side by side
in one process: for each seed (the main job's: data.seed = train.seed = 1233 + s), a
`teacher-logits` cache per K of the default teacher over the sequences configs/distill_default.yaml
trains on, then the default distillation (runs/default/pruned -> 60 steps x 16 x 256 tokens)
online and from each cache, in that order. Needs the main job's teacher and pruned student
(scripts/run_default.sh).

    .venv/bin/python scripts/bench_teacher_cache.py [--ks 8,32,128] [--seeds 1,2] [--out DIR]

Per run: the student's validation loss after the same steps on the same tokens (the distill
stage's validation batches, drawn with the seed: compare within a seed), the median
KD step time (train_step: forward, loss, backward, optimizer; the online side includes the
teacher's forward, the cached side reading the targets from disk), and per cache its bytes
per token and the seconds its write took (the teacher forward paid once). Writes
DIR/results.json and DIR/table.md (default DIR: runs/default/teacher_cache_bench).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ks", default="8,32,128")
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--out", default="runs/default/teacher_cache_bench")
    ap.add_argument("--run", default="runs/default", help="the main job's run folder")
    ap.add_argument("--table-only", action="store_true",
                    help="rewrite DIR/table.md from DIR/results.json (and the caches' coverage)")
    a = ap.parse_args(argv)
    import os

    os.chdir(ROOT)
    if a.table_only:
        res = json.loads((Path(a.out) / "results.json").read_text())
        add_coverage(res, Path(a.out))
        (Path(a.out) / "results.json").write_text(json.dumps(res, indent=2))
        (Path(a.out) / "table.md").write_text(table(res) + "\n")
        print(table(res))
        return 0
    from megatron_minitron.config import load_stage_config
    from megatron_minitron.distill.stage import run_distill
    from megatron_minitron.distill.logits_stage import run_teacher_logits
    from megatron_minitron.train import checkpoint as ckpt

    run, out = Path(a.run), Path(a.out)
    for need in ("teacher", "pruned"):
        if ckpt.resolve(run / need) is None:
            print(f"error: no checkpoint at {run / need}; run scripts/run_default.sh first", file=sys.stderr)
            return 2
    ks = [int(k) for k in a.ks.split(",")]
    seeds = [int(s) for s in a.seeds.split(",")]
    out.mkdir(parents=True, exist_ok=True)
    res = {"ks": ks, "seeds": seeds, "caches": {}, "runs": {}}

    def step_s(summary):
        """Median seconds of a train_step (tokens_per_s is measured around it alone)."""
        per_step = summary["tokens_seen"] / summary["iteration"]
        return statistics.median(per_step / h["tokens_per_s"] for h in summary["history"])

    for s in seeds:
        common = [f"student={run / 'pruned'}", f"teacher={run / 'teacher'}", f"data.seed={1233 + s}",
                  f"train.seed={1233 + s}"]
        base = load_stage_config("distill", "configs/distill_default.yaml", common)
        samples = base.train.steps * base.train.global_batch_size
        for k in ks:
            c = out / f"cache_k{k}_s{s}"
            t0 = time.time()
            m = run_teacher_logits(load_stage_config("teacher-logits", "configs/teacher_logits_default.yaml", [
                f"teacher={run / 'teacher'}", f"output_dir={c}", f"top_k={k}", f"samples={samples}",
                f"data.seed={1233 + s}", "resume=false"]))
            res["caches"][f"k{k}/s{s}"] = {"bytes": m["bytes"], "bytes_per_token": m["bytes_per_token"],
                                           "seconds": time.time() - t0, "teacher_val_loss": m["teacher_val_loss"]}
        for name, extra in [("online", [])] + [(f"k{k}", [f"teacher_cache={out / f'cache_k{k}_s{s}'}"]) for k in ks]:
            d = run_distill(load_stage_config("distill", "configs/distill_default.yaml", common + extra + [
                f"output_dir={out / f'{name}_s{s}'}", "resume=false"]))
            res["runs"][f"{name}/s{s}"] = {"val_loss": d["student_val_after"], "step_s": step_s(d),
                                           "train_seconds": d["train_seconds"], "teacher_val_loss": d["teacher_val_loss"]}
            print(f"[bench] seed {s} {name}: val loss {d['student_val_after']:.4f}, "
                  f"step {res['runs'][f'{name}/s{s}']['step_s']:.3f} s", flush=True)
    add_coverage(res, out)
    (out / "results.json").write_text(json.dumps(res, indent=2))
    (out / "table.md").write_text(table(res) + "\n")
    print(table(res))
    return 0


def add_coverage(res: dict, out: Path) -> None:
    """Per cache: the teacher's mean probability mass inside its top-K (1 - rest mass) over
    every cached token: what the K+1-bucket loss still sees of the teacher's distribution."""
    from megatron_minitron.distill.cache import TeacherCache

    for key, c in res["caches"].items():
        k, s = key.split("/")
        root = out / f"cache_{k}_{s}"
        if "topk_mass" in c or not root.is_dir():
            continue
        tc = TeacherCache(root)
        tot = n = 0.0
        for a in range(0, tc.samples, 64):
            lr = tc.get(range(a, min(a + 64, tc.samples)))["log_rest"].double()
            tot += float((1 - lr.exp()).sum())
            n += lr.numel()
        c["topk_mass"] = tot / n


def table(res: dict) -> str:
    seeds, ks = res["seeds"], res["ks"]
    R = res["runs"]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    on = {s: R[f"online/s{s}"] for s in seeds}
    lines = ["| teacher | cache bytes / token | val loss, seed " + " / ".join(map(str, seeds))
             + " | gap to online, per seed (mean) | KD step time, cached / online (per seed) | cache write (s) "
             "| teacher mass in top-K |",
             "|---|---|---|---|---|---|---|"]
    lines.append("| online, full vocabulary | - | " + " / ".join(f"{on[s]['val_loss']:.4f}" for s in seeds)
                 + " | - | "
                 + " / ".join(f"{on[s]['step_s']:.3f} s" for s in seeds) + " | - | 1 |")
    for k in ks:
        r = {s: R[f"k{k}/s{s}"] for s in seeds}
        c = {s: res["caches"][f"k{k}/s{s}"] for s in seeds}
        gap = mean([r[s]["val_loss"] - on[s]["val_loss"] for s in seeds])
        lines.append(f"| cached top-{k} | {c[seeds[0]]['bytes_per_token']} | "
                     + " / ".join(f"{r[s]['val_loss']:.4f}" for s in seeds) + " | "
                     + " / ".join(f"{r[s]['val_loss'] - on[s]['val_loss']:+.4f}" for s in seeds) + f" ({gap:+.4f}) | "
                     + " / ".join(f"{r[s]['step_s'] / on[s]['step_s']:.2f}" for s in seeds) + " | "
                     + " / ".join(f"{c[s]['seconds']:.0f}" for s in seeds) + " | "
                     + (f"{mean([c[s]['topk_mass'] for s in seeds]):.3f}" if all("topk_mass" in c[s] for s in seeds)
                        else "-") + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
