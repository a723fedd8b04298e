"""The only place that knows which megatron-core release is installed.

Supported: 0.16.x (hybrid model in `models.mamba` / `ssm.mamba_block`) to 0.19.x
(`models.hybrid`). Everything else in the package imports megatron names from here.
"""

from __future__ import annotations

import importlib.util

from megatron.core import dist_checkpointing, parallel_state, tensor_parallel  # noqa: F401
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig  # noqa: F401
from megatron.core.distributed import finalize_model_grads  # noqa: F401
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: F401
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler  # noqa: F401
from megatron.core.package_info import __version__ as MCORE_VERSION
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: F401
from megatron.core.process_groups_config import ProcessGroupCollection  # noqa: F401
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed  # noqa: F401
from megatron.core.transformer import TransformerConfig  # noqa: F401
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm

try:  # megatron-core >= 0.19: models.hybrid (HybridModel / HybridStack)
    from megatron.core.models.hybrid import hybrid_block as _stack_module
    from megatron.core.models.hybrid.hybrid_block import HybridStack as HybridStackCls
    from megatron.core.models.hybrid.hybrid_block import (
        HybridStackSubmodules as HybridStackSubmodulesCls,
    )
    from megatron.core.models.hybrid.hybrid_model import HybridModel as _HybridModel

    def make_hybrid_model(stack_spec, pattern: str, **kwargs):
        return _HybridModel(hybrid_stack_spec=stack_spec, hybrid_layer_pattern=pattern, **kwargs)

except ImportError:  # megatron-core 0.16 - 0.18: models.mamba (MambaModel / MambaStack)
    from megatron.core.models.mamba import MambaModel as _HybridModel
    from megatron.core.ssm import mamba_block as _stack_module
    from megatron.core.ssm.mamba_block import MambaStack as HybridStackCls
    from megatron.core.ssm.mamba_block import MambaStackSubmodules as HybridStackSubmodulesCls

    def make_hybrid_model(stack_spec, pattern: str, **kwargs):
        return _HybridModel(mamba_stack_spec=stack_spec, hybrid_override_pattern=pattern, **kwargs)

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.ssm import mamba_mixer as mamba_mixer_module
from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)

