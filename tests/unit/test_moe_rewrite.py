"""`prune` of MoE hybrids in one process (real megatron-core checkpoints): the hidden axis runs
through every MoE tensor (router columns, experts unless a latent projection sits between,
shared expert, latent projections); the routed experts (router rows, expert bias and the
experts' stacked tensors together), each expert's own FFN neurons and the shared expert's
neurons. Oracle: a keep-all plan with every axis permuted (experts within their routing
groups, each expert's neurons by its own permutation) computes the same function, so the
pruned checkpoint's logits equal the source's; a wrong index in any MoE rule breaks that
(checked: one tensor's index left unpermuted, or every expert given expert 0's neuron order,
changes the logits)."""

import dataclasses

import pytest
import torch

from megatron_minitron import dist as D
from megatron_minitron.config import ModelConfig, ParallelConfig
from megatron_minitron.model import build_model, causal_mask
from megatron_minitron.plan.targets import assemble_plan
from megatron_minitron.rewrite import rules
from megatron_minitron.rewrite.stage import PruneConfig, run_prune
from megatron_minitron.train import checkpoint as ckpt

BASE = ModelConfig(pattern="ME*E", hidden_size=32, ffn_hidden_size=64, mamba_num_heads=4,
                   mamba_head_dim=8, mamba_num_groups=2, mamba_state_dim=8, mamba_chunk_size=16,
                   num_attention_heads=4, num_query_groups=2, kv_channels=8, vocab_size=256,
                   seq_length=16, num_moe_experts=4, moe_ffn_hidden_size=16, moe_router_topk=2,
                   moe_shared_expert_intermediate_size=24, moe_router_topk_scaling_factor=2.5)
# keep-all: sums re-associated in another order (observed <= 1e-6): asserted 1e-5
ATOL = 1e-5
# a wrong rule: observed 8.5e-2 (latent, expert FFN) to 0.81 for the broken tensors below; asserted 1e-3
WRONG_MIN = 1e-3


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
        elif t == "E":  # experts within their routing groups; each expert its own neuron order
            layers[i] = {"experts": grouped(cfg.num_moe_experts, cfg.moe_router_num_groups),
                         "expert_ffn": [perm(cfg.moe_ffn_hidden_size) for _ in range(cfg.num_moe_experts)]}
            if cfg.moe_shared_expert_intermediate_size:
                layers[i]["shared_ffn"] = perm(cfg.moe_shared_expert_intermediate_size)
    return assemble_plan(cfg, perm(cfg.hidden_size), layers)


# wrong rules for the sharpness check: (MoE tensor, which index dim, how it is broken)
def _unpermuted(ix):
    return None


def _expert0_everywhere(ix):  # the separable-rule bug: every expert gets expert 0's neurons
    return ix[:1].expand_as(ix)


WRONG = {
    "hidden": ("router.weight", 1, _unpermuted),
    "latent_hidden": ("fc1_latent_proj.weight", 1, _unpermuted),
    "router_rows": ("router.weight", 0, _unpermuted),
    "expert_bias": ("router.expert_bias", 0, _unpermuted),
    "expert_axis": ("experts.experts.linear_fc2.weight", 0, _unpermuted),
    "expert_ffn_separable": ("experts.experts.linear_fc2.weight", 2, _expert0_everywhere),
    "shared_ffn": ("shared_experts.linear_fc2.weight", 1, _unpermuted),
}
CASES = {  # name: (model change, wrong rules checked)
    "shared": ({}, ["hidden", "router_rows", "expert_bias", "expert_axis", "expert_ffn_separable",
                    "shared_ffn"]),
    "latent": ({"moe_latent_size": 12}, ["latent_hidden", "expert_ffn_separable"]),
    "no_shared": ({"moe_shared_expert_intermediate_size": 0}, ["hidden"]),
    # grouped routing: 2 groups of 2, experts permuted within their group
    "grouped": ({"moe_router_num_groups": 2, "moe_router_group_topk": 1}, ["router_rows"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_keepall_permuted_prune_of_moe_model_is_the_identity(tmp_path, case):
    change, wrongs = CASES[case]
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
                    b.copy_(0.3 * torch.randn_like(b))
        ckpt.save(tmp_path / "src", 0, cfg, {"model": model.sharded_state_dict()}, {"stage": "test"})
        plan = _keepall(cfg, torch.Generator().manual_seed(4))
        assert all(plan.layers[i]["experts"] != sorted(plan.layers[i]["experts"]) for i in (1, 3))
        plan.save(tmp_path / "plan.json")
        run_prune(PruneConfig(checkpoint=str(tmp_path / "src"), plan=str(tmp_path / "plan.json"),
                              output=str(tmp_path / "new" / "dirs" / "pruned"), fsync=False))
        # (an output whose parent folders do not exist yet: prune makes them)
        a, b = _logits(tmp_path / "src"), _logits(tmp_path / "new" / "dirs" / "pruned")
        print(f"{case}: keep-all permuted max |diff| = {(a - b).abs().max():.2e}")
        assert (a - b).abs().max() < ATOL
        # the oracle is sharp: the same plan with one MoE tensor's index broken (a wrong
        # rule) changes the function
        orig = rules.Rules._moe
        for w in wrongs:
            bad_part, dim, broken = WRONG[w]

            def wrong(self, key, part, hid, i, bad_part=bad_part, dim=dim, broken=broken):
                idx = orig(self, key, part, hid, i)
                if part == bad_part:
                    assert idx[dim] is not None, (part, dim)
                    idx = list(idx)
                    idx[dim] = broken(idx[dim])
                return idx

            rules.Rules._moe = wrong
            try:
                run_prune(PruneConfig(checkpoint=str(tmp_path / "src"), plan=str(tmp_path / "plan.json"),
                                      output=str(tmp_path / f"wrong_{w}"), fsync=False, verify=False))
            finally:
                rules.Rules._moe = orig
            d = (a - _logits(tmp_path / f"wrong_{w}")).abs().max()
            print(f"{case}: wrong rule {w}: max |diff| = {d:.2e}")
            assert d > WRONG_MIN, w
    finally:
        D.shutdown()
