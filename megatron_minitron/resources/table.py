"""The 8B recipe's resource table (README): per-GPU estimates of each stage at the layouts
of configs/*nemotron_h_8b*.yaml on 8 x 80 GB GPUs per node, from the model YAMLs alone.

    python -m megatron_minitron.resources.table [--limit-gb 80]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..config import ModelConfig, build, load_yaml
from . import estimate as E

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def nemotron_h_8b() -> ModelConfig:
    return build(ModelConfig, load_yaml(CONFIGS / "model" / "nemotron_h_8b.yaml")["model"], "model.")


def nemotron_h_4b() -> ModelConfig:
    """The paper's pruned 4B (sec. 4): hidden 3072, FFN 12288, 112 Mamba heads x 64."""
    return dataclasses.replace(nemotron_h_8b(), hidden_size=3072, ffn_hidden_size=12288,
                               mamba_num_heads=112)


def rows(world: int = 64) -> list[tuple[str, str, E.Estimate]]:
    """(stage, layout, estimate) of the 8B recipe, world = GPUs of the job."""
    from ..config import load_yaml as ly

    t8, s4 = nemotron_h_8b(), nemotron_h_4b()
    st = ly(CONFIGS / "stats_nemotron_h_8b.yaml")
    sp = st["parallel"]
    lay = E.Layout(tp=sp["tp"], pp=sp.get("pp", 1), dp=8 // (sp["tp"] * sp.get("pp", 1)),
                   micro_batch_size=st["micro_batch_size"], seq_length=st["seq_length"],
                   sequence_parallel=sp.get("sequence_parallel", False))
    out = [("stats (1024 x 8192, depth KL)", f"1 node: tp={lay.tp} dp={lay.dp} mbs={lay.micro_batch_size}",
            E.stats(t8, lay, "gpu", True, st.get("depth_chunk_tokens", 1024)))]
    out.append(("prune (host)", "1 process", E.prune(t8)))
    dc = ly(CONFIGS / "distill_nemotron_h_8b_to_4b.yaml")
    p, tr = dc["parallel"], dc["train"]
    tp, pp = p["tp"], p.get("pp", 1)
    dp = world // (tp * pp)
    lay = E.Layout(tp=tp, pp=pp, dp=dp, micro_batch_size=tr["micro_batch_size"],
                   seq_length=dc["seq_length"],
                   num_micro=tr["global_batch_size"] // (tr["micro_batch_size"] * dp),
                   sequence_parallel=p.get("sequence_parallel", False),
                   recompute=tr.get("recompute", "none"), distributed_optimizer=True)
    out.append(("distill 8B -> 4B (KD)", f"{world // 8} nodes: tp={tp} pp={pp} dp={dp} sp={lay.sequence_parallel} "
                f"recompute={lay.recompute}",
                E.training(s4, lay, "gpu", "distill", kd_chunk=dc["loss"]["chunk_size"], teacher=t8)))
    return out


def markdown(world: int = 64, limit_gb: float = 80.0) -> str:
    rs = rows(world)
    order = ["weights", "grads", "optimizer", "activations", "logits", "teacher", "depth_kl",
             "tensor buffers", "runtime"]
    present = {k for _, _, e in rs for k in e.items}
    keys = [k for k in order if k in present] + sorted(present - set(order))
    head = "| stage | layout | " + " | ".join(keys) + " | total | fits 80 GB |"
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
    a = ap.parse_args(argv)
    print(markdown(a.world, a.limit_gb))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
