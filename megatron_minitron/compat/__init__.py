"""Compatibility layer: megatron-core versions, TE vs local specs, CPU fallbacks.

`setup_runtime()` must run once per process before any model is built. On a GPU node
with Transformer Engine and mamba_ssm it changes nothing; otherwise it installs the
pure-PyTorch kernels and the CPU patches, and says so once.
"""

from __future__ import annotations

_done = False
FALLBACKS: list[str] = []


def setup_runtime() -> list[str]:
    """Install whatever fallbacks this machine needs. Returns their names."""
    global _done
    if _done:
        return FALLBACKS
    from . import cpu, mcore

    if not mcore.HAVE_MAMBA_SSM:
        _install_mamba_fallback(mcore.mamba_mixer_module)
        FALLBACKS.append("ssd-scan+gated-rmsnorm(pure torch)")
    if not mcore.te_usable():
        # the hybrid stack hard-codes TENorm for its final norm
        mcore.STACK_MODULE.TENorm = mcore.LocalNorm
        FALLBACKS.append("local-specs(no TE)")
    if not mcore.HAVE_TE:
        from megatron.core.transformer.moe import moe_layer, moe_utils

        from . import latent

        # the router's gating linear tests `te_general_gemm is not None`, a name that is
        # only bound when TE imported (NameError otherwise)
        if not hasattr(moe_utils, "te_general_gemm"):
            moe_utils.te_general_gemm = None
        latent.install(moe_layer)
    if cpu.install():
        FALLBACKS.append("cpu-device-patches")
    _done = True
    return FALLBACKS


def _install_mamba_fallback(mixer_mod) -> None:
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    from .gated_norm import RMSNormGated
    from .ssd import chunk_scan_combined

    class ExtendedRMSNorm(RMSNormGated):
        """Gated RMSNorm with megatron's sharded state dict (TP-sharded along dim 0)."""

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            from megatron.core import parallel_state

            tp_group = getattr(self, "tp_group", None) or parallel_state.get_tensor_model_parallel_group()
            return make_sharded_tensors_for_checkpoint(
                self.state_dict(prefix="", keep_vars=True),
                prefix,
                {"weight": 0},
                sharded_offsets,
                tp_group=tp_group,
                dp_cp_group=metadata["dp_cp_group"],
            )

    mixer_mod.RMSNormGated = RMSNormGated
    mixer_mod.ExtendedRMSNorm = ExtendedRMSNorm
    mixer_mod.mamba_chunk_scan_combined = chunk_scan_combined
    mixer_mod.HAVE_MAMBA_SSM = True
