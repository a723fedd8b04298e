"""Latent MoE projections without Transformer Engine.

megatron-core's MoELayer builds `fc1_latent_proj` / `fc2_latent_proj` (hidden <-> latent,
duplicated on every TP rank) only as TE's `TELinear` and asserts TE is installed. This
twin has the same constructor, the same `(output, bias)` return and the same checkpoint
entry (a replicated `weight`), so a checkpoint written on CPU loads with TE on GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class DuplicatedLinear(torch.nn.Module):
    """TELinear(parallel_mode='duplicated') in plain torch: y = x W^T, W [out, in]."""

    def __init__(self, input_size: int, output_size: int, *, parallel_mode=None, config=None,
                 init_method=None, bias: bool = False, skip_bias_add: bool = False,
                 skip_weight_param_allocation: bool = False, is_expert: bool = False, **_):
        super().__init__()
        if parallel_mode != "duplicated" or bias or skip_weight_param_allocation or is_expert:
            raise NotImplementedError("DuplicatedLinear stands in for the latent MoE projections "
                                      "only (duplicated, no bias, not an expert)")
        self.weight = torch.nn.Parameter(torch.empty(output_size, input_size, dtype=config.params_dtype))
        if config.perform_initialization:
            init_method(self.weight)
        # replicated on TP ranks: with sequence parallelism each rank sees its own tokens,
        # so the gradient is all-reduced over TP as megatron does for TE's duplicated linear
        self.weight.allreduce = True
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor):
        return F.linear(x, self.weight), None

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, None, sharded_offsets)


def install(moe_layer_module) -> None:
    moe_layer_module.TELinear = DuplicatedLinear
    moe_layer_module.HAVE_TE = True  # read only by the latent projections' assert
