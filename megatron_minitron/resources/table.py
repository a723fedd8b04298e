"""Resource tables of the big recipes: per-GPU estimates of each stage at the layouts of
their recipe YAMLs on 8 x 80 GB GPUs per node, from the model YAMLs alone.

    python -m megatron_minitron.resources.table [--recipe nemotron_h_8b] [--limit-gb 80]
    python -m megatron_minitron.resources.table --recipe nemotron_3_nano [--search] [--search-cost]
    python -m megatron_minitron.resources.table [--recipe ...] --teacher-cache

nemotron_h_8b: configs/*nemotron_h_8b*.yaml (the README's table). nemotron_3_nano: Nemotron
3 Nano 30B-A3B (configs/model/nemotron_3_nano_30b_a3b.yaml) at configs/stats_ and
distill_nemotron_3_nano_30b_a3b.yaml, beside the same layouts without expert parallelism;
--search lists every (tp, pp, ep, recompute) of its distill job that fits; --search-cost
the architecture search's cost per candidate (configs/search_*.yaml), from FLOPs;
--teacher-cache what one teacher-logits cache costs and saves there and in the long KD.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from pathlib import Path

from ..config import ModelConfig, build, load_yaml
from . import estimate as E

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ORDER = ["weights", "grads", "optimizer", "activations", "logits", "moe_dispatch", "teacher",
         "depth_kl", "tensor buffers", "runtime"]


def _model(name: str) -> ModelConfig:
    return build(ModelConfig, load_yaml(CONFIGS / "model" / name)["model"], "model.")


def nemotron_h_8b() -> ModelConfig:
    return _model("nemotron_h_8b.yaml")


def nemotron_h_4b() -> ModelConfig:
    """The paper's pruned 4B (sec. 4): hidden 3072, FFN 12288, 112 Mamba heads x 64."""
    return _model("nemotron_h_4b.yaml")


def nemotron_3_nano_30b_a3b() -> ModelConfig:
    return _model("nemotron_3_nano_30b_a3b.yaml")


def nemotron_3_nano_22b_a3b() -> ModelConfig:
    """A pruned Nemotron 3 Nano student: hidden 2304, 104 routed experts (FFN 1856), shared
    expert 3072, all 52 layers and the teacher's Mamba / attention heads: 22.3B total,
    3.0B active per token (2.4B without the embedding and output layer)."""
    return _model("nemotron_3_nano_22b_a3b.yaml")


def _stats_layout(st: dict, gpus: int = 8) -> E.Layout:
    p = st["parallel"]
    tp, pp = p.get("tp", 1), p.get("pp", 1)
    return E.Layout(tp=tp, pp=pp, dp=gpus // (tp * pp), ep=p.get("ep", 1),
                    micro_batch_size=st["micro_batch_size"], seq_length=st["seq_length"],
                    sequence_parallel=p.get("sequence_parallel", False) and tp > 1)


def _distill_layout(dc: dict, world: int, moe: bool) -> E.Layout:
    p, tr = dc["parallel"], dc["train"]
    tp, pp, cp = p["tp"], p.get("pp", 1), p.get("cp", 1)
    dp = world // (tp * pp * cp)
    return E.Layout(tp=tp, pp=pp, dp=dp, cp=cp, ep=p.get("ep", 1), micro_batch_size=tr["micro_batch_size"],
                    seq_length=dc["seq_length"],
                    num_micro=tr["global_batch_size"] // (tr["micro_batch_size"] * dp),
                    sequence_parallel=p.get("sequence_parallel", False) and tp > 1,
                    recompute=tr.get("recompute", "none"), distributed_optimizer=True,
                    moe_aux_loss=moe and tr.get("moe_aux_loss_coeff", 1e-4) > 0)


def layout_text(lay: E.Layout, nodes: int) -> str:
    ep = f" ep={lay.ep}" if lay.ep > 1 else ""
    sp = f" sp={lay.sequence_parallel}" if lay.tp > 1 else ""
    rc = f" recompute={lay.recompute}" if lay.recompute != "none" or lay.num_micro > 1 else ""
    cp = f" cp={lay.cp}" if lay.cp > 1 else ""
    return (f"{nodes} node{'s' if nodes > 1 else ''}: tp={lay.tp} pp={lay.pp}{ep}{cp} dp={lay.dp}"
            f"{sp} mbs={lay.micro_batch_size}{rc}")


