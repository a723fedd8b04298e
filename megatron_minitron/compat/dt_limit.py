"""Mamba dt clamp (dt_limit) for megatron-core's MambaMixer.

mamba_ssm's kernels and transformers' NemotronH (>= 5.25, torch path too) clamp
dt = softplus(dt_raw + dt_bias) to `dt_limit` = config.json time_step_limit (default
(0, inf): none) inside the chunked scan; megatron-core's MambaMixer never passes a dt_limit,
so it computes the unclamped function. A model imported from transformers with a clamp
keeps it as `ModelConfig.mamba_dt_clamp_min/max`, and
`apply(model, cfg)` makes every MambaMixer of the model run with it:

- a forward pre-hook / forward hook pair sets a context variable to the mixer's limit for
  the duration of its forward (so recompute and several models in one process stay right);
- the scan functions megatron's mixer module calls, `mamba_chunk_scan_combined` (the
  non-fused path: mamba_ssm's Triton kernel or our compat/ssd.py) and
  `mamba_split_conv1d_scan_combined` (the fused mem-eff path), are wrapped to pass
  `dt_limit=` from that variable. Both kernels take a dt_limit and apply it after
  softplus, as transformers does.

Decoding with an inference cache (megatron's selective_state_update step) has no dt_limit:
a clamped mixer refuses it rather than silently computing another function.
"""

from __future__ import annotations

import contextvars
import functools

_NO_LIMIT = (0.0, float("inf"))
_LIMIT: contextvars.ContextVar = contextvars.ContextVar("mamba_dt_limit", default=None)
_WRAPPED = ("mamba_chunk_scan_combined", "mamba_split_conv1d_scan_combined")


def limit_of(cfg) -> tuple:
    """(lo, hi) of a ModelConfig: 0 means no bound on that side."""
    lo = float(getattr(cfg, "mamba_dt_clamp_min", 0.0) or 0.0)
    hi = float(getattr(cfg, "mamba_dt_clamp_max", 0.0) or 0.0)
    return (lo, hi if hi > 0 else float("inf"))


def _wrap(fn):
    if fn is None or getattr(fn, "_dt_limit_wrapped", False):
        return fn

    @functools.wraps(fn)
    def with_limit(*args, **kwargs):
        lim = _LIMIT.get()
        if lim is not None:
            kwargs["dt_limit"] = lim
        return fn(*args, **kwargs)

    with_limit._dt_limit_wrapped = True
    return with_limit


def install(mixer_mod) -> None:
    """Wrap the scan functions of megatron's mamba_mixer module (idempotent; re-wraps a
    function that was replaced since, e.g. by the CPU fallback)."""
    for name in _WRAPPED:
        if hasattr(mixer_mod, name):
            setattr(mixer_mod, name, _wrap(getattr(mixer_mod, name)))


def _pre(module, args, kwargs):
    if module.dt_limit == _NO_LIMIT:
        return None
    if kwargs.get("inference_context") is not None or kwargs.get("inference_params") is not None or (
            len(args) > 1 and args[1] is not None):
        raise NotImplementedError(
            f"this model clamps Mamba dt to {module.dt_limit} (model.mamba_dt_clamp_min/max); "
            "megatron's cached decoding step cannot apply that clamp. Run full forwards, or "
            "export to Hugging Face and generate there")
    module._dt_limit_token = _LIMIT.set(module.dt_limit)
    return None


def _post(module, args, kwargs, output):
    token = getattr(module, "_dt_limit_token", None)
    if token is not None:
        module._dt_limit_token = None
        _LIMIT.reset(token)
    return None


def apply(model, cfg) -> int:
    """Give every MambaMixer in `model` the dt clamp of `cfg`. Returns how many mixers carry
    a clamp (0 when cfg has none: nothing is installed)."""
    from . import mcore

    lim = limit_of(cfg)
    if lim == _NO_LIMIT:
        return 0
    if lim[0] < 0 or lim[1] <= lim[0]:
        raise ValueError(f"Mamba dt clamp {lim} is not a range 0 <= min < max")
    install(mcore.mamba_mixer_module)
    n = 0
    for m in model.modules():
        if isinstance(m, mcore.MambaMixer):
            m.dt_limit = lim
            if not getattr(m, "_dt_limit_hooked", False):
                m.register_forward_pre_hook(_pre, with_kwargs=True)
                m.register_forward_hook(_post, with_kwargs=True, always_call=True)
                m._dt_limit_hooked = True
            n += 1
    return n
