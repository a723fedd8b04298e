"""Checks for `plan` + `prune` on real megatron-core checkpoints (gloo), in a few launches:

  src   (1 process):   source checkpoint C0 (tiny hybrid, every 1-D weight perturbed so a
                       wrong index is visible), logits of C0 on real-corpus tokens; plans:
                       keepall (everything kept, heads permuted within groups, channels /
                       neurons / hidden permuted), real (random scores of the right shapes,
                       ranked order, every axis pruned + 2 MLP layers dropped), cross
                       (keep-all with heads swapped across groups). Reference twin: the
                       full-tensor trim (rules.take on whole global tensors) of C0 for `real`
                       and `cross`, loaded at TP=1 -> logits.
  check (N processes): load a checkpoint at a layout (tp, pp) -> logits + parameter count.
The prune runs themselves are CLI launches (see test_prune_dist.py).
"""

import json
import sys
from pathlib import Path

import torch

from megatron_minitron import dist as D
from megatron_minitron.compat import mcore
from megatron_minitron.config import ModelConfig, ParallelConfig
from megatron_minitron.importance.io import ImportanceFile
from megatron_minitron.model import build_model
from megatron_minitron.plan.targets import Plan, TargetConfig, assemble_plan, make_plan
from megatron_minitron.rewrite import rules
from megatron_minitron.rewrite.stage import forward_logits, global_param_count
from megatron_minitron.train import checkpoint as ckpt

MODEL = ModelConfig(
    pattern="M-*-M-", hidden_size=64, ffn_hidden_size=128, mamba_num_heads=4,
    mamba_head_dim=16, mamba_num_groups=2, mamba_state_dim=8, mamba_chunk_size=16,
    num_attention_heads=4, num_query_groups=2, kv_channels=16, vocab_size=4096,
    seq_length=64,
)
REAL_TARGET = TargetConfig(hidden_size=48, ffn_hidden_size=96, mamba_num_heads=2, mamba_head_dim=12,
                           num_attention_heads=2, num_layers=4, depth_layer_type="-")


def tokens(wd: Path) -> torch.Tensor:
    """Two rows of 32 real-corpus tokens."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    info = json.loads((wd / "data.json").read_text())
    ds = IndexedDataset(info["prefix"])
    flat = torch.cat([torch.as_tensor(ds[i].astype("int64")) for i in range(min(len(ds), 8))])
    return flat[:64].reshape(2, 32)


def perm(n: int, g: torch.Generator) -> list[int]:
    return torch.randperm(n, generator=g).tolist()


def grouped_perm(n: int, groups: int, g: torch.Generator) -> list[int]:
    per = n // groups
    return [gi * per + j for gi in range(groups) for j in perm(per, g)]


def keepall_layers(cfg: ModelConfig, g, cross: bool = False) -> dict:
    layers = {}
    for i, t in enumerate(cfg.pattern):
        if t == "M":
            heads = grouped_perm(cfg.mamba_num_heads, cfg.mamba_num_groups, g)
            if cross:  # swap the first head of group 0 with the first head of group 1
                k = cfg.mamba_num_heads // cfg.mamba_num_groups
                heads[0], heads[k] = heads[k], heads[0]
            layers[i] = {"mamba_heads": heads, "mamba_channels": perm(cfg.mamba_head_dim, g)}
        elif t == "-":
            layers[i] = {"ffn": perm(cfg.ffn_hidden_size, g)}
        else:
            layers[i] = {"attention_heads": grouped_perm(cfg.num_attention_heads, cfg.num_query_groups, g)}
    return layers


def random_importance(cfg: ModelConfig, g) -> ImportanceFile:
    return ImportanceFile.random(cfg, g)


def full_state(model) -> dict:
    """key -> full global tensor (TP=1 model; factories expanded)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    sd = model.sharded_state_dict()
    apply_factories(sd)
    return {st.key: st for st in nested_values(sd) if isinstance(st, ShardedTensor)}


def reference_twin(src_model, plan: Plan, par) -> torch.Tensor:
    """Trim whole global tensors with rules.take (no checkpoint, no shards) -> TP=1 model."""
    src = {k: st.data for k, st in full_state(src_model).items()}
    dst_model = build_model(plan.target, par)
    with torch.no_grad():
        for key, st in full_state(dst_model).items():
            src_key, idxs = rules.rule(key, plan)
            st.data.copy_(rules.take(src[src_key], idxs))
    return dst_model


def main():
    mode, wd = sys.argv[1], Path(sys.argv[2])
    toks = tokens(wd)
    if mode == "src":
        par = D.init(ParallelConfig())
        model = build_model(MODEL, par)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():  # make every 1-D weight distinct so a wrong index shows
            for n, prm in model.named_parameters():
                if prm.dim() == 1:
                    prm.add_(0.1 * torch.randn(prm.shape, generator=g))
        ckpt.save(wd / "src", 0, MODEL, {"model": model.sharded_state_dict()}, {"kind": "test-source"})
        res = {}
        torch.save(forward_logits(model, par, toks), wd / "logits_src.pt")
        keepall = assemble_plan(MODEL, perm(MODEL.hidden_size, g), keepall_layers(MODEL, g))
        keepall.save(wd / "plan_keepall.json")
        real = make_plan(random_importance(MODEL, g), REAL_TARGET, order="ranked", tp=2, pp=2)
        real.save(wd / "plan_real.json")
        torch.save(forward_logits(reference_twin(model, real, par), par, toks), wd / "logits_real_ref.pt")
        cross = assemble_plan(MODEL, list(range(MODEL.hidden_size)), keepall_layers(MODEL, g, cross=True),
                              group_rule=False)
        torch.save(forward_logits(reference_twin(model, cross, par), par, toks), wd / "logits_cross.pt")
        # the same keep-all plan through the reference twin (identity of the rules themselves)
        torch.save(forward_logits(reference_twin(model, keepall, par), par, toks), wd / "logits_keepall_ref.pt")
        res["real_target"] = real.target.to_dict()
        res["real_params_after"] = real.params_after["total"]
        (wd / "result_src.json").write_text(json.dumps(res))
    elif mode == "check":
        # check WD NAME CKPT tp pp [tp pp ...]: load CKPT at each layout, logits + param count
        name, path = sys.argv[3], sys.argv[4]
        layouts = [(int(a), int(b)) for a, b in zip(sys.argv[5::2], sys.argv[6::2])]
        res = {}
        for tp, pp in layouts:
            if tp * pp > int(__import__("os").environ.get("WORLD_SIZE", "1")):
                continue
            par = D.init(ParallelConfig(tp=tp, pp=pp))
            cfg = ckpt.read_model_config(path)
            model = build_model(cfg, par)
            ckpt.load_model_weights(path, model)
            n = global_param_count(mcore.sharded_tensors(model), model)
            logits = forward_logits(model, par, toks)
            tag = f"{name}_tp{tp}pp{pp}"
            if par.is_last_stage and par.tp_rank == 0 and par.dp_rank == 0:
                torch.save(logits, wd / f"logits_{tag}.pt")
            if D.is_rank0():
                res[tag] = {"params": n, "config": cfg.to_dict()}
        if D.is_rank0():
            (wd / f"result_check_{name}_{__import__('os').environ.get('WORLD_SIZE', '1')}.json").write_text(
                json.dumps(res))
    D.shutdown()


if __name__ == "__main__":
    main()
