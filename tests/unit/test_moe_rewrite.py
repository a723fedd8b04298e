"""`prune` of MoE hybrids in one process (real megatron-core checkpoints): the hidden axis runs
through every MoE tensor (router columns, experts unless a latent projection sits between,
shared expert, latent projections). Oracle: a keep-all plan with the hidden channels (and
every other axis) permuted computes the same function, so the pruned checkpoint's logits
equal the source's; a wrong index in any MoE rule breaks that (checked: dropping the
permutation of one tensor changes the logits)."""

import dataclasses

import pytest
import torch

from megatron_minitron import dist as D
from megatron_minitron.config import ModelConfig, ParallelConfig
from megatron_minitron.model import build_model, causal_mask
from megatron_minitron.plan.targets import assemble_plan
from megatron_minitron.rewrite.stage import PruneConfig, run_prune
from megatron_minitron.train import checkpoint as ckpt

BASE = ModelConfig(pattern="ME*E", hidden_size=32, ffn_hidden_size=64, mamba_num_heads=4,
                   mamba_head_dim=8, mamba_num_groups=2, mamba_state_dim=8, mamba_chunk_size=16,
                   num_attention_heads=4, num_query_groups=2, kv_channels=8, vocab_size=256,
                   seq_length=16, num_moe_experts=4, moe_ffn_hidden_size=16, moe_router_topk=2,
                   moe_shared_expert_intermediate_size=24, moe_router_topk_scaling_factor=2.5)
# keep-all: sums re-associated in another order (observed <= 1e-6): asserted 1e-5
ATOL = 1e-5


def _logits(path):
    par = D.init(ParallelConfig(), seed=3)  # fresh groups: run_prune re-made them
    model = build_model(ckpt.read_model_config(ckpt.require(path)), par, initialize=False)
    ckpt.load_model_weights(ckpt.require(path), model)
    g = torch.Generator().manual_seed(1)
    tok = torch.randint(0, BASE.vocab_size, (2, 16), generator=g)
    with torch.no_grad():
        return model.eval()(tok, torch.arange(16)[None].expand(2, -1), causal_mask(16))


def _keepall(cfg: ModelConfig, g):
    def perm(n):
        return torch.randperm(n, generator=g).tolist()

    def grouped(n, groups):
        per = n // groups
        return [gi * per + j for gi in range(groups) for j in perm(per)]

    layers = {}
    for i, t in enumerate(cfg.pattern):
        if t == "M":
            layers[i] = {"mamba_heads": grouped(cfg.mamba_num_heads, cfg.mamba_num_groups),
                         "mamba_channels": perm(cfg.mamba_head_dim)}
        elif t == "*":
            layers[i] = {"attention_heads": grouped(cfg.num_attention_heads, cfg.num_query_groups)}
    return assemble_plan(cfg, perm(cfg.hidden_size), layers)


@pytest.mark.parametrize("change", [{}, {"moe_latent_size": 12}, {"moe_shared_expert_intermediate_size": 0}])
def test_keepall_permuted_prune_of_moe_model_is_the_identity(tmp_path, change):
    cfg = dataclasses.replace(BASE, **change)
    par = D.init(ParallelConfig(), seed=3)
    try:
        model = build_model(cfg, par)
        with torch.no_grad():  # norms and the router bias off their trivial init
            for name, p in model.named_parameters():
                if p.dim() == 1:
                    p.mul_(1 + 0.5 * torch.rand_like(p))
                elif ".mlp." in name:  # MoE weights large enough to matter in the logits
                    p.mul_(6.0)
            for name, b in model.named_buffers():
                if name.endswith("expert_bias"):
                    b.copy_(0.1 * torch.randn_like(b))
        ckpt.save(tmp_path / "src", 0, cfg, {"model": model.sharded_state_dict()}, {"stage": "test"})
        plan = _keepall(cfg, torch.Generator().manual_seed(4))
        plan.save(tmp_path / "plan.json")
        run_prune(PruneConfig(checkpoint=str(tmp_path / "src"), plan=str(tmp_path / "plan.json"),
                              output=str(tmp_path / "new" / "dirs" / "pruned"), fsync=False))
        # (an output whose parent folders do not exist yet: prune makes them)
        a, b = _logits(tmp_path / "src"), _logits(tmp_path / "new" / "dirs" / "pruned")
        assert (a - b).abs().max() < ATOL
        # the oracle is sharp: the same plan with one MoE tensor's hidden axis left
        # unpermuted (a wrong rule) changes the function
        from megatron_minitron.rewrite import rules

        orig, bad = rules.Rules._moe, ("fc1_latent_proj.weight" if cfg.moe_latent_size else "router.weight")

        def wrong(self, key, part, hid):
            idx = orig(self, key, part, hid)
            return [None, None] if part == bad else idx

        rules.Rules._moe = wrong
        try:
            run_prune(PruneConfig(checkpoint=str(tmp_path / "src"), plan=str(tmp_path / "plan.json"),
                                  output=str(tmp_path / "wrong"), fsync=False))
        finally:
            rules.Rules._moe = orig
        assert (a - _logits(tmp_path / "wrong")).abs().max() > 1e-3
    finally:
        D.shutdown()