from megatron.core.activations import squared_relu  # noqa: F401
from megatron.core.datasets.blended_dataset import BlendedDataset  # noqa: F401
from megatron.core.datasets.blended_megatron_dataset_builder import (  # noqa: F401
    BlendedMegatronDatasetBuilder,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig  # noqa: F401
from megatron.core.datasets.indexed_dataset import (  # noqa: F401
    _INDEX_HEADER,
    DType,
    IndexedDataset,
    IndexedDatasetBuilder,
)
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
from megatron.core.dist_checkpointing.mapping import (  # noqa: F401
    ShardedObject,
    ShardedTensor,
    apply_factories,
    is_main_replica,
)

HAVE_TE = importlib.util.find_spec("transformer_engine") is not None
# megatron-core >= 0.19's hybrid stack recomputes whole layers itself
# (recompute_granularity='full'); 0.16's MambaStack ignores the setting.
STACK_HAS_FULL_RECOMPUTE = "recompute_granularity" in open(_stack_module.__file__).read()
HAVE_MAMBA_SSM = bool(getattr(mamba_mixer_module, "HAVE_MAMBA_SSM", False))
STACK_MODULE = _stack_module


class LocalNorm:
    """megatron's WrappedTorchNorm (torch RMSNorm / LayerNorm) that also runs under sequence
    parallelism: each TP rank then normalises its own slice of the sequence, so the weight's
    gradient is partial; marking it `sequence_parallel` makes megatron's
    finalize_model_grads all-reduce it over the TP group (what TE's norms do)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm=False,
                zero_centered_gamma=False, normalization="LayerNorm"):
        import torch

        if config.layernorm_zero_centered_gamma:
            raise ValueError("zero-centered gamma needs Transformer Engine's norms")
        norm_cls = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}[config.normalization]
        norm = norm_cls(normalized_shape=hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)
        return norm


def te_usable() -> bool:
    import torch

    return HAVE_TE and torch.cuda.is_available()


def hybrid_stack_spec(use_te: bool, d_conv: int, chunk_size: int, moe: bool = False,
                      grouped_gemm: bool = False, cp: int = 1) -> ModuleSpec:
    """Layer specs for the hybrid stack.

    With Transformer Engine: TE's fused norm+linear modules. Without it: plain
    Column/RowParallelLinear, torch norms and DotProductAttention; their norms are saved
    under TE's key names (`sharded_state_dict_keys_map`), so a checkpoint written by either
    spec loads in the other. moe: E layers as megatron's MoELayer (SequentialMLP experts,
    or TE's grouped GEMM with grouped_gemm; both store one [experts, ...] tensor per
    projection under `mlp.experts.experts.linear_fc{1,2}.weight`) behind a separate norm.
    cp > 1 without TE: the core attention is compat/cp_attention.py's (megatron's local
    attention refuses context parallelism; TE's runs it).
    """
    mixer_params = {"d_conv": d_conv, "chunk_size": chunk_size}
    if use_te:
        from megatron.core.extensions.transformer_engine import (
            TEDotProductAttention,
            TELayerNormColumnParallelLinear,
            TERowParallelLinear,
        )

        col_ln, row, attn = TELayerNormColumnParallelLinear, TERowParallelLinear, TEDotProductAttention
        norms = dict(mamba=None, attn=None, mlp=None)
        keymaps = dict(mamba={}, attn={}, mlp={})
    else:
        col_ln, row, attn = ColumnParallelLinear, RowParallelLinear, DotProductAttention
        if cp > 1:
            from .cp_attention import CPDotProductAttention as attn
        norms = dict(mamba=LocalNorm, attn=LocalNorm, mlp=LocalNorm)
        keymaps = dict(
            mamba={"norm.": "mixer.in_proj.layer_norm_"},
            attn={"input_layernorm.": "self_attention.linear_qkv.layer_norm_"},
            mlp={"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"},
        )
    from megatron.core.transformer.identity_op import IdentityOp

    mamba_layer = ModuleSpec(
        module=MambaLayer,
        submodules=MambaLayerSubmodules(
            norm=norms["mamba"] or IdentityOp,
            mixer=ModuleSpec(
                module=MambaMixer,
                params=mixer_params,
                submodules=MambaMixerSubmodules(in_proj=col_ln, out_proj=row),
            ),
            mamba_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keymaps["mamba"],
        ),
    )
    attention_layer = ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norms["attn"] or IdentityOp,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=col_ln, core_attention=attn, linear_proj=row
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keymaps["attn"],
        ),
    )
    mlp_layer = ModuleSpec(
        module=MLPLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=norms["mlp"] or IdentityOp,
            mlp=ModuleSpec(
                module=MLP, submodules=MLPSubmodules(linear_fc1=col_ln, linear_fc2=row)
            ),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keymaps["mlp"],
        ),
    )
    layers = dict(mamba_layer=mamba_layer, attention_layer=attention_layer, mlp_layer=mlp_layer)
    if moe:
        from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
        from megatron.core.transformer.transformer_layer import MoETransformerLayer

        if use_te:
            from megatron.core.extensions.transformer_engine import TENorm as moe_norm
        else:
            moe_norm = LocalNorm
        layers["moe_layer"] = ModuleSpec(
            module=MoETransformerLayer,
            submodules=TransformerLayerSubmodules(
                pre_mlp_layernorm=moe_norm,
                mlp=get_moe_module_spec(use_te=use_te, num_experts=1, moe_grouped_gemm=grouped_gemm),
                mlp_bda=get_bias_dropout_add,
            ),
        )
    return ModuleSpec(module=HybridStackCls, submodules=HybridStackSubmodulesCls(**layers))


def sharded_parts(model) -> tuple[list, list]:
    """The model's ShardedTensors, with factories expanded (Mamba in_proj -> the stored
    `in_proj.weight.{z,x,B,C,dt}` parts, conv1d -> `{x,B,C}`), each a view of its
    parameter; and its ShardedObjects (`_extra_state`)."""
    sd = model.sharded_state_dict()
    apply_factories(sd)
    vals = list(nested_values(sd))
    return ([v for v in vals if isinstance(v, ShardedTensor)],
            [v for v in vals if isinstance(v, ShardedObject)])


def sharded_tensors(model) -> list:
    """sharded_parts' tensors only."""
    return sharded_parts(model)[0]