def rows(world: int = 64) -> list[tuple[str, str, E.Estimate]]:
    """(stage, layout, estimate) of the 8B recipe, world = GPUs of the job."""
    t8, s4 = nemotron_h_8b(), nemotron_h_4b()
    st = load_yaml(CONFIGS / "stats_nemotron_h_8b.yaml")
    lay = _stats_layout(st)
    out = [("stats (1024 x 8192, depth KL)", f"1 node: tp={lay.tp} dp={lay.dp} mbs={lay.micro_batch_size}",
            E.stats(t8, lay, "gpu", True, st.get("depth_chunk_tokens", 1024)))]
    out.append(("prune (host)", "1 process", E.prune(t8)))
    dc = load_yaml(CONFIGS / "distill_nemotron_h_8b_to_4b.yaml")
    lay = _distill_layout(dc, world, False)
    out.append(("distill 8B -> 4B (KD)", f"{world // 8} nodes: tp={lay.tp} pp={lay.pp} dp={lay.dp} "
                f"sp={lay.sequence_parallel} recompute={lay.recompute}",
                E.training(s4, lay, "gpu", "distill", kd_chunk=dc["loss"]["chunk_size"], teacher=t8)))
    lc = load_yaml(CONFIGS / "distill_nemotron_h_4b_128k.yaml")  # the long-context phase after it
    lay = _distill_layout(lc, world, False)
    out.append((f"distill 4B at {lc['seq_length'] // 1024}k (KD, long context)", layout_text(lay, world // 8),
                E.training(s4, lay, "gpu", "distill", kd_chunk=lc["loss"]["chunk_size"], teacher=t8)))
    return out


def rows_nemotron_3_nano(world: int = 64) -> list[tuple[str, str, E.Estimate]]:
    """Nemotron 3 Nano 30B-A3B: stats on one node, prune, KD 30B-A3B -> 22B-A3B on
    world / 8 nodes, each at its recipe's layout and (for comparison) without EP."""
    t, s = nemotron_3_nano_30b_a3b(), nemotron_3_nano_22b_a3b()
    st = load_yaml(CONFIGS / "stats_nemotron_3_nano_30b_a3b.yaml")
    chunk = st.get("depth_chunk_tokens", 1024)
    lay = _stats_layout(st)
    out = []
    for ep in dict.fromkeys((lay.ep, 1)):
        x = dataclasses.replace(lay, ep=ep)
        out.append(("stats 30B-A3B (1024 x 8192, depth KL)", layout_text(x, 1),
                    E.stats(t, x, "gpu", True, chunk)))
    out.append(("prune 30B-A3B (host)", "1 process", E.prune(t)))
    dc = load_yaml(CONFIGS / "distill_nemotron_3_nano_30b_a3b.yaml")
    lay = _distill_layout(dc, world, True)
    kd = dc["loss"]["chunk_size"]
    variants = [lay, dataclasses.replace(lay, ep=1),
                dataclasses.replace(lay, tp=1, sequence_parallel=False, dp=world // lay.pp,
                                    num_micro=lay.num_micro * lay.tp)]
    for x in variants:
        out.append(("distill 30B-A3B -> 22B-A3B (KD, 8192)", layout_text(x, world // 8),
                    E.training(s, x, "gpu", "distill", kd_chunk=kd, teacher=t)))
    out.append(_search_short_kd("nemotron_3_nano", world))
    return out


def _search_recipe(recipe: str):
    """(search config, teacher, candidates, enumeration info) of a search recipe, from its
    teacher_model YAML; candidates that drop layers drop the last ones (no importance file)."""
    from ..config import load_stage_config
    from ..search.space import enumerate_candidates
    from ..search.stage import budget_of

    cfg = load_stage_config("search", str(CONFIGS / SEARCH_RECIPES[recipe]), [])
    t = build(ModelConfig, load_yaml(CONFIGS.parent / cfg.teacher_model)["model"], "model.")
    p = cfg.parallel
    cands, info = enumerate_candidates(t, cfg.space, budget_of(cfg, t.seq_length),
                                       drop_order=list(range(t.num_layers))[::-1], tp=p.tp, pp=p.pp, ep=p.ep)
    return cfg, t, cands, info


def _search_short_kd(recipe: str, world: int) -> tuple[str, str, E.Estimate]:
    """The search recipe's short KD of the candidate that needs the most memory."""
    cfg, t, cands, _ = _search_recipe(recipe)
    p, kd, seq = cfg.parallel, cfg.kd, cfg.seq_length or t.seq_length
    dp = world // (p.tp * p.pp)
    lay = E.Layout(tp=p.tp, pp=p.pp, dp=dp, ep=p.ep, micro_batch_size=kd.micro_batch_size, seq_length=seq,
                   num_micro=kd.global_batch_size // (kd.micro_batch_size * dp),
                   sequence_parallel=p.sequence_parallel and p.tp > 1, recompute=kd.recompute,
                   distributed_optimizer=True, moe_aux_loss=t.is_moe and kd.moe_aux_loss_coeff > 0)
    est = max((E.training(dataclasses.replace(c.model_config(t), seq_length=seq), lay, "gpu", "distill",
                          kd_chunk=cfg.kd_loss.chunk_size, teacher=dataclasses.replace(t, seq_length=seq))
               for c in cands), key=lambda e: e.total)
    return (f"search short KD (largest of {len(cands)} candidates)", layout_text(lay, world // 8), est)


def search_distill(world: int = 64, limit_gb: float = 80.0, global_batch: int = 768,
                   seq: int = 8192, kd_chunk: int = 1024) -> list[tuple[E.Layout, E.Estimate]]:
    """Every (tp, pp, ep, recompute) layout of the 30B-A3B -> 22B-A3B KD job at
    micro-batch 1 that the resource check accepts (check.layout_problem) and fits, smallest
    total first."""
    from .check import layout_problem

    t, s = nemotron_3_nano_30b_a3b(), nemotron_3_nano_22b_a3b()
    out = []
    for tp, pp, ep, rc in itertools.product((1, 2), (1, 2, 4), (1, 2, 4, 8), ("none", "selective", "full")):
        dp = world // (tp * pp)
        lay = E.Layout(tp=tp, pp=pp, dp=dp, ep=ep, micro_batch_size=1, seq_length=seq,
                       num_micro=global_batch // dp, sequence_parallel=tp > 1, recompute=rc,
                       moe_aux_loss=True)
        if layout_problem([s, t], lay, world, True) is None:
            est = E.training(s, lay, "gpu", "distill", kd_chunk=kd_chunk, teacher=t)
            if E.fits(est, limit_gb):
                out.append((lay, est))
    return sorted(out, key=lambda x: x[1].total)


SEARCH_RECIPES = {"nemotron_h_8b": "search_nemotron_h_8b_to_4b.yaml",
                  "nemotron_3_nano": "search_nemotron_3_nano_30b_a3b.yaml"}


def search_cost(recipe: str = "nemotron_3_nano", nodes: int = 8, tflops_per_gpu: float = 400.0) -> dict:
    """Cost of a recipe's architecture search on `nodes` x 8 GPUs, from FLOPs at an assumed
    sustained rate (400 TFLOP/s: about 40% of an H100's bf16 peak): per candidate, the
    zero-shot forward over the fixed validation set (2 N_student FLOP/token) and the short KD
    (teacher forward + student forward / backward: 2 N_teacher + 6 N_student FLOP/token).
    N = the parameters a token uses, the input embedding left out (its row lookup is no
    GEMM): MoE layers count their top-k experts. The student is the candidate closest to the
    budgets (the recipe's candidates that drop layers drop the last ones here)."""
    from ..model import count_parameters

    cfg, t, cands, info = _search_recipe(recipe)
    s = cands[0].model_config(t)

    def n_used(m: ModelConfig) -> int:
        n = count_parameters(m)
        return n["active"] - n["embedding"]

    seq = cfg.seq_length or t.seq_length
    rate = nodes * 8 * tflops_per_gpu * 1e12
    zs_tokens = cfg.eval_iters * cfg.micro_batch_size * seq
    kd_tokens = cfg.short_kd_steps * cfg.kd.global_batch_size * seq
    zs_flop = 2 * n_used(s) * zs_tokens
    kd_flop_token = 2 * n_used(t) + 6 * n_used(s)
    kd_flop = kd_flop_token * kd_tokens
    top = min(cfg.top_k, len(cands))
    return {"recipe": SEARCH_RECIPES[recipe], "nodes": nodes, "tflops_per_gpu": tflops_per_gpu, "seq": seq,
            "candidates": len(cands), "combinations": info["combinations"], "top_k": top,
            "student": cands[0].name, "student_params": cands[0].params,
            "student_active": cands[0].active_params, "n_used_teacher": n_used(t), "n_used_student": n_used(s),
            "zero_shot_tokens": zs_tokens, "zero_shot_flop": zs_flop, "zero_shot_s": zs_flop / rate,
            "student_bf16_bytes": 2 * cands[0].params,
            "kd_tokens": kd_tokens, "kd_flop_per_token": kd_flop_token, "kd_flop": kd_flop, "kd_s": kd_flop / rate,
            "search_node_hours": nodes * (len(cands) * zs_flop + top * kd_flop) / rate / 3600}


def search_cost_markdown(recipe: str = "nemotron_3_nano", nodes: int = 8) -> str:
    c = search_cost(recipe, nodes)
    gb = c["student_bf16_bytes"] / 1e9

    def t(sec: float) -> str:
        return f"{sec / 3600:.1f} h" if sec >= 3600 else f"{sec / 60:.0f} min" if sec >= 60 else f"{sec:.0f} s"

    return "\n".join([
        f"| step (per candidate) | work | {nodes} nodes ({nodes * 8} GPUs) |",
        "|---|---|---|",
        f"| zero-shot | {c['zero_shot_tokens'] // c['seq']} x {c['seq']} tokens forward through the "
        f"{c['n_used_student'] / 1e9:.2f}B parameters a token uses ({c['zero_shot_flop']:.1e} FLOP) + reading "
        f"its ~{gb:.0f} GB of teacher rows | {t(c['zero_shot_s'])} of compute (I/O-bound) |",
        f"| short KD | {c['kd_tokens'] / 1e9:.1f}B tokens; teacher forward ({c['n_used_teacher'] / 1e9:.2f}B) + "
        f"student forward / backward ({c['n_used_student'] / 1e9:.2f}B): {c['kd_flop_per_token'] / 1e9:.1f} "
        f"GFLOP/token, {c['kd_flop']:.1e} FLOP | {t(c['kd_s'])} |",
        f"| whole search | {c['candidates']} candidates zero-shot (of {c['combinations']:,} combinations), "
        f"{c['top_k']} short KDs | {c['search_node_hours']:.0f} node-hours |"])


DISTILL_RECIPES = {"nemotron_h_8b": "distill_nemotron_h_8b_to_4b.yaml",
                   "nemotron_3_nano": "distill_nemotron_3_nano_30b_a3b.yaml"}


def teacher_cache_cost(recipe: str = "nemotron_h_8b", nodes: int = 8, tflops_per_gpu: float = 400.0,
                       ks=(8, 32, 128), dtype: str = "float32") -> dict:
    """What a teacher-logits cache (issue 22) costs and saves for a recipe's search (its
    top_k short KDs over the same tokens) and its long KD, from FLOPs at the search-cost
    rate: the cache is one teacher forward over the tokens (2 N_teacher FLOP/token, N = the
    parameters a token uses, embedding left out), the same work one online KD spends on its
    teacher; every run that reads it instead skips that forward. Per K: the cache's bytes
    (distill/cache.bytes_per_token) and the read rate a cached KD step needs."""
    from ..distill.cache import bytes_per_token
    from ..model import count_parameters

    sc = search_cost(recipe, nodes, tflops_per_gpu)
    rate = nodes * 8 * tflops_per_gpu * 1e12
    d = build_distill(recipe)
    t, s = d["teacher"], d["student"]

    def n_used(m: ModelConfig) -> int:
        n = count_parameters(m)
        return n["active"] - n["embedding"]

    def job(tokens: int, runs: int, n_student: int, step_tokens: int) -> dict:
        teacher_h = 2 * sc["n_used_teacher"] * tokens / rate * nodes  # node-hours x 3600
        step_s = (2 * sc["n_used_teacher"] + 6 * n_student) * step_tokens / rate
        cached_step_s = 6 * n_student * step_tokens / rate
        return {"tokens": tokens, "runs": runs, "teacher_forward_node_hours": teacher_h / 3600,
                "saved_node_hours": (runs - 1) * teacher_h / 3600,
                "online_node_hours": runs * (2 * sc["n_used_teacher"] + 6 * n_student) * tokens / rate * nodes / 3600,
                "online_step_s": step_s, "cached_step_s": cached_step_s,
                "per_k": {k: {"bytes": tokens * bytes_per_token(k, dtype),
                              "read_gb_per_s": step_tokens * bytes_per_token(k, dtype) / cached_step_s / 1e9}
                          for k in ks}}

    search_tokens = sc["kd_tokens"]
    search_step = sc["kd_tokens"] // max(1, _search_recipe(recipe)[0].short_kd_steps)
    long_tokens = d["tokens"]
    return {"recipe": recipe, "nodes": nodes, "tflops_per_gpu": tflops_per_gpu, "dtype": dtype, "ks": list(ks),
            "n_used_teacher": sc["n_used_teacher"], "n_used_student": sc["n_used_student"],
            "search": job(search_tokens, sc["top_k"], sc["n_used_student"], search_step),
            "long_kd": job(long_tokens, 1, n_used(s), d["step_tokens"]),
            "break_even_runs": 1}


def build_distill(recipe: str) -> dict:
    """The recipe's long KD: teacher, student (its plan target or model YAML) and tokens."""
    cfg = load_yaml(CONFIGS / DISTILL_RECIPES[recipe])
    if recipe == "nemotron_h_8b":
        t, s = nemotron_h_8b(), nemotron_h_4b()
    else:
        t, s = nemotron_3_nano_30b_a3b(), nemotron_3_nano_22b_a3b()
    tr = cfg["train"]
    seq = cfg.get("seq_length") or s.seq_length
    return {"teacher": t, "student": s, "tokens": tr["steps"] * tr["global_batch_size"] * seq,
            "step_tokens": tr["global_batch_size"] * seq}


def teacher_cache_markdown(recipe: str = "nemotron_h_8b", nodes: int = 8) -> str:
    c = teacher_cache_cost(recipe, nodes)

    def size(b: float) -> str:
        return f"{b / 1e12:.1f} TB" if b >= 1e12 else f"{b / 1e9:.0f} GB"

    rows = [f"| job | tokens | runs over them | teacher forward once | saved by one cache | "
            + " | ".join(f"cache, top-{k} ({c['dtype']}): size, read rate" for k in c["ks"]) + " |",
            "|---|---|---|---|---|" + "---|" * len(c["ks"])]
    for name, key in (("search: short KDs", "search"), ("long KD", "long_kd")):
        j = c[key]
        rows.append(f"| {name} | {j['tokens'] / 1e9:.1f}B | {j['runs']} | {j['teacher_forward_node_hours']:.1f} "
                    f"node-h | {j['saved_node_hours']:.0f} node-h of {j['online_node_hours']:.0f} | "
                    + " | ".join(f"{size(j['per_k'][k]['bytes'])}, {j['per_k'][k]['read_gb_per_s']:.2f} GB/s"
                                 for k in c["ks"]) + " |")
    return "\n".join(rows)


def markdown(world: int = 64, limit_gb: float = 80.0, recipe: str = "nemotron_h_8b") -> str:
    rs = rows(world) if recipe == "nemotron_h_8b" else rows_nemotron_3_nano(world)
    present = {k for _, _, e in rs for k in e.items}
    keys = [k for k in ORDER if k in present] + sorted(present - set(ORDER))
    gb = f"{limit_gb:g}"
    head = "| stage | layout | " + " | ".join(keys) + f" | total | fits {gb} GB |"
    sep = "|" + "---|" * (len(keys) + 4)
    lines = [head, sep]
    for name, lay, e in rs:
        cells = [f"{e.items[k] / E.GiB:.1f}" if k in e.items else "" for k in keys]
        lines.append(f"| {name} | {lay} | " + " | ".join(cells)
                     + f" | {e.total / E.GiB:.1f} | {'yes' if E.fits(e, limit_gb) else 'NO'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=64, help="GPUs in the job (8 nodes x 8)")
    ap.add_argument("--limit-gb", type=float, default=80.0)
    ap.add_argument("--recipe", choices=("nemotron_h_8b", "nemotron_3_nano"), default="nemotron_h_8b")
    ap.add_argument("--search", action="store_true",
                    help="nemotron_3_nano: every distill layout that fits, smallest first")
    ap.add_argument("--search-cost", action="store_true",
                    help="the recipe's architecture search: cost per candidate from FLOPs")
    ap.add_argument("--teacher-cache", action="store_true",
                    help="a teacher-logits cache for the recipe's search and long KD: size, savings")
    a = ap.parse_args(argv)
    if a.teacher_cache:
        print(teacher_cache_markdown(a.recipe, a.world // 8))
        return 0
    if a.search_cost:
        print(search_cost_markdown(a.recipe, a.world // 8))
        return 0
    print(markdown(a.world, a.limit_gb, a.recipe))
    if a.search:
        print()
        for lay, est in search_distill(a.world, a.limit_gb):
            print(f"  {layout_text(lay, a.world // 8)}: {est.total / E.GiB:.1f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