def save_checkpointing_config(folder: str) -> None:
    """megatron's metadata.json marking `folder` as a torch_dist distributed checkpoint."""
    save_config(CheckpointingConfig(sharded_backend="torch_dist"), folder)


def init_distributed_optimizer_state(optimizer) -> None:
    """Allocate the Adam state of every DistributedOptimizer in `optimizer` (a chained or
    single megatron optimizer) before its checkpoint is loaded: its state_dict() needs the
    state to exist, and megatron fills it with one zero-gradient step (values overwritten
    by the load)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(opt, "_init_optimizer_states_with_dummy_values") and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def load_optimizer_state(optimizer, state) -> None:
    """optimizer.load_state_dict(state), then the Adam step count of each distributed
    optimizer set from the checkpoint's param groups. With torch's Adam (no TE / apex, as on
    CPU) megatron 0.16 restores the step from the param groups and then overwrites it with
    the per-parameter placeholder of its dp-sharded state (the bias correction would
    restart)."""
    import torch

    opts = list(getattr(optimizer, "chained_optimizers", [optimizer]))
    if len(opts) == 1:
        states = [state]
    elif isinstance(state, dict):
        states = [v for _, v in sorted(state.items())]
    else:
        states = list(state)
    steps = []
    for opt, sd in zip(opts, states):
        groups = sd.get("optimizer", {}).get("param_groups", []) if isinstance(sd, dict) else []
        vals = {g["step"] for g in groups if isinstance(g, dict) and g.get("step") is not None}
        distributed = hasattr(opt, "_init_optimizer_states_with_dummy_values")
        steps.append(vals.pop() if distributed and len(vals) == 1 else None)
    optimizer.load_state_dict(state)
    for opt, step in zip(opts, steps):
        if step is None:
            continue
        for st in opt.optimizer.state.values():
            if "step" in st:  # torch's Adam keeps it per parameter; TE / apex FusedAdam do not
                st["step"] = torch.tensor(float(step), dtype=torch.float32)


def checkpoint_each_layer(layers) -> None:
    """Full activation recompute for a stack that lacks it: each layer's forward runs under
    torch.utils.checkpoint while training (only its input is kept; the layer is recomputed
    in backward). The RNG state is replayed, so dropout (if any) matches."""
    import torch
    from torch.utils.checkpoint import checkpoint

    for layer in layers:
        inner = layer.forward

        def forward(*args, _inner=inner, _layer=layer, **kwargs):
            if _layer.training and torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        layer.forward = forward


def _skip_step_in_reshardable_load() -> None:
    """megatron-core's fully-reshardable loader copies every key of a parameter's optimizer
    state from the checkpoint; torch's Adam (used where TE / apex's FusedAdam are absent,
    e.g. on CPU) keeps a per-parameter 'step' that the checkpoint does not store (the step
    lives in the param groups; load_optimizer_state sets it). Copy everything but 'step'."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer as DO

    orig = DO._set_main_param_and_optimizer_states
    if getattr(orig, "_minitron", False):
        return

    def set_states(self, model_param, tensors):
        if "step" in tensors or self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return orig(self, model_param, tensors)
        gi, go = self.model_param_group_index_map[model_param]
        st = self.optimizer.state[self.optimizer.param_groups[gi]["params"][go]]
        step = st.pop("step", None)
        try:
            return orig(self, model_param, tensors)
        finally:
            if step is not None:
                st["step"] = step

    set_states._minitron = True
    DO._set_main_param_and_optimizer_states = set_states


_skip_step_in_reshardable_load()
